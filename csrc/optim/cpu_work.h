// Interface between the CPU entry points (cpu.cpp) and the ISA-specific CPU kernels
// (cpu_kernels.h, compiled as cpu_generic.cpp and cpu_avx2.cpp). Plain data only: no type here
// depends on the instruction set a file is compiled for.
#pragma once

#include <c10/core/ScalarType.h>

#include <array>
#include <cstdint>
#include <vector>

namespace hift_ext {
namespace optim {
namespace cpu {

// One tensor of a call: its stream pointers (see the storage policies at the end of update.h),
// its length and the PARAM's dtype, and the per-tensor scalars that depend on its step count
// (AdamW: -step_size, sqrt(bc2); AdaGrad: -clr). Written streams come from mutable_data_ptr(),
// read-only ones from const_data_ptr().
struct Work {
  void* weight = nullptr;          // the param, or its fp32 master when the call has masters
  const void* grad = nullptr;
  std::array<void*, 3> state{};    // AdamW: exp_avg, exp_avg_sq[, max_exp_avg_sq]; AdaGrad: sum;
                                   // SGD: [momentum_buffer]
  void* param = nullptr;           // masters only: receives the master rounded to the param dtype
  int64_t numel = 0;
  c10::ScalarType dtype = c10::ScalarType::Float;
  float s0 = 0.f, s1 = 0.f;
};

struct AdamWCall {
  float lerp_w, beta2, one_minus_beta2, decay, eps, grad_scale;
  bool lerp_small, maximize, has_wd, has_scale, amsgrad, master;
};
struct AdagradCall {
  float wd, eps, grad_scale;
  bool maximize, has_wd, has_scale, master;
};
struct SgdCall {
  float wd, momentum, one_minus_dampening, neg_lr, grad_scale;
  bool maximize, has_wd, has_scale, has_momentum, nesterov, first_step, master;
};

// Raises; defined in cpu.cpp so no error-formatting template is instantiated in an ISA file.
[[noreturn]] void unsupported_dtype(c10::ScalarType t);

#define HIFT_DECLARE_CPU_KERNELS(ISA)                                       \
  namespace ISA {                                                           \
  void adamw(const std::vector<Work>& work, const AdamWCall& call);        \
  void adagrad(const std::vector<Work>& work, const AdagradCall& call);    \
  void sgd(const std::vector<Work>& work, const SgdCall& call);            \
  }

HIFT_DECLARE_CPU_KERNELS(generic)
#if defined(__x86_64__) || defined(_M_X64)
#define HIFT_HAVE_AVX2_KERNELS 1
HIFT_DECLARE_CPU_KERNELS(avx2)
#endif

}  // namespace cpu
}  // namespace optim
}  // namespace hift_ext
