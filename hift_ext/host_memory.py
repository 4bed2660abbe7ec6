"""Host memory of a CPU training process: keep what it frees in the heap (glibc).

glibc hands every freed block of 128 KiB-32 MiB and more back to the kernel (mmap'd blocks at once,
the heap's top past a trim threshold), and a training step frees and allocates its activations and
gradients again at every step: each page is then faulted in again. On the 2-core development VM a
page fault costs 1-25 us, and `hift-ext finetune --task causal-lm` spent 35 s in the kernel (11.5M
faults); kept in the heap, 16-19 s (1.6M) and 1.10-1.17x the training tokens/s, for 9-11% more
peak RSS (README, the LLM job). The same as ``GLIBC_TUNABLES=`` :data:`RETAINED_HEAP_TUNABLES` at
start-up, which the benchmarks' speed runs use (benchmarks/_side_by_side.py), but set from inside the
process, so `hift-ext finetune` gets it however it is launched.
"""
from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["retain_freed_memory", "OPT_OUT", "RETAINED_HEAP_TUNABLES"]

OPT_OUT = "HIFT_RETAIN_HEAP"  # =0: leave glibc's defaults alone
_M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1  # mallopt takes an int: trim only a free top of the heap larger than 2 GiB
# the same settings for a process about to start (GLIBC_TUNABLES, read by glibc at start-up), where the
# trim threshold is not bound to an int: 64 GiB
RETAINED_HEAP_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


def retain_freed_memory() -> bool:
    """Ask glibc to serve every allocation from the heap and to keep freed memory there (trimming
    only a free top over 2 GiB). Whether it applied: not on other C libraries or systems, not when
    ``HIFT_RETAIN_HEAP=0``, and not when GLIBC_TUNABLES already sets a malloc tunable (the user's)."""
    if not sys.platform.startswith("linux") or os.environ.get(OPT_OUT, "1") == "0":
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt, or another libc name
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1
