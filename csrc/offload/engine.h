// Offload engine: keeps every HiFT group's optimizer state in a host store and streams one group
// at a time to the device through a ring of R staging slots (pinned host memory on CUDA).
//
// Data path of one group (all copies are of one flat, 256-byte aligned byte buffer per group):
//   prefetch: host store --(memcpy, H2D worker thread)--> slot --(cudaMemcpyAsync, H2D stream)--> device
//   release:  device --(cudaMemcpyAsync, D2H stream, after the compute stream's event)--> slot
//             --(memcpy, D2H worker thread, after the copy's event)--> host store
// Ordering rules (the invariants the tests check):
//   * slots are handed out round-robin in ISSUE order; a task waits for the previous user of its
//     slot to be completely finished with it (CPU stage done, and on CUDA its copy event complete)
//     before writing into it, so a slot is never written while a copy still reads it and never read
//     before it is written;
//   * a prefetch of group g waits for g's last write-back to reach the host store;
//   * the compute stream waits on the H2D event of a group before its state is used (fetch), and the
//     D2H stream waits on an event recorded on the compute stream at release(), never a device-wide
//     synchronize; device buffers are record_stream'ed on the side streams, so the caching allocator
//     reuses them only after the copies that touch them are done;
//   * every wait in a task points at a task issued earlier, and each worker runs its queue in FIFO
//     order, so the engine cannot deadlock.
// Without CUDA (device == cpu) the same ring, queues and ordering run with host buffers; completion
// flags play the role of events.
#pragma once

#include <torch/extension.h>

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
#include <vector>

#ifdef HIFT_EXT_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace hift_ext {
namespace offload {

constexpr int64_t kAlign = 256;  // every tensor of a group starts at a 256-byte boundary

struct TensorMeta {
  std::vector<int64_t> sizes;
  at::ScalarType dtype;
  int64_t offset;  // bytes into the group's flat buffer
  int64_t nbytes;
};

struct Task {
  enum Kind { kH2D, kD2H };
  Kind kind;
  uint64_t id = 0;
  int64_t group = 0;
  int slot = 0;
  int64_t nbytes = 0;
  bool keep_resident = false;       // D2H flush: device copy stays in use
  at::Tensor device;                // the group's device buffer (kept alive until the copy is enqueued)
  at::Tensor host;                  // the group's host-store buffer
  std::shared_ptr<Task> prev_slot_user;  // must be finished with the slot before this task uses it
  std::shared_ptr<Task> after;           // H2D: the group's pending write-back
  // guarded by the engine mutex
  bool cpu_finished = false;  // the worker is done with this task (H2D: copy enqueued / done)
  std::exception_ptr error;
  uint64_t checksum = 0;  // debug
#ifdef HIFT_EXT_WITH_CUDA
  std::shared_ptr<at::cuda::CUDAEvent> compute_ev;  // D2H: recorded on the compute stream
  // H2D: recorded on the compute stream right after the device buffer was allocated there: the
  // caching allocator may hand out a block the compute stream still uses, so the H2D stream must
  // not write it before that work is done.
  std::shared_ptr<at::cuda::CUDAEvent> alloc_ev;
  std::shared_ptr<at::cuda::CUDAEvent> copy_ev;     // H2D: slot->device copy done (device ready, slot free)
#endif
};

struct Slot {
  at::Tensor buf;     // uint8 [cap]
  int64_t cap = 0;
  bool pinned = false;
  std::shared_ptr<Task> last;  // the last task this slot was handed to (issue order)
  uint64_t tag = 0;            // debug: id of the task that last wrote the slot
  bool writing = false;        // debug
};

struct GroupRec {
  enum State { kHost = 0, kPrefetching = 1, kResident = 2 };
  std::vector<TensorMeta> metas;
  int64_t nbytes = 0;
  at::Tensor host;    // uint8 [nbytes], pageable host store
  at::Tensor device;  // uint8 [nbytes] on the device while kPrefetching / kResident
  State state = kHost;
  std::shared_ptr<Task> h2d;  // the prefetch of the current device copy
  std::shared_ptr<Task> wb;   // the last write-back
#ifdef HIFT_EXT_WITH_CUDA
  c10::StreamId alloc_stream = 0;
#endif
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
  void reserve(int64_t nbytes);
  void prefetch(int64_t g);
  std::vector<at::Tensor> fetch(int64_t g);
  void release(int64_t g);
  void flush(int64_t g);
  std::vector<at::Tensor> host_tensors(int64_t g);
  std::vector<at::Tensor> host_views(int64_t g);  // no wait: valid once g's write-back is done
  void load_host(int64_t g, const std::vector<at::Tensor>& tensors);
  std::string residency(int64_t g);
  int64_t group_bytes(int64_t g);
  void synchronize();
  std::map<std::string, int64_t> memory_report();
  std::map<std::string, int64_t> stats();
  void close();

  // pipeline_bytes: piece size of the pipelined staging on CUDA (0: one copy per group);
  // copy_threads: most threads one host memcpy uses.
  void set_tuning(int64_t pipeline_bytes, int64_t copy_threads);
  std::map<std::string, int64_t> tuning() const { return {{"pipeline_bytes", pipeline_bytes_.load()}, {"copy_threads", copy_threads_.load()}}; }

  std::string device_str() const { return device_.str(); }
  int64_t num_slots() const { return static_cast<int64_t>(slots_.size()); }
  bool is_cuda() const { return is_cuda_; }

 private:
  GroupRec& rec_locked(int64_t g, const char* what);
  std::shared_ptr<Task> issue_prefetch_locked(int64_t g, GroupRec& r);
  std::shared_ptr<Task> issue_writeback_locked(int64_t g, GroupRec& r, bool keep_resident);
  void assign_slot_locked(const std::shared_ptr<Task>& t);
  void wait_task(std::unique_lock<std::mutex>& lk, const std::shared_ptr<Task>& t);
  void wait_rethrow(std::unique_lock<std::mutex>& lk, const std::shared_ptr<Task>& t, const char* what);
  std::vector<at::Tensor> views(const at::Tensor& buf, const std::vector<TensorMeta>& metas);
  at::Tensor alloc_device(int64_t nbytes);
  at::Tensor alloc_slot(int64_t nbytes, bool* pinned);

  void worker_loop(std::deque<std::shared_ptr<Task>>* q);
  void run_task(const std::shared_ptr<Task>& t);
  void* acquire_slot(const std::shared_ptr<Task>& t);  // waits for the previous user, grows, claims; slot data
  void run_h2d(const std::shared_ptr<Task>& t);
  void run_d2h(const std::shared_ptr<Task>& t);
  void finish(const std::shared_ptr<Task>& t);
  void debug_pause();
  int64_t pipeline_piece(int64_t n) const;  // 0: copy the group in one go

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

  // accounting (guarded by mu_)
  int64_t reserve_bytes_ = 0;
  int64_t device_bytes_ = 0, device_peak_ = 0;
  int64_t n_h2d_ = 0, n_d2h_ = 0, bytes_h2d_ = 0, bytes_d2h_ = 0;
  int64_t slot_waits_ = 0, violations_ = 0, fetch_waits_ = 0;

#ifdef HIFT_EXT_WITH_CUDA
  std::unique_ptr<at::cuda::CUDAStream> h2d_stream_, d2h_stream_;
#endif
};

void bind_engine(pybind11::module_& m);

}  // namespace offload
}  // namespace hift_ext
