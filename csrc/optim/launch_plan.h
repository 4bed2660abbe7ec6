// How a CUDA multi-tensor call is cut into launches and how a block finds its tensor: shared by
// cuda.cu (the kernels and their launches) and, for tests on machines without a GPU, by the CPU
// build (bindings.cpp exposes the plan to python). No CUDA headers: plain C++ that nvcc also
// compiles for the device.
//
// A launch covers its tensors' 64K-element chunks, one block per chunk. Its table travels
//   - by value in the kernel's arguments (InlineTable): lists of up to kInlineTensors non-empty
//     tensors, and every piece of a longer list while a CUDA graph is being captured;
//   - in device memory otherwise (a long list: ONE launch over a table uploaded per call).
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__CUDACC__)
#define HIFT_PLAN_HD __host__ __device__ __forceinline__
#else
#define HIFT_PLAN_HD inline
#endif

namespace hift_ext {
namespace optim {
namespace plan {

constexpr int64_t kChunk = 65536;  // elements per block (a multiple of every vector width)
constexpr int kInlineTensors = 40;
constexpr int64_t kMaxBlocks = INT32_MAX - 1;  // per launch (grid x dimension, int32 indices)

inline int64_t chunks_of(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

// A short list's table, passed by value as a kernel argument. Tensor t owns the blocks
// [first_block[t], first_block[t + 1]); empty tensors are left out.
template <class Meta>
struct InlineTable {
  Meta tensors[kInlineTensors];
  int32_t first_block[kInlineTensors + 1];
  int32_t num_tensors;
  // The tensor and chunk of `block`. Inlined in the kernel, so the reads stay loads from the
  // argument space (no local copy of the table).
  HIFT_PLAN_HD void locate(int32_t block, Meta& tm, int32_t& chunk) const {
    int32_t t = 0;
    while (t + 1 < num_tensors && first_block[t + 1] <= block) ++t;  // uniform per block
    tm = tensors[t];
    chunk = block - first_block[t];
  }
};

// True when the list takes one launch over a device table (not capturing, and too many tensors
// for the kernel arguments).
template <class Meta>
bool use_device_table(const std::vector<Meta>& tms, bool capturing) {
  size_t nonempty = 0;
  for (const auto& t : tms) nonempty += t.numel > 0 ? 1 : 0;
  return nonempty > static_cast<size_t>(kInlineTensors) && !capturing;
}

// Calls launch(table, num_blocks) for consecutive inline tables covering every non-empty tensor
// of `tms` in order.
template <class Meta, class Launch>
void for_each_inline_table(const std::vector<Meta>& tms, const Launch& launch) {
  InlineTable<Meta> table;
  std::memset(&table, 0, sizeof(table));
  int64_t blocks = 0;
  auto flush = [&] {
    if (table.num_tensors == 0) return;
    table.first_block[table.num_tensors] = static_cast<int32_t>(blocks);
    launch(table, blocks);
    std::memset(&table, 0, sizeof(table));
    blocks = 0;
  };
  for (const auto& t : tms) {
    if (t.numel == 0) continue;
    const int64_t chunks = chunks_of(t.numel);
    if (chunks > kMaxBlocks)
      throw std::length_error("a tensor of " + std::to_string(t.numel) + " elements is too large");
    if (table.num_tensors == kInlineTensors || blocks + chunks > kMaxBlocks) flush();
    table.tensors[table.num_tensors] = t;
    table.first_block[table.num_tensors] = static_cast<int32_t>(blocks);
    ++table.num_tensors;
    blocks += chunks;
  }
  flush();
}

}  // namespace plan
}  // namespace optim
}  // namespace hift_ext
