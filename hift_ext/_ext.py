"""Loads the compiled extension hift_ext._C once, and says clearly what to do when it is missing.

Importing hift_ext never fails because of the extension: the pure-Python parts (grouping, schedules,
LR) work without it, and the first call that needs a kernel raises ExtensionMissingError.
"""
from __future__ import annotations

import warnings

import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

BUILD_HINT = (
    "build it from the repository root with `pip install --no-build-isolation -e .` "
    "(or `./run.sh test`, which creates the venv and builds everything)"
)


class ExtensionMissingError(RuntimeError):
    pass


try:
    from hift_ext import _C  # noqa: F401  (registers torch.ops.hift_ext.*)

    _IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    _IMPORT_ERROR = exc
    warnings.warn(
        f"hift_ext: the compiled extension hift_ext._C could not be loaded ({exc}); "
        f"fused kernels are unavailable until you {BUILD_HINT}.",
        RuntimeWarning,
        stacklevel=2,
    )


def has_extension() -> bool:
    return _C is not None


def has_cuda_kernels() -> bool:
    """True when hift_ext._C was compiled with its CUDA kernels (nvcc build)."""
    return _C is not None and bool(_C.has_cuda_kernels())


def require_extension():
    if _C is None:
        raise ExtensionMissingError(
            f"hift_ext._C is not available ({_IMPORT_ERROR}); {BUILD_HINT}."
        )
    return _C
