#include "engine.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <random>
#include <sstream>

namespace hift_ext {
namespace offload {

namespace {

int64_t round_up(int64_t n, int64_t a) { return (n + a - 1) / a * a; }

#ifdef HIFT_EXT_WITH_CUDA
// Events a worker thread synchronizes on (copy done): blocking sync puts the waiting worker to
// sleep instead of spinning in the driver beside the training thread, which launches kernels
// through the same driver (and, on a virtualized GPU, the same ioctl path).
constexpr unsigned int kWaitedEventFlags = cudaEventDisableTiming | cudaEventBlockingSync;
#endif

// memcpy split over the intra-op pool for large buffers (pageable <-> pinned staging is memory
// bandwidth bound; one thread does not saturate it). At most max_threads pool threads work on one
// copy: the copies run beside training, whose launching thread must keep a core.
void host_copy(void* dst, const void* src, int64_t n, int64_t max_threads) {
  if (n <= 0 || dst == src) return;
  constexpr int64_t kGrain = int64_t(8) << 20;
  if (n <= 2 * kGrain || max_threads <= 1) {
    std::memcpy(dst, src, static_cast<size_t>(n));
    return;
  }
  const int64_t chunks = (n + kGrain - 1) / kGrain;
  const int64_t per_task = (chunks + max_threads - 1) / max_threads;
  auto* d = static_cast<char*>(dst);
  const auto* s = static_cast<const char*>(src);
  at::parallel_for(0, chunks, per_task, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      const int64_t off = c * kGrain;
      std::memcpy(d + off, s + off, static_cast<size_t>(std::min(kGrain, n - off)));
    }
  });
}

uint64_t checksum(const void* p, int64_t n) {
  const auto* b = static_cast<const unsigned char*>(p);
  uint64_t h = 1469598103934665603ull;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, b + i, 8);
    h = (h ^ w) * 1099511628211ull;
  }
  for (; i < n; ++i) h = (h ^ b[i]) * 1099511628211ull;
  return h ^ static_cast<uint64_t>(n);
}

std::vector<int64_t> contiguous_strides(const std::vector<int64_t>& sizes) {
  std::vector<int64_t> st(sizes.size());
  int64_t s = 1;
  for (int64_t i = static_cast<int64_t>(sizes.size()) - 1; i >= 0; --i) {
    st[i] = s;
    s *= std::max<int64_t>(sizes[i], 1);
  }
  return st;
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

#ifdef HIFT_EXT_WITH_CUDA
void cuda_check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "hift_ext offload: ", what, " failed: ", cudaGetErrorString(err));
}
#endif

}  // namespace

Engine::Engine(const std::string& device, int64_t num_slots, int64_t pinned, double debug_delay_us,
               bool debug)
    : device_(device), pinned_mode_(pinned), debug_delay_us_(debug_delay_us), debug_(debug) {
  TORCH_CHECK(num_slots >= 1, "hift_ext offload: num_slots must be >= 1, got ", num_slots);
  TORCH_CHECK(device_.is_cpu() || device_.is_cuda(),
              "hift_ext offload: device must be cpu or cuda, got ", device);
  if (device_.is_cuda()) {
#ifdef HIFT_EXT_WITH_CUDA
    is_cuda_ = true;
    if (!device_.has_index()) device_ = c10::Device(c10::kCUDA, c10::cuda::current_device());
    c10::cuda::CUDAGuard guard(device_.index());
    h2d_stream_ = std::make_unique<at::cuda::CUDAStream>(at::cuda::getStreamFromPool(false, device_.index()));
    d2h_stream_ = std::make_unique<at::cuda::CUDAStream>(at::cuda::getStreamFromPool(false, device_.index()));
    if (*h2d_stream_ == *d2h_stream_)  // the pool hands streams out round-robin; make sure they differ
      d2h_stream_ = std::make_unique<at::cuda::CUDAStream>(at::cuda::getStreamFromPool(false, device_.index()));
#else
    TORCH_CHECK(false, "hift_ext offload: device ", device,
                " needs hift_ext built with CUDA (this build is CPU-only; rebuild with HIFT_EXT_CUDA=1)");
#endif
  }
  slots_.resize(static_cast<size_t>(num_slots));
  workers_.emplace_back([this] { worker_loop(&h2d_q_); });
  workers_.emplace_back([this] { worker_loop(&d2h_q_); });
}

Engine::~Engine() {
  try {
    close();
  } catch (...) {
  }
}

void Engine::close() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (closed_) return;
    closed_ = true;
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& t : workers_)
    if (t.joinable()) t.join();
  workers_.clear();
