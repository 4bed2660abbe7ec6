"""Optimizer-state offload: the C++ engine in csrc/offload and the HiFT optimizers' use of it.

:class:`OffloadEngine` (the Python face of the engine) keeps every registered group's state in a
host store (one 256-byte aligned byte buffer per group) and moves it to the device through ONE
persistent device arena of four quarters (allocated once, never returned to the allocator) and a
ring of ``num_slots`` pinned staging slots, on two side streams (H2D, D2H) ordered by events:

    prefetch(g, j): host store --gather memcpy (H2D worker)--> slot --cudaMemcpyAsync (H2D stream)--> arena
    release(g, j):  arena --(D2H stream, after the compute stream's event)--> slot --scatter memcpy--> store

A group moves as *pieces* (``set_pieces``): lists of element ranges of its tensors. One piece of
whole tensors is the default; a group larger than half of the device budget is cut into pieces of
a quarter, so it streams through the arena (piece i+1 copies in while piece i is updated and piece
i-1 copies out) and the device never holds more optimizer state than the budget. The compute
stream only ever waits on events (fetch), never on a device-wide synchronize. On a machine without
CUDA (device "cpu") the very same arena, ring, queues and ordering run with host buffers and
background threads, which is how CI tests them.

:class:`GroupStateOffload` is the residency of a HiFT optimizer's per-group state: layout, piece
plans, prefetching of the next group, the streamed update, reloading. The optimizer hands it its
parameters, state mapping and kernel calls; it never reaches back into the optimizer.

Tensors returned by fetch() alias the arena and are valid until release(); those returned by
host_tensors()/host_views() alias the host store (like torch's own optimizer.state_dict(), they see
later updates: clone them to keep a snapshot). API calls are expected from one thread.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor

from hift_ext._ext import require_extension

__all__ = ["OffloadEngine", "GroupStateOffload", "offload_available", "plan_pieces"]

_PINNED = {None: -1, "auto": -1, True: 1, False: 0}


def offload_available() -> bool:
    """True when the compiled extension (which holds the engine) is importable."""
    from hift_ext._ext import has_extension

    return has_extension()


def _device_str(device) -> str:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"OffloadEngine: device {dev} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"OffloadEngine: device must be cpu or cuda, got {dev}")
    return str(dev)


class OffloadEngine:
    """Moves optimizer-state groups between a host store and ``device`` through a persistent
    device arena and ``num_slots`` pinned staging slots.

    Args:
        device: where fetched state lives ("cuda", "cuda:1", or "cpu" for the host-only engine).
        num_slots: number of staging slots R (>= 1). 2 overlaps one prefetch with one write-back;
            3 adds slack when a write-back is slow to start.
        pinned: "auto" (default: pinned slots, falling back to pageable with a warning when pinned
            memory cannot be allocated), True (fail with a clear error instead) or False.
        debug: check slot ownership and checksums on every copy, and allow inject_fault (tests);
            ``stats()["violations"]`` must stay 0.
        debug_delay_us: random sleeps of up to this many microseconds inside the workers (tests:
            shakes out ordering bugs).

    A group moves as pieces (``set_pieces``; by default one piece of whole tensors). The device
    arena has four quarters; a piece takes one quarter or an aligned half. Its size is
    ``set_device_budget(nbytes)`` (fixed: pieces larger than half of it are refused), else it is
    sized automatically to hold two of the largest pieces.
    """

    def __init__(self, device="cuda", num_slots: int = 2, *, pinned="auto", debug: bool = False,
                 debug_delay_us: float = 0.0):
        if int(num_slots) < 1:
            raise ValueError(f"OffloadEngine: num_slots must be >= 1, got {num_slots}")
        if pinned not in _PINNED:
            raise ValueError(f"OffloadEngine: pinned must be 'auto', True or False, got {pinned!r}")
        C = require_extension()
        dev = _device_str(device)
        self._impl = C.OffloadEngine(dev, int(num_slots), _PINNED[pinned], float(debug_delay_us),
                                     bool(debug))
        self.device = torch.device(dev)
        self.num_slots = int(num_slots)
        self.debug = bool(debug)

    # -- groups ---------------------------------------------------------------------------------
    def add_group(self, g: int, tensors: Sequence[torch.Tensor]) -> None:
        """Register group ``g`` and copy ``tensors`` (any device, any dtype/shape) into the host
        store, as one piece of whole tensors. The caller drops its own copies."""
        self._impl.add_group(int(g), [t.detach() for t in tensors])

    def remove_group(self, g: int) -> None:
        self._impl.remove_group(int(g))

    def has_group(self, g: int) -> bool:
        return self._impl.has_group(int(g))

    def groups(self) -> list[int]:
        return list(self._impl.groups())

    def group_bytes(self, g: int) -> int:
        return int(self._impl.group_bytes(int(g)))

    def set_pieces(self, g: int, pieces: Sequence[Sequence[tuple[int, int, int]]]) -> None:
        """Cut group g into pieces: each a list of ``(tensor index, begin, end)`` element ranges
        (a range starts at a multiple of 256 bytes), every element of every tensor in exactly one.
        fetch(g, j) then returns one tensor per range, in this order (shaped like the tensor when
        the range is all of it, else 1-D)."""
        self._impl.set_pieces(int(g), [[(int(t), int(b), int(e)) for t, b, e in piece] for piece in pieces])

    def num_pieces(self, g: int) -> int:
        return int(self._impl.num_pieces(int(g)))

    def piece_bytes(self, g: int) -> list[int]:
        """Device bytes of each piece of g (packed, 256-byte aligned segments)."""
        return [int(n) for n in self._impl.piece_bytes(int(g))]

    def set_device_budget(self, nbytes: int) -> None:
        """Allocate the device arena now, ``nbytes`` (rounded down to four 256-byte aligned
        quarters); it never grows afterwards and a piece must fit half of it."""
        self._impl.set_device_budget(int(nbytes))

    def reserve(self, nbytes: int) -> None:
        """Size the pinned staging slots now (e.g. to the largest piece), so pinned-memory
        failures surface here and slots never grow later."""
        self._impl.reserve(int(nbytes))

    # -- movement -------------------------------------------------------------------------------
    def prefetch(self, g: int, piece: int = 0) -> None:
        """Start copying a piece of g's state to the device; returns at once. No-op when it is
        already there or on its way."""
        self._impl.prefetch(int(g), int(piece))

    def fetch(self, g: int, piece: int = 0) -> list[torch.Tensor]:
        """A piece of g's state on the device, usable on the current stream (which waits on the
        copy's event; the host blocks only until the copy is enqueued)."""
        return list(self._impl.fetch(int(g), int(piece)))

    def release(self, g: int, piece: int = 0) -> None:
        """Write the piece back asynchronously (after the work already enqueued on the current
        stream); its device memory is reused once that copy has read it. The tensors from fetch()
        must not be used afterwards. A prefetched but never fetched piece is simply dropped."""
        self._impl.release(int(g), int(piece))

    def flush(self, g: int) -> None:
        """Write g's resident pieces back to the host store and keep them on the device; returns
        once the copies have read the device buffers, so later updates cannot race them."""
        self._impl.flush(int(g))

    def host_tensors(self, g: int) -> list[torch.Tensor]:
        """The true current state of g as CPU tensors aliasing the host store (waits for g's
        pending write-backs; resident pieces are copied back first)."""
        return list(self._impl.host_tensors(int(g)))

    def host_views(self, g: int) -> list[torch.Tensor]:
        """CPU tensors aliasing g's host store (one storage each), without waiting: their contents
        are g's state once g's write-backs finished (after synchronize() or host_tensors(g))."""
        return list(self._impl.host_views(int(g)))

    def load_host(self, g: int, tensors: Sequence[torch.Tensor]) -> None:
        """Overwrite g's state (same shapes and dtypes as add_group); resident pieces are updated
        too, prefetched ones dropped; a failed write-back of g is forgotten."""
        self._impl.load_host(int(g), [t.detach() for t in tensors])

    def residency(self, g: int) -> str:
        """"host" | "writing_back" | "prefetching" | "device" (the furthest piece)."""
        return self._impl.residency(int(g))

    def synchronize(self) -> None:
        """Wait for every copy in flight; raises if a write-back failed."""
        self._impl.synchronize()

    def set_tuning(self, *, pipeline_bytes: int | None = None, copy_threads: int | None = None) -> None:
        """CUDA copy tuning. ``pipeline_bytes`` (default 32 MiB): a piece is staged and sent in
        sub-copies of this size, so the DMA overlaps the host memcpy (0: one copy per piece).
        ``copy_threads`` (default 4): most threads one host memcpy uses."""
        cur = self.tuning()
        self._impl.set_tuning(int(cur["pipeline_bytes"] if pipeline_bytes is None else pipeline_bytes),
                              int(cur["copy_threads"] if copy_threads is None else copy_threads))

    def tuning(self) -> dict:
        return dict(self._impl.tuning())

    def inject_fault(self, kind: str, after: int = 0) -> None:
        """Debug engines only: the next ``kind`` ("h2d" or "d2h") copy fails after ``after``
        sub-copies, as a failing cudaMemcpyAsync would (tests of the error paths)."""
        self._impl.inject_fault(kind, int(after))

    # -- accounting -----------------------------------------------------------------------------
    def memory_report(self) -> dict:
        """Bytes: device_bytes (the arena plus any overflow buffers: all the device memory the
        engine holds), device_budget_bytes, device_peak_bytes, device_leased_bytes (pieces on the
        device now), device_leased_peak_bytes, pinned_bytes, slot_bytes, host_store_bytes,
        largest_group_bytes, largest_piece_bytes; counts: num_groups, resident_groups, num_slots."""
        return dict(self._impl.memory_report())

    def stats(self) -> dict:
        """Counters: h2d_copies, d2h_copies, h2d_bytes, d2h_bytes, slot_waits, fetch_waits,
        violations (debug checks; must stay 0), queued, overflow_allocs (pieces that found no free
        quarter: a temporary device buffer each), arena_allocs."""
        return dict(self._impl.stats())

    def close(self) -> None:
        """Finish every copy and stop the worker threads (also done when garbage collected)."""
        impl = getattr(self, "_impl", None)
        if impl is not None:
            impl.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __reduce__(self):
        raise TypeError(
            "OffloadEngine cannot be pickled (it owns threads, streams and device memory); save the "
            "optimizer's state_dict() instead"
        )

    def __repr__(self) -> str:
        r = self.memory_report()
        return (f"OffloadEngine(device={self.device}, num_slots={self.num_slots}, "
                f"groups={r['num_groups']}, host_store={r['host_store_bytes']} B, "
                f"device={r['device_bytes']} B, pinned={r['pinned_bytes']} B)")


