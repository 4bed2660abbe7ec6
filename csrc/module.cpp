// The single pybind11 module hift_ext._C. Loading it also runs the TORCH_LIBRARY registrations of
// csrc/optim/ops.cpp (torch.ops.hift_ext.*), since every source is linked into this one library.
#include <torch/extension.h>

#include "offload/bindings.h"
#include "optim/bindings.h"
#include "optim/ops.h"

namespace {
bool has_cuda_kernels() {
#ifdef HIFT_EXT_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hift_ext compiled extension: fused optimizer ops (torch.ops.hift_ext) and offload engine";
  m.def("has_cuda_kernels", &has_cuda_kernels,
        "True when this build contains the CUDA kernels (compiled with nvcc).");
  m.def("cpu_kernel_isa", &hift_ext::optim::cpu_kernel_isa,
        "Instruction set of the CPU optimizer kernels in use: 'avx2' or 'generic' "
        "(HIFT_EXT_CPU_ISA=generic forces the portable ones).");
  hift_ext::bind_offload(m);
  hift_ext::bind_optim_calls(m);
}