#ifdef HIFT_EXT_WITH_CUDA
  // Prefetched device buffers may still be targets of H2D copies: wait for those before the
  // buffers go back to the allocator with the engine (record_stream covers the allocator, this
  // covers the events owned by the tasks).
  if (is_cuda_) {
    std::vector<std::shared_ptr<Task>> pending;
    {
      std::lock_guard<std::mutex> lk(mu_);
      for (auto& kv : groups_)
        if (kv.second.h2d) pending.push_back(kv.second.h2d);
    }
    for (auto& t : pending)
      if (t->copy_ev && t->copy_ev->isCreated()) t->copy_ev->synchronize();
  }
#endif
}

// ------------------------------------------------------------------ helpers (main thread)

GroupRec& Engine::rec_locked(int64_t g, const char* what) {
  TORCH_CHECK(!closed_, "hift_ext offload: ", what, "(", g, ") on a closed engine");
  auto it = groups_.find(g);
  TORCH_CHECK(it != groups_.end(), "hift_ext offload: ", what, "(", g,
              "): unknown group (add_group(", g, ", tensors) first)");
  return it->second;
}

void Engine::assign_slot_locked(const std::shared_ptr<Task>& t) {
  const size_t i = static_cast<size_t>(next_slot_++ % slots_.size());
  t->slot = static_cast<int>(i);
  t->prev_slot_user = slots_[i].last;
  slots_[i].last = t;
}

at::Tensor Engine::alloc_device(int64_t nbytes) {
  return at::empty({nbytes}, at::TensorOptions().dtype(at::kByte).device(device_));
}

at::Tensor Engine::alloc_slot(int64_t nbytes, bool* pinned) {
  *pinned = false;
#ifdef HIFT_EXT_WITH_CUDA
  if (is_cuda_ && pinned_mode_ != 0) {
    c10::cuda::CUDAGuard guard(device_.index());
    void* p = nullptr;
    cudaError_t err = cudaHostAlloc(&p, static_cast<size_t>(nbytes), cudaHostAllocDefault);
    if (err == cudaSuccess) {
      *pinned = true;
      return at::from_blob(
          p, {nbytes}, [](void* q) { (void)cudaFreeHost(q); },
          at::TensorOptions().dtype(at::kByte).device(at::kCPU));
    }
    (void)cudaGetLastError();  // clear the sticky error state of this thread
    TORCH_CHECK(pinned_mode_ != 1, "hift_ext offload: could not allocate ", nbytes,
                " bytes of pinned (page-locked) host memory for a staging slot (",
                cudaGetErrorString(err), "). Use fewer slots (num_slots), a smaller group_size, raise "
                "the locked-memory limit, or pass pinned=False for pageable (slower) copies.");
    bool warn = false;
    {
      std::lock_guard<std::mutex> lk(mu_);
      warn = !warned_pageable_;
      warned_pageable_ = true;
    }
    if (warn)
      TORCH_WARN("hift_ext offload: could not allocate ", nbytes, " bytes of pinned host memory (",
                 cudaGetErrorString(err), "); falling back to pageable staging slots: transfers ",
                 "will be slower and will not overlap with compute.");
  }
#endif
  return at::empty({nbytes}, at::TensorOptions().dtype(at::kByte).device(at::kCPU));
}

std::vector<at::Tensor> Engine::views(const at::Tensor& buf, const std::vector<TensorMeta>& metas) {
  std::vector<at::Tensor> out;
  out.reserve(metas.size());
  for (const auto& m : metas) {
    auto t = at::empty({0}, buf.options().dtype(m.dtype));
    const int64_t es = static_cast<int64_t>(c10::elementSize(m.dtype));
    t.set_(buf.storage(), m.offset / es, m.sizes, contiguous_strides(m.sizes));
    out.push_back(std::move(t));
  }
  return out;
}

void Engine::wait_task(std::unique_lock<std::mutex>& lk, const std::shared_ptr<Task>& t) {
  if (!t) return;
  cv_.wait(lk, [&] { return t->cpu_finished; });
}

void Engine::wait_rethrow(std::unique_lock<std::mutex>& lk, const std::shared_ptr<Task>& t, const char* what) {
  if (!t) return;
  wait_task(lk, t);
  if (t->error) {
    try {
      std::rethrow_exception(t->error);
    } catch (const std::exception& e) {
      TORCH_CHECK(false, "hift_ext offload: ", what, " of group ", t->group, " failed: ", e.what());
    }
  }
}

