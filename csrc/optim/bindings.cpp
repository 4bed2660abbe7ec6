// Direct entry points of torch.ops.hift_ext.fused_{adamw,adagrad,sgd}_ for the optimizers' eager
// steps: the very same dispatcher call (every dispatch key, autograd and ADInplaceOrView kernels,
// Python modes included), without torch.ops' python-side handling of the arguments, which costs
// more than the whole update of a small parameter list (measured: 8.6 us per call through
// torch.ops for one 16-element tensor on the CPU, most of it argument handling). hift_ext/ops.py
// uses them outside torch.compile tracing and torch.ops otherwise.
#include "bindings.h"

#include "launch_plan.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <stdexcept>
#include <vector>

namespace hift_ext {
namespace {

using TL = at::TensorList;
using OT = std::optional<at::Tensor>;
using Tensors = std::vector<at::Tensor>;

using AdamWFn = void(TL, TL, TL, TL, TL, TL, double, double, double, double, double, bool, bool,
                     TL, const OT&, const OT&, const OT&);
using AdagradFn = void(TL, TL, TL, TL, double, double, double, double, bool, TL, const OT&,
                       const OT&);
using SgdFn = void(TL, TL, TL, double, double, double, bool, double, bool, bool, TL, const OT&,
                   const OT&);

template <class Fn>
c10::TypedOperatorHandle<Fn> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

// Calls f without the GIL; an error reaches python as torch.ops would raise it: RuntimeError with
// the message alone (c10::Error::what() would append a C++ backtrace).
template <class F>
void call_without_gil(const F& f) {
  try {
    pybind11::gil_scoped_release no_gil;
    f();
  } catch (const c10::Error& e) {
    throw std::runtime_error(e.what_without_backtrace());
  }
}

void fused_adamw(const Tensors& params, const Tensors& grads, const Tensors& exp_avgs,
                 const Tensors& exp_avg_sqs, const Tensors& max_exp_avg_sqs,
                 const Tensors& state_steps, double lr, double beta1, double beta2,
                 double weight_decay, double eps, bool amsgrad, bool maximize,
                 const Tensors& master_params, const OT& grad_scale, const OT& found_inf,
                 const OT& lr_tensor) {
  static const auto h = op<AdamWFn>("hift_ext::fused_adamw_");
  call_without_gil([&] {
    h.call(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2,
           weight_decay, eps, amsgrad, maximize, master_params, grad_scale, found_inf, lr_tensor);
  });
}

void fused_adagrad(const Tensors& params, const Tensors& grads, const Tensors& state_sums,
                   const Tensors& state_steps, double lr, double lr_decay, double weight_decay,
                   double eps, bool maximize, const Tensors& master_params, const OT& grad_scale,
                   const OT& found_inf) {
  static const auto h = op<AdagradFn>("hift_ext::fused_adagrad_");
  call_without_gil([&] {
    h.call(params, grads, state_sums, state_steps, lr, lr_decay, weight_decay, eps, maximize,
           master_params, grad_scale, found_inf);
  });
}

void fused_sgd(const Tensors& params, const Tensors& grads, const Tensors& momentum_buffers,
               double lr, double momentum, double dampening, bool nesterov, double weight_decay,
               bool maximize, bool is_first_step, const Tensors& master_params,
               const OT& grad_scale, const OT& found_inf) {
  static const auto h = op<SgdFn>("hift_ext::fused_sgd_");
  call_without_gil([&] {
    h.call(params, grads, momentum_buffers, lr, momentum, dampening, nesterov, weight_decay,
           maximize, is_first_step, master_params, grad_scale, found_inf);
  });
}

// The CUDA launch plan of a list of tensor sizes (launch_plan.h), for tests on any machine: None
// when the list takes one launch over a device table, else per inline launch the (tensor index,
// chunk) that each of its blocks locates.
pybind11::object launch_plan(const std::vector<int64_t>& numels, bool capturing) {
  struct Meta {
    int64_t numel;
    int64_t index;
  };
  std::vector<Meta> tms;
  for (size_t i = 0; i < numels.size(); ++i) tms.push_back({numels[i], static_cast<int64_t>(i)});
  if (optim::plan::use_device_table(tms, capturing)) return pybind11::none();
  pybind11::list launches;
  optim::plan::for_each_inline_table(tms, [&](const optim::plan::InlineTable<Meta>& table,
                                              int64_t blocks) {
    pybind11::list located;
    for (int64_t b = 0; b < blocks; ++b) {
      Meta tm;
      int32_t chunk;
      table.locate(static_cast<int32_t>(b), tm, chunk);
      located.append(pybind11::make_tuple(tm.index, chunk));
    }
    launches.append(located);
  });
  return launches;
}

}  // namespace

void bind_optim_calls(pybind11::module_& m) {
  // Positional arguments in the schema's order (hift_ext/ops.py passes them so).
  m.def("fused_adamw_", &fused_adamw, "torch.ops.hift_ext.fused_adamw_, called directly");
  m.def("fused_adagrad_", &fused_adagrad, "torch.ops.hift_ext.fused_adagrad_, called directly");
  m.def("fused_sgd_", &fused_sgd, "torch.ops.hift_ext.fused_sgd_, called directly");
  m.def("_launch_plan", &launch_plan, pybind11::arg("numels"), pybind11::arg("capturing"),
        "CUDA launch plan of tensors of these sizes (tests): None = one launch over a device "
        "table, else per inline launch the (tensor index, chunk) of each block");
  m.attr("_INLINE_TENSORS") = optim::plan::kInlineTensors;
  m.attr("_CHUNK") = optim::plan::kChunk;
}

}  // namespace hift_ext
