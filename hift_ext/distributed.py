"""Data-parallel HiFT on torch.distributed: the optimizer synchronizes its active group itself.

DDP cannot wrap a HiFT model: it registers the parameters that require grad when it wraps the model,
and HiFT switches ``requires_grad`` at every group switch. The HiFT optimizers therefore do the data
parallelism themselves (NCCL on GPUs, gloo on CPUs), and HiFT's structure makes it cheap: only the
active group has gradients, so a step communicates about 1/k of what DDP does.

The optimizer holds one :class:`DataParallel` when ``torch.distributed`` is initialized and the
process group has more than one rank (``process_group=None``: the default group); without it
nothing here runs and single-process training is unchanged bit for bit.

Gradients (every rank, every syncing backward):

* A post-accumulate-grad hook on every trainable parameter (inactive groups have
  ``requires_grad=False``: their hooks never fire, they cost nothing). The hooks of a HiFT group fill
  *buckets* (consecutive parameters of the group in backward order, one dtype, at most
  ``bucket_cap_mb``); a full bucket is launched asynchronously (``all_reduce``, or ``reduce_scatter``
  with ``shard_state=True``) while backward still runs. Buckets are launched in index order on
  every rank (a bucket that fills early waits for the ones before it), so every rank issues the same
  collectives in the same order, like DDP.
* At the end of that backward (an autograd callback) the remaining buckets are launched (a parameter
  without a gradient contributes zeros), all of them are waited for, and the averaged gradients are
  written back to ``p.grad``; one tiny ``all_reduce(MAX)`` agrees on which parameters have a
  gradient on any rank (one that has none anywhere keeps ``grad=None``, as in a single process).
  So after ``loss.backward()`` returns, ``p.grad`` holds the synchronized gradients: gradient
  clipping, ``GradScaler`` and the skip logic of a training loop see what every other rank sees.
* Micro-batches that only accumulate skip synchronization: inside ``optimizer.no_sync()``, or for all
  but every ``accumulation_steps``-th backward since the last step. ``sync_grads()`` synchronizes
  now (e.g. when the last backward ran inside ``no_sync()``); ``step()`` calls it when needed.
* ``step()`` agrees on ``found_inf`` (``all_reduce(MAX)``: an AMP overflow on any rank skips the
  step on all) and checks that every rank is at the same schedule position.

Sharded state (``shard_state=True``, ZeRO-style per HiFT group): every bucket is split into N equal
chunks and rank r owns chunk r of every bucket: the optimizer state and fp32 masters of those
elements only (so a rank's share of a parameter is an element range, what offload pieces are made
of). Gradients are reduce-scattered (each rank receives the average of its own chunk); after the
backward, ``p.grad`` holds the averaged gradient on the elements this rank owns and zeros elsewhere
(the sum over ranks is the synchronized gradient: use ``optimizer.clip_grad_norm_``, which reduces
the norm over ranks). Each rank updates its elements, then the updated parameters are all-gathered.
A non-finite gradient in any rank's chunk is made visible on every rank (the tiny agreement carries
it), so a GradScaler or a loop that skips non-finite steps decides the same everywhere.

Collectives wait at most ``comm_timeout`` seconds (default: the process group's timeout); a failed
or timed-out collective (a rank that raised, crashed or was killed) raises
:class:`HiFTDistributedError` naming the operation and the fix, instead of hanging.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import weakref
from collections import defaultdict
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = [
    "HiFTDistributedError",
    "DataParallel",
    "DEFAULT_BUCKET_CAP_MB",
    "resolve_process_group",
    "is_distributed",
    "world_size",
    "rank",
    "comm_device",
    "all_gather_json",
    "broadcast_json",
    "all_reduce_sum",
    "all_reduce_max",
]

#: DDP's default bucket size
DEFAULT_BUCKET_CAP_MB = 25.0
#: a rank's chunk of a sharded bucket is a multiple of this many elements (padding < N * 8 elements)
SHARD_ALIGN = 8
#: the attribute a parameter's post-accumulate-grad hook checks (the DataParallel that owns it now)
_OWNER_ATTR = "_hift_data_parallel"


class HiFTDistributedError(RuntimeError):
    """A collective of hift_ext's data parallelism failed or timed out (another rank stopped), or
    the ranks disagree (configuration, schedule position)."""


def _dist():
    import torch.distributed as dist

    return dist


def is_distributed() -> bool:
    """torch.distributed is available and initialized."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def world_size(group=None) -> int:
    return _dist().get_world_size(group) if is_distributed() else 1


