#include "bindings.h"

#include "engine.h"

namespace hift_ext {
// Registers hift_ext._C.OffloadEngine (csrc/offload/engine.{h,cpp}).
void bind_offload(pybind11::module_& m) { offload::bind_engine(m); }
}  // namespace hift_ext
