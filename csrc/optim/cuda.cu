// CUDA kernels: multi-tensor apply, ONE launch for a whole list of tensors.
//
// Layout of a launch: a tensor table (per tensor: pointers, size, step pointer, dtype) and a grid
// with a block per 64K-element chunk. The table travels one of two ways:
//   - short lists (up to kInlineTensors non-empty tensors): BY VALUE in the kernel's arguments,
//     with the first block of every tensor (InlineTable). Nothing is uploaded: the launch is as
//     cheap as torch's fused kernel, whose metadata are kernel arguments too, and a CUDA graph
//     keeps the table in its kernel node, so a captured step replays with no host work.
//   - long lists: in device memory (DeviceTable), built per call in pinned memory as
//     [TensorMeta x num_tensors][BlockMeta x num_blocks] and copied asynchronously on the current
//     stream. Any number of tensors fits ONE launch (torch's kernel-argument metadata split a
//     list into launches of a few dozen tensors), which is what wins on many small tensors.
//     During CUDA graph capture a long list is launched as several inline launches instead (a
//     pinned upload cannot be captured: its host buffer would be recycled while replays read it).
//
// Per block: the chunk is processed with 16-byte vector loads/stores (4 fp32 or 8 bf16/fp16), 8
// elements per thread per iteration (ILP: all loads are issued before the math), then a scalar
// tail for sizes that are not a multiple of the vector width. If any of the tensor's pointers is
// not 16-byte aligned (a view with an offset), the whole chunk takes the scalar path. Chunks start
// at multiples of 64K elements, so alignment is a property of the tensor, not of the chunk.
//
// Storage policies (update.h): without masters every stream has the param's dtype; with fp32
// master weights the master and states are fp32 and the grad and param have the param's dtype.
// A vector step covers one 16-byte vector of the grad (the narrowest stream) and as many 16-byte
// vectors of each wider stream as that takes (bf16 param with masters: 8 elements = 1 x 16 B of
// grad and param, 2 x 16 B of master and each state).
//
// Math: fp32 for every storage dtype, the per-element functions of update.h (shared with the CPU
// kernel). step / grad_scale / found_inf (and AdamW's lr when given as a tensor) are read from
// device memory inside the kernel (no host sync, graph-capturable); the call's scalars are
// computed once per block in double, like the CPU path and torch's python code.
#include "launch_plan.h"
#include "ops.h"
#include "update.h"

#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace hift_ext {
namespace optim {
namespace {

constexpr int kBlock = 512;       // threads per block
constexpr int64_t kChunk = plan::kChunk;  // elements per block (multiple of every vector width)
constexpr int kElemsPerThread = 8;  // per iteration: 2 x float4, or 1 x 8 bf16/fp16

enum DTypeCode : int32_t { kF32 = 0, kBF16 = 1, kF16 = 2 };

struct TensorMeta {
  void* weight;        // the param, or its fp32 master when the call has masters (read, written)
  const void* grad;    // read only
  void* state[3];      // optimizer states (unused entries are null)
  void* param;         // masters only: receives the master rounded to the param dtype (written)
  const float* step;   // state_steps[i] (null for SGD)
  int64_t numel;
  int32_t dtype;       // DTypeCode of the param
  int32_t pad;
};
static_assert(sizeof(TensorMeta) == 72, "TensorMeta layout");

struct BlockMeta {
  int32_t tensor;
  int32_t chunk;
};

int32_t dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default: TORCH_CHECK(false, "hift_ext: unsupported dtype ", t);
  }
}

struct DeviceMeta {
  at::Tensor buffer;  // keeps the device copy alive until the launch is enqueued
  const TensorMeta* tensors = nullptr;
  const BlockMeta* blocks = nullptr;
  int64_t num_blocks = 0;
};

