// Per-element update math of AdamW, AdaGrad and SGD: the single source of truth.
//
// The same templates are instantiated by the CPU kernel (cpu_kernels.h) with
// V = at::vec::Vectorized<float> (the SIMD body, and the tail on padded copies) and by the CUDA
// kernel (cuda.cu) with V = float. So a formula changes in exactly one place for every device and
// dtype.
//
// Every formula mirrors torch.optim's single-tensor implementation operation by operation
// (torch/optim/adam.py, adagrad.py, sgd.py), with fp32 math ("opmath") for fp32/bf16/fp16 storage:
//   AdamW : p *= 1 - lr*wd; m.lerp_(g, 1-b1); v = v*b2 + (1-b2)*g*g; [vmax = max(vmax, v)]
//           p += -(lr/bc1) * m / (sqrt(v)/sqrt(bc2) + eps)
//   AdaGrad: g += wd*p; s += g*g; p += -clr * g / (sqrt(s) + eps),  clr = lr/(1+(step-1)*lr_decay)
//   SGD   : g += wd*p; buf = first ? g : buf*mom + (1-damp)*g; g = nesterov ? g + mom*buf : buf;
//           p += -lr * g
// Scalars derived from the python floats (1 - lr*wd, bias corrections, ...) are computed in double
// and rounded once to float, exactly as torch does when it passes a python scalar to a float op.
//
// The math sees fp32 values only. Where they are loaded from and stored to is a storage policy
// (end of this file): PlainStorage<T> (param, grad and states all T; the update reads and writes
// the param) or MasterStorage<T> (fp32 master weights: the update reads and writes the fp32
// master with fp32 states, reads a T grad, and stores the master rounded to T into the param).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define HIFT_HD __host__ __device__ __forceinline__
#else
#define HIFT_HD inline
#endif

// HIFT_UPDATE_NS: the CPU kernels are compiled twice (generic and AVX2, see cpu_kernels.h); each
// copy puts these templates in its own inline namespace so the two instantiations of e.g.
// adamw_update<false, float> never share a symbol (the linker must not pick the AVX2 one for the
// generic path).
#ifndef HIFT_UPDATE_NS
#define HIFT_UPDATE_NS portable
#endif

