// Offload engine: keeps every HiFT group's optimizer state (and fp32 masters) in a host store and
// streams it to the device through a persistent device arena, piece by piece.
//
// Host side: one pageable, 256-byte aligned byte buffer per group (its tensors back to back).
// Device side: ONE arena of `budget` bytes, allocated once and never returned to the allocator,
// cut into four quarters. A group is moved as a list of *pieces*; a piece is a list of segments
// (a contiguous element range of one of the group's tensors), packed 256-byte aligned. A piece
// occupies one quarter, or two adjacent ones (an aligned half). By default a group is one piece of
// whole tensors; the caller may cut it (set_pieces) so that a group larger than the budget streams
// through the arena: piece i+1 copies in while piece i is updated and piece i-1 copies out.
//
// Data path of one piece:
//   prefetch: host store --(gather memcpy, H2D worker)--> pinned slot --(cudaMemcpyAsync, H2D stream)--> arena
//   release:  arena --(cudaMemcpyAsync, D2H stream, after the compute stream's event)--> pinned slot
//             --(scatter memcpy, D2H worker)--> host store
// Ordering rules (the invariants the tests check):
//   * pinned slots are handed out round-robin in ISSUE order; a task waits until the previous user
//     of its slot is finished with it (CPU stage done, and on CUDA its copy event complete);
//   * a prefetch of a piece waits for that piece's last write-back to reach the host store;
//   * a prefetch into arena quarters waits (on the H2D stream, not on the host) for the last user of
//     those quarters: the write-back that read them, or the compute work that used them;
//   * quarters are leased from prefetch/fetch until release; a lease never overlaps another. When no
//     free quarters are left (only with unusual call patterns, never in the HiFT optimizer's), the
//     piece gets a temporary device buffer instead, counted in stats()["overflow_allocs"];
//   * the compute stream waits on a piece's H2D event before its state is used (fetch); the D2H
//     stream waits on an event recorded on the compute stream at release(), never on a device-wide
//     synchronize;
//   * a write-back writes the host store only after every device->slot copy of the piece was
//     enqueued: a failure in the copy loop leaves the store with the last good state and no copy in
//     flight without an event;
//   * every wait in a task points at a task issued earlier and each worker runs its queue in FIFO
//     order, so the engine cannot deadlock.
// Without CUDA (device == cpu) the same arena, ring, queues and ordering run with host buffers;
// completion flags play the role of events.
#pragma once

#include <torch/extension.h>