std::shared_ptr<Task> Engine::issue_prefetch_locked(int64_t g, GroupRec& r) {
  if (r.wb && r.wb->cpu_finished && r.wb->error) std::rethrow_exception(r.wb->error);
  auto t = std::make_shared<Task>();
  t->kind = Task::kH2D;
  t->id = next_id_++;
  t->group = g;
  t->nbytes = r.nbytes;
  t->host = r.host;
  if (r.wb && !r.wb->cpu_finished) t->after = r.wb;
  r.device = alloc_device(r.nbytes);
#ifdef HIFT_EXT_WITH_CUDA
  if (is_cuda_) {
    auto cur = at::cuda::getCurrentCUDAStream(device_.index());
    r.alloc_stream = cur.id();
    t->alloc_ev = std::make_shared<at::cuda::CUDAEvent>(cudaEventDisableTiming);
    t->alloc_ev->record(cur);
    t->copy_ev = std::make_shared<at::cuda::CUDAEvent>(kWaitedEventFlags);
  }
#endif
  t->device = r.device;
  device_bytes_ += r.nbytes;
  device_peak_ = std::max(device_peak_, device_bytes_);
  assign_slot_locked(t);
  r.h2d = t;
  r.state = GroupRec::kPrefetching;
  h2d_q_.push_back(t);
  ++n_h2d_;
  bytes_h2d_ += r.nbytes;
  cv_.notify_all();
  return t;
}

std::shared_ptr<Task> Engine::issue_writeback_locked(int64_t g, GroupRec& r, bool keep_resident) {
  auto t = std::make_shared<Task>();
  t->kind = Task::kD2H;
  t->id = next_id_++;
  t->group = g;
  t->nbytes = r.nbytes;
  t->host = r.host;
  t->device = r.device;
  t->keep_resident = keep_resident;
#ifdef HIFT_EXT_WITH_CUDA
  if (is_cuda_) {
    // The D2H stream waits for everything enqueued so far on the compute (current) stream, i.e. the
    // update kernels of this group; no host-side synchronization.
    t->compute_ev = std::make_shared<at::cuda::CUDAEvent>(cudaEventDisableTiming);
    t->compute_ev->record(at::cuda::getCurrentCUDAStream(device_.index()));
  }
#endif
  assign_slot_locked(t);
  r.wb = t;
  d2h_q_.push_back(t);
  ++n_d2h_;
  bytes_d2h_ += r.nbytes;
  cv_.notify_all();
  return t;
}

// ------------------------------------------------------------------ public API (main thread)

void Engine::add_group(int64_t g, const std::vector<at::Tensor>& tensors) {
  GroupRec r;
  int64_t off = 0;
  for (const auto& t : tensors) {
    TORCH_CHECK(t.defined(), "hift_ext offload: add_group(", g, "): undefined tensor");
    TensorMeta m;
    m.sizes = t.sizes().vec();
    m.dtype = t.scalar_type();
    m.offset = off;
    m.nbytes = t.numel() * static_cast<int64_t>(t.element_size());
    off = round_up(off + m.nbytes, kAlign);
    r.metas.push_back(std::move(m));
  }
  r.nbytes = off;
  r.host = at::empty({r.nbytes}, at::TensorOptions().dtype(at::kByte).device(at::kCPU));
  auto hv = views(r.host, r.metas);
  for (size_t i = 0; i < tensors.size(); ++i) hv[i].copy_(tensors[i]);
  std::lock_guard<std::mutex> lk(mu_);
  TORCH_CHECK(!closed_, "hift_ext offload: add_group on a closed engine");
  TORCH_CHECK(groups_.find(g) == groups_.end(), "hift_ext offload: add_group(", g,
              "): group already added (use load_host to overwrite its state, or remove_group)");
  groups_.emplace(g, std::move(r));
}

void Engine::remove_group(int64_t g) {
  std::unique_lock<std::mutex> lk(mu_);
  auto& r = rec_locked(g, "remove_group");
  auto wb = r.wb, h2d = r.h2d;
  wait_task(lk, wb);
  wait_task(lk, h2d);
  // last H2D task that reads this group's store may be a discarded one: every task of the group
  // is older than the current queue tail, so waiting for the queues of this group suffices.
  std::vector<std::shared_ptr<Task>> mine;
  for (auto& t : h2d_q_)
    if (t->group == g) mine.push_back(t);
  for (auto& t : mine) wait_task(lk, t);
  auto it = groups_.find(g);
  if (it == groups_.end()) return;
  if (it->second.device.defined()) device_bytes_ -= it->second.nbytes;
  at::Tensor dev = std::move(it->second.device), host = std::move(it->second.host);
  groups_.erase(it);
  lk.unlock();
}

bool Engine::has_group(int64_t g) {
  std::lock_guard<std::mutex> lk(mu_);
  return groups_.count(g) > 0;
}