// Builds the metadata in pinned memory and copies it to the device on the current stream. The
// copy from a pinned caching-host-allocator block records an event, so the host block is not
// reused before the copy ran; the device block is freed stream-ordered after the kernel.
DeviceMeta upload_meta(const std::vector<TensorMeta>& tms, const at::Device& device,
                       const char* op) {
  // Never called during capture (launch_table launches inline tables then): the pinned buffer
  // would be recycled while a graph replay still reads the device copy.
  TORCH_INTERNAL_ASSERT(at::cuda::currentStreamCaptureStatus() == at::cuda::CaptureStatus::None);
  int64_t num_blocks = 0;
  for (const auto& t : tms) num_blocks += plan::chunks_of(t.numel);
  TORCH_CHECK(num_blocks < INT32_MAX && tms.size() < static_cast<size_t>(INT32_MAX), op,
              ": too many chunks for one launch");
  DeviceMeta out;
  out.num_blocks = num_blocks;
  if (num_blocks == 0) return out;
  const int64_t tensor_bytes = static_cast<int64_t>(tms.size() * sizeof(TensorMeta));
  const int64_t bytes = tensor_bytes + num_blocks * static_cast<int64_t>(sizeof(BlockMeta));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  auto* h = static_cast<uint8_t*>(host.mutable_data_ptr());
  std::memcpy(h, tms.data(), tensor_bytes);
  auto* bm = reinterpret_cast<BlockMeta*>(h + tensor_bytes);
  int64_t b = 0;
  for (size_t t = 0; t < tms.size(); ++t) {
    const int64_t chunks = plan::chunks_of(tms[t].numel);
    for (int64_t c = 0; c < chunks; ++c) bm[b++] = {static_cast<int32_t>(t), static_cast<int32_t>(c)};
  }
  out.buffer = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(device));
  out.buffer.copy_(host, /*non_blocking=*/true);
  const auto* d = static_cast<const uint8_t*>(out.buffer.const_data_ptr());
  out.tensors = reinterpret_cast<const TensorMeta*>(d);
  out.blocks = reinterpret_cast<const BlockMeta*>(d + tensor_bytes);
  return out;
}

// ------------------------------------------------------------------ tensor tables
// Short lists: InlineTable (launch_plan.h) in the kernel arguments. Kernel arguments stay under the
// 4 KB every architecture and CUDA version accepts.
using InlineTable = plan::InlineTable<TensorMeta>;
static_assert(sizeof(InlineTable) + 256 <= 4096, "InlineTable too large for kernel arguments");

// A long list's table, uploaded to device memory.
struct DeviceTable {
  const TensorMeta* tensors;
  const BlockMeta* blocks;
  __device__ __forceinline__ void locate(int32_t block, TensorMeta& tm, int32_t& chunk) const {
    const BlockMeta bm = blocks[block];
    tm = tensors[bm.tensor];
    chunk = bm.chunk;
  }
};

// Launches the list: launch(table, num_blocks) is called with an InlineTable (a short list, or
// each piece of a long list during graph capture) or once with a DeviceTable (a long list).
template <class Launch>
void launch_table(const std::vector<TensorMeta>& tms, const at::Device& device, const char* op,
                  const Launch& launch) {
  const bool capturing =
      at::cuda::currentStreamCaptureStatus() != at::cuda::CaptureStatus::None;
  if (plan::use_device_table(tms, capturing)) {
    const DeviceMeta meta = upload_meta(tms, device, op);
    if (meta.num_blocks > 0) launch(DeviceTable{meta.tensors, meta.blocks}, meta.num_blocks);
    return;
  }
  try {
    plan::for_each_inline_table(tms, launch);
  } catch (const std::length_error& e) {
    TORCH_CHECK(false, op, ": ", e.what());
  }
}

// ------------------------------------------------------------------ device-side chunk engine
template <class T>
struct alignas(16) Pack {
  T v[16 / sizeof(T)];
};

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// E consecutive elements of U held as 16-byte packs (E is a multiple of 16 / sizeof(U)).
template <class U, int E>
struct Frag {
  static constexpr int kPer = 16 / sizeof(U);
  static_assert(E % kPer == 0, "a fragment is whole 16-byte vectors");
  static constexpr int kPacks = E / kPer;
  Pack<U> pk[kPacks];
  __device__ __forceinline__ void load(const U* base, int64_t idx) {
    const Pack<U>* src = reinterpret_cast<const Pack<U>*>(base) + idx * kPacks;
#pragma unroll
    for (int k = 0; k < kPacks; ++k) pk[k] = src[k];
  }
  __device__ __forceinline__ void store(U* base, int64_t idx) const {
    Pack<U>* dst = reinterpret_cast<Pack<U>*>(base) + idx * kPacks;
#pragma unroll
    for (int k = 0; k < kPacks; ++k) dst[k] = pk[k];
  }
  __device__ __forceinline__ float get(int e) const {
    return static_cast<float>(pk[e / kPer].v[e % kPer]);
  }
  __device__ __forceinline__ void set(int e, float x) {
    pk[e / kPer].v[e % kPer] = static_cast<U>(x);
  }
};