def rank(group=None) -> int:
    return _dist().get_rank(group) if is_distributed() else 0


def resolve_process_group(process_group, owner: str):
    """The process group to synchronize over, or None (single process: nothing to synchronize).

    ``None``: the default group when torch.distributed is initialized; a group of one rank is None.
    """
    if process_group is None:
        if not is_distributed():
            return None
        pg = _dist().group.WORLD
    else:
        if not is_distributed():
            raise ValueError(
                f"{owner}: process_group= was given but torch.distributed is not initialized; call "
                "torch.distributed.init_process_group() first (or leave process_group=None)"
            )
        pg = process_group
    if _dist().get_world_size(pg) <= 1:
        return None
    return pg


def comm_device(pg, param_device: torch.device) -> torch.device:
    """Where the collectives' buffers live: the GPU for NCCL, the CPU for gloo."""
    backend = str(_dist().get_backend(pg)).lower()
    if "nccl" in backend and "gloo" not in backend:
        if param_device.type == "cuda":
            return param_device
        return torch.device("cuda", torch.cuda.current_device())
    if "gloo" in backend and "nccl" not in backend:
        return torch.device("cpu")
    return param_device


def _timeout(seconds: Optional[float], owner: str) -> Optional[datetime.timedelta]:
    if seconds is None:
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) \
            or seconds <= 0:
        raise ValueError(f"{owner}: comm_timeout must be a positive number of seconds or None (the process "
                         f"group's timeout), got {seconds!r}")
    return datetime.timedelta(seconds=float(seconds))


def _group_rank0(pg) -> int:
    dist = _dist()
    if pg is None or pg is dist.group.WORLD:
        return 0
    return dist.get_global_rank(pg, 0)


def _explain(owner: str, what: str, exc: BaseException, timeout) -> HiFTDistributedError:
    r, n = rank(), world_size()
    limit = f"{timeout.total_seconds():g} s" if timeout is not None else "the process group's timeout"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return HiFTDistributedError(
        f"{owner}: rank {r} of {n}: {what} failed ({type(exc).__name__}: {first}). Another rank has "
        f"probably stopped (it raised an error, crashed or was killed: see its output), or did not reach "
        f"this point within {limit}. Every rank must run the same steps; fix the failing rank, or raise "
        "the limit with comm_timeout= (hift-ext finetune: --dist-timeout). This rank stops too."
    )