std::vector<int64_t> Engine::groups() {
  std::lock_guard<std::mutex> lk(mu_);
  std::vector<int64_t> out;
  for (auto& kv : groups_) out.push_back(kv.first);
  return out;
}

int64_t Engine::group_bytes(int64_t g) {
  std::lock_guard<std::mutex> lk(mu_);
  return rec_locked(g, "group_bytes").nbytes;
}

std::string Engine::residency(int64_t g) {
  std::lock_guard<std::mutex> lk(mu_);
  auto& r = rec_locked(g, "residency");
  switch (r.state) {
    case GroupRec::kPrefetching: return "prefetching";
    case GroupRec::kResident: return "device";
    default: return (r.wb && !r.wb->cpu_finished) ? "writing_back" : "host";
  }
}

void Engine::reserve(int64_t nbytes) {
  // Grow idle slots now (on this thread, so errors and warnings reach the caller); busy slots grow
  // in the worker when next used. Only this (API) thread hands slots to tasks, so an idle slot
  // stays idle while we replace its buffer.
  std::vector<size_t> idle;
  {
    std::lock_guard<std::mutex> lk(mu_);
    reserve_bytes_ = std::max(reserve_bytes_, nbytes);
    for (size_t i = 0; i < slots_.size(); ++i) {
      auto& last = slots_[i].last;
      bool free = !last || last->cpu_finished;
#ifdef HIFT_EXT_WITH_CUDA
      if (free && last && last->copy_ev && last->copy_ev->isCreated()) free = last->copy_ev->query();
#endif
      if (slots_[i].cap < nbytes && free) idle.push_back(i);
    }
  }
  for (size_t i : idle) {
    at::Tensor old;
    {
      std::lock_guard<std::mutex> lk(mu_);
      old = std::move(slots_[i].buf);
      slots_[i].cap = 0;
    }
    old.reset();
    bool pinned = false;
    at::Tensor buf = alloc_slot(nbytes, &pinned);
    std::lock_guard<std::mutex> lk(mu_);
    slots_[i].buf = std::move(buf);
    slots_[i].cap = nbytes;
    slots_[i].pinned = pinned;
  }
}

void Engine::prefetch(int64_t g) {
  std::lock_guard<std::mutex> lk(mu_);
  auto& r = rec_locked(g, "prefetch");
  if (r.state == GroupRec::kHost) issue_prefetch_locked(g, r);
}

std::vector<at::Tensor> Engine::fetch(int64_t g) {
  std::unique_lock<std::mutex> lk(mu_);
  auto& r = rec_locked(g, "fetch");
  if (r.state == GroupRec::kHost) issue_prefetch_locked(g, r);
  if (r.state == GroupRec::kPrefetching) {
    auto t = r.h2d;
    if (!t->cpu_finished) ++fetch_waits_;
    wait_task(lk, t);
    if (t->error) {
      r.state = GroupRec::kHost;
      r.h2d.reset();
      at::Tensor dev = std::move(r.device);
      device_bytes_ -= r.nbytes;
      lk.unlock();
      std::rethrow_exception(t->error);
    }
#ifdef HIFT_EXT_WITH_CUDA
    if (is_cuda_) {
      auto cur = at::cuda::getCurrentCUDAStream(device_.index());
      t->copy_ev->block(cur);  // the compute stream waits for the H2D copy; the host does not
      if (cur.id() != r.alloc_stream) r.device.record_stream(cur.unwrap());
    }
#endif
    r.state = GroupRec::kResident;
    r.h2d.reset();
  }
  return views(r.device, r.metas);
}

void Engine::release(int64_t g) {
  std::unique_lock<std::mutex> lk(mu_);
  auto& r = rec_locked(g, "release");
  at::Tensor drop;
  if (r.state == GroupRec::kResident) {
    issue_writeback_locked(g, r, /*keep_resident=*/false);
    drop = std::move(r.device);  // the task holds it until the D2H copy is enqueued + recorded
    r.state = GroupRec::kHost;
  } else if (r.state == GroupRec::kPrefetching) {
    // Prefetched but never fetched: the host store is still the truth, drop the device copy (the
    // H2D task keeps its own reference, and record_stream protects the copy in flight).
    drop = std::move(r.device);
    r.h2d.reset();
    device_bytes_ -= r.nbytes;
    r.state = GroupRec::kHost;
  }
  lk.unlock();
}

void Engine::flush(int64_t g) {
  std::unique_lock<std::mutex> lk(mu_);
  auto& r = rec_locked(g, "flush");
  // The group stays resident, so the next update kernels may overwrite r.device: wait until the
  // D2H copy has read it, or the host store could mix old and new state.
  if (r.state == GroupRec::kResident)
    wait_rethrow(lk, issue_writeback_locked(g, r, /*keep_resident=*/true), "flush");
}