// Runs op over the n elements of one chunk with storage policy S and NS states (update.h):
// op(float& weight, float grad, float (&states)[max(NS,1)]) updates one element in fp32. Loads
// weight, grad and states (states enter op as 0 when !load_states: SGD's first step, whose fresh
// momentum buffer may be uninitialized memory), stores weight, states and, with masters, the
// param as the rounded weight. The grad is never stored and the param never loaded.
template <class S, int NS, class Op>
__device__ __forceinline__ void process_chunk(const StreamPtrs<S, NS>& q, int64_t n,
                                              bool load_states, const Op& op) {
  using W = typename S::weight_t;
  using G = typename S::grad_t;
  using St = typename S::state_t;
  using P = typename S::param_t;
  constexpr int kNS = NS > 0 ? NS : 1;
  constexpr int E = 16 / sizeof(G);  // elements per vector step: one 16-byte vector of the grad
  constexpr int kU = kElemsPerThread / E > 0 ? kElemsPerThread / E : 1;  // steps per thread
  bool aligned = aligned16(q.weight) && aligned16(q.grad);
#pragma unroll
  for (int k = 0; k < NS; ++k) aligned = aligned && aligned16(q.state[k]);
  if (S::kMaster) aligned = aligned && aligned16(q.param);

  int64_t done = 0;
  if (aligned) {
    const int64_t nvec = n / E;
    const int64_t stride = static_cast<int64_t>(kU) * blockDim.x;
    for (int64_t base = 0; base < nvec; base += stride) {
      Frag<W, E> rw[kU];
      Frag<G, E> rg[kU];
      Frag<St, E> rs[kNS][kU];
      // Issue every load of this iteration before any math (memory-level parallelism).
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int64_t idx = base + static_cast<int64_t>(u) * blockDim.x + threadIdx.x;
        if (idx < nvec) {
          rw[u].load(q.weight, idx);
          rg[u].load(q.grad, idx);
          if (load_states) {
#pragma unroll
            for (int k = 0; k < NS; ++k) rs[k][u].load(q.state[k], idx);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int64_t idx = base + static_cast<int64_t>(u) * blockDim.x + threadIdx.x;
        if (idx < nvec) {
          Frag<P, E> rp;
#pragma unroll
          for (int e = 0; e < E; ++e) {
            float w = rw[u].get(e);
            float st[kNS] = {};
#pragma unroll
            for (int k = 0; k < NS; ++k) st[k] = load_states ? rs[k][u].get(e) : 0.f;
            op(w, rg[u].get(e), st);
            rw[u].set(e, w);
            if (S::kMaster) rp.set(e, w);
#pragma unroll
            for (int k = 0; k < NS; ++k) rs[k][u].set(e, st[k]);
          }
          rw[u].store(q.weight, idx);
          if (S::kMaster) rp.store(q.param, idx);
#pragma unroll
          for (int k = 0; k < NS; ++k) rs[k][u].store(q.state[k], idx);
        }
      }
    }
    done = nvec * E;
  }
  // Scalar tail (odd sizes) or the whole chunk (misaligned pointers).
  for (int64_t i = done + threadIdx.x; i < n; i += blockDim.x)
    update_element(q, i, load_states, op);
}

// Calls f(T{}) with the storage type of the block's tensor (uniform per block: no divergence).
template <class F>
__device__ __forceinline__ void dispatch_dtype(int32_t code, const F& f) {
  switch (code) {
    case kF32: f(float{}); break;
    case kBF16: f(c10::BFloat16{}); break;
    default: f(c10::Half{}); break;
  }
}

// The chunk's typed stream pointers under storage policy S.
template <class S, int NS>
__device__ __forceinline__ StreamPtrs<S, NS> chunk_ptrs(const TensorMeta& tm, int64_t start) {
  return stream_ptrs<S, NS>(tm.weight, tm.grad, tm.state, tm.param, start);
}

// ------------------------------------------------------------------ AdamW
struct AdamWKernelArgs {
  double lr, beta1, beta2, weight_decay, eps;
  // lr read at run time when the call got it as a tensor (one of them, or neither: then `lr`), so
  // a captured graph's replays see the value a scheduler writes into it
  const float* lr_f32;
  const double* lr_f64;
  Flags flags;
  const float* grad_scale;
  const float* found_inf;
};

template <bool AMS, bool MASTER, class Table>
__global__ void __launch_bounds__(kBlock)
    adamw_kernel(const Table table, const AdamWKernelArgs ka) {
  if (ka.found_inf != nullptr && *ka.found_inf != 0.f) return;  // whole call is skipped
  TensorMeta tm;
  int32_t chunk;
  table.locate(static_cast<int32_t>(blockIdx.x), tm, chunk);
  __shared__ AdamWArgs<float> sh;
  __shared__ bool sh_small;
  if (threadIdx.x == 0) {
    const double lr = ka.lr_f64 != nullptr   ? *ka.lr_f64
                      : ka.lr_f32 != nullptr ? static_cast<double>(*ka.lr_f32)
                                             : ka.lr;
    const AdamWHostScalars hs = adamw_host_scalars(lr, ka.beta1, ka.beta2, ka.weight_decay, ka.eps);
    const AdamWStepScalars st =
        adamw_step_scalars(lr, ka.beta1, ka.beta2, static_cast<double>(*tm.step));
    sh.lerp_w = hs.lerp_w;
    sh.beta2 = hs.beta2;
    sh.one_minus_beta2 = hs.one_minus_beta2;
    sh.decay = hs.decay;
    sh.eps = hs.eps;
    sh.neg_step = st.neg_step;
    sh.bc2_sqrt = st.bc2_sqrt;
    sh.grad_scale = ka.grad_scale != nullptr ? *ka.grad_scale : 1.f;
    sh_small = hs.lerp_small;
  }
  __syncthreads();
  const AdamWArgs<float> a = sh;
  const bool small = sh_small;
  const Flags f = ka.flags;
  const int64_t start = static_cast<int64_t>(chunk) * kChunk;
  const int64_t n = (tm.numel - start < kChunk) ? tm.numel - start : kChunk;
  constexpr int NS = AMS ? 3 : 2;  // exp_avg, exp_avg_sq[, max_exp_avg_sq]
  dispatch_dtype(tm.dtype, [&](auto tag) {
    using S = StorageOf<MASTER, decltype(tag)>;
    process_chunk<S, NS>(chunk_ptrs<S, NS>(tm, start), n, true,
                         [&](float& w, float g, float (&s)[NS]) {
                           // s[NS-1] is only read with AMS
                           adamw_update<AMS>(w, g, s[0], s[1], s[NS - 1], a, small, f);
                         });
  });
}

// ------------------------------------------------------------------ AdaGrad
struct AdagradKernelArgs {
  double lr, lr_decay;
  float wd, eps;
  Flags flags;
  const float* grad_scale;
  const float* found_inf;
};

template <bool MASTER, class Table>
__global__ void __launch_bounds__(kBlock)
    adagrad_kernel(const Table table, const AdagradKernelArgs ka) {
  if (ka.found_inf != nullptr && *ka.found_inf != 0.f) return;
  TensorMeta tm;
  int32_t chunk;
  table.locate(static_cast<int32_t>(blockIdx.x), tm, chunk);
  __shared__ float sh_neg_clr;
  if (threadIdx.x == 0) sh_neg_clr = adagrad_neg_clr(ka.lr, ka.lr_decay, static_cast<double>(*tm.step));
  __syncthreads();
  AdagradArgs<float> a;
  a.wd = ka.wd;
  a.eps = ka.eps;
  a.neg_clr = sh_neg_clr;
  a.grad_scale = ka.grad_scale != nullptr ? *ka.grad_scale : 1.f;
  const Flags f = ka.flags;
  const int64_t start = static_cast<int64_t>(chunk) * kChunk;
  const int64_t n = (tm.numel - start < kChunk) ? tm.numel - start : kChunk;
  dispatch_dtype(tm.dtype, [&](auto tag) {
    using S = StorageOf<MASTER, decltype(tag)>;
    process_chunk<S, 1>(chunk_ptrs<S, 1>(tm, start), n, true,
                        [&](float& w, float g, float (&s)[1]) {
                          adagrad_update(w, g, s[0], a, f);
                        });
  });
}

// ------------------------------------------------------------------ SGD
struct SgdKernelArgs {
  SgdArgs<float> a;  // grad_scale field filled in the kernel
  Flags flags;
  SgdFlags sflags;
  const float* grad_scale;
  const float* found_inf;
};

template <bool MOMENTUM, bool MASTER, class Table>
__global__ void __launch_bounds__(kBlock)
    sgd_kernel(const Table table, const SgdKernelArgs ka) {
  if (ka.found_inf != nullptr && *ka.found_inf != 0.f) return;
  TensorMeta tm;
  int32_t chunk;
  table.locate(static_cast<int32_t>(blockIdx.x), tm, chunk);
  SgdArgs<float> a = ka.a;
  a.grad_scale = ka.grad_scale != nullptr ? *ka.grad_scale : 1.f;
  const Flags f = ka.flags;
  const SgdFlags sf = ka.sflags;
  const int64_t start = static_cast<int64_t>(chunk) * kChunk;
  const int64_t n = (tm.numel - start < kChunk) ? tm.numel - start : kChunk;
  constexpr int NS = MOMENTUM ? 1 : 0;
  // First step: the fresh momentum buffer is written, never read.
  const bool load_states = !sf.first_step;
  dispatch_dtype(tm.dtype, [&](auto tag) {
    using S = StorageOf<MASTER, decltype(tag)>;
    process_chunk<S, NS>(chunk_ptrs<S, NS>(tm, start), n, load_states,
                         [&](float& w, float g, float (&s)[1]) {
                           sgd_update(w, g, s[0], a, f, sf);  // s[0]: a dummy without momentum
                         });
  });
}

const float* opt_ptr(const OptTensor& t) {
  return (t.has_value() && t->defined()) ? t->const_data_ptr<float>() : nullptr;
}

// One tensor's table entry. Written tensors (weight, states, param) through mutable_data_ptr(),
// read-only ones (grad, step) through const_data_ptr(). With a master, the master is the weight
// the update reads and writes and the param only receives its rounded value.
TensorMeta make_meta(const at::Tensor& param, const at::Tensor& grad,
                     std::initializer_list<const at::Tensor*> states, at::TensorList masters,
                     size_t i, const at::Tensor* step) {
  TensorMeta m{};
  const bool master = !masters.empty();
  m.weight = master ? masters[i].mutable_data_ptr() : param.mutable_data_ptr();
  m.param = master ? param.mutable_data_ptr() : nullptr;
  m.grad = grad.const_data_ptr();
  int k = 0;
  for (const at::Tensor* t : states) m.state[k++] = t->mutable_data_ptr();
  m.step = step != nullptr ? step->const_data_ptr<float>() : nullptr;
  m.numel = param.numel();
  m.dtype = dtype_code(param.scalar_type());
  return m;
}

// Calls f(std::integral_constant<bool, b>{}) for a runtime bool (template kernel selection).
template <class F>
void with_bool(bool b, const F& f) {
  if (b) f(std::true_type{});
  else f(std::false_type{});
}

}  // namespace

void adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                at::TensorList state_steps, double lr, double beta1, double beta2,
                double weight_decay, double eps, bool amsgrad, bool maximize,
                const OptTensor& grad_scale, const OptTensor& found_inf,
                at::TensorList master_params, const OptTensor& lr_tensor) {
  const at::Device device = params[0].device();
  c10::cuda::CUDAGuard guard(device);
  std::vector<TensorMeta> tms;
  tms.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    if (amsgrad) {
      tms.push_back(make_meta(params[i], grads[i],
                              {&exp_avgs[i], &exp_avg_sqs[i], &max_exp_avg_sqs[i]}, master_params,
                              i, &state_steps[i]));
    } else {
      tms.push_back(make_meta(params[i], grads[i], {&exp_avgs[i], &exp_avg_sqs[i]}, master_params,
                              i, &state_steps[i]));
    }
  }
  AdamWKernelArgs ka{};
  ka.lr = lr;
  ka.beta1 = beta1;
  ka.beta2 = beta2;
  ka.weight_decay = weight_decay;
  ka.eps = eps;
  if (lr_tensor.has_value() && lr_tensor->defined()) {
    if (lr_tensor->scalar_type() == at::kDouble) ka.lr_f64 = lr_tensor->const_data_ptr<double>();
    else ka.lr_f32 = lr_tensor->const_data_ptr<float>();
  }
  ka.flags.maximize = maximize;
  ka.flags.has_wd = weight_decay != 0.0;
  ka.grad_scale = opt_ptr(grad_scale);
  ka.flags.has_scale = ka.grad_scale != nullptr;
  ka.found_inf = opt_ptr(found_inf);
  const auto stream = at::cuda::getCurrentCUDAStream();
  with_bool(amsgrad, [&](auto ams) {
    with_bool(!master_params.empty(), [&](auto master) {
      launch_table(tms, device, "hift_ext::fused_adamw_", [&](const auto& table, int64_t blocks) {
        adamw_kernel<decltype(ams)::value, decltype(master)::value>
            <<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(table, ka);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

void adagrad_cuda(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                  at::TensorList state_steps, double lr, double lr_decay, double weight_decay,
                  double eps, bool maximize, const OptTensor& grad_scale,
                  const OptTensor& found_inf, at::TensorList master_params) {
  const at::Device device = params[0].device();
  c10::cuda::CUDAGuard guard(device);
  std::vector<TensorMeta> tms;
  tms.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i)
    tms.push_back(
        make_meta(params[i], grads[i], {&state_sums[i]}, master_params, i, &state_steps[i]));
  AdagradKernelArgs ka{};
  ka.lr = lr;
  ka.lr_decay = lr_decay;
  ka.wd = static_cast<float>(weight_decay);
  ka.eps = static_cast<float>(eps);
  ka.flags.maximize = maximize;
  ka.flags.has_wd = weight_decay != 0.0;
  ka.grad_scale = opt_ptr(grad_scale);
  ka.flags.has_scale = ka.grad_scale != nullptr;
  ka.found_inf = opt_ptr(found_inf);
  const auto stream = at::cuda::getCurrentCUDAStream();
  with_bool(!master_params.empty(), [&](auto master) {
    launch_table(tms, device, "hift_ext::fused_adagrad_", [&](const auto& table, int64_t blocks) {
      adagrad_kernel<decltype(master)::value>
          <<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(table, ka);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
              double lr, double momentum, double dampening, bool nesterov, double weight_decay,
              bool maximize, bool is_first_step, const OptTensor& grad_scale,
              const OptTensor& found_inf, at::TensorList master_params) {
  const at::Device device = params[0].device();
  c10::cuda::CUDAGuard guard(device);
  const bool has_momentum = momentum != 0.0;
  std::vector<TensorMeta> tms;
  tms.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    if (has_momentum) {
      tms.push_back(
          make_meta(params[i], grads[i], {&momentum_buffers[i]}, master_params, i, nullptr));
    } else {
      tms.push_back(make_meta(params[i], grads[i], {}, master_params, i, nullptr));
    }
  }
  SgdKernelArgs ka{};
  ka.a.wd = static_cast<float>(weight_decay);
  ka.a.momentum = static_cast<float>(momentum);
  ka.a.one_minus_dampening = static_cast<float>(1.0 - dampening);
  ka.a.neg_lr = static_cast<float>(-lr);
  ka.a.grad_scale = 1.f;
  ka.flags.maximize = maximize;
  ka.flags.has_wd = weight_decay != 0.0;
  ka.grad_scale = opt_ptr(grad_scale);
  ka.flags.has_scale = ka.grad_scale != nullptr;
  ka.found_inf = opt_ptr(found_inf);
  ka.sflags.has_momentum = has_momentum;
  ka.sflags.nesterov = nesterov;
  ka.sflags.first_step = is_first_step;
  const auto stream = at::cuda::getCurrentCUDAStream();
  with_bool(has_momentum, [&](auto mom) {
    with_bool(!master_params.empty(), [&](auto master) {
      launch_table(tms, device, "hift_ext::fused_sgd_", [&](const auto& table, int64_t blocks) {
        sgd_kernel<decltype(mom)::value, decltype(master)::value>
            <<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(table, ka);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

}  // namespace optim
}  // namespace hift_ext
