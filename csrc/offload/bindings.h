#pragma once
#include <torch/extension.h>

namespace hift_ext {
// Adds the offload engine's pybind11 classes to the extension module (csrc/offload/bindings.cpp).
void bind_offload(pybind11::module_& m);
}  // namespace hift_ext