std::vector<at::Tensor> Engine::host_tensors(int64_t g) {
  std::unique_lock<std::mutex> lk(mu_);
  auto& r = rec_locked(g, "host_tensors");
  std::shared_ptr<Task> t;
  if (r.state == GroupRec::kResident)
    t = issue_writeback_locked(g, r, /*keep_resident=*/true);  // the device copy is the truth
  else
    t = r.wb;
  wait_rethrow(lk, t, "write-back");
  return views(r.host, r.metas);
}

std::vector<at::Tensor> Engine::host_views(int64_t g) {
  std::lock_guard<std::mutex> lk(mu_);
  auto& r = rec_locked(g, "host_views");
  return views(r.host, r.metas);
}

void Engine::load_host(int64_t g, const std::vector<at::Tensor>& tensors) {
  std::unique_lock<std::mutex> lk(mu_);
  auto& r = rec_locked(g, "load_host");
  TORCH_CHECK(tensors.size() == r.metas.size(), "hift_ext offload: load_host(", g, "): expected ",
              r.metas.size(), " tensors, got ", tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& m = r.metas[i];
    TORCH_CHECK(tensors[i].sizes().vec() == m.sizes && tensors[i].scalar_type() == m.dtype,
                "hift_ext offload: load_host(", g, "): tensor ", i, " has shape ",
                shape_str(tensors[i].sizes().vec()), " and dtype ", tensors[i].scalar_type(),
                ", the group holds ", shape_str(m.sizes), " ", m.dtype);
  }
  // Nothing may read or write this group's store while we overwrite it.
  wait_task(lk, r.wb);
  std::vector<std::shared_ptr<Task>> readers;
  for (auto& t : h2d_q_)
    if (t->group == g) readers.push_back(t);
  if (r.h2d) readers.push_back(r.h2d);
  for (auto& t : readers) wait_task(lk, t);
  at::Tensor drop;
  if (r.state == GroupRec::kPrefetching) {
    drop = std::move(r.device);
    r.h2d.reset();
    device_bytes_ -= r.nbytes;
    r.state = GroupRec::kHost;
  }
  const bool resident = r.state == GroupRec::kResident;
  at::Tensor host = r.host, dev = resident ? r.device : at::Tensor();
  auto metas = r.metas;
  lk.unlock();  // the copies may synchronize with the device: do not hold the engine lock
  drop.reset();
  auto hv = views(host, metas);
  for (size_t i = 0; i < tensors.size(); ++i)
    if (hv[i].data_ptr() != tensors[i].data_ptr() || tensors[i].device() != hv[i].device()) hv[i].copy_(tensors[i]);
  if (resident) {
    auto dv = views(dev, metas);
    for (size_t i = 0; i < tensors.size(); ++i) dv[i].copy_(hv[i], /*non_blocking=*/false);
  }
}

void Engine::synchronize() {
  std::vector<std::shared_ptr<Task>> all;
  std::unique_lock<std::mutex> lk(mu_);
  for (auto& t : h2d_q_) all.push_back(t);
  for (auto& t : d2h_q_) all.push_back(t);
  for (auto& kv : groups_) {
    if (kv.second.wb) all.push_back(kv.second.wb);
    if (kv.second.h2d) all.push_back(kv.second.h2d);
  }
  for (auto& t : all) wait_task(lk, t);
  lk.unlock();
#ifdef HIFT_EXT_WITH_CUDA
  if (is_cuda_)
    for (auto& t : all)
      if (t->copy_ev && t->copy_ev->isCreated()) t->copy_ev->synchronize();
#endif
  for (auto& t : all)
    if (t->error && t->kind == Task::kD2H) std::rethrow_exception(t->error);
}

std::map<std::string, int64_t> Engine::memory_report() {
  std::lock_guard<std::mutex> lk(mu_);
  std::map<std::string, int64_t> m;
  int64_t pinned = 0, slot_bytes = 0, store = 0, resident = 0;
  for (auto& s : slots_) {
    slot_bytes += s.cap;
    if (s.pinned) pinned += s.cap;
  }
  int64_t largest = 0;
  for (auto& kv : groups_) {
    store += kv.second.nbytes;
    largest = std::max(largest, kv.second.nbytes);
    if (kv.second.state == GroupRec::kResident) ++resident;
  }
  m["device_bytes"] = device_bytes_;
  m["device_peak_bytes"] = device_peak_;
  m["pinned_bytes"] = pinned;
  m["slot_bytes"] = slot_bytes;
  m["host_store_bytes"] = store;
  m["largest_group_bytes"] = largest;
  m["num_groups"] = static_cast<int64_t>(groups_.size());
  m["resident_groups"] = resident;
  m["num_slots"] = static_cast<int64_t>(slots_.size());
  return m;
}

