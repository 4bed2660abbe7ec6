// The CPU kernels, written once and compiled per instruction set: cpu_generic.cpp (baseline
// flags) and cpu_avx2.cpp (AVX2 + FMA via a target pragma). Define HIFT_CPU_ISA before including.
//
// One at::parallel_for over the concatenated elements of ALL tensors of a call. Real layer groups
// are lists of many small tensors; a parallel region per tensor pays a fork/join each (torch's
// fused CPU AdamW does, and drops to ~12 GB/s on 2,000 x 4K tensors). Splitting the total element
// count evenly keeps every thread streaming at one region per call. Each thread finds its first
// tensor by binary search over prefix offsets, then walks tensors in order. Inside a tensor: a
// SIMD body over 2 x Vectorized<float> (one Vectorized<bf16/fp16> worth) and a scalar tail, both
// calling the same update.h templates.
//
// No include guard on purpose: this file is included once per ISA translation unit.
#ifndef HIFT_CPU_ISA
#error "define HIFT_CPU_ISA before including cpu_kernels.h"
#endif

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
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

template <class T>
T* at_(void* p, int64_t off) {
  return static_cast<T*>(p) + off;
}

template <class V, class C>
Flags flags_of(const C& c) {
  Flags f;
  f.maximize = c.maximize;
  f.has_wd = c.has_wd;
  f.has_scale = c.has_scale;
  return f;
}

// ---------------------------------------------------------------- AdamW
template <class V>
AdamWArgs<V> adamw_args(const AdamWCall& c, const Work& w) {
  using O = VecOps<V>;
  return {O::splat(c.lerp_w), O::splat(c.beta2), O::splat(c.one_minus_beta2), O::splat(c.decay),
          O::splat(c.eps),    O::splat(w.s0),    O::splat(w.s1),              O::splat(c.grad_scale)};
}

template <class T, bool AMS>
void adamw_span(const Work& w, int64_t b, int64_t e, const AdamWCall& c) {
  const AdamWArgs<float> s = adamw_args<float>(c, w);
  const AdamWArgs<Vec> sv = adamw_args<Vec>(c, w);
  const Flags f = flags_of<float>(c);
  const bool small = c.lerp_small;
  T* p = at_<T>(w.ptr[0], b);
  const T* g = at_<T>(w.ptr[1], b);
  T* m = at_<T>(w.ptr[2], b);
  T* v = at_<T>(w.ptr[3], b);
  T* x = AMS ? at_<T>(w.ptr[4], b) : nullptr;
  const int64_t n = e - b;
  int64_t i = 0;
  for (; i + kSimd <= n; i += kSimd) {
    Vec p0, p1, g0, g1, m0, m1, v0, v1, x0, x1;
    Io<T>::load(p + i, p0, p1);
    Io<T>::load(g + i, g0, g1);
    Io<T>::load(m + i, m0, m1);
    Io<T>::load(v + i, v0, v1);
    if (AMS) Io<T>::load(x + i, x0, x1);
    adamw_update<AMS>(p0, g0, m0, v0, x0, sv, small, f);
    adamw_update<AMS>(p1, g1, m1, v1, x1, sv, small, f);
    Io<T>::store(p + i, p0, p1);
    Io<T>::store(m + i, m0, m1);
    Io<T>::store(v + i, v0, v1);
    if (AMS) Io<T>::store(x + i, x0, x1);
  }
  for (; i < n; ++i) {  // scalar tail: same formula
    float pp = static_cast<float>(p[i]), mm = static_cast<float>(m[i]);
    float vv = static_cast<float>(v[i]), xx = AMS ? static_cast<float>(x[i]) : 0.f;
    adamw_update<AMS>(pp, static_cast<float>(g[i]), mm, vv, xx, s, small, f);
    p[i] = static_cast<T>(pp);
    m[i] = static_cast<T>(mm);
    v[i] = static_cast<T>(vv);
    if (AMS) x[i] = static_cast<T>(xx);
  }
}

// ---------------------------------------------------------------- AdaGrad
template <class V>
AdagradArgs<V> adagrad_args(const AdagradCall& c, const Work& w) {
  using O = VecOps<V>;
  return {O::splat(c.wd), O::splat(c.eps), O::splat(w.s0), O::splat(c.grad_scale)};
}

