#include "engine.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <random>
#include <sstream>
#include <stdexcept>

namespace hift_ext {
namespace offload {

namespace {

int64_t round_up(int64_t n, int64_t a) { return (n + a - 1) / a * a; }

#ifdef HIFT_EXT_WITH_CUDA
// Events a worker thread synchronizes on (copy done): blocking sync puts the waiting worker to
// sleep instead of spinning in the driver beside the training thread, which launches kernels
// through the same driver (and, on a virtualized GPU, the same ioctl path).
constexpr unsigned int kWaitedEventFlags = cudaEventDisableTiming | cudaEventBlockingSync;

void cuda_check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "hift_ext offload: ", what, " failed: ", cudaGetErrorString(err));
}
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

// Copies the packed byte range [off, off + len) of a piece between its staging buffer and the
// host store (gather for H2D, scatter for D2H). Padding between segments is not copied.
void pack_range(const std::vector<Segment>& segs, char* stage, const char* host, int64_t off, int64_t len,
                int64_t threads) {
  for (const auto& s : segs) {
    const int64_t a = std::max(off, s.dev_off), b = std::min(off + len, s.dev_off + s.nbytes);
    if (a < b) host_copy(stage + a, host + s.host_off + (a - s.dev_off), b - a, threads);
  }
}
void unpack_range(const std::vector<Segment>& segs, const char* stage, char* host, int64_t off, int64_t len,
                  int64_t threads) {
  for (const auto& s : segs) {
    const int64_t a = std::max(off, s.dev_off), b = std::min(off + len, s.dev_off + s.nbytes);
    if (a < b) host_copy(host + s.host_off + (a - s.dev_off), stage + a, b - a, threads);
  }
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

uint64_t segments_checksum(const std::vector<Segment>& segs, const char* base, bool packed) {
  uint64_t h = 0;
  for (const auto& s : segs) h = h * 31 + checksum(base + (packed ? s.dev_off : s.host_off), s.nbytes);
  return h;
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

std::string what_of(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const c10::Error& err) {
    return err.what_without_backtrace();
  } catch (const std::exception& err) {
    return err.what();
  } catch (...) {
    return "unknown error";
  }
}

// A typed view of `nbytes` at byte offset `off` of `base`'s storage.
at::Tensor typed_view(const at::Tensor& base, int64_t off, at::ScalarType dtype, const std::vector<int64_t>& sizes) {
  auto t = at::empty({0}, base.options().dtype(dtype));
  const int64_t es = static_cast<int64_t>(c10::elementSize(dtype));
  t.set_(base.storage(), (base.storage_offset() + off) / es, sizes, contiguous_strides(sizes));
  return t;
}

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
  // Copies may still target the arena or an overflow buffer: wait for them before that memory
  // goes back to the allocator with the engine.
  if (is_cuda_) {
    std::vector<std::shared_ptr<Task>> pending;
    {
      std::lock_guard<std::mutex> lk(mu_);
      for (auto& kv : groups_)
        for (auto& p : kv.second.pieces) {
          if (p.h2d) pending.push_back(p.h2d);
          if (p.wb) pending.push_back(p.wb);
        }
      for (auto& f : fences_)
        if (f.task) pending.push_back(f.task);
    }
    for (auto& t : pending)
      if (t->done_ev && t->done_ev->isCreated()) t->done_ev->synchronize();
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

PieceRec& Engine::piece_locked(GroupRec& r, int64_t g, int64_t piece, const char* what) {
  TORCH_CHECK(piece >= 0 && piece < static_cast<int64_t>(r.pieces.size()), "hift_ext offload: ", what,
              "(", g, ", piece=", piece, "): group ", g, " has ", r.pieces.size(), " piece(s)");
  return r.pieces[static_cast<size_t>(piece)];
}

void Engine::assign_slot_locked(const std::shared_ptr<Task>& t) {
  const size_t i = static_cast<size_t>(next_slot_++ % slots_.size());
  t->slot = static_cast<int>(i);
  t->prev_slot_user = slots_[i].last;
  slots_[i].last = t;
}

void Engine::default_pieces(GroupRec& r) {
  PieceRec p;
  for (size_t i = 0; i < r.metas.size(); ++i) {
    const auto& m = r.metas[i];
    p.segs.push_back({static_cast<int64_t>(i), 0, m.numel, m.offset, m.offset, m.nbytes});
  }
  p.nbytes = r.nbytes;
  r.pieces.clear();
  r.pieces.push_back(std::move(p));
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
                cudaGetErrorString(err), "). Use fewer slots (num_slots), a smaller device budget, raise "
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

void Engine::wait_task(std::unique_lock<std::mutex>& lk, const std::shared_ptr<Task>& t) {
  if (!t) return;
  cv_.wait(lk, [&] { return t->cpu_finished; });
}

void Engine::wait_group_idle_locked(std::unique_lock<std::mutex>& lk, int64_t g) {
  // Every task that reads or writes g's store: the queued ones and each piece's last two.
  std::vector<std::shared_ptr<Task>> mine;
  for (auto& t : h2d_q_)
    if (t->group == g) mine.push_back(t);
  for (auto& t : d2h_q_)
    if (t->group == g) mine.push_back(t);
  auto it = groups_.find(g);
  if (it != groups_.end())
    for (auto& p : it->second.pieces) {
      if (p.wb) mine.push_back(p.wb);
      if (p.h2d) mine.push_back(p.h2d);
    }
  for (auto& t : mine) wait_task(lk, t);
}

void Engine::rethrow_wb_error(int64_t g, int64_t j, const PieceRec& p) {
  if (!p.wb_error) return;
  TORCH_CHECK(false, "hift_ext offload: the write-back (device -> host) of group ", g, " piece ", j,
              " failed: ", what_of(p.wb_error), ". The host store still holds that group's state from "
              "before the update whose write-back failed (load_host or remove_group clears this)");
}

void Engine::ensure_arena_locked(std::unique_lock<std::mutex>& lk, int64_t piece_bytes) {
  if (budget_fixed_) {
    TORCH_CHECK(piece_bytes <= 2 * quarter_, "hift_ext offload: a piece of ", piece_bytes,
                " bytes does not fit half of the device budget (", budget_, " bytes); cut the group "
                "into smaller pieces (set_pieces) or raise the budget");
    return;
  }
  int64_t largest = piece_bytes;
  for (auto& kv : groups_)
    for (auto& p : kv.second.pieces) largest = std::max(largest, p.nbytes);
  if (budget_ > 0 && largest <= 2 * quarter_) return;
  // Automatic size: two halves, each holding the largest piece (one being updated or written back
  // while the next is prefetched). Growing needs the old arena idle: nothing leased, nothing in
  // flight; otherwise this piece takes an overflow buffer (counted) and the arena grows later.
  if (budget_ > 0)
    for (bool l : leased_)
      if (l) return;
  reallocate_arena_locked(lk, round_up((largest + 1) / 2, kAlign));
}

void Engine::reallocate_arena_locked(std::unique_lock<std::mutex>& lk, int64_t quarter) {
  // Every copy into or out of the old arena and the compute work fenced on it must be done.
  std::vector<std::shared_ptr<Task>> all(h2d_q_.begin(), h2d_q_.end());
  all.insert(all.end(), d2h_q_.begin(), d2h_q_.end());
  for (auto& f : fences_)
    if (f.task) all.push_back(f.task);
  for (auto& t : all) wait_task(lk, t);
#ifdef HIFT_EXT_WITH_CUDA
  for (auto& t : all)
    if (t->done_ev && t->done_ev->isCreated()) t->done_ev->synchronize();
  for (auto& f : fences_)
    if (f.compute_ev && f.compute_ev->isCreated()) f.compute_ev->synchronize();
#endif
  for (auto& f : fences_) f = Fence{};
  at::Tensor old = std::move(arena_);
  old.reset();
#ifdef HIFT_EXT_WITH_CUDA
  c10::optional<c10::cuda::CUDAGuard> guard;
  if (is_cuda_) guard.emplace(device_.index());
#endif
  arena_ = at::empty({kQuarters * quarter}, at::TensorOptions().dtype(at::kByte).device(device_));
  budget_ = kQuarters * quarter;
  quarter_ = quarter;
  ++arena_allocs_;
  device_peak_ = std::max(device_peak_, budget_ + overflow_bytes_);
  fence_new_arena_locked();
}

void Engine::fence_new_arena_locked() {
#ifdef HIFT_EXT_WITH_CUDA
  // The allocator may hand out a block the compute stream still uses: the first copies into the
  // arena (on the H2D stream) wait for the compute stream's work so far.
  if (is_cuda_) {
    auto ev = std::make_shared<at::cuda::CUDAEvent>(cudaEventDisableTiming);
    ev->record(at::cuda::getCurrentCUDAStream(device_.index()));
    for (auto& f : fences_) f.compute_ev = ev;
  }
#endif
}

void Engine::lease_locked(PieceRec& p, const std::shared_ptr<Task>& t) {
  p.quarter = -1;
  p.nquarters = 0;
  if (p.nbytes == 0) return;
  const bool fits = arena_.defined() && p.nbytes <= 2 * quarter_;
  const int m = p.nbytes <= quarter_ ? 1 : 2;
  int best = -1;
  uint64_t best_seq = 0;
  for (int q = 0; fits && q + m <= kQuarters; q += m) {
    bool free = true;
    uint64_t seq = 0;
    for (int k = q; k < q + m; ++k) {
      free = free && !leased_[k];
      seq = std::max(seq, fences_[k].seq);
    }
    if (free && (best < 0 || seq < best_seq)) {
      best = q;
      best_seq = seq;
    }
  }
  if (best >= 0) {
    p.quarter = best;
    p.nquarters = m;
    for (int k = best; k < best + m; ++k) {
      leased_[k] = true;
      if (fences_[k].task) t->fences.push_back(fences_[k].task);
#ifdef HIFT_EXT_WITH_CUDA
      if (fences_[k].compute_ev) t->fence_evs.push_back(fences_[k].compute_ev);
#endif
    }
    t->dev = static_cast<char*>(arena_.data_ptr()) + static_cast<int64_t>(best) * quarter_;
  } else {
    // No free quarters (more pieces leased at once than the arena holds): a temporary buffer.
#ifdef HIFT_EXT_WITH_CUDA
    c10::optional<c10::cuda::CUDAGuard> guard;
    if (is_cuda_) guard.emplace(device_.index());
#endif
    p.overflow = at::empty({p.nbytes}, at::TensorOptions().dtype(at::kByte).device(device_));
    ++overflow_allocs_;
    overflow_bytes_ += p.nbytes;
    t->dev = static_cast<char*>(p.overflow.data_ptr());
    t->dev_keep = p.overflow;
#ifdef HIFT_EXT_WITH_CUDA
    if (is_cuda_) {
      // The allocator may hand out a block the compute stream still uses.
      auto ev = std::make_shared<at::cuda::CUDAEvent>(cudaEventDisableTiming);
      ev->record(at::cuda::getCurrentCUDAStream(device_.index()));
      t->fence_evs.push_back(ev);
    }
#endif
  }
  leased_bytes_ += p.nbytes;
  leased_peak_ = std::max(leased_peak_, leased_bytes_);
  device_peak_ = std::max(device_peak_, budget_ + overflow_bytes_);
}

void Engine::unlease_locked(PieceRec& p, const std::shared_ptr<Task>& last_user, bool used_by_compute) {
  if (p.nbytes == 0) return;
  leased_bytes_ -= p.nbytes;
  if (p.quarter >= 0) {
    Fence f;
    f.task = last_user;
    f.seq = ++use_seq_;
#ifdef HIFT_EXT_WITH_CUDA
    if (is_cuda_ && used_by_compute) {
      f.compute_ev = std::make_shared<at::cuda::CUDAEvent>(cudaEventDisableTiming);
      f.compute_ev->record(at::cuda::getCurrentCUDAStream(device_.index()));
    }
#endif
    for (int k = p.quarter; k < p.quarter + p.nquarters; ++k) {
      leased_[k] = false;
      fences_[k] = f;
    }
  } else if (p.overflow.defined()) {
    overflow_bytes_ -= p.nbytes;
#ifdef HIFT_EXT_WITH_CUDA
    // Compute work enqueued on it is ordered by the allocator (it was allocated on this stream).
    (void)used_by_compute;
#endif
    p.overflow = at::Tensor();  // tasks that still copy it hold their own reference (dev_keep)
  }
  p.quarter = -1;
  p.nquarters = 0;
}

void Engine::drop_piece_locked(PieceRec& p) {
  // A prefetched piece nobody used, or a resident one whose group is removed / reloaded.
  if (p.state == PieceRec::kHost) return;
  unlease_locked(p, p.h2d, /*used_by_compute=*/p.state == PieceRec::kResident);
  p.h2d.reset();
  p.state = PieceRec::kHost;
}

char* Engine::piece_dev_locked(PieceRec& p) {
  if (p.quarter >= 0) return static_cast<char*>(arena_.data_ptr()) + static_cast<int64_t>(p.quarter) * quarter_;
  if (p.overflow.defined()) return static_cast<char*>(p.overflow.data_ptr());
  return nullptr;
}

std::vector<at::Tensor> Engine::device_views_locked(GroupRec& r, PieceRec& p) {
  std::vector<at::Tensor> out;
  out.reserve(p.segs.size());
  const at::Tensor& base = p.quarter >= 0 ? arena_ : p.overflow;
  const int64_t base_off = p.quarter >= 0 ? static_cast<int64_t>(p.quarter) * quarter_ : 0;
  for (const auto& s : p.segs) {
    const auto& m = r.metas[static_cast<size_t>(s.tensor)];
    const bool whole = s.begin == 0 && s.end == m.numel;
    const std::vector<int64_t> sizes = whole ? m.sizes : std::vector<int64_t>{s.end - s.begin};
    if (!base.defined()) {  // an empty piece
      out.push_back(at::empty(sizes, at::TensorOptions().dtype(m.dtype).device(device_)));
      continue;
    }
    out.push_back(typed_view(base, base_off + s.dev_off, m.dtype, sizes));
  }
  return out;
}

std::vector<at::Tensor> Engine::host_tensor_views(const GroupRec& r) {
  // One storage per tensor (not views of one byte buffer): torch.save refuses several views of one
  // storage with different dtypes, and a deepcopy copies each tensor alone. The deleter keeps the
  // group's buffer alive.
  std::vector<at::Tensor> out;
  out.reserve(r.metas.size());
  auto* base = static_cast<char*>(r.host.data_ptr());
  for (const auto& m : r.metas) {
    at::Tensor keep = r.host;
    out.push_back(at::from_blob(
        base + m.offset, m.sizes, [keep](void*) mutable { keep.reset(); },
        at::TensorOptions().dtype(m.dtype).device(at::kCPU)));
  }
  return out;
}

std::shared_ptr<Task> Engine::issue_prefetch_locked(std::unique_lock<std::mutex>& lk, int64_t g, GroupRec& r,
                                                    int64_t j) {
  PieceRec& p = r.pieces[static_cast<size_t>(j)];
  if (p.wb && p.wb->cpu_finished && p.wb->error && !p.wb_error) p.wb_error = p.wb->error;
  rethrow_wb_error(g, j, p);
  if (p.nbytes > 0) ensure_arena_locked(lk, p.nbytes);
  auto t = std::make_shared<Task>();
  t->kind = Task::kH2D;
  t->id = next_id_++;
  t->group = g;
  t->piece = j;
  t->nbytes = p.nbytes;
  t->segs = p.segs;
  t->host = r.host;
  if (p.wb && !p.wb->cpu_finished) t->after = p.wb;
  lease_locked(p, t);
#ifdef HIFT_EXT_WITH_CUDA
  if (is_cuda_) t->done_ev = std::make_shared<at::cuda::CUDAEvent>(kWaitedEventFlags);
#endif
  assign_slot_locked(t);
  p.h2d = t;
  p.state = PieceRec::kPrefetching;
  h2d_q_.push_back(t);
  ++n_h2d_;
  bytes_h2d_ += p.nbytes;
  cv_.notify_all();
  return t;
}

std::shared_ptr<Task> Engine::issue_writeback_locked(int64_t g, GroupRec& r, int64_t j, bool keep_resident) {
  PieceRec& p = r.pieces[static_cast<size_t>(j)];
  auto t = std::make_shared<Task>();
  t->kind = Task::kD2H;
  t->id = next_id_++;
  t->group = g;
  t->piece = j;
  t->nbytes = p.nbytes;
  t->segs = p.segs;
  t->host = r.host;
  t->dev = piece_dev_locked(p);
  if (p.overflow.defined()) t->dev_keep = p.overflow;
  t->keep_resident = keep_resident;
#ifdef HIFT_EXT_WITH_CUDA
  if (is_cuda_) {
    // The D2H stream waits for everything enqueued so far on the compute (current) stream, i.e. the
    // update kernels of this piece; no host-side synchronization.
    t->compute_ev = std::make_shared<at::cuda::CUDAEvent>(cudaEventDisableTiming);
    t->compute_ev->record(at::cuda::getCurrentCUDAStream(device_.index()));
    t->done_ev = std::make_shared<at::cuda::CUDAEvent>(kWaitedEventFlags);
  }
#endif
  assign_slot_locked(t);
  p.wb = t;
  d2h_q_.push_back(t);
  ++n_d2h_;
  bytes_d2h_ += p.nbytes;
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
    m.numel = t.numel();
    m.elem = static_cast<int64_t>(t.element_size());
    m.nbytes = m.numel * m.elem;
    off = round_up(off + m.nbytes, kAlign);
    r.metas.push_back(std::move(m));
  }
  r.nbytes = off;
  r.host = at::empty({r.nbytes}, at::TensorOptions().dtype(at::kByte).device(at::kCPU));
  auto hv = host_tensor_views(r);
  for (size_t i = 0; i < tensors.size(); ++i) hv[i].copy_(tensors[i]);
  default_pieces(r);
  std::lock_guard<std::mutex> lk(mu_);
  TORCH_CHECK(!closed_, "hift_ext offload: add_group on a closed engine");
  TORCH_CHECK(groups_.find(g) == groups_.end(), "hift_ext offload: add_group(", g,
              "): group already added (use load_host to overwrite its state, or remove_group)");
  groups_.emplace(g, std::move(r));
}

void Engine::remove_group(int64_t g) {
  std::unique_lock<std::mutex> lk(mu_);
  rec_locked(g, "remove_group");
  wait_group_idle_locked(lk, g);
  auto it = groups_.find(g);
  if (it == groups_.end()) return;
  for (auto& p : it->second.pieces) drop_piece_locked(p);
  at::Tensor host = std::move(it->second.host);
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

void Engine::set_pieces(int64_t g,
                        const std::vector<std::vector<std::tuple<int64_t, int64_t, int64_t>>>& pieces) {
  std::unique_lock<std::mutex> lk(mu_);
  auto& r = rec_locked(g, "set_pieces");
  const int64_t nt = static_cast<int64_t>(r.metas.size());
  // Validate: every element of every tensor in exactly one segment, ranges in order per tensor.
  std::vector<std::vector<std::pair<int64_t, int64_t>>> cover(static_cast<size_t>(nt));
  std::vector<PieceRec> out;
  for (size_t j = 0; j < pieces.size(); ++j) {
    PieceRec p;
    int64_t off = 0;
    for (const auto& seg : pieces[j]) {
      const int64_t ti = std::get<0>(seg), b = std::get<1>(seg), e = std::get<2>(seg);
      TORCH_CHECK(ti >= 0 && ti < nt, "hift_ext offload: set_pieces(", g, "): piece ", j,
                  " names tensor ", ti, " but the group has ", nt);
      const auto& m = r.metas[static_cast<size_t>(ti)];
      TORCH_CHECK(0 <= b && b <= e && e <= m.numel, "hift_ext offload: set_pieces(", g, "): piece ", j,
                  " has range [", b, ", ", e, ") of tensor ", ti, " which has ", m.numel, " elements");
      TORCH_CHECK((b * m.elem) % kAlign == 0 || b == 0, "hift_ext offload: set_pieces(", g, "): piece ", j,
                  " starts tensor ", ti, " at element ", b, ", not a multiple of ", kAlign / m.elem,
                  " elements (", kAlign, " bytes)");
      cover[static_cast<size_t>(ti)].push_back({b, e});
      p.segs.push_back({ti, b, e, m.offset + b * m.elem, off, (e - b) * m.elem});
      off = round_up(off + (e - b) * m.elem, kAlign);
    }
    p.nbytes = off;
    out.push_back(std::move(p));
  }
  for (int64_t ti = 0; ti < nt && !pieces.empty(); ++ti) {  // no pieces: back to one of whole tensors
    auto& c = cover[static_cast<size_t>(ti)];
    std::sort(c.begin(), c.end());
    int64_t at = 0;
    for (auto& [b, e] : c) {
      TORCH_CHECK(b == at, "hift_ext offload: set_pieces(", g, "): tensor ", ti, " elements [", at, ", ", b,
                  ") are ", (b > at ? "in no piece" : "in two pieces"), "; every element must be in exactly one");
      at = e;
    }
    TORCH_CHECK(at == r.metas[static_cast<size_t>(ti)].numel || (c.empty() && r.metas[static_cast<size_t>(ti)].numel == 0),
                "hift_ext offload: set_pieces(", g, "): tensor ", ti, " elements from ", at, " on are in no piece");
  }
  wait_group_idle_locked(lk, g);
  for (size_t j = 0; j < r.pieces.size(); ++j) {
    auto& p = r.pieces[j];
    TORCH_CHECK(p.state == PieceRec::kHost || p.state == PieceRec::kPrefetching, "hift_ext offload: set_pieces(",
                g, "): piece ", j, " is on the device; release it first");
    if (p.wb && p.wb->error && !p.wb_error) p.wb_error = p.wb->error;
    rethrow_wb_error(g, static_cast<int64_t>(j), p);
  }
  for (auto& p : r.pieces) drop_piece_locked(p);
  if (out.empty()) {
    default_pieces(r);
  } else {
    r.pieces = std::move(out);
  }
}

int64_t Engine::num_pieces(int64_t g) {
  std::lock_guard<std::mutex> lk(mu_);
  return static_cast<int64_t>(rec_locked(g, "num_pieces").pieces.size());
}

std::vector<int64_t> Engine::piece_bytes(int64_t g) {
  std::lock_guard<std::mutex> lk(mu_);
  std::vector<int64_t> out;
  for (auto& p : rec_locked(g, "piece_bytes").pieces) out.push_back(p.nbytes);
  return out;
}

int64_t Engine::group_bytes(int64_t g) {
  std::lock_guard<std::mutex> lk(mu_);
  return rec_locked(g, "group_bytes").nbytes;
}

std::string Engine::residency(int64_t g) {
  std::lock_guard<std::mutex> lk(mu_);
  auto& r = rec_locked(g, "residency");
  bool resident = false, prefetching = false, writing = false;
  for (auto& p : r.pieces) {
    resident = resident || p.state == PieceRec::kResident;
    prefetching = prefetching || p.state == PieceRec::kPrefetching;
    writing = writing || (p.wb && !p.wb->cpu_finished);
  }
  if (resident) return "device";
  if (prefetching) return "prefetching";
  return writing ? "writing_back" : "host";
}

void Engine::set_device_budget(int64_t nbytes) {
  std::unique_lock<std::mutex> lk(mu_);
  TORCH_CHECK(!closed_, "hift_ext offload: set_device_budget on a closed engine");
  const int64_t q = (nbytes / kQuarters) / kAlign * kAlign;
  TORCH_CHECK(q >= kAlign, "hift_ext offload: a device budget of ", nbytes, " bytes is too small; it must be at least ",
              kQuarters * kAlign, " bytes (four quarters of ", kAlign, " bytes)");
  for (bool l : leased_)
    TORCH_CHECK(!l, "hift_ext offload: set_device_budget while pieces are on the device; release them first");
  if (budget_fixed_ && q == quarter_) return;
  reallocate_arena_locked(lk, q);
  budget_fixed_ = true;
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
      if (free && last && last->done_ev && last->done_ev->isCreated()) free = last->done_ev->query();
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

void Engine::prefetch(int64_t g, int64_t piece) {
  std::unique_lock<std::mutex> lk(mu_);
  auto& r = rec_locked(g, "prefetch");
  auto& p = piece_locked(r, g, piece, "prefetch");
  if (p.state == PieceRec::kHost) issue_prefetch_locked(lk, g, r, piece);
}

std::vector<at::Tensor> Engine::fetch(int64_t g, int64_t piece) {
  std::unique_lock<std::mutex> lk(mu_);
  auto& r = rec_locked(g, "fetch");
  auto& p = piece_locked(r, g, piece, "fetch");
  if (p.state == PieceRec::kHost) issue_prefetch_locked(lk, g, r, piece);
  if (p.state == PieceRec::kPrefetching) {
    auto t = p.h2d;
    if (!t->cpu_finished) ++fetch_waits_;
    wait_task(lk, t);
    if (t->error) {
      unlease_locked(p, t, /*used_by_compute=*/false);
      p.h2d.reset();
      p.state = PieceRec::kHost;
      const std::string why = what_of(t->error);
      if (p.wb && p.wb->error && !p.wb_error) p.wb_error = p.wb->error;
      lk.unlock();
      TORCH_CHECK(false, "hift_ext offload: the prefetch (host -> device) of group ", g, " piece ", piece,
                  " failed: ", why, ". The host store is unchanged; the group's state did not reach the device");
    }
#ifdef HIFT_EXT_WITH_CUDA
    if (is_cuda_) {
      auto cur = at::cuda::getCurrentCUDAStream(device_.index());
      t->done_ev->block(cur);  // the compute stream waits for the H2D copy; the host does not
    }
#endif
    p.state = PieceRec::kResident;
  }
  return device_views_locked(r, p);
}

void Engine::release(int64_t g, int64_t piece) {
  std::unique_lock<std::mutex> lk(mu_);
  auto& r = rec_locked(g, "release");
  auto& p = piece_locked(r, g, piece, "release");
  if (p.state == PieceRec::kResident) {
    auto wb = issue_writeback_locked(g, r, piece, /*keep_resident=*/false);
    // The write-back waits for the compute stream itself; the compute fence also covers a
    // write-back that fails before it enqueues anything.
    unlease_locked(p, wb, /*used_by_compute=*/true);
    p.h2d.reset();
    p.state = PieceRec::kHost;
  } else if (p.state == PieceRec::kPrefetching) {
    // Prefetched but never fetched: the host store is still the truth; the quarters' next writer
    // waits for this copy (it is their fence).
    drop_piece_locked(p);
  }
}

void Engine::flush(int64_t g) {
  std::unique_lock<std::mutex> lk(mu_);
  auto& r = rec_locked(g, "flush");
  // The pieces stay resident, so the next update kernels may overwrite them: wait until the D2H
  // copies have read them, or the host store could mix old and new state.
  std::vector<std::shared_ptr<Task>> wbs;
  for (size_t j = 0; j < r.pieces.size(); ++j)
    if (r.pieces[j].state == PieceRec::kResident)
      wbs.push_back(issue_writeback_locked(g, r, static_cast<int64_t>(j), /*keep_resident=*/true));
  for (auto& t : wbs) wait_task(lk, t);
  for (size_t j = 0; j < r.pieces.size(); ++j) {
    auto& p = r.pieces[j];
    if (p.wb && p.wb->error && !p.wb_error) p.wb_error = p.wb->error;
    rethrow_wb_error(g, static_cast<int64_t>(j), p);
  }
}

std::vector<at::Tensor> Engine::host_tensors(int64_t g) {
  std::unique_lock<std::mutex> lk(mu_);
  auto& r = rec_locked(g, "host_tensors");
  for (size_t j = 0; j < r.pieces.size(); ++j)
    if (r.pieces[j].state == PieceRec::kResident)  // the device copy is the truth
      issue_writeback_locked(g, r, static_cast<int64_t>(j), /*keep_resident=*/true);
  std::vector<std::shared_ptr<Task>> wbs;
  for (auto& p : r.pieces)
    if (p.wb) wbs.push_back(p.wb);
  for (auto& t : wbs) wait_task(lk, t);
  for (size_t j = 0; j < r.pieces.size(); ++j) {
    auto& p = r.pieces[j];
    if (p.wb && p.wb->error && !p.wb_error) p.wb_error = p.wb->error;
    rethrow_wb_error(g, static_cast<int64_t>(j), p);
  }
  return host_tensor_views(r);
}

std::vector<at::Tensor> Engine::host_views(int64_t g) {
  std::lock_guard<std::mutex> lk(mu_);
  return host_tensor_views(rec_locked(g, "host_views"));
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
  wait_group_idle_locked(lk, g);
  std::vector<std::pair<std::vector<at::Tensor>, std::vector<Segment>>> resident;
  for (auto& p : r.pieces) {
    if (p.state == PieceRec::kPrefetching) drop_piece_locked(p);
    if (p.state == PieceRec::kResident) resident.push_back({device_views_locked(r, p), p.segs});
    p.wb_error = nullptr;  // the new state replaces whatever a failed write-back left behind
    if (p.wb && p.wb->error) p.wb.reset();
  }
  const auto hv = host_tensor_views(r);
  lk.unlock();  // the copies may synchronize with the device: do not hold the engine lock
  for (size_t i = 0; i < tensors.size(); ++i)
    if (hv[i].data_ptr() != tensors[i].data_ptr() || tensors[i].device() != hv[i].device()) hv[i].copy_(tensors[i]);
  for (auto& [dv, segs] : resident)
    for (size_t s = 0; s < segs.size(); ++s) {
      const auto& seg = segs[s];
      dv[s].view(-1).copy_(hv[static_cast<size_t>(seg.tensor)].reshape(-1).narrow(0, seg.begin, seg.end - seg.begin),
                           /*non_blocking=*/false);
    }
}

void Engine::synchronize() {
  std::vector<std::shared_ptr<Task>> all;
  std::unique_lock<std::mutex> lk(mu_);
  for (auto& t : h2d_q_) all.push_back(t);
  for (auto& t : d2h_q_) all.push_back(t);
  for (auto& kv : groups_)
    for (auto& p : kv.second.pieces) {
      if (p.wb) all.push_back(p.wb);
      if (p.h2d) all.push_back(p.h2d);
    }
  for (auto& t : all) wait_task(lk, t);
  std::exception_ptr first;
  int64_t fg = 0, fj = 0;
  for (auto& kv : groups_)
    for (size_t j = 0; j < kv.second.pieces.size(); ++j) {
      auto& p = kv.second.pieces[j];
      if (p.wb && p.wb->error && !p.wb_error) p.wb_error = p.wb->error;
      if (p.wb_error && !first) {
        first = p.wb_error;
        fg = kv.first;
        fj = static_cast<int64_t>(j);
      }
    }
  lk.unlock();
#ifdef HIFT_EXT_WITH_CUDA
  if (is_cuda_)
    for (auto& t : all)
      if (t->done_ev && t->done_ev->isCreated()) t->done_ev->synchronize();
#endif
  if (first) {
    PieceRec tmp;
    tmp.wb_error = first;
    rethrow_wb_error(fg, fj, tmp);
  }
}

std::map<std::string, int64_t> Engine::memory_report() {
  std::lock_guard<std::mutex> lk(mu_);
  std::map<std::string, int64_t> m;
  int64_t pinned = 0, slot_bytes = 0, store = 0, resident = 0, largest = 0, largest_piece = 0;
  for (auto& s : slots_) {
    slot_bytes += s.cap;
    if (s.pinned) pinned += s.cap;
  }
  for (auto& kv : groups_) {
    store += kv.second.nbytes;
    largest = std::max(largest, kv.second.nbytes);
    bool res = false;
    for (auto& p : kv.second.pieces) {
      largest_piece = std::max(largest_piece, p.nbytes);
      res = res || p.state == PieceRec::kResident;
    }
    resident += res ? 1 : 0;
  }
  m["device_bytes"] = budget_ + overflow_bytes_;
  m["device_budget_bytes"] = budget_;
  m["device_peak_bytes"] = device_peak_;
  m["device_leased_bytes"] = leased_bytes_;
  m["device_leased_peak_bytes"] = leased_peak_;
  m["pinned_bytes"] = pinned;
  m["slot_bytes"] = slot_bytes;
  m["host_store_bytes"] = store;
  m["largest_group_bytes"] = largest;
  m["largest_piece_bytes"] = largest_piece;
  m["num_groups"] = static_cast<int64_t>(groups_.size());
  m["resident_groups"] = resident;
  m["num_slots"] = static_cast<int64_t>(slots_.size());
  return m;
}

std::map<std::string, int64_t> Engine::stats() {
  std::lock_guard<std::mutex> lk(mu_);
  int64_t queued = static_cast<int64_t>(h2d_q_.size() + d2h_q_.size());
  return {{"h2d_copies", n_h2d_},        {"d2h_copies", n_d2h_},         {"h2d_bytes", bytes_h2d_},
          {"d2h_bytes", bytes_d2h_},      {"slot_waits", slot_waits_},    {"fetch_waits", fetch_waits_},
          {"violations", violations_},    {"queued", queued},             {"overflow_allocs", overflow_allocs_},
          {"arena_allocs", arena_allocs_}};
}

void Engine::inject_fault(const std::string& kind, int64_t after) {
  TORCH_CHECK(debug_, "hift_ext offload: inject_fault needs an engine made with debug=True");
  TORCH_CHECK(kind == "h2d" || kind == "d2h", "hift_ext offload: inject_fault kind must be 'h2d' or 'd2h', got '",
              kind, "'");
  TORCH_CHECK(after >= 0, "hift_ext offload: inject_fault after must be >= 0, got ", after);
  std::lock_guard<std::mutex> lk(mu_);
  fail_kind_ = kind == "h2d" ? Task::kH2D : Task::kD2H;
  fail_after_ = after;
}

// ------------------------------------------------------------------ workers

int64_t Engine::pipeline_piece(int64_t n) const {
  // Debug mode checksums whole pieces: keep the one-shot path there.
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

void Engine::maybe_fail(const std::shared_ptr<Task>& t, int64_t subcopy) {
  std::lock_guard<std::mutex> lk(mu_);
  if (fail_kind_ == static_cast<int>(t->kind) && subcopy == fail_after_) {
    fail_kind_ = -1;
    throw std::runtime_error("injected copy failure (debug fault injection)");
  }
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

void Engine::mark_enqueued(const std::shared_ptr<Task>& t) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    t->enqueued = true;
  }
  cv_.notify_all();
}

void Engine::finish(const std::shared_ptr<Task>& t) {
  at::Tensor keep = std::move(t->dev_keep), host = std::move(t->host);
  {
    std::lock_guard<std::mutex> lk(mu_);
    t->enqueued = true;
    t->cpu_finished = true;
    t->after.reset();
    t->prev_slot_user.reset();
    t->fences.clear();
    if (t->error && t->kind == Task::kD2H) {
      auto it = groups_.find(t->group);
      if (it != groups_.end() && t->piece < static_cast<int64_t>(it->second.pieces.size())) {
        auto& p = it->second.pieces[static_cast<size_t>(t->piece)];
        if (p.wb == t) p.wb_error = t->error;
      }
    }
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
  if (prev && prev->kind == Task::kH2D && prev->done_ev && prev->done_ev->isCreated())
    prev->done_ev->synchronize();
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
      for (auto& kv : groups_)  // size to the largest piece
        for (auto& p : kv.second.pieces) want = std::max(want, p.nbytes);
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
  {
    std::unique_lock<std::mutex> lk(mu_);
    // The store of this piece must hold its last write-back.
    auto after = t->after;
    if (after) {
      cv_.wait(lk, [&] { return after->cpu_finished; });
      if (after->error) std::rethrow_exception(after->error);
    }
    // The quarters' last users must have enqueued (CUDA) or done (CPU) their work on them.
    for (auto& f : t->fences) cv_.wait(lk, [&] { return f->enqueued; });
  }
  void* slot_ptr = acquire_slot(t);
  Slot& s = slots_[static_cast<size_t>(t->slot)];
  auto* stage = static_cast<char*>(slot_ptr);
  const auto* host = static_cast<const char*>(t->host.data_ptr());
  const int64_t n = t->nbytes;
  const int64_t threads = copy_threads_;
  debug_pause();
  auto check_slot = [&] {
    std::lock_guard<std::mutex> lk(mu_);
    if (s.tag != t->id) ++violations_;
  };
  if (is_cuda_) {
#ifdef HIFT_EXT_WITH_CUDA
    c10::cuda::CUDAGuard guard(device_.index());
    auto st = *h2d_stream_;
    for (auto& f : t->fences)
      if (f->done_ev && f->done_ev->isCreated()) f->done_ev->block(st);  // a write-back read the quarter
    for (auto& ev : t->fence_evs) ev->block(st);                        // compute used it
    const int64_t piece = pipeline_piece(n);
    const int64_t step = piece ? piece : std::max<int64_t>(n, 1);
    int64_t sub = 0;
    try {
      // Piece by piece when large: the DMA of one sub-copy runs while the next is staged.
      for (int64_t off = 0; off < n; off += step, ++sub) {
        const int64_t len = std::min(step, n - off);
        pack_range(t->segs, stage, host, off, len, threads);
        maybe_fail(t, sub);
        cuda_check(cudaMemcpyAsync(t->dev + off, stage + off, static_cast<size_t>(len), cudaMemcpyHostToDevice,
                                   st.stream()),
                   "cudaMemcpyAsync (host slot -> device)");
      }
    } catch (...) {
      // Whatever was enqueued still reads the slot and writes the quarters: fence it.
      t->done_ev->record(st);
      mark_enqueued(t);
      {
        std::lock_guard<std::mutex> lk(mu_);
        s.writing = false;
      }
      throw;
    }
    t->done_ev->record(st);  // device ready + slot free, for fetch() and the slot's next user
    if (t->dev_keep.defined()) t->dev_keep.record_stream(st.unwrap());
    mark_enqueued(t);
    std::lock_guard<std::mutex> lk(mu_);
    s.writing = false;
    if (s.tag != t->id) ++violations_;
#endif
    return;
  }
  pack_range(t->segs, stage, host, 0, n, threads);  // stage 1: host store -> slot
  if (debug_) t->checksum = segments_checksum(t->segs, stage, /*packed=*/true);
  {
    std::lock_guard<std::mutex> lk(mu_);
    s.writing = false;
  }
  debug_pause();
  check_slot();
  maybe_fail(t, 0);
  if (debug_ && segments_checksum(t->segs, stage, true) != t->checksum) {
    std::lock_guard<std::mutex> lk(mu_);
    ++violations_;
  }
  for (const auto& seg : t->segs)  // stage 2: slot -> "device"
    host_copy(t->dev + seg.dev_off, stage + seg.dev_off, seg.nbytes, threads);
  check_slot();
  if (debug_ && segments_checksum(t->segs, t->dev, true) != t->checksum) {
    std::lock_guard<std::mutex> lk(mu_);
    ++violations_;
  }
  mark_enqueued(t);
}

void Engine::run_d2h(const std::shared_ptr<Task>& t) {
  void* slot_ptr = acquire_slot(t);
  Slot& s = slots_[static_cast<size_t>(t->slot)];
  auto* stage = static_cast<char*>(slot_ptr);
  auto* host = static_cast<char*>(t->host.data_ptr());
  const int64_t n = t->nbytes;
  const int64_t threads = copy_threads_;
  debug_pause();
  if (is_cuda_) {
#ifdef HIFT_EXT_WITH_CUDA
    c10::cuda::CUDAGuard guard(device_.index());
    auto st = *d2h_stream_;
    t->compute_ev->block(st);  // after the piece's update kernels on the compute stream
    const int64_t piece = pipeline_piece(n);
    const int64_t step = piece ? piece : std::max<int64_t>(n, 1);
    std::vector<at::cuda::CUDAEvent> landed;
    landed.reserve(static_cast<size_t>(n / step + 1));
    int64_t sub = 0;
    try {
      // Every device -> slot copy is enqueued before the host store is touched: a failure here
      // leaves the store with the last good state.
      for (int64_t off = 0; off < n; off += step, ++sub) {
        maybe_fail(t, sub);
        cuda_check(cudaMemcpyAsync(stage + off, t->dev + off, static_cast<size_t>(std::min(step, n - off)),
                                   cudaMemcpyDeviceToHost, st.stream()),
                   "cudaMemcpyAsync (device -> host slot)");
        landed.emplace_back(kWaitedEventFlags);
        landed.back().record(st);
      }
    } catch (...) {
      t->done_ev->record(st);
      mark_enqueued(t);
      t->done_ev->synchronize();  // the slot and the quarters are free once the enqueued copies end
      {
        std::lock_guard<std::mutex> lk(mu_);
        s.writing = false;
      }
      throw;
    }
    t->done_ev->record(st);
    if (t->dev_keep.defined()) t->dev_keep.record_stream(st.unwrap());
    mark_enqueued(t);
    // Each sub-copy moves on to the store as soon as its DMA is done.
    for (size_t i = 0; i < landed.size(); ++i) {
      const int64_t off = static_cast<int64_t>(i) * step;
      landed[i].synchronize();
      unpack_range(t->segs, stage, host, off, std::min(step, n - off), threads);
    }
    std::lock_guard<std::mutex> lk(mu_);
    s.writing = false;
    if (s.tag != t->id) ++violations_;
#endif
    return;
  }
  maybe_fail(t, 0);
  for (const auto& seg : t->segs)  // stage 1: "device" -> slot
    host_copy(stage + seg.dev_off, t->dev + seg.dev_off, seg.nbytes, threads);
  mark_enqueued(t);  // the quarters have been read
  if (debug_) t->checksum = segments_checksum(t->segs, stage, /*packed=*/true);
  {
    std::lock_guard<std::mutex> lk(mu_);
    s.writing = false;
  }
  debug_pause();
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (s.tag != t->id || s.writing) ++violations_;
  }
  maybe_fail(t, 1);
  unpack_range(t->segs, stage, host, 0, n, threads);  // stage 2: slot -> host store
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (s.tag != t->id || s.writing) ++violations_;
    if (debug_ && segments_checksum(t->segs, host, /*packed=*/false) != t->checksum) ++violations_;
  }
}

}  // namespace offload
}  // namespace hift_ext
