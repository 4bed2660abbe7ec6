#pragma once
#include <torch/extension.h>

namespace hift_ext {
// Adds the direct entry points of the fused optimizer ops to the extension module
// (csrc/optim/bindings.cpp).
void bind_optim_calls(pybind11::module_& m);
}  // namespace hift_ext
