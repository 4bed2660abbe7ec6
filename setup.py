"""Builds hift_ext._C: one extension module from every csrc/**/*.cpp (and csrc/**/*.cu with CUDA).

CUDA is used when torch is a CUDA build and nvcc is found (HIFT_EXT_CUDA=0|1 forces the choice).
setup.py finds the toolkit itself (CUDA_HOME, CUDA_PATH, /usr/local/cuda, nvcc on PATH), adds the
pip-installed CUDA headers (site-packages/nvidia/cu*/include) when the toolkit lacks some (e.g.
cusparse.h), and limits TORCH_CUDA_ARCH_LIST to "8.0;9.0+PTX" when no GPU is visible and the user
did not set it, so a GPU-less build takes minutes instead of compiling for every architecture.
"""
from __future__ import annotations

import glob
import os
import shutil
import site
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0+PTX"


def _log(msg: str) -> None:
    print(f"hift_ext setup: {msg}", file=sys.stderr, flush=True)


def _find_cuda_home() -> str | None:
    """The CUDA toolkit root, or None. Runs before torch.utils.cpp_extension reads CUDA_HOME."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    candidates = ["/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        # nvcc may be a wrapper script (e.g. /usr/local/bin/nvcc -> exec /usr/local/cuda-X/bin/nvcc):
        # trust its parent only when it looks like a toolkit.
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in candidates:
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and os.path.exists(
            os.path.join(home, "include", "cuda_runtime.h")
        ):
            return home
    return None


def _want_cuda(torch_mod, cuda_home: str | None) -> tuple[bool, str]:
    forced = os.environ.get("HIFT_EXT_CUDA", "").strip().lower()
    if forced in ("0", "false", "no", "off"):
        return False, "HIFT_EXT_CUDA=0"
    has_torch_cuda = torch_mod.version.cuda is not None
    if forced in ("1", "true", "yes", "on"):
        if not has_torch_cuda:
            raise SystemExit("hift_ext setup: HIFT_EXT_CUDA=1 but this torch is a CPU-only build")
        if cuda_home is None:
            raise SystemExit("hift_ext setup: HIFT_EXT_CUDA=1 but nvcc was not found; set CUDA_HOME")
        return True, "HIFT_EXT_CUDA=1"
    if not has_torch_cuda:
        return False, "torch is a CPU-only build"
    if cuda_home is None:
        return False, "nvcc not found (set CUDA_HOME to build the CUDA kernels)"
    return True, f"torch CUDA {torch_mod.version.cuda}, nvcc in {cuda_home}"


def _pip_cuda_include_dirs(cuda_home: str) -> list[str]:
    """site-packages/nvidia/cu*/include when the toolkit lacks headers torch includes."""
    if os.path.exists(os.path.join(cuda_home, "include", "cusparse.h")):
        return []
    roots = list(site.getsitepackages()) + [site.getusersitepackages()] + sys.path
    found: list[str] = []
    for root in roots:
        for inc in sorted(glob.glob(os.path.join(root, "nvidia", "cu*", "include"))) + [
            os.path.join(root, "nvidia", "cusparse", "include")
        ]:
            if os.path.exists(os.path.join(inc, "cusparse.h")) and inc not in found:
                found.append(inc)
    return found[:1]


def _gpu_visible() -> bool:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        return out.returncode == 0 and "GPU" in out.stdout
    except (OSError, subprocess.SubprocessError):
        return False


def _libstdcxx_link_args() -> list[str]:
    """Link the libstdc++.so that torch loaded when the compiler would link libstdc++ statically.

    Some toolchains (seen: a GCC under /opt/gcc on a GPU image) ship no shared libstdc++ of their
    own, so g++ silently puts a private copy of the C++ runtime into _C.so. An exception thrown here
    (every TORCH_CHECK) is then raised by that copy and caught by torch's, and the process dies with
    a segmentation fault instead of a RuntimeError. Naming the loaded libstdc++.so.6 on the link
    line makes the extension use the same runtime as torch."""
    if not sys.platform.startswith("linux"):
        return []
    cxx = os.environ.get("CXX") or "c++"
    try:
        found = subprocess.run([cxx, "-print-file-name=libstdc++.so"], capture_output=True, text=True,
                               timeout=30).stdout.strip()
        specs = subprocess.run([cxx, "-dumpspecs"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    if os.path.isabs(found) and os.path.exists(found) and "static-libstdc++" not in specs:
        return []  # the usual case: the compiler links its shared libstdc++
    try:
        with open("/proc/self/maps") as f:
            loaded = sorted({ln.split()[-1] for ln in f if "/libstdc++.so" in ln})
    except OSError:
        loaded = []
    if not loaded:
        return []
    _log(f"{cxx} would link libstdc++ statically: linking torch's {loaded[0]} instead")
    return [loaded[0]]


def _sources(pattern: str) -> list[str]:
    return sorted(
        os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "**", pattern), recursive=True)
    )


def _extensions_and_cmdclass():
    cuda_home = _find_cuda_home()
    if cuda_home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = cuda_home  # torch.utils.cpp_extension reads it at import
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    use_cuda, why = _want_cuda(torch, cuda_home)
    link = ["-fopenmp"] + _libstdcxx_link_args()
    # -fopenmp: at::parallel_for is an inline template, so the OpenMP region is compiled here.
    # -g0: python's default -g makes every torch header emit debug info (slow builds, big .so).
    # -fno-math-errno: lets std::sqrt vectorize (nothing here reads errno).
    cxx = ["-O3", "-g0", "-fno-math-errno", "-fopenmp", "-Wall", "-Wno-unused-function", "-Wno-interference-size",
           "-Wno-unknown-pragmas", "-Wno-psabi"]  # noise from torch headers
    include_dirs = [os.path.join(ROOT, "csrc")]
    sources = _sources("*.cpp")
    if use_cuda:
        include_dirs += _pip_cuda_include_dirs(cuda_home)
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not _gpu_visible():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
            _log(f"no GPU visible: TORCH_CUDA_ARCH_LIST={DEFAULT_ARCHS} (set it to override)")
        nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-DHIFT_EXT_WITH_CUDA=1",
                "-Xcompiler", "-Wno-interference-size"]
        ext = CUDAExtension(
            "hift_ext._C",
            sources + _sources("*.cu"),
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx + ["-DHIFT_EXT_WITH_CUDA=1"], "nvcc": nvcc},
            extra_link_args=link,
        )
        _log(f"building hift_ext._C WITH CUDA kernels ({why})")
    else:
        ext = CppExtension(
            "hift_ext._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
        _log(f"building hift_ext._C CPU-only, without CUDA kernels ({why})")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions_and_cmdclass()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