std::map<std::string, int64_t> Engine::stats() {
  std::lock_guard<std::mutex> lk(mu_);
  int64_t queued = static_cast<int64_t>(h2d_q_.size() + d2h_q_.size());
  return {{"h2d_copies", n_h2d_},   {"d2h_copies", n_d2h_},     {"h2d_bytes", bytes_h2d_},
          {"d2h_bytes", bytes_d2h_}, {"slot_waits", slot_waits_}, {"fetch_waits", fetch_waits_},
          {"violations", violations_}, {"queued", queued}};
}

// ------------------------------------------------------------------ workers

int64_t Engine::pipeline_piece(int64_t n) const {
  // Debug mode checksums whole slots: keep the one-shot path there.
  if (!is_cuda_ || debug_ || pipeline_bytes_ <= 0 || n <= 2 * pipeline_bytes_) return 0;
  return round_up(pipeline_bytes_, kAlign);
}

void Engine::set_tuning(int64_t pipeline_bytes, int64_t copy_threads) {
  TORCH_CHECK(copy_threads >= 1, "hift_ext offload: copy_threads must be >= 1, got ", copy_threads);
  TORCH_CHECK(pipeline_bytes >= 0, "hift_ext offload: pipeline_bytes must be >= 0, got ", pipeline_bytes);
  pipeline_bytes_ = pipeline_bytes;
  copy_threads_ = copy_threads;
}

void Engine::debug_pause() {
  if (debug_delay_us_ <= 0) return;
  thread_local std::mt19937 rng(std::hash<std::thread::id>()(std::this_thread::get_id()));
  std::uniform_real_distribution<double> d(0.0, debug_delay_us_);
  std::this_thread::sleep_for(std::chrono::duration<double, std::micro>(d(rng)));
}

void Engine::worker_loop(std::deque<std::shared_ptr<Task>>* q) {
  for (;;) {
    std::shared_ptr<Task> t;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return stop_ || !q->empty(); });
      if (q->empty()) return;  // stop_ and drained
      t = q->front();          // stays in the queue (visible to load_host / remove_group) until done
    }
    run_task(t);
    {
      std::lock_guard<std::mutex> lk(mu_);
      q->pop_front();
    }
    cv_.notify_all();
  }
}

void Engine::run_task(const std::shared_ptr<Task>& t) {
  try {
    if (t->kind == Task::kH2D)
      run_h2d(t);
    else
      run_d2h(t);
  } catch (...) {
    std::lock_guard<std::mutex> lk(mu_);
    t->error = std::current_exception();
  }
  finish(t);
}

void Engine::finish(const std::shared_ptr<Task>& t) {
  at::Tensor dev = std::move(t->device), host = std::move(t->host);
  {
    std::lock_guard<std::mutex> lk(mu_);
    t->cpu_finished = true;
    t->after.reset();
    t->prev_slot_user.reset();
  }
  cv_.notify_all();
}

void* Engine::acquire_slot(const std::shared_ptr<Task>& t) {
  std::shared_ptr<Task> prev;
  {
    std::unique_lock<std::mutex> lk(mu_);
    prev = t->prev_slot_user;
    if (prev && !prev->cpu_finished) ++slot_waits_;
    if (prev) cv_.wait(lk, [&] { return prev->cpu_finished; });
    t->prev_slot_user.reset();
  }
#ifdef HIFT_EXT_WITH_CUDA
  // The previous user's H2D copy still reads the slot until its event completes.
  if (prev && prev->kind == Task::kH2D && prev->copy_ev && prev->copy_ev->isCreated())
    prev->copy_ev->synchronize();
#endif
  Slot& s = slots_[static_cast<size_t>(t->slot)];
  int64_t cap;
  {
    std::lock_guard<std::mutex> lk(mu_);
    cap = s.cap;
  }
  if (cap < t->nbytes) {
    int64_t want = t->nbytes;
    {
      std::lock_guard<std::mutex> lk(mu_);
      for (auto& kv : groups_) want = std::max(want, kv.second.nbytes);  // size to the largest group
      want = std::max(want, reserve_bytes_);
    }
    bool pinned = false;
    at::Tensor old;
    {
      std::lock_guard<std::mutex> lk(mu_);
      old = std::move(s.buf);
      s.cap = 0;
    }
    old.reset();  // free before allocating the bigger one (peak pinned memory)
    at::Tensor buf = alloc_slot(want, &pinned);
    std::lock_guard<std::mutex> lk(mu_);
    s.buf = std::move(buf);
    s.cap = want;
    s.pinned = pinned;
  }
  // Claim the slot for t: debug checks compare the tag and the writing flag at every stage.
  std::lock_guard<std::mutex> lk(mu_);
  s.tag = t->id;
  s.writing = true;
  return s.buf.defined() ? s.buf.data_ptr() : nullptr;
}