#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#ifdef HIFT_EXT_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace hift_ext {
namespace offload {

constexpr int64_t kAlign = 256;  // tensors in the store and segments in a piece start at 256 bytes
constexpr int kQuarters = 4;

struct TensorMeta {
  std::vector<int64_t> sizes;
  at::ScalarType dtype;
  int64_t offset;  // bytes into the group's host buffer
  int64_t nbytes;
  int64_t numel;
  int64_t elem;  // element size
};

struct Segment {
  int64_t tensor;     // index into the group's tensors
  int64_t begin, end; // element range
  int64_t host_off;   // bytes into the group's host buffer
  int64_t dev_off;    // bytes into the piece (packed, 256-byte aligned)
  int64_t nbytes;
};

struct Task {
  enum Kind { kH2D, kD2H };
  Kind kind;
  uint64_t id = 0;
  int64_t group = 0, piece = 0;
  int slot = 0;
  int64_t nbytes = 0;  // packed bytes of the piece
  bool keep_resident = false;       // D2H flush: the device copy stays in use
  std::vector<Segment> segs;
  char* dev = nullptr;              // the piece's device memory (arena or overflow buffer)
  at::Tensor dev_keep;              // keeps an overflow buffer alive until the copy is done
  at::Tensor host;                  // the group's host store buffer
  std::shared_ptr<Task> prev_slot_user;  // must be finished with the slot before this task uses it
  std::shared_ptr<Task> after;           // H2D: the piece's pending write-back
  std::vector<std::shared_ptr<Task>> fences;  // H2D: the last users of the arena quarters it writes
  // guarded by the engine mutex
  bool enqueued = false;      // the device-side work is enqueued (events recorded) or done
  bool cpu_finished = false;  // the worker is done with this task
  std::exception_ptr error;
  uint64_t checksum = 0;  // debug
#ifdef HIFT_EXT_WITH_CUDA
  std::shared_ptr<at::cuda::CUDAEvent> compute_ev;  // D2H: recorded on the compute stream at release
  std::vector<std::shared_ptr<at::cuda::CUDAEvent>> fence_evs;  // H2D: compute work on its quarters
  std::shared_ptr<at::cuda::CUDAEvent> done_ev;     // the device copy is done (device ready / read)
#endif
};

struct Slot {
  at::Tensor buf;     // uint8 [cap], pinned on CUDA
  int64_t cap = 0;
  bool pinned = false;
  std::shared_ptr<Task> last;  // the last task this slot was handed to (issue order)
  uint64_t tag = 0;            // debug: id of the task that last wrote the slot
  bool writing = false;        // debug
};

// The last user of an arena quarter: a new writer waits for it.
struct Fence {
  std::shared_ptr<Task> task;  // a write-back reading it, or the prefetch that filled it
#ifdef HIFT_EXT_WITH_CUDA
  std::shared_ptr<at::cuda::CUDAEvent> compute_ev;  // compute work that used it (dropped leases)
#endif
  uint64_t seq = 0;  // issue order of that use (least recently used quarters are taken first)
};

struct PieceRec {
  enum State { kHost = 0, kPrefetching = 1, kResident = 2 };
  std::vector<Segment> segs;
  int64_t nbytes = 0;
  State state = kHost;
  int quarter = -1, nquarters = 0;  // the arena lease while not kHost (-1: overflow buffer)
  at::Tensor overflow;              // device buffer when the arena had no room
  std::shared_ptr<Task> h2d;        // the prefetch of the current device copy
  std::shared_ptr<Task> wb;         // the last write-back
  std::exception_ptr wb_error;      // a failed write-back: the store holds the state before it
};

struct GroupRec {
  std::vector<TensorMeta> metas;
  int64_t nbytes = 0;
  at::Tensor host;  // uint8 [nbytes]
  std::vector<PieceRec> pieces;
};

class Engine {
 public:
  // pinned: 1 = pinned slots, fail with a clear error if they cannot be allocated;
  //         0 = pageable slots; -1 = auto (pinned on CUDA, pageable with a warning if that fails).
  Engine(const std::string& device, int64_t num_slots, int64_t pinned, double debug_delay_us, bool debug);
  ~Engine();

  void add_group(int64_t g, const std::vector<at::Tensor>& tensors);
  void remove_group(int64_t g);
  bool has_group(int64_t g);
  std::vector<int64_t> groups();
  // pieces: per piece, (tensor, begin, end) element ranges covering every element exactly once;
  // an empty list goes back to one piece of whole tensors.
  void set_pieces(int64_t g, const std::vector<std::vector<std::tuple<int64_t, int64_t, int64_t>>>& pieces);
  int64_t num_pieces(int64_t g);
  std::vector<int64_t> piece_bytes(int64_t g);
  void set_device_budget(int64_t nbytes);
  void reserve(int64_t nbytes);  // pinned slot bytes
  void prefetch(int64_t g, int64_t piece);
  std::vector<at::Tensor> fetch(int64_t g, int64_t piece);
  void release(int64_t g, int64_t piece);
  void flush(int64_t g);
  std::vector<at::Tensor> host_tensors(int64_t g);
  std::vector<at::Tensor> host_views(int64_t g);  // no wait: valid once g's write-backs are done
  void load_host(int64_t g, const std::vector<at::Tensor>& tensors);
  std::string residency(int64_t g);
  int64_t group_bytes(int64_t g);
  void synchronize();
  std::map<std::string, int64_t> memory_report();
  std::map<std::string, int64_t> stats();
  void close();

  // pipeline_bytes: sub-copy size of the pipelined staging on CUDA (0: one copy per piece);
  // copy_threads: most threads one host memcpy uses.
  void set_tuning(int64_t pipeline_bytes, int64_t copy_threads);
  std::map<std::string, int64_t> tuning() const {
    return {{"pipeline_bytes", pipeline_bytes_.load()}, {"copy_threads", copy_threads_.load()}};
  }
  // Debug mode only: the next `kind` ("h2d" | "d2h") task fails after `after` sub-copies, as a
  // failing cudaMemcpyAsync would (tests of the error paths).
  void inject_fault(const std::string& kind, int64_t after);

  std::string device_str() const { return device_.str(); }
  int64_t num_slots() const { return static_cast<int64_t>(slots_.size()); }
  bool is_cuda() const { return is_cuda_; }