def state_nbytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes a list of tensors takes in the engine's flat layout (256-byte aligned)."""
    n = 0
    for t in tensors:
        n += (t.numel() * t.element_size() + 255) // 256 * 256
    return n


# ============================================================================================
# Piece plans
# ============================================================================================
_ALIGN = 256
#: elements a piece boundary inside a tensor is a multiple of: 256 bytes of the smallest state
#: dtype (2 bytes), so every segment starts 256-byte aligned and cuts a 16-byte vector nowhere
PIECE_UNIT = 128


def _packed_bytes(n: int, sizes: Sequence[int]) -> int:
    return sum((n * e + _ALIGN - 1) // _ALIGN * _ALIGN for e in sizes)


def min_piece_bytes(params: Sequence[tuple[int, Sequence[int]]]) -> int:
    """The smallest piece capacity that can hold every parameter's state in pieces of
    :data:`PIECE_UNIT` elements (``params``: (numel, element sizes of its state tensors))."""
    return max([_packed_bytes(min(PIECE_UNIT, max(n, 1)), sz) for n, sz in params if sz] or [0])


def plan_pieces(params: Sequence[tuple[int, Sequence[int]]], capacity: int) -> list[list[tuple[int, int, int]]]:
    """Cut a group's state into pieces of at most ``capacity`` packed bytes.

    ``params``: per parameter, (numel, element sizes of its state tensors, in layout order). Returns
    pieces as lists of (parameter index, begin, end) element ranges, in parameter order; a range
    inside a tensor starts at a multiple of :data:`PIECE_UNIT` elements. Raises ValueError when
    ``capacity`` cannot hold :data:`PIECE_UNIT` elements of some parameter's state.
    """
    need = min_piece_bytes(params)
    if capacity < need:
        raise ValueError(f"a piece of {capacity} bytes cannot hold {PIECE_UNIT} elements of a parameter's "
                         f"optimizer state ({need} bytes)")
    pieces: list[list[tuple[int, int, int]]] = []
    cur: list[tuple[int, int, int]] = []
    used = 0
    for i, (numel, sizes) in enumerate(params):
        if not sizes:
            continue
        a = 0
        while True:
            rest = numel - a
            if _packed_bytes(rest, sizes) <= capacity - used:
                cur.append((i, a, numel))
                used += _packed_bytes(rest, sizes)
                break
            n = (capacity - used) // sum(sizes) // PIECE_UNIT * PIECE_UNIT
            if n >= PIECE_UNIT:
                cur.append((i, a, a + n))
                a += n
            if cur:
                pieces.append(cur)  # full
            cur, used = [], 0
    if cur:
        pieces.append(cur)
    return pieces


# ============================================================================================
# A HiFT optimizer's state residency
# ============================================================================================
StateKeys = Callable[[dict], list]


class GroupStateOffload:
    """Keeps every HiFT group's optimizer state (and fp32 masters) in the engine's host store and
    brings one group at a time through the device arena.

    Between steps every offloaded tensor of the optimizer's state mapping is a host view of the
    store (only the scalar ``step`` stays with the parameters). :meth:`update` runs one group's
    update: piece by piece, it fetches the piece, hands the kernel calls their slices and views,
    and writes the piece back; :meth:`after_step` prefetches the next group during the next
    forward/backward.

    Several steps per group (the optimizer's ``steps_per_group``): the optimizer says, per update,
    whether the same group is updated again next (``keep_resident``). A group of one piece then
    stays on the device between its steps: one fetch at the block's first step, one write-back
    after its last. The host views are stale while it is resident; :meth:`synchronize` writes it
    back first (``engine.flush``: it stays resident) and :meth:`after_load` replaces its device copy
    too (``engine.load_host``), so state_dict / load_state_dict / deepcopy see the true state. A
    group streamed in several pieces (larger than half of the device budget) cannot stay: it streams
    at every step.

    Args:
        device: the parameters' device.
        num_slots: pinned staging slots.
        prefetch: prefetch the next group's (first pieces of) state after each step.
        device_bytes: the device budget for optimizer state. None: two halves each holding the
            largest group whole (sized from ``group_sizes``). A group larger than half of the
            budget is streamed in pieces of a quarter.
        group_sizes: per HiFT group, per parameter, (numel, element sizes of its state tensors in
            layout order): the state the optimizer will create, for sizing before it exists.
        debug / debug_delay_us: passed to the engine (tests).
    """

    def __init__(self, device, *, num_slots: int = 2, prefetch: bool = True, device_bytes: int | None = None,
                 group_sizes: Sequence[Sequence[tuple[int, Sequence[int]]]] = (), debug: bool = False,
                 debug_delay_us: float = 0.0):
        if device_bytes is not None:
            if isinstance(device_bytes, bool) or not isinstance(device_bytes, int) or device_bytes <= 0:
                raise ValueError(f"offload_device_bytes must be a positive int (bytes) or None, got {device_bytes!r}")
        self.engine = OffloadEngine(device, num_slots, debug=debug, debug_delay_us=debug_delay_us)
        self.prefetch_next = bool(prefetch)
        self.device_bytes = device_bytes
        self._config = dict(device=device, num_slots=num_slots, prefetch=prefetch, device_bytes=device_bytes,
                            debug=debug, debug_delay_us=debug_delay_us)
        self._layout: dict[int, list[tuple[int, str]]] = {}
        self._plans: dict[int, list[list[tuple[int, int, int]]]] = {}
        self._views: dict[int, list[list[tuple[int, str]]]] = {}
        self._prefetched: set[int] = set()
        self._resident: int | None = None  # a group kept on the device between the steps of its block
        self._size(group_sizes)

    # ------------------------------------------------------------------------------- sizing
    def _size(self, group_sizes) -> None:
        groups = [list(g) for g in group_sizes]
        if self.device_bytes is None:
            largest = max([_packed_bytes_group(g) for g in groups] or [0])
            if largest > 0:
                quarter = ((largest + 1) // 2 + _ALIGN - 1) // _ALIGN * _ALIGN
                self.engine.set_device_budget(4 * quarter)  # two halves, each the largest group
                self.engine.reserve(2 * quarter)
            return
        quarter = self.device_bytes // 4 // _ALIGN * _ALIGN
        need = max([min_piece_bytes(g) for g in groups] or [0])
        if quarter < max(need, _ALIGN):
            raise ValueError(
                f"offload_device_bytes={self.device_bytes} is too small: the device arena is cut into four "
                f"quarters and a quarter must hold at least {max(need, _ALIGN)} bytes ({PIECE_UNIT} elements of "
                f"a parameter's optimizer state); pass at least {4 * max(need, _ALIGN)} bytes, or None to "
                "size it to the largest group"
            )
        self.engine.set_device_budget(self.device_bytes)
        largest = max([_packed_bytes_group(g) for g in groups] or [0])
        self.engine.reserve(min(2 * quarter, (largest + _ALIGN - 1) // _ALIGN * _ALIGN) or _ALIGN)

    @property
    def quarter_bytes(self) -> int:
        return self.engine.memory_report()["device_budget_bytes"] // 4

    # ------------------------------------------------------------------------------- layout
    @staticmethod
    def state_keys(st: dict) -> list[str]:
        """The offloaded entries of a parameter's state: every tensor but the scalar step."""
        return [k for k in sorted(st) if k != "step" and isinstance(st[k], Tensor)]

    def is_registered(self, g: int) -> bool:
        return g in self._layout

    def num_pieces(self, g: int) -> int:
        return len(self._plans.get(g, ()))

    def register(self, g: int, params: Sequence[Tensor], state) -> None:
        """Make the engine hold group g's current state tensors (created on the host by the
        optimizer, or with new keys), and point the state mapping at the store."""
        layout = [(i, k) for i, p in enumerate(params) for k in self.state_keys(state.get(p, {}))]
        if self._layout.get(g) == layout and self.engine.has_group(g):
            return
        tensors = [state[params[i]][k] for i, k in layout]
        self._install(g, params, state, layout, tensors)

    def _install(self, g, params, state, layout, tensors) -> None:
        self._prefetched.discard(g)
        if self._resident == g:
            self._resident = None  # remove_group drops the device copy; the new tensors replace it
        if self.engine.has_group(g):
            self.engine.remove_group(g)  # host views keep the old buffer alive until replaced
        self._layout.pop(g, None)
        self._plans.pop(g, None)  # (a group loaded without state must not be prefetched later)
        self._views.pop(g, None)
        if not layout:
            return
        self.engine.add_group(g, tensors)
        self._layout[g] = layout
        self._plan(g, params, layout, tensors)
        self._point_at_host(g, params, state)

    def _plan(self, g, params, layout, tensors) -> None:
        by_param: dict[int, list[tuple[str, int]]] = {}
        for (i, k), t in zip(layout, tensors):
            by_param.setdefault(i, []).append((k, t.element_size()))
        order = sorted(by_param)
        entries = [(params[i].numel(), [e for _, e in by_param[i]]) for i in order]
        budget = self.engine.memory_report()["device_budget_bytes"]
        total = sum(_packed_bytes(n, sz) for n, sz in entries)
        if budget and total > budget // 2:  # does not fit a half: stream it in quarters
            plan = [[(order[j], a, b) for j, a, b in piece] for piece in plan_pieces(entries, budget // 4 // _ALIGN * _ALIGN)]
        else:
            plan = [[(i, 0, params[i].numel()) for i in order]]
        index = {ik: n for n, ik in enumerate(layout)}
        pieces, views = [], []
        for piece in plan:
            segs, names = [], []
            for i, a, b in piece:
                for k, _ in by_param[i]:
                    segs.append((index[(i, k)], a, b))
                    names.append((i, k))
            pieces.append(segs)
            views.append(names)
        if len(plan) > 1 or self.engine.num_pieces(g) != 1:
            self.engine.set_pieces(g, pieces)
        self._plans[g] = plan
        self._views[g] = views

    def _point_at_host(self, g, params, state) -> None:
        for (i, k), v in zip(self._layout[g], self.engine.host_views(g)):
            state[params[i]][k] = v

    # ------------------------------------------------------------------------------- the update
    def update(self, g: int, params: Sequence[Tensor], calls: Sequence[tuple[Any, Sequence[int], Sequence[Tensor], Sequence[str]]],
               apply: Callable[[Any, list, list, list, list], None], keep_resident: bool = False) -> None:
        """Run group g's update piece by piece.

        ``calls``: (tag, indices into ``params`` of the parameters it updates, their gradients, the
        state keys its kernel reads). For each piece, ``apply(tag, params, grads, states, idx)`` gets
        the pieces of those parameters and gradients (whole tensors, or 1-D element ranges), one
        list of device state tensors per key, and the positions in the call's lists.

        ``keep_resident``: the caller updates g again at its next step, so a group of one piece is
        not written back now (it stays on the device until an update without the flag,
        :meth:`synchronize`'s flush keeping it there, or another group's update).
        """
        eng = self.engine
        for h in list(self._prefetched):  # a stale prefetch (e.g. a retried step)
            if h != g:
                for j in range(self.num_pieces(h)):
                    eng.release(h, j)
        self._prefetched.clear()
        if self._resident is not None and self._resident != g:  # e.g. the position was reloaded
            self._release_resident()
        plan = self._plans.get(g)
        if not plan:
            return
        keep = keep_resident and len(plan) == 1  # a streamed group cannot stay on the device
        pos = [{i: c for c, i in enumerate(index)} for _, index, _, _ in calls]
        done = 0
        try:
            eng.prefetch(g, 0)
            for j, piece in enumerate(plan):
                views = eng.fetch(g, j)
                if j + 1 < len(plan):
                    eng.prefetch(g, j + 1)  # copies in while this piece is updated
                by = dict(zip(self._views[g][j], views))
                for (tag, _, grads, keys), where in zip(calls, pos):
                    ps, gs, idx = [], [], []
                    states: list[list[Tensor]] = [[] for _ in keys]
                    for i, a, b in piece:
                        c = where.get(i)
                        if c is None:
                            continue
                        p, gr = params[i], grads[c]
                        if a == 0 and b == p.numel():
                            ps.append(p)
                            gs.append(gr)
                        else:
                            ps.append(p.view(-1)[a:b])
                            gs.append(gr.view(-1)[a:b])
                        for s, k in enumerate(keys):
                            states[s].append(by[(i, k)])
                        idx.append(c)
                    if ps:
                        apply(tag, ps, gs, states, idx)
                if not keep:
                    eng.release(g, j)  # the write-back waits for this piece's kernels, not the host
                done = j + 1
        except BaseException:
            for j in range(done, len(plan)):
                eng.release(g, j)  # unchanged pieces go back (a kernel refuses before writing)
            if self._resident == g:
                self._resident = None
            raise
        self._resident = g if keep else None

    def _release_resident(self) -> None:
        """Write the group kept on the device back (asynchronously) and free its device memory."""
        h, self._resident = self._resident, None
        if h is not None and self.engine.has_group(h):
            for j in range(self.num_pieces(h)):
                self.engine.release(h, j)

    def after_step(self, g: int, nxt: int) -> None:
        """Group g was updated; overlap the next group's first pieces with its forward/backward.
        Within a block (nxt == g) nothing moves: the next group is prefetched only after the
        block's last step."""
        if self.prefetch_next and nxt != g and nxt in self._plans:
            for j in range(min(2, self.num_pieces(nxt))):
                self.engine.prefetch(nxt, j)
            self._prefetched.add(nxt)

    # ------------------------------------------------------------------------------- state
    def synchronize(self, flush: bool = True) -> None:
        """Every write-back done: the host views in the state mapping hold the true state. A group
        kept on the device for its block is written back first and stays there (``flush=False``:
        it is not, and its host views may be stale)."""
        if flush and self._resident is not None:
            self.engine.flush(self._resident)
        self.engine.synchronize()

    def after_load(self, param_groups: Sequence[dict], state) -> None:
        """The state mapping was replaced by load_state_dict (its offloaded tensors are fresh host
        tensors): put them into the store, group by group."""
        for h in list(self._prefetched):
            for j in range(self.num_pieces(h)):
                self.engine.release(h, j)
        self._prefetched.clear()
        for g, grp in enumerate(param_groups):
            params = grp["params"]
            layout = [(i, k) for i, p in enumerate(params) for k in self.state_keys(state.get(p, {}))]
            tensors = [state[params[i]][k] for i, k in layout]
            if layout and self._layout.get(g) == layout and self.engine.has_group(g):
                self.engine.load_host(g, tensors)
                self._point_at_host(g, params, state)
            else:
                self._install(g, params, state, layout, tensors)

    def clone(self, param_groups: Sequence[dict], state) -> "GroupStateOffload":
        """A new engine holding ``state`` (a deep copy's): what copy.deepcopy of the optimizer uses."""
        new = GroupStateOffload(**self._config)
        new._size_like(self)
        new.after_load(param_groups, state)
        return new

    def _size_like(self, other: "GroupStateOffload") -> None:
        rep = other.engine.memory_report()
        if rep["device_budget_bytes"]:
            self.engine.set_device_budget(rep["device_budget_bytes"])
        if rep["slot_bytes"]:
            self.engine.reserve(rep["slot_bytes"] // max(1, rep["num_slots"]))

    def memory_report(self) -> dict:
        rep = self.engine.memory_report()
        rep["pieces_per_group"] = [self.num_pieces(g) for g in sorted(self._plans)]
        rep["resident_group"] = self._resident  # kept on the device between the steps of its block
        return rep

    def __reduce__(self):
        raise TypeError(
            "a HiFT optimizer that offloads its state cannot be pickled (its engine owns threads, streams "
            "and device memory); save optimizer.state_dict() and load it into a new optimizer instead"
        )


def _packed_bytes_group(params: Sequence[tuple[int, Sequence[int]]]) -> int:
    return sum(_packed_bytes(n, sz) for n, sz in params)