void Engine::run_h2d(const std::shared_ptr<Task>& t) {
  // The store of this group must hold its last write-back.
  {
    std::unique_lock<std::mutex> lk(mu_);
    auto after = t->after;
    if (after) {
      cv_.wait(lk, [&] { return after->cpu_finished; });
      if (after->error) std::rethrow_exception(after->error);
    }
  }
  void* slot_ptr = acquire_slot(t);
  Slot& s = slots_[static_cast<size_t>(t->slot)];
  const int64_t n = t->nbytes;
  debug_pause();
#ifdef HIFT_EXT_WITH_CUDA
  if (const int64_t piece = pipeline_piece(n)) {
    // Piece by piece: the DMA of one piece runs while the next is staged, so the device copy is
    // complete one piece after the staging instead of a whole group's transfer later.
    c10::cuda::CUDAGuard guard(device_.index());
    auto st = *h2d_stream_;
    t->alloc_ev->block(st);  // the buffer's previous life on the compute stream is over
    auto* dst = static_cast<char*>(t->device.data_ptr());
    auto* stage = static_cast<char*>(slot_ptr);
    const auto* src = static_cast<const char*>(t->host.data_ptr());
    for (int64_t off = 0; off < n; off += piece) {
      const int64_t len = std::min(piece, n - off);
      host_copy(stage + off, src + off, len, copy_threads_);
      cuda_check(cudaMemcpyAsync(dst + off, stage + off, static_cast<size_t>(len), cudaMemcpyHostToDevice,
                                 st.stream()),
                 "cudaMemcpyAsync (host slot -> device)");
    }
    t->copy_ev->record(st);
    t->device.record_stream(st.unwrap());
    std::lock_guard<std::mutex> lk(mu_);
    s.writing = false;
    if (s.tag != t->id) ++violations_;
    return;
  }
#endif
  host_copy(slot_ptr, t->host.data_ptr(), n, copy_threads_);  // stage 1: host store -> slot
  if (debug_) t->checksum = checksum(slot_ptr, n);
  {
    std::lock_guard<std::mutex> lk(mu_);
    s.writing = false;
  }
  debug_pause();
  auto check_slot = [&] {
    std::lock_guard<std::mutex> lk(mu_);
    if (s.tag != t->id || s.writing) ++violations_;
  };
  check_slot();
  if (is_cuda_) {
#ifdef HIFT_EXT_WITH_CUDA
    c10::cuda::CUDAGuard guard(device_.index());
    auto st = *h2d_stream_;
    t->alloc_ev->block(st);  // the buffer's previous life on the compute stream is over
    if (n > 0)
      cuda_check(cudaMemcpyAsync(t->device.data_ptr(), slot_ptr, static_cast<size_t>(n),
                                 cudaMemcpyHostToDevice, st.stream()),
                 "cudaMemcpyAsync (host slot -> device)");
    t->copy_ev->record(st);  // device ready + slot free, for fetch() and the slot's next user
    // The buffer was allocated on the compute stream: the allocator must not hand it out again
    // before this copy is done, even if the group is released or dropped right away.
    t->device.record_stream(st.unwrap());
#endif
  } else {
    if (debug_ && checksum(slot_ptr, n) != t->checksum) {
      std::lock_guard<std::mutex> lk(mu_);
      ++violations_;
    }
    host_copy(t->device.data_ptr(), slot_ptr, n, copy_threads_);  // stage 2: slot -> "device"
    check_slot();
    if (debug_ && checksum(t->device.data_ptr(), n) != t->checksum) {
      std::lock_guard<std::mutex> lk(mu_);
      ++violations_;
    }
  }
}

