// pybind11 bindings of the offload engine (hift_ext._C.OffloadEngine); the Python face with its
// documentation is hift_ext/offload.py.
#include "bindings.h"

#include "engine.h"

namespace hift_ext {

void bind_offload(pybind11::module_& m) {
  namespace py = pybind11;
  using offload::Engine;
  using G = py::call_guard<py::gil_scoped_release>;
  py::class_<Engine, std::shared_ptr<Engine>>(m, "OffloadEngine", R"doc(
Optimizer-state offload engine (C++). Use hift_ext.offload.OffloadEngine, the Python layer.
)doc")
      .def(py::init<const std::string&, int64_t, int64_t, double, bool>(), py::arg("device"),
           py::arg("num_slots") = 2, py::arg("pinned") = -1, py::arg("debug_delay_us") = 0.0,
           py::arg("debug") = false)
      .def("add_group", &Engine::add_group, G())
      .def("remove_group", &Engine::remove_group, G())
      .def("has_group", &Engine::has_group)
      .def("groups", &Engine::groups)
      .def("group_bytes", &Engine::group_bytes)
      .def("set_pieces", &Engine::set_pieces, G())
      .def("num_pieces", &Engine::num_pieces)
      .def("piece_bytes", &Engine::piece_bytes)
      .def("set_device_budget", &Engine::set_device_budget, G())
      .def("reserve", &Engine::reserve, G())
      .def("prefetch", &Engine::prefetch, G())
      .def("fetch", &Engine::fetch, G())
      .def("release", &Engine::release, G())
      .def("flush", &Engine::flush, G())
      .def("host_tensors", &Engine::host_tensors, G())
      .def("host_views", &Engine::host_views)
      .def("load_host", &Engine::load_host, G())
      .def("residency", &Engine::residency)
      .def("synchronize", &Engine::synchronize, G())
      .def("set_tuning", &Engine::set_tuning, py::arg("pipeline_bytes"), py::arg("copy_threads"))
      .def("tuning", &Engine::tuning)
      .def("inject_fault", &Engine::inject_fault, py::arg("kind"), py::arg("after") = 0)
      .def("memory_report", &Engine::memory_report)
      .def("stats", &Engine::stats)
      .def("close", &Engine::close, G())
      .def_property_readonly("device", &Engine::device_str)
      .def_property_readonly("num_slots", &Engine::num_slots)
      .def_property_readonly("is_cuda", &Engine::is_cuda);
}

}  // namespace hift_ext