template <class T>
void adagrad_span(const Work& w, int64_t b, int64_t e, const AdagradCall& c) {
  const AdagradArgs<float> s = adagrad_args<float>(c, w);
  const AdagradArgs<Vec> sv = adagrad_args<Vec>(c, w);
  const Flags f = flags_of<float>(c);
  T* p = at_<T>(w.ptr[0], b);
  const T* g = at_<T>(w.ptr[1], b);
  T* sum = at_<T>(w.ptr[2], b);
  const int64_t n = e - b;
  int64_t i = 0;
  for (; i + kSimd <= n; i += kSimd) {
    Vec p0, p1, g0, g1, s0, s1;
    Io<T>::load(p + i, p0, p1);
    Io<T>::load(g + i, g0, g1);
    Io<T>::load(sum + i, s0, s1);
    adagrad_update(p0, g0, s0, sv, f);
    adagrad_update(p1, g1, s1, sv, f);
    Io<T>::store(p + i, p0, p1);
    Io<T>::store(sum + i, s0, s1);
  }
  for (; i < n; ++i) {
    float pp = static_cast<float>(p[i]), ss = static_cast<float>(sum[i]);
    adagrad_update(pp, static_cast<float>(g[i]), ss, s, f);
    p[i] = static_cast<T>(pp);
    sum[i] = static_cast<T>(ss);
  }
}

// ---------------------------------------------------------------- SGD
template <class V>
SgdArgs<V> sgd_args(const SgdCall& c) {
  using O = VecOps<V>;
  return {O::splat(c.wd), O::splat(c.momentum), O::splat(c.one_minus_dampening), O::splat(c.neg_lr),
          O::splat(c.grad_scale)};
}

template <class T>
void sgd_span(const Work& w, int64_t b, int64_t e, const SgdCall& c) {
  const SgdArgs<float> s = sgd_args<float>(c);
  const SgdArgs<Vec> sv = sgd_args<Vec>(c);
  const Flags f = flags_of<float>(c);
  SgdFlags sf;
  sf.has_momentum = c.has_momentum;
  sf.nesterov = c.nesterov;
  sf.first_step = c.first_step;
  // The first step overwrites the fresh buffer: never read it (it may be uninitialized memory).
  const bool read_buf = sf.has_momentum && !sf.first_step;
  T* p = at_<T>(w.ptr[0], b);
  const T* g = at_<T>(w.ptr[1], b);
  T* buf = sf.has_momentum ? at_<T>(w.ptr[2], b) : nullptr;
  const int64_t n = e - b;
  int64_t i = 0;
  for (; i + kSimd <= n; i += kSimd) {
    Vec p0, p1, g0, g1, b0(0.f), b1(0.f);
    Io<T>::load(p + i, p0, p1);
    Io<T>::load(g + i, g0, g1);
    if (read_buf) Io<T>::load(buf + i, b0, b1);
    sgd_update(p0, g0, b0, sv, f, sf);
    sgd_update(p1, g1, b1, sv, f, sf);
    Io<T>::store(p + i, p0, p1);
    if (sf.has_momentum) Io<T>::store(buf + i, b0, b1);
  }
  for (; i < n; ++i) {
    float pp = static_cast<float>(p[i]);
    float bb = read_buf ? static_cast<float>(buf[i]) : 0.f;
    sgd_update(pp, static_cast<float>(g[i]), bb, s, f, sf);
    p[i] = static_cast<T>(pp);
    if (sf.has_momentum) buf[i] = static_cast<T>(bb);
  }
}

}  // namespace

void adamw(const std::vector<Work>& work, const AdamWCall& call) {
  auto run = [&](auto ams) {
    constexpr bool AMS = decltype(ams)::value;
    parallel_over(work, [&](const Work& w, int64_t b, int64_t e) {
      dispatch_dtype(w.dtype, [&](auto tag) { adamw_span<decltype(tag), AMS>(w, b, e, call); });
    });
  };
  if (call.amsgrad) run(std::true_type{});
  else run(std::false_type{});
}

void adagrad(const std::vector<Work>& work, const AdagradCall& call) {
  parallel_over(work, [&](const Work& w, int64_t b, int64_t e) {
    dispatch_dtype(w.dtype, [&](auto tag) { adagrad_span<decltype(tag)>(w, b, e, call); });
  });
}

void sgd(const std::vector<Work>& work, const SgdCall& call) {
  parallel_over(work, [&](const Work& w, int64_t b, int64_t e) {
    dispatch_dtype(w.dtype, [&](auto tag) { sgd_span<decltype(tag)>(w, b, e, call); });
  });
}

}  // namespace HIFT_CPU_ISA
}  // namespace cpu
}  // namespace optim
}  // namespace hift_ext