namespace hift_ext {
namespace optim {
inline namespace HIFT_UPDATE_NS {

// Element-wise helpers a value type V must provide. Specialized for float here and for
// at::vec::Vectorized<float> in cpu_kernels.h (a template specialization is found at
// instantiation, so this header needs no ATen include and stays valid for nvcc device code and
// plain g++).
template <class V>
struct VecOps;

template <>
struct VecOps<float> {
  static HIFT_HD float splat(float x) { return x; }
  static HIFT_HD float neg(float x) { return -x; }
  static HIFT_HD float sqrt(float x) {
#if defined(__CUDA_ARCH__)
    return ::sqrtf(x);  // IEEE round-to-nearest (we never build with --use_fast_math)
#else
    return std::sqrt(x);
#endif
  }
  // torch.maximum semantics: NaN propagates from either side.
  static HIFT_HD float max(float a, float b) { return (a != a) ? a : (a > b ? a : b); }
};

// Call-wide flags (uniform over all elements, so branches on them are perfectly predicted).
struct Flags {
  bool maximize = false;
  bool has_wd = false;      // weight_decay != 0
  bool has_scale = false;   // grad_scale given: grads are divided by it in registers
};

// ---------------------------------------------------------------------------------------------
// AdamW
// ---------------------------------------------------------------------------------------------
template <class V>
struct AdamWArgs {
  V lerp_w;      // lerp weight w = 1-beta1 when |w| < 0.5, else w - 1 (torch's two-sided lerp)
  V beta2;
  V one_minus_beta2;
  V decay;       // 1 - lr*weight_decay
  V eps;
  V neg_step;    // -lr / (1 - beta1^step)          (per tensor: depends on its step)
  V bc2_sqrt;    // sqrt(1 - beta2^step)            (per tensor)
  V grad_scale;  // only read when Flags::has_scale
};

// Per-tensor scalars from the step count, in double like the python code (beta**step).
struct AdamWStepScalars {
  float neg_step;
  float bc2_sqrt;
};
HIFT_HD AdamWStepScalars adamw_step_scalars(double lr, double beta1, double beta2, double step) {
  const double bc1 = 1.0 - ::pow(beta1, step);
  const double bc2 = 1.0 - ::pow(beta2, step);
  return {static_cast<float>(-(lr / bc1)), static_cast<float>(::sqrt(bc2))};
}

// a * b rounded by itself: nvcc would fuse `1 - a*b` into one FMA (the CUDA kernel computes
// these scalars on the device when lr is a tensor), the host compiler does not; both must agree.
HIFT_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

// Call-wide scalars from the python floats (on the host, or per block on the device).
struct AdamWHostScalars {
  float lerp_w;
  bool lerp_small;  // torch.lerp: |w| < 0.5 ? m + w*(g-m) : g - (1-w)*(g-m)
  float beta2, one_minus_beta2, decay, eps;
};
HIFT_HD AdamWHostScalars adamw_host_scalars(double lr, double beta1, double beta2, double wd,
                                            double eps) {
  AdamWHostScalars s;
  const float w = static_cast<float>(1.0 - beta1);
  s.lerp_small = (w < 0.5f && w > -0.5f);
  // For |w| >= 0.5, (1-w) is exact in float (Sterbenz), so g + (w-1)*(g-m) == g - (1-w)*(g-m).
  s.lerp_w = s.lerp_small ? w : w - 1.0f;
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  s.decay = static_cast<float>(1.0 - mul_rn(lr, wd));
  s.eps = static_cast<float>(eps);
  return s;
}

// One AdamW element (or one SIMD vector of elements). vmax is only touched when AMSGRAD.
template <bool AMSGRAD, class V>
HIFT_HD void adamw_update(V& p, V g, V& m, V& v, V& vmax, const AdamWArgs<V>& a, bool lerp_small,
                          const Flags& f) {
  using O = VecOps<V>;
  if (f.has_scale) g = g / a.grad_scale;  // unscale in registers (AMP), grads stay untouched
  if (f.maximize) g = O::neg(g);
  if (f.has_wd) p = p * a.decay;          // decoupled decay: param.mul_(1 - lr*wd)
  // exp_avg.lerp_(grad, 1 - beta1)
  m = lerp_small ? m + a.lerp_w * (g - m) : g + a.lerp_w * (g - m);
  // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1-beta2): addcmul is self + (value*t1)*t2
  v = v * a.beta2 + a.one_minus_beta2 * g * g;
  V src = v;
  if (AMSGRAD) {
    vmax = O::max(vmax, v);  // torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
    src = vmax;
  }
  const V denom = O::sqrt(src) / a.bc2_sqrt + a.eps;
  // param.addcdiv_(exp_avg, denom, value=-step_size): self + (value*t1)/t2
  p = p + a.neg_step * m / denom;
}

// ---------------------------------------------------------------------------------------------
// AdaGrad
// ---------------------------------------------------------------------------------------------
template <class V>
struct AdagradArgs {
  V wd;
  V eps;
  V neg_clr;     // -lr / (1 + (step-1)*lr_decay)   (per tensor)
  V grad_scale;
};

HIFT_HD float adagrad_neg_clr(double lr, double lr_decay, double step) {
  return static_cast<float>(-(lr / (1.0 + (step - 1.0) * lr_decay)));
}

template <class V>
HIFT_HD void adagrad_update(V& p, V g, V& sum, const AdagradArgs<V>& a, const Flags& f) {
  using O = VecOps<V>;
  if (f.has_scale) g = g / a.grad_scale;
  if (f.maximize) g = O::neg(g);
  if (f.has_wd) g = g + a.wd * p;          // grad.add(param, alpha=weight_decay)
  sum = sum + g * g;                        // state_sum.addcmul_(grad, grad, value=1)
  const V std_ = O::sqrt(sum) + a.eps;      // state_sum.sqrt().add_(eps)
  p = p + a.neg_clr * g / std_;             // param.addcdiv_(grad, std, value=-clr)
}

// ---------------------------------------------------------------------------------------------
// SGD
// ---------------------------------------------------------------------------------------------
template <class V>
struct SgdArgs {
  V wd;
  V momentum;
  V one_minus_dampening;
  V neg_lr;
  V grad_scale;
};

struct SgdFlags {
  bool has_momentum = false;
  bool nesterov = false;
  bool first_step = false;  // torch clones d_p into the fresh buffer on the first step
};

template <class V>
HIFT_HD void sgd_update(V& p, V g, V& buf, const SgdArgs<V>& a, const Flags& f, const SgdFlags& s) {
  using O = VecOps<V>;
  if (f.has_scale) g = g / a.grad_scale;
  if (f.maximize) g = O::neg(g);
  if (f.has_wd) g = g + a.wd * p;          // grad.add(param, alpha=weight_decay)
  if (s.has_momentum) {
    // buf.mul_(momentum).add_(grad, alpha=1-dampening)
    buf = s.first_step ? g : buf * a.momentum + a.one_minus_dampening * g;
    g = s.nesterov ? g + a.momentum * buf : buf;  // grad.add(buf, alpha=momentum)
  }
  p = p + a.neg_lr * g;                     // param.add_(grad, alpha=-lr)
}

// ---------------------------------------------------------------------------------------------
// Storage policies: the element types a tensor's streams are loaded from and stored to. The update
// functions above are the same for every policy; only loads and stores change.
//
// Streams of one tensor, in the order every kernel uses:
//   weight : the value the math calls p, read and written (PlainStorage: the param itself;
//            MasterStorage: the fp32 master weight)
//   grad   : read only, never written (AMP unscaling happens in registers)
//   states : NS optimizer states, read (unless a call says they are fresh) and written
//   param  : MasterStorage only: written, never read; receives the updated master rounded to the
//            param's dtype (round to nearest even: static_cast / at::vec::convert_from_float, the
//            conversion torch's Tensor.to uses), so param == master.to(param.dtype) after a step.
// ---------------------------------------------------------------------------------------------
template <class T>
struct PlainStorage {
  using weight_t = T;
  using grad_t = T;
  using state_t = T;
  using param_t = T;
  static constexpr bool kMaster = false;
};

template <class T>
struct MasterStorage {
  using weight_t = float;
  using grad_t = T;
  using state_t = float;
  using param_t = T;
  static constexpr bool kMaster = true;
};

template <bool MASTER, class T>
using StorageOf = typename std::conditional<MASTER, MasterStorage<T>, PlainStorage<T>>::type;

// Typed pointers of one tensor's streams, already offset to the first element of a span.
template <class S, int NS>
struct StreamPtrs {
  static constexpr int kStates = NS;
  typename S::weight_t* weight;
  const typename S::grad_t* grad;
  typename S::state_t* state[NS > 0 ? NS : 1];
  typename S::param_t* param;  // MasterStorage only (null otherwise)
};

// Builds StreamPtrs from untyped pointers (the CPU work items and the CUDA tensor table store
// them as void*: one table serves every dtype and policy) plus an element offset.
template <class S, int NS>
HIFT_HD StreamPtrs<S, NS> stream_ptrs(void* weight, const void* grad, void* const* states,
                                      void* param, int64_t offset) {
  StreamPtrs<S, NS> q;
  q.weight = static_cast<typename S::weight_t*>(weight) + offset;
  q.grad = static_cast<const typename S::grad_t*>(grad) + offset;
  for (int k = 0; k < (NS > 0 ? NS : 1); ++k)
    q.state[k] = k < NS ? static_cast<typename S::state_t*>(states[k]) + offset : nullptr;
  q.param = S::kMaster ? static_cast<typename S::param_t*>(param) + offset : nullptr;
  return q;
}

// Stores an updated weight value: the weight stream, and for MasterStorage the rounded param.
template <class S, int NS>
HIFT_HD void store_weight(const StreamPtrs<S, NS>& q, int64_t i, float w) {
  q.weight[i] = static_cast<typename S::weight_t>(w);
  if (S::kMaster) q.param[i] = static_cast<typename S::param_t>(w);
}

// One element through the policy: load weight, grad and states as fp32, op(w, g, s) (an update
// function above), store weight (+ param) and states. States enter op as 0 when !load_states
// (SGD's first step: the fresh momentum buffer may be uninitialized memory). The CUDA kernel's
// scalar path; its vector path and the CPU kernel do the same with vector loads and stores.
template <class S, int NS, class Op>
HIFT_HD void update_element(const StreamPtrs<S, NS>& q, int64_t i, bool load_states,
                            const Op& op) {
  float w = static_cast<float>(q.weight[i]);
  float s[NS > 0 ? NS : 1] = {};
  if (load_states) {
    for (int k = 0; k < NS; ++k) s[k] = static_cast<float>(q.state[k][i]);
  }
  op(w, static_cast<float>(q.grad[i]), s);
  store_weight(q, i, w);
  for (int k = 0; k < NS; ++k) q.state[k][i] = static_cast<typename S::state_t>(s[k]);
}

}  // namespace HIFT_UPDATE_NS
}  // namespace optim
}  // namespace hift_ext