 private:
  GroupRec& rec_locked(int64_t g, const char* what);
  PieceRec& piece_locked(GroupRec& r, int64_t g, int64_t piece, const char* what);
  void lease_locked(PieceRec& p, const std::shared_ptr<Task>& t);
  void unlease_locked(PieceRec& p, const std::shared_ptr<Task>& last_user, bool used_by_compute);
  void ensure_arena_locked(std::unique_lock<std::mutex>& lk, int64_t piece_bytes);
  void reallocate_arena_locked(std::unique_lock<std::mutex>& lk, int64_t quarter);
  void fence_new_arena_locked();
  std::shared_ptr<Task> issue_prefetch_locked(std::unique_lock<std::mutex>& lk, int64_t g, GroupRec& r, int64_t j);
  std::shared_ptr<Task> issue_writeback_locked(int64_t g, GroupRec& r, int64_t j, bool keep_resident);
  void assign_slot_locked(const std::shared_ptr<Task>& t);
  void wait_task(std::unique_lock<std::mutex>& lk, const std::shared_ptr<Task>& t);
  void wait_group_idle_locked(std::unique_lock<std::mutex>& lk, int64_t g);
  void drop_piece_locked(PieceRec& p);
  void rethrow_wb_error(int64_t g, int64_t j, const PieceRec& p);
  char* piece_dev_locked(PieceRec& p);
  std::vector<at::Tensor> device_views_locked(GroupRec& r, PieceRec& p);
  std::vector<at::Tensor> host_tensor_views(const GroupRec& r);
  at::Tensor alloc_slot(int64_t nbytes, bool* pinned);
  void default_pieces(GroupRec& r);

  void worker_loop(std::deque<std::shared_ptr<Task>>* q);
  void run_task(const std::shared_ptr<Task>& t);
  void* acquire_slot(const std::shared_ptr<Task>& t);  // waits for the previous user, grows, claims
  void run_h2d(const std::shared_ptr<Task>& t);
  void run_d2h(const std::shared_ptr<Task>& t);
  void mark_enqueued(const std::shared_ptr<Task>& t);
  void finish(const std::shared_ptr<Task>& t);
  void debug_pause();
  void maybe_fail(const std::shared_ptr<Task>& t, int64_t subcopy);
  int64_t pipeline_piece(int64_t n) const;  // 0: copy the piece in one go

  c10::Device device_;
  bool is_cuda_ = false;
  int64_t pinned_mode_;
  double debug_delay_us_;
  bool debug_;
  std::atomic<int64_t> pipeline_bytes_{int64_t(32) << 20};  // read by the workers
  std::atomic<int64_t> copy_threads_{4};

  std::mutex mu_;
  std::condition_variable cv_;
  std::map<int64_t, GroupRec> groups_;
  std::vector<Slot> slots_;
  uint64_t next_slot_ = 0;
  uint64_t next_id_ = 1;
  std::deque<std::shared_ptr<Task>> h2d_q_, d2h_q_;
  std::vector<std::thread> workers_;
  bool stop_ = false;
  bool closed_ = false;
  bool warned_pageable_ = false;

  // the device arena (guarded by mu_)
  at::Tensor arena_;
  int64_t budget_ = 0;       // arena bytes; 0 = not sized yet
  bool budget_fixed_ = false;  // set by set_device_budget: never grows, pieces must fit
  int64_t quarter_ = 0;      // bytes of one quarter
  std::array<bool, kQuarters> leased_{};
  std::array<Fence, kQuarters> fences_{};
  uint64_t use_seq_ = 0;

  // fault injection (debug)
  int fail_kind_ = -1;  // Task::Kind, -1 = off
  int64_t fail_after_ = 0;

  // accounting (guarded by mu_)
  int64_t reserve_bytes_ = 0;
  int64_t leased_bytes_ = 0, leased_peak_ = 0, overflow_bytes_ = 0, device_peak_ = 0;
  int64_t n_h2d_ = 0, n_d2h_ = 0, bytes_h2d_ = 0, bytes_d2h_ = 0;
  int64_t slot_waits_ = 0, violations_ = 0, fetch_waits_ = 0, overflow_allocs_ = 0, arena_allocs_ = 0;

#ifdef HIFT_EXT_WITH_CUDA
  std::unique_ptr<at::cuda::CUDAStream> h2d_stream_, d2h_stream_;
#endif
};

}  // namespace offload
}  // namespace hift_ext