class _Comm:
    """Collectives on one process group, every one waited with the timeout and counted (bytes per
    kind, as this rank hands them to the backend)."""

    def __init__(self, pg, device: torch.device, timeout: Optional[datetime.timedelta], owner: str):
        self.pg = pg
        self.device = device
        self.timeout = timeout
        self.owner = owner
        self.rank = _dist().get_rank(pg)
        self.world_size = _dist().get_world_size(pg)
        self.stats: Dict[str, int] = defaultdict(int)

    def count(self, kind: str, t: Tensor) -> None:
        self.stats[f"{kind}_bytes"] += t.numel() * t.element_size()
        self.stats[f"{kind}_calls"] += 1

    def wait(self, work, what: str) -> None:
        try:
            if self.timeout is None:
                work.wait()
            else:
                work.wait(timeout=self.timeout)
        except Exception as exc:  # noqa: BLE001 - every backend error is a stopped peer or a timeout
            raise _explain(self.owner, what, exc, self.timeout) from exc

    def _start(self, fn, what: str):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001
            raise _explain(self.owner, what, exc, self.timeout) from exc

    def all_reduce(self, t: Tensor, kind: str, what: str, op=None, wait: bool = True):
        dist = _dist()
        self.count(kind, t)
        work = self._start(lambda: dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=self.pg, async_op=True), what)
        if wait:
            self.wait(work, what)
            return None
        return work

    def reduce_scatter(self, out: Tensor, inp: Tensor, kind: str, what: str):
        dist = _dist()
        self.count(kind, inp)
        fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        return self._start(lambda: fn(out, inp, group=self.pg, async_op=True), what)

    def all_gather(self, out: Tensor, inp: Tensor, kind: str, what: str):
        dist = _dist()
        self.count(kind, out)
        fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        return self._start(lambda: fn(out, inp, group=self.pg, async_op=True), what)

    def gather_to_first(self, t: Tensor, kind: str, what: str) -> Optional[Tensor]:
        """The concatenation of every rank's ``t`` (equal sizes) on the group's first rank, None
        elsewhere."""
        dist = _dist()
        lst = [torch.empty_like(t) for _ in range(self.world_size)] if self.rank == 0 else None
        self.count(kind, t)
        work = self._start(lambda: dist.gather(t, gather_list=lst, dst=_group_rank0(self.pg), group=self.pg,
                                               async_op=True), what)
        self.wait(work, what)
        return torch.cat(lst) if lst is not None else None

    def broadcast(self, t: Tensor, kind: str, what: str) -> None:
        dist = _dist()
        self.count(kind, t)
        work = self._start(lambda: dist.broadcast(t, src=_group_rank0(self.pg), group=self.pg, async_op=True), what)
        self.wait(work, what)


# ============================================================================================
# JSON over tensors (no pickle anywhere): configurations, RNG states, small results
# ============================================================================================
def _encode(obj: Any, device) -> Tensor:
    data = json.dumps(obj, sort_keys=True, allow_nan=True).encode("utf-8")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device) if data else torch.empty(0, dtype=torch.uint8, device=device)


def _decode(t: Tensor) -> Any:
    return json.loads(bytes(t.cpu().tolist()).decode("utf-8"))


def _default_device(pg=None) -> torch.device:
    return comm_device(pg or _dist().group.WORLD, torch.device("cuda", torch.cuda.current_device())
                       if torch.cuda.is_available() else torch.device("cpu"))


def all_gather_json(obj: Any, pg=None, *, comm: Optional[_Comm] = None) -> List[Any]:
    """Every rank's JSON-able ``obj``, in rank order (one element without torch.distributed)."""
    if not is_distributed():
        return [json.loads(json.dumps(obj))]
    dist = _dist()
    device = comm.device if comm is not None else _default_device(pg)
    pg = comm.pg if comm is not None else pg
    n = dist.get_world_size(pg)
    data = _encode(obj, device)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    sizes = torch.empty(n, dtype=torch.int64, device=device)
    _run(comm, lambda: _all_gather_into(sizes, size, pg), "exchanging the configuration")
    longest = int(sizes.max())
    buf = torch.zeros(longest, dtype=torch.uint8, device=device)
    buf[: data.numel()] = data
    out = torch.empty(n * longest, dtype=torch.uint8, device=device)
    _run(comm, lambda: _all_gather_into(out, buf, pg), "exchanging the configuration")
    return [_decode(out[i * longest: i * longest + int(sizes[i])]) for i in range(n)]


def broadcast_json(obj: Any, pg=None) -> Any:
    """Rank 0's JSON-able ``obj`` on every rank (``obj`` itself without torch.distributed)."""
    if not is_distributed():
        return obj
    dist = _dist()
    device = _default_device(pg)
    data = _encode(obj if dist.get_rank(pg) == 0 else None, device)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    dist.broadcast(size, src=_group_rank0(pg), group=pg)
    buf = data if dist.get_rank(pg) == 0 else torch.empty(int(size), dtype=torch.uint8, device=device)
    dist.broadcast(buf, src=_group_rank0(pg), group=pg)
    return _decode(buf)


