// The CPU kernels, written once and compiled per instruction set: cpu_generic.cpp (baseline
// flags) and cpu_avx2.cpp (AVX2 + FMA via a target pragma). Define HIFT_CPU_ISA before including.
//
// One at::parallel_for over the concatenated elements of ALL tensors of a call. Real layer groups
// are lists of many small tensors; a parallel region per tensor pays a fork/join each (torch's
// fused CPU AdamW does, and drops to ~12 GB/s on 2,000 x 4K tensors). Splitting the total element
// count evenly keeps every thread streaming at one region per call. Each thread finds its first
// tensor by binary search over prefix offsets, then walks tensors in order. Inside a tensor: a
// SIMD body over 2 x Vectorized<float> (one Vectorized<bf16/fp16> worth) calling the update.h
// templates with V = Vectorized<float>; the tail runs the same SIMD step on padded copies. Loads
// and stores follow the call's storage policy (update.h): plain (every stream in the param's
// dtype) or fp32 master weights (fp32 master and states, grad in the param's dtype, the param
// written as the master rounded to nearest even).
//
// No include guard on purpose: this file is included once per ISA translation unit.
#ifndef HIFT_CPU_ISA
#error "define HIFT_CPU_ISA before including cpu_kernels.h"
#endif

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <type_traits>

#include "cpu_work.h"
#include "update.h"