void Engine::run_d2h(const std::shared_ptr<Task>& t) {
  bool stored = false;  // the pipelined CUDA path writes the host store itself
  void* slot_ptr = acquire_slot(t);
  Slot& s = slots_[static_cast<size_t>(t->slot)];
  const int64_t n = t->nbytes;
  debug_pause();
  if (is_cuda_) {
#ifdef HIFT_EXT_WITH_CUDA
    c10::cuda::CUDAGuard guard(device_.index());
    auto st = *d2h_stream_;
    t->compute_ev->block(st);  // after the group's update kernels on the compute stream
    if (const int64_t piece = pipeline_piece(n)) {
      // Piece by piece: each piece moves on to the host store as soon as its DMA is done.
      std::vector<at::cuda::CUDAEvent> landed;
      landed.reserve(static_cast<size_t>((n + piece - 1) / piece));
      const auto* src = static_cast<const char*>(t->device.data_ptr());
      auto* stage = static_cast<char*>(slot_ptr);
      for (int64_t off = 0; off < n; off += piece) {
        cuda_check(cudaMemcpyAsync(stage + off, src + off, static_cast<size_t>(std::min(piece, n - off)),
                                   cudaMemcpyDeviceToHost, st.stream()),
                   "cudaMemcpyAsync (device -> host slot)");
        landed.emplace_back(kWaitedEventFlags);
        landed.back().record(st);
      }
      t->device.record_stream(st.unwrap());
      t->device.reset();
      auto* dst = static_cast<char*>(t->host.data_ptr());
      for (size_t i = 0; i < landed.size(); ++i) {
        const int64_t off = static_cast<int64_t>(i) * piece;
        landed[i].synchronize();
        host_copy(dst + off, stage + off, std::min(piece, n - off), copy_threads_);
      }
      stored = true;
    } else {
    if (n > 0)
      cuda_check(cudaMemcpyAsync(slot_ptr, t->device.data_ptr(), static_cast<size_t>(n),
                                 cudaMemcpyDeviceToHost, st.stream()),
                 "cudaMemcpyAsync (device -> host slot)");
    at::cuda::CUDAEvent done(kWaitedEventFlags);
    done.record(st);
    // Device memory goes back to the allocator now, but is reused only after this copy finished.
    t->device.record_stream(st.unwrap());
    t->device.reset();
    done.synchronize();  // this worker (not the compute stream) waits for the copy
    }
#endif
  } else {
    host_copy(slot_ptr, t->device.data_ptr(), n, copy_threads_);  // stage 1: "device" -> slot
    t->device.reset();
  }
  if (debug_) t->checksum = checksum(slot_ptr, n);
  {
    std::lock_guard<std::mutex> lk(mu_);
    s.writing = false;
  }
  debug_pause();
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (s.tag != t->id || s.writing) ++violations_;
  }
  if (!stored) host_copy(t->host.data_ptr(), slot_ptr, n, copy_threads_);  // stage 2: slot -> host store
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (s.tag != t->id || s.writing) ++violations_;
    if (debug_ && checksum(t->host.data_ptr(), n) != t->checksum) ++violations_;
    if (!t->keep_resident) device_bytes_ -= n;
  }
}

// ------------------------------------------------------------------ bindings

void bind_engine(pybind11::module_& m) {
  namespace py = pybind11;
  using G = py::call_guard<py::gil_scoped_release>;
  py::class_<Engine, std::shared_ptr<Engine>>(m, "OffloadEngine", R"doc(
Optimizer-state offload engine (C++). Use hift_ext.offload.OffloadEngine, the Python layer.
)doc")
      .def(py::init<const std::string&, int64_t, int64_t, double, bool>(), py::arg("device"),
           py::arg("num_slots") = 2, py::arg("pinned") = -1, py::arg("debug_delay_us") = 0.0,
           py::arg("debug") = false)
      .def("add_group", &Engine::add_group, G())
      .def("remove_group", &Engine::remove_group, G())
      .def("has_group", &Engine::has_group)
      .def("groups", &Engine::groups)
      .def("group_bytes", &Engine::group_bytes)
      .def("reserve", &Engine::reserve, G())
      .def("prefetch", &Engine::prefetch, G())
      .def("fetch", &Engine::fetch, G())
      .def("release", &Engine::release, G())
      .def("flush", &Engine::flush, G())
      .def("host_tensors", &Engine::host_tensors, G())
      .def("host_views", &Engine::host_views)
      .def("load_host", &Engine::load_host, G())
      .def("residency", &Engine::residency)
      .def("synchronize", &Engine::synchronize, G())
      .def("set_tuning", &Engine::set_tuning, py::arg("pipeline_bytes"), py::arg("copy_threads"))
      .def("tuning", &Engine::tuning)
      .def("memory_report", &Engine::memory_report)
      .def("stats", &Engine::stats)
      .def("close", &Engine::close, G())
      .def_property_readonly("device", &Engine::device_str)
      .def_property_readonly("num_slots", &Engine::num_slots)
      .def_property_readonly("is_cuda", &Engine::is_cuda);
}

}  // namespace offload
}  // namespace hift_ext