def _reduce(values: Sequence[float], op_name: str, pg=None) -> List[float]:
    if not is_distributed():
        return [float(v) for v in values]
    dist = _dist()
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_default_device(pg))
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op_name), group=pg)
    return t.tolist()


def all_reduce_sum(values: Sequence[float], pg=None) -> List[float]:
    """Element-wise sum over ranks (float64); ``values`` itself without torch.distributed."""
    return _reduce(values, "SUM", pg)


def all_reduce_max(values: Sequence[float], pg=None) -> List[float]:
    """Element-wise maximum over ranks (float64)."""
    return _reduce(values, "MAX", pg)


def _run(comm: Optional[_Comm], fn, what: str):
    if comm is None:
        return fn()
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        raise _explain(comm.owner, what, exc, comm.timeout) from exc


def _all_gather_into(out: Tensor, inp: Tensor, pg) -> None:
    dist = _dist()
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, inp, group=pg)


# ============================================================================================
# Buckets
# ============================================================================================
class _Bucket:
    """Consecutive parameters of one HiFT group (backward order), one dtype: one collective."""

    __slots__ = ("group", "index", "params", "offsets", "numel", "shard", "padded", "dtype", "owned")

    def __init__(self, group: int, index: int, params: List[Tensor], world: int, rank_: int, sharded: bool):
        self.group, self.index, self.params = group, index, params
        self.dtype = params[0].dtype
        self.offsets = []
        n = 0
        for p in params:
            self.offsets.append(n)
            n += p.numel()
        self.numel = n
        if sharded:
            self.shard = -(-n // world)
            self.shard = -(-self.shard // SHARD_ALIGN) * SHARD_ALIGN
            self.padded = self.shard * world
        else:
            self.shard = n
            self.padded = n
        # this rank's elements of each parameter: (lo, hi, offset in this rank's chunk); lo == hi: none
        self.owned: List[Tuple[int, int, int]] = []
        a, b = rank_ * self.shard, (rank_ + 1) * self.shard
        for p, off in zip(params, self.offsets):
            if not sharded:
                self.owned.append((0, p.numel(), off))
                continue
            lo = min(max(a - off, 0), p.numel())
            hi = min(max(b - off, 0), p.numel())
            self.owned.append((lo, hi, off + lo - a) if hi > lo else (0, 0, 0))

    @property
    def nbytes(self) -> int:
        return self.padded * torch.empty((), dtype=self.dtype).element_size()


# ============================================================================================
# The optimizer's data parallelism
# ============================================================================================
class DataParallel:
    """Gradient synchronization (and, with ``shard_state``, the layout of the sharded state) of a
    HiFT optimizer's groups over ``process_group``. The optimizer owns it and calls it; it never
    reaches into the optimizer.

    Args:
        owner: the optimizer's class name (for messages).
        groups: the HiFT groups' parameters, bottom to top.
        active: returns the index of the group the next step updates.
        process_group: a group of more than one rank.
        shard_state: each rank owns 1/N of every bucket's elements (state, masters, update).
        bucket_cap_mb: most megabytes (2**20 bytes) of gradients per bucket.
        accumulation_steps: synchronize at every ``accumulation_steps``-th backward since the last
            step (1: every backward).
        comm_timeout: seconds a collective may wait (None: the process group's timeout).
    """

    def __init__(self, owner: str, groups: Sequence[Sequence[Tensor]], active: Callable[[], int], *,
                 process_group, shard_state: bool = False, bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
                 accumulation_steps: int = 1, comm_timeout: Optional[float] = None):
        self.owner = owner
        self.pg = process_group
        self.shard = bool(shard_state)
        devices = {p.device for ps in groups for p in ps}
        self.comm = _Comm(process_group, comm_device(process_group, next(iter(devices))),
                          _timeout(comm_timeout, owner), owner)
        self.rank = self.comm.rank
        self.world_size = self.comm.world_size
        self.device = self.comm.device
        self.accumulation_steps = int(accumulation_steps)
        self.bucket_cap_bytes = int(float(bucket_cap_mb) * 2 ** 20)
        #: integrations may decide per backward whether it synchronizes (e.g. accelerate's
        #: GradientState.sync_gradients under transformers.Trainer); None: accumulation_steps rules
        self.should_sync: Optional[Callable[[], bool]] = None
        self._active = active
        self.buckets: List[List[_Bucket]] = [self._plan(g, list(ps)) for g, ps in enumerate(groups)]
        self.params: List[List[Tensor]] = [list(ps) for ps in groups]
        self._where: Dict[int, Tuple[int, int, int]] = {}
        self._owned: Dict[int, Tuple[int, int]] = {}
        for g, bs in enumerate(self.buckets):
            for b, bucket in enumerate(bs):
                for j, p in enumerate(bucket.params):
                    self._where[id(p)] = (g, b, j)
                    lo, hi, _ = bucket.owned[j]
                    self._owned[id(p)] = (lo, hi)
        # the accumulation window (since the last step / zero_grad)
        self._micro = 0
        self._no_sync = 0
        self._in_backward = False
        self._syncing = False
        self.synced = False
        # the synchronization in progress
        self._group = -1
        self._ready: List[int] = []
        self._next = 0
        self._inflight: List[Tuple[_Bucket, Tensor, Optional[Tensor], Any, List[bool]]] = []
        self._handles: List[Any] = []
        self._install_hooks()

    # ----------------------------------------------------------------------------- layout
    def _plan(self, g: int, params: List[Tensor]) -> List[_Bucket]:
        buckets: List[_Bucket] = []
        cur: List[Tensor] = []
        nbytes = 0
        for p in reversed(params):  # backward produces the top of a group first
            size = p.numel() * p.element_size()
            if cur and (p.dtype != cur[0].dtype or p.device != cur[0].device or nbytes + size > self.bucket_cap_bytes):
                buckets.append(_Bucket(g, len(buckets), cur, self.world_size, self.rank, self.shard))
                cur, nbytes = [], 0
            cur.append(p)
            nbytes += size
        if cur:
            buckets.append(_Bucket(g, len(buckets), cur, self.world_size, self.rank, self.shard))
        return buckets

    def owned(self, p: Tensor) -> Tuple[int, int]:
        """The element range [lo, hi) of ``p`` (flattened) this rank owns (all of it unsharded)."""
        return self._owned[id(p)]

    def owned_numel(self, p: Tensor) -> int:
        lo, hi = self._owned[id(p)]
        return hi - lo

    # ----------------------------------------------------------------------------- hooks
    def _install_hooks(self) -> None:
        ref = weakref.ref(self)

        def hook(p: Tensor) -> None:
            dp = ref()
            if dp is not None and getattr(p, _OWNER_ATTR, None) is ref:
                dp._on_grad(p)

        for ps in self.params:
            for p in ps:
                setattr(p, _OWNER_ATTR, ref)  # a later optimizer on the same parameters takes over
                self._handles.append(p.register_post_accumulate_grad_hook(hook))

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __del__(self):
        try:
            self.remove_hooks()
        except Exception:  # noqa: BLE001
            pass

    # ----------------------------------------------------------------------------- accumulation
    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        self._no_sync += 1
        try:
            yield
        finally:
            self._no_sync -= 1

    def _wants_sync(self) -> bool:
        if self._no_sync:
            return False
        if self.should_sync is not None:
            return bool(self.should_sync())
        return self._micro % self.accumulation_steps == 0

    def reset(self) -> None:
        """A new accumulation window (after step() or zero_grad()). Also forgets a backward that
        raised before its end (its end-of-backward callback never ran)."""
        self._micro = 0
        self.synced = False
        self._in_backward = False
        self._syncing = False
        self._inflight = []

    def _on_grad(self, p: Tensor) -> None:
        g, b, _ = self._where[id(p)]
        if g != self._active():
            return  # a group HiFT does not train now (the user switched requires_grad on)
        if not self._in_backward:
            if self.shard and self.synced:
                raise RuntimeError(
                    f"{self.owner}: backward() after the gradients were synchronized, without step() or "
                    "zero_grad(): with shard_state=True each rank holds only its part of the synchronized "
                    "gradient, so accumulating more into it would be wrong. Run the micro-batches that only "
                    "accumulate inside optimizer.no_sync() (or set accumulation_steps), so that only the last "
                    "backward synchronizes")
            self._in_backward = True
            self._micro += 1
            self.synced = False
            self._syncing = self._wants_sync()
            if self._syncing:
                self._begin(g)
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        if not self._syncing or g != self._group:
            return
        self._ready[b] += 1
        self._launch_ready()

    def _end_of_backward(self) -> None:
        self._in_backward = False
        if self._syncing:
            self._syncing = False
            self._finish()

    def sync_grads(self) -> None:
        """Synchronize the active group's gradients now, unless the last backward did."""
        if self._in_backward:
            raise RuntimeError(f"{self.owner}.sync_grads() was called during backward; call it after "
                               "loss.backward() returns")
        if self.synced:
            return
        self._begin(self._active())
        self._finish()

    # ----------------------------------------------------------------------------- the sync
    def _begin(self, g: int) -> None:
        self._group = g
        self._ready = [0] * len(self.buckets[g])
        self._next = 0
        self._inflight = []

    def _launch_ready(self) -> None:
        bs = self.buckets[self._group]
        while self._next < len(bs) and self._ready[self._next] >= len(bs[self._next].params):
            self._launch(bs[self._next])
            self._next += 1

    def _launch(self, bucket: _Bucket) -> None:
        buf = torch.empty(bucket.padded, dtype=bucket.dtype, device=self.device)
        present = []
        for p, off in zip(bucket.params, bucket.offsets):
            n = p.numel()
            grad = p.grad
            present.append(grad is not None)
            if grad is None:
                buf[off: off + n].zero_()
            else:
                buf[off: off + n].copy_(grad.detach().reshape(-1), non_blocking=grad.device == buf.device)
        if bucket.padded > bucket.numel:
            buf[bucket.numel:].zero_()
        buf.div_(self.world_size)  # the average, divided before the sum (as DDP: no fp16 overflow)
        what = f"the gradient {'reduce-scatter' if self.shard else 'all-reduce'} of HiFT group {bucket.group} (bucket {bucket.index})"
        if self.shard:
            out = torch.empty(bucket.shard, dtype=bucket.dtype, device=self.device)
            work = self.comm.reduce_scatter(out, buf, "grad_reduce_scatter", what)
        else:
            out = None
            work = self.comm.all_reduce(buf, "grad_all_reduce", what, wait=False)
        self._inflight.append((bucket, buf, out, work, present))

    def _finish(self) -> None:
        g = self._group
        bs = self.buckets[g]
        while self._next < len(bs):  # parameters without a gradient (on this rank) contribute zeros
            self._launch(bs[self._next])
            self._next += 1
        for bucket, _, _, work, _ in self._inflight:
            self.comm.wait(work, f"the gradient synchronization of HiFT group {g} (bucket {bucket.index})")
        # agree on which parameters have a gradient on any rank (and, sharded, on a non-finite chunk)
        flags = [1.0 if x else 0.0 for _, _, _, _, present in self._inflight for x in present]
        agree = torch.tensor([0.0] + flags, dtype=torch.float32, device=self.device)
        if self.shard:
            bad = [(~torch.isfinite(out)).any() for _, _, out, _, _ in self._inflight if out.numel()]
            if bad:
                agree[0] = torch.stack(bad).any().to(torch.float32)
        self.comm.all_reduce(agree, "control", f"the gradient agreement of HiFT group {g}",
                             op=_dist().ReduceOp.MAX)
        agreed = agree.tolist()
        nonfinite, anywhere = agreed[0] > 0, iter(agreed[1:])
        first = None
        for bucket, buf, out, _, _ in self._inflight:
            for j, (p, off) in enumerate(zip(bucket.params, bucket.offsets)):
                if not next(anywhere):
                    p.grad = None  # no rank has a gradient for it: skipped, as in one process
                    continue
                n = p.numel()
                if not self.shard:
                    src = buf[off: off + n].view_as(p)
                    if p.grad is None:
                        p.grad = src.to(p.device, copy=True)
                    else:
                        p.grad.copy_(src)
                    continue
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                else:
                    p.grad.zero_()
                lo, hi, co = bucket.owned[j]
                if hi > lo:
                    p.grad.view(-1)[lo:hi].copy_(out[co: co + hi - lo])
                if first is None:
                    first = p
        if nonfinite and first is not None:
            first.grad.view(-1)[0] = float("nan")  # seen by every rank's inf/NaN check
        self._inflight = []
        self.synced = True
        self.comm.stats["grad_syncs"] += 1

    # ----------------------------------------------------------------------------- step
    def agree_step(self, found_inf: Optional[Tensor], position: int) -> bool:
        """True when the step is skipped on every rank (``found_inf`` set on any rank); raises
        when the ranks are at different schedule positions."""
        local = 0.0 if found_inf is None else float(found_inf.item())
        t = torch.tensor([1.0 if local else 0.0, float(position), -float(position)], dtype=torch.float64,
                         device=self.device)
        self.comm.all_reduce(t, "control", "the step agreement (found_inf, schedule position)",
                             op=_dist().ReduceOp.MAX)
        skip, hi, neg_lo = t.tolist()
        if hi != -neg_lo:
            raise HiFTDistributedError(
                f"{self.owner}: rank {self.rank}: the ranks are at different HiFT steps ({int(-neg_lo)} to "
                f"{int(hi)}; this rank: {position}): one rank skipped or repeated a step. Skip a step on every "
                "rank or on none (agree on the decision, e.g. with an all_reduce of the loss), and load the "
                "same checkpoint on every rank"
            )
        return skip > 0

    def gather_params(self, g: int) -> None:
        """Sharded: every rank's updated elements of group g's parameters to every rank."""
        pending = []
        for bucket in self.buckets[g]:
            chunk = torch.zeros(bucket.shard, dtype=bucket.dtype, device=self.device)
            for j, p in enumerate(bucket.params):
                lo, hi, co = bucket.owned[j]
                if hi > lo:
                    chunk[co: co + hi - lo].copy_(p.detach().view(-1)[lo:hi])
            full = torch.empty(bucket.padded, dtype=bucket.dtype, device=self.device)
            work = self.comm.all_gather(full, chunk, "param_all_gather",
                                        f"the parameter all-gather of HiFT group {g} (bucket {bucket.index})")
            pending.append((bucket, full, work))
        for bucket, full, work in pending:
            self.comm.wait(work, f"the parameter all-gather of HiFT group {g} (bucket {bucket.index})")
            for p, off in zip(bucket.params, bucket.offsets):
                p.detach().view(-1).copy_(full[off: off + p.numel()])

    def broadcast_params(self) -> None:
        """Rank 0's parameters to every rank (as DDP does when it wraps a model)."""
        for bs in self.buckets:
            for bucket in bs:
                flat = torch.empty(bucket.numel, dtype=bucket.dtype, device=self.device)
                for p, off in zip(bucket.params, bucket.offsets):
                    flat[off: off + p.numel()].copy_(p.detach().reshape(-1))
                self.comm.broadcast(flat, "broadcast", "the parameter broadcast from rank 0")
                for p, off in zip(bucket.params, bucket.offsets):
                    p.detach().view(-1).copy_(flat[off: off + p.numel()])

    def grad_norm(self, grads: Sequence[Tensor], norm_type: float) -> Tensor:
        """The norm of the synchronized gradient of the active group from each rank's share
        (sharded: the ranks' gradients are disjoint parts of it)."""
        if norm_type == math.inf:
            local = torch.stack([g.detach().abs().max().float() for g in grads]).max() if grads else torch.zeros(())
            t = local.to(self.device, torch.float64).reshape(1)
            self.comm.all_reduce(t, "control", "the gradient norm", op=_dist().ReduceOp.MAX)
            return t[0].float()
        local = sum((torch.linalg.vector_norm(g.detach(), norm_type, dtype=torch.float64) ** norm_type
                     for g in grads), torch.zeros((), dtype=torch.float64))
        t = torch.as_tensor(local, dtype=torch.float64).to(self.device).reshape(1)
        self.comm.all_reduce(t, "control", "the gradient norm")
        return (t[0] ** (1.0 / norm_type)).float()

    # ----------------------------------------------------------------------------- checks
    def check_agreement(self, config: Dict[str, Any]) -> None:
        """Refuse (on every rank) optimizers whose configuration differs between ranks."""
        configs = all_gather_json(config, comm=self.comm)
        differ = sorted({k for c in configs for k in set(c) | set(config) if c.get(k) != config.get(k)})
        if differ:
            lines = "; ".join(f"{k}: " + ", ".join(f"rank {r}: {c.get(k)!r}" for r, c in enumerate(configs))
                              for k in differ)
            raise ValueError(
                f"{self.owner}: the ranks of the process group built different optimizers ({lines}). Every rank "
                "must construct it with the same model, groups and arguments (strategy, seed, steps_per_group, "
                "shard_state, ...), or the ranks would update different groups"
            )

    def stats(self) -> Dict[str, int]:
        return dict(self.comm.stats)

    def reset_stats(self) -> None:
        self.comm.stats.clear()


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able object (parameter shapes, ...)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ============================================================================================
# Launching: torchrun's environment, and the ranks of a training loop
# ============================================================================================
def launched_world_size() -> int:
    """WORLD_SIZE from the environment (torchrun, accelerate launch), 1 when absent."""
    import os

    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def init_from_env(device: str = "auto", timeout_s: Optional[float] = None) -> bool:
    """Join the default process group when launched on several processes (torchrun sets WORLD_SIZE,
    RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): NCCL when the run trains on CUDA, else gloo; each
    rank takes GPU LOCAL_RANK. Returns True when distributed. ``timeout_s``: how long a collective
    may wait for the others (None: torch's default)."""
    import os

    if is_distributed():
        return world_size() > 1
    if launched_world_size() <= 1:
        return False
    dist = _dist()
    use_cuda = torch.cuda.is_available() and not str(device).startswith("cpu")
    kw = {}
    if timeout_s is not None:
        kw["timeout"] = datetime.timedelta(seconds=float(timeout_s))
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo", **kw)
    return dist.get_world_size() > 1


def local_rank() -> int:
    import os

    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


class Ranks:
    """This process's place among the ranks of the default process group, for a training loop:
    rank 0 of 1 (and every method a no-op) without torch.distributed."""

    def __init__(self):
        self.world = world_size()
        self.rank = rank()

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def split(self, items: Sequence[Any]) -> List[Any]:
        """This rank's contiguous part of ``items`` (sizes differ by at most one; a rank may get
        none when there are fewer items than ranks)."""
        n, w, r = len(items), self.world, self.rank
        lo = r * n // w
        hi = (r + 1) * n // w
        return list(items[lo:hi])

    def strided(self, items: Sequence[Any]) -> List[Any]:
        """Every world-th item starting at this rank's (evaluation: similar lengths everywhere)."""
        return list(items[self.rank:: self.world])

    def sum(self, values: Sequence[float]) -> List[float]:
        return all_reduce_sum(values) if self.distributed else [float(v) for v in values]

    def max(self, values: Sequence[float]) -> List[float]:
        return all_reduce_max(values) if self.distributed else [float(v) for v in values]

    def gather_json(self, obj: Any) -> List[Any]:
        return all_gather_json(obj) if self.distributed else [obj]

    def broadcast_json(self, obj: Any) -> Any:
        return broadcast_json(obj) if self.distributed else obj