namespace hift_ext {
namespace optim {
inline namespace HIFT_UPDATE_NS {

using Vec = at::vec::Vectorized<float>;

template <>
struct VecOps<Vec> {
  static Vec splat(float x) { return Vec(x); }
  static Vec neg(const Vec& x) { return x.neg(); }
  static Vec sqrt(const Vec& x) { return x.sqrt(); }
  static Vec max(const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }  // NaN-propagating
};

}  // namespace HIFT_UPDATE_NS

namespace cpu {
namespace HIFT_CPU_ISA {
namespace {

// Loads/stores 2 float vectors worth of T (bf16/fp16 are widened to fp32 for the math).
template <class T>
struct Io {
  static_assert(at::vec::Vectorized<T>::size() == 2 * Vec::size(), "unexpected vector widths");
  static inline void load(const T* p, Vec& a, Vec& b) {
    std::tie(a, b) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
  }
  static inline void store(T* p, const Vec& a, const Vec& b) {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
};
template <>
struct Io<float> {
  static inline void load(const float* p, Vec& a, Vec& b) {
    a = Vec::loadu(p);
    b = Vec::loadu(p + Vec::size());
  }
  static inline void store(float* p, const Vec& a, const Vec& b) {
    a.store(p);
    b.store(p + Vec::size());
  }
};
constexpr int64_t kSimd = 2 * Vec::size();

// Elements per task below which a call stays on one thread (fork/join would cost more).
constexpr int64_t kGrain = 32768;

// Runs f(work, begin, end) over every tensor's [begin, end) slice, all tensors in one region.
template <class F>
void parallel_over(const std::vector<Work>& work, const F& f) {
  std::vector<int64_t> offsets(work.size() + 1, 0);
  for (size_t i = 0; i < work.size(); ++i) offsets[i + 1] = offsets[i] + work[i].numel;
  const int64_t total = offsets.back();
  if (total == 0) return;
  at::parallel_for(0, total, kGrain, [&](int64_t begin, int64_t end) {
    // Last tensor whose offset <= begin (skips empty tensors that share its offset).
    size_t t = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
    while (begin < end && t < work.size()) {
      const int64_t stop = std::min(end, offsets[t + 1]);
      if (stop > begin) f(work[t], begin - offsets[t], stop - offsets[t]);
      begin = stop;
      ++t;
    }
  });
}

template <class F>
void dispatch_dtype(c10::ScalarType t, const F& f) {
  switch (t) {
    case c10::ScalarType::Float: f(float{}); break;
    case c10::ScalarType::BFloat16: f(c10::BFloat16{}); break;
    case c10::ScalarType::Half: f(c10::Half{}); break;
    default: unsupported_dtype(t);  // unreachable: check_inputs rejects other dtypes
  }
}

template <class C>
Flags flags_of(const C& c) {
  Flags f;
  f.maximize = c.maximize;
  f.has_wd = c.has_wd;
  f.has_scale = c.has_scale;
  return f;
}

// One SIMD step (kSimd elements from offset i) of run_span.
template <class S, int NS, class Op>
C10_ALWAYS_INLINE void simd_step(const StreamPtrs<S, NS>& q, int64_t i, bool load_states,
                                  const Op& op) {
  constexpr int kNS = NS > 0 ? NS : 1;
  Vec w0, w1, g0, g1, s0[kNS], s1[kNS];
  for (int k = 0; k < kNS; ++k) s0[k] = s1[k] = Vec(0.f);  // fresh (or dummy: NS == 0) states
  Io<typename S::weight_t>::load(q.weight + i, w0, w1);
  Io<typename S::grad_t>::load(q.grad + i, g0, g1);
  if (load_states) {
    for (int k = 0; k < NS; ++k) Io<typename S::state_t>::load(q.state[k] + i, s0[k], s1[k]);
  }
  op(w0, g0, s0);
  op(w1, g1, s1);
  Io<typename S::weight_t>::store(q.weight + i, w0, w1);
  if (S::kMaster) Io<typename S::param_t>::store(q.param + i, w0, w1);
  for (int k = 0; k < NS; ++k) Io<typename S::state_t>::store(q.state[k] + i, s0[k], s1[k]);
}

// Runs op over elements [b, e) of one tensor with storage policy S (update.h) and NS states:
// op(Vec& weight, Vec grad, Vec (&states)[max(NS,1)]) updates 8 elements in fp32. Loads widen
// weight, grad and states from their storage types (states are 0 when !load_states: SGD's first
// step, whose fresh buffer may be uninitialized memory); stores write weight and states back and,
// with masters, the weight rounded into the param.
//
// The tail (< kSimd elements, at the end of a tensor or of a thread's share) goes through the SAME
// SIMD step on zero-padded copies, not through scalar code: GCC contracts a*b+c into an FMA in
// C++ (-ffp-contract=fast is its default even with -std=c++20) and does so differently in scalar
// and vector code (and in scalar code even per template instantiation), so a scalar tail gave
// elements near a tensor end or a thread boundary different last-bit results than the body, and
// the master variant different bits than the plain one. With one code path every element's
// result is independent of its position, of the thread count and of the storage policy.
template <class S, int NS, class Op>
void run_span(const Work& w, int64_t b, int64_t e, bool load_states, const Op& op) {
  using W = typename S::weight_t;
  using G = typename S::grad_t;
  using St = typename S::state_t;
  using P = typename S::param_t;
  constexpr int kNS = NS > 0 ? NS : 1;
  const StreamPtrs<S, NS> q = stream_ptrs<S, NS>(w.weight, w.grad, w.state.data(), w.param, b);
  const int64_t n = e - b;
  int64_t i = 0;
  for (; i + kSimd <= n; i += kSimd) simd_step(q, i, load_states, op);
  const int64_t r = n - i;
  if (r == 0) return;
  alignas(64) W wb[kSimd];
  alignas(64) G gb[kSimd];
  alignas(64) St sb[kNS][kSimd];
  alignas(64) P pb[kSimd];
  std::memset(static_cast<void*>(wb), 0, sizeof(wb));
  std::memset(static_cast<void*>(gb), 0, sizeof(gb));
  std::memset(static_cast<void*>(sb), 0, sizeof(sb));
  std::memcpy(static_cast<void*>(wb), q.weight + i, r * sizeof(W));
  std::memcpy(static_cast<void*>(gb), q.grad + i, r * sizeof(G));
  if (load_states) {
    for (int k = 0; k < NS; ++k)
      std::memcpy(static_cast<void*>(sb[k]), q.state[k] + i, r * sizeof(St));
  }
  StreamPtrs<S, NS> t;
  t.weight = wb;
  t.grad = gb;
  for (int k = 0; k < kNS; ++k) t.state[k] = sb[k];
  t.param = pb;
  simd_step(t, 0, load_states, op);
  std::memcpy(static_cast<void*>(q.weight + i), wb, r * sizeof(W));
  if (S::kMaster) std::memcpy(static_cast<void*>(q.param + i), pb, r * sizeof(P));
  for (int k = 0; k < NS; ++k)
    std::memcpy(static_cast<void*>(q.state[k] + i), sb[k], r * sizeof(St));
}

// ---------------------------------------------------------------- AdamW
AdamWArgs<Vec> adamw_args(const AdamWCall& c, const Work& w) {
  return {Vec(c.lerp_w), Vec(c.beta2), Vec(c.one_minus_beta2), Vec(c.decay),
          Vec(c.eps),    Vec(w.s0),    Vec(w.s1),              Vec(c.grad_scale)};
}

template <class S, bool AMS>
void adamw_span(const Work& w, int64_t b, int64_t e, const AdamWCall& c) {
  const AdamWArgs<Vec> a = adamw_args(c, w);
  const Flags f = flags_of(c);
  const bool small = c.lerp_small;
  constexpr int NS = AMS ? 3 : 2;  // exp_avg, exp_avg_sq[, max_exp_avg_sq]
  run_span<S, NS>(w, b, e, true, [a, small, f](Vec& p, Vec g, Vec (&s)[NS]) {
    adamw_update<AMS>(p, g, s[0], s[1], s[NS - 1], a, small, f);  // s[NS-1] only used if AMS
  });
}

// ---------------------------------------------------------------- AdaGrad
AdagradArgs<Vec> adagrad_args(const AdagradCall& c, const Work& w) {
  return {Vec(c.wd), Vec(c.eps), Vec(w.s0), Vec(c.grad_scale)};
}

template <class S>
void adagrad_span(const Work& w, int64_t b, int64_t e, const AdagradCall& c) {
  const AdagradArgs<Vec> a = adagrad_args(c, w);
  const Flags f = flags_of(c);
  run_span<S, 1>(w, b, e, true,
                 [a, f](Vec& p, Vec g, Vec (&s)[1]) { adagrad_update(p, g, s[0], a, f); });
}

// ---------------------------------------------------------------- SGD
SgdArgs<Vec> sgd_args(const SgdCall& c) {
  return {Vec(c.wd), Vec(c.momentum), Vec(c.one_minus_dampening), Vec(c.neg_lr), Vec(c.grad_scale)};
}

template <class S, bool MOMENTUM>
void sgd_span(const Work& w, int64_t b, int64_t e, const SgdCall& c) {
  const SgdArgs<Vec> a = sgd_args(c);
  const Flags f = flags_of(c);
  SgdFlags sf;
  sf.has_momentum = MOMENTUM;
  sf.nesterov = c.nesterov;
  sf.first_step = c.first_step;
  constexpr int NS = MOMENTUM ? 1 : 0;
  // The first step overwrites the fresh buffer: never read it (it may be uninitialized memory).
  run_span<S, NS>(w, b, e, !sf.first_step, [a, f, sf](Vec& p, Vec g, Vec (&s)[1]) {
    sgd_update(p, g, s[0], a, f, sf);  // s[0] is a dummy without momentum
  });
}

}  // namespace

// Calls f(S{}) with the storage policy of a tensor: its param dtype, plain or with a master.
template <class F>
void dispatch_storage(c10::ScalarType t, bool master, const F& f) {
  dispatch_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    if (master) f(MasterStorage<T>{});
    else f(PlainStorage<T>{});
  });
}

void adamw(const std::vector<Work>& work, const AdamWCall& call) {
  auto run = [&](auto ams) {
    constexpr bool AMS = decltype(ams)::value;
    parallel_over(work, [&](const Work& w, int64_t b, int64_t e) {
      dispatch_storage(w.dtype, call.master,
                       [&](auto s) { adamw_span<decltype(s), AMS>(w, b, e, call); });
    });
  };
  if (call.amsgrad) run(std::true_type{});
  else run(std::false_type{});
}

void adagrad(const std::vector<Work>& work, const AdagradCall& call) {
  parallel_over(work, [&](const Work& w, int64_t b, int64_t e) {
    dispatch_storage(w.dtype, call.master,
                     [&](auto s) { adagrad_span<decltype(s)>(w, b, e, call); });
  });
}

void sgd(const std::vector<Work>& work, const SgdCall& call) {
  auto run = [&](auto mom) {
    constexpr bool MOMENTUM = decltype(mom)::value;
    parallel_over(work, [&](const Work& w, int64_t b, int64_t e) {
      dispatch_storage(w.dtype, call.master,
                       [&](auto s) { sgd_span<decltype(s), MOMENTUM>(w, b, e, call); });
    });
  };
  if (call.has_momentum) run(std::true_type{});
  else run(std::false_type{});
}

}  // namespace HIFT_CPU_ISA
}  // namespace cpu
}  // namespace optim
}  // namespace hift_ext
