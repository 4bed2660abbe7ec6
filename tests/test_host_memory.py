"""hift_ext.host_memory: `hift-ext finetune` on the CPU keeps freed memory in glibc's heap, unless
the user opts out or set glibc's malloc tunables themselves. Each case runs in a fresh process
(mallopt changes the whole process)."""
import os
import subprocess
import sys

import pytest

from hift_ext import host_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")

PROBE = ("import ctypes, sys; from hift_ext.host_memory import retain_freed_memory; "
         "ok = retain_freed_memory(); "
         # freed memory stays: a 64 MiB block freed and allocated again faults in no new pages
         "import resource; libc = ctypes.CDLL('libc.so.6'); libc.malloc.restype = ctypes.c_void_p; "
         "libc.free.argtypes = [ctypes.c_void_p]; n = 64 << 20; "
         "p = libc.malloc(n); ctypes.memset(p, 1, n); libc.free(p); "
         "f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; "
         "p = libc.malloc(n); ctypes.memset(p, 1, n); libc.free(p); "
         "print(ok, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)")


def _probe(**env):
    e = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory.OPT_OUT)}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**e, **env}, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0] == "True", int(out[1])


def test_freed_memory_stays_in_the_heap_unless_opted_out():
    applied, kept = _probe()
    if not applied:
        pytest.skip("not glibc")
    assert kept < 1000  # 64 MiB again from the heap (16384 4-KiB pages if they had gone back to the kernel)
    applied, returned = _probe(**{host_memory.OPT_OUT: "0"})
    # glibc's default: the block was mmap'd, unmapped, and faulted in again (fewer faults with
    # transparent huge pages, yet more than none)
    assert not applied and returned > kept
    applied, _ = _probe(GLIBC_TUNABLES="glibc.malloc.mmap_max=1")  # the user's own malloc settings win
    assert not applied
