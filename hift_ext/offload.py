"""Optimizer-state offload: the Python face of the C++ engine in csrc/offload.

The host store holds every registered group's optimizer state (one flat, 256-byte aligned byte
buffer per group). A ring of ``num_slots`` staging slots (pinned host memory on CUDA, each sized to
the largest group) carries the copies; two side streams (H2D, D2H) and one event per slot use
order them:

    prefetch(g): host store --memcpy (H2D worker)--> slot --cudaMemcpyAsync (H2D stream)--> device
    release(g):  device --(D2H stream, after the compute stream's event)--> slot --memcpy--> store

The compute stream only ever waits on events (fetch), never on a device-wide synchronize, and device
buffers are ``record_stream``-ed on the side streams, so memory is reused only after the copies that
touch it finished. On a machine without CUDA (device "cpu") the very same ring, queues and ordering
run with host buffers and background threads, which is how CI tests them.

Contract (what the HiFT optimizer relies on)::

    eng = OffloadEngine(device, num_slots=2)
    eng.add_group(g, tensors)     # copy a group's (fresh) state into the host store; g is an int
    eng.prefetch(g)               # start the host -> device copy; returns at once
    ts = eng.fetch(g)             # device tensors of g, safe to use on the current stream
    eng.release(g)                # after g's kernels were enqueued: async write-back, frees device
    eng.host_tensors(g)           # the true state on the host (waits / copies back as needed)
    eng.load_host(g, tensors)     # overwrite g's state (device copy too, if resident)
    eng.synchronize(); eng.memory_report(); eng.stats()

Tensors returned by fetch() alias the group's device buffer and are valid until release(g); those
returned by host_tensors() alias the host store (like torch's own optimizer.state_dict(), they see
later updates: clone them to keep a snapshot). API calls are expected from one thread.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from hift_ext._ext import require_extension

__all__ = ["OffloadEngine", "offload_available"]

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
    """Moves optimizer-state groups between a host store and ``device`` through ``num_slots``
    staging slots.

    Args:
        device: where fetched state lives ("cuda", "cuda:1", or "cpu" for the host-only engine).
        num_slots: number of staging slots R (>= 1). 2 overlaps one prefetch with one write-back;
            3 adds slack when a write-back is slow to start.
        pinned: "auto" (default: pinned slots, falling back to pageable with a warning when pinned
            memory cannot be allocated), True (fail with a clear error instead) or False.
        debug: check slot ownership and checksums on every copy (tests); ``stats()["violations"]``.
        debug_delay_us: random sleeps of up to this many microseconds inside the workers (tests:
            shakes out ordering bugs).
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

    # -- groups ---------------------------------------------------------------------------------
    def add_group(self, g: int, tensors: Sequence[torch.Tensor]) -> None:
        """Register group ``g`` and copy ``tensors`` (any device, any dtype/shape) into the host
        store. The group starts on the host; the caller drops its own copies and calls fetch()."""
        ts = [t.detach() for t in tensors]
        self._impl.add_group(int(g), ts)

    def remove_group(self, g: int) -> None:
        self._impl.remove_group(int(g))

    def has_group(self, g: int) -> bool:
        return self._impl.has_group(int(g))

    def groups(self) -> list[int]:
        return list(self._impl.groups())

    def group_bytes(self, g: int) -> int:
        return int(self._impl.group_bytes(int(g)))

    def reserve(self, nbytes: int) -> None:
        """Size the staging slots now (e.g. to the largest group's state), so pinned-memory
        failures surface here and slots never grow later."""
        self._impl.reserve(int(nbytes))

    # -- movement -------------------------------------------------------------------------------
    def prefetch(self, g: int) -> None:
        """Start copying g's state to the device; returns at once. No-op when already there."""
        self._impl.prefetch(int(g))

    def fetch(self, g: int) -> list[torch.Tensor]:
        """g's state on the device, usable on the current stream (which waits on the copy's
        event; the host blocks only until the copy is enqueued)."""
        return list(self._impl.fetch(int(g)))

    def release(self, g: int) -> None:
        """Write g's state back asynchronously (after the work already enqueued on the current
        stream) and give its device memory back once the copy is done. The tensors from fetch()
        must not be used afterwards. A prefetched but never fetched group is simply dropped."""
        self._impl.release(int(g))

    def flush(self, g: int) -> None:
        """Write a resident group's state back to the host store and keep it on the device; returns
        once the copy has read the device buffers, so later updates cannot race it."""
        self._impl.flush(int(g))

    def host_tensors(self, g: int) -> list[torch.Tensor]:
        """The true current state of g as CPU tensors aliasing the host store (waits for g's
        pending write-back; a resident group is copied back first)."""
        return list(self._impl.host_tensors(int(g)))

    def host_views(self, g: int) -> list[torch.Tensor]:
        """CPU tensors aliasing g's host store, without waiting: their contents are g's state once
        g's write-back finished (after synchronize() or host_tensors(g))."""
        return list(self._impl.host_views(int(g)))

    def load_host(self, g: int, tensors: Sequence[torch.Tensor]) -> None:
        """Overwrite g's state (same shapes and dtypes as add_group); a resident group's device
        copy is updated too, a prefetched one is dropped."""
        self._impl.load_host(int(g), [t.detach() for t in tensors])

    def residency(self, g: int) -> str:
        """"host" | "writing_back" | "prefetching" | "device"."""
        return self._impl.residency(int(g))

    def synchronize(self) -> None:
        """Wait for every copy in flight."""
        self._impl.synchronize()

    def set_tuning(self, *, pipeline_bytes: int | None = None, copy_threads: int | None = None) -> None:
        """CUDA copy tuning. ``pipeline_bytes`` (default 32 MiB): a group is staged and sent in
        pieces of this size, so the DMA overlaps the host memcpy (0: one copy per group).
        ``copy_threads`` (default 4): most threads one host memcpy uses."""
        cur = self.tuning()
        self._impl.set_tuning(int(cur["pipeline_bytes"] if pipeline_bytes is None else pipeline_bytes),
                              int(cur["copy_threads"] if copy_threads is None else copy_threads))

    def tuning(self) -> dict:
        return dict(self._impl.tuning())

    # -- accounting -----------------------------------------------------------------------------
    def memory_report(self) -> dict:
        """Bytes: device_bytes (state buffers the engine holds on the device now, including
        write-backs in flight), device_peak_bytes, pinned_bytes, slot_bytes, host_store_bytes,
        largest_group_bytes; counts: num_groups, resident_groups, num_slots."""
        return dict(self._impl.memory_report())

    def stats(self) -> dict:
        """Counters: h2d_copies, d2h_copies, h2d_bytes, d2h_bytes, slot_waits, fetch_waits,
        violations (debug checks; must stay 0), queued."""
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

    def __repr__(self) -> str:
        r = self.memory_report()
        return (f"OffloadEngine(device={self.device}, num_slots={self.num_slots}, "
                f"groups={r['num_groups']}, host_store={r['host_store_bytes']} B, "
                f"pinned={r['pinned_bytes']} B)")


def state_nbytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes a list of tensors takes in the engine's flat layout (256-byte aligned)."""
    n = 0
    for t in tensors:
        n += (t.numel() * t.element_size() + 255) // 256 * 256
    return n
