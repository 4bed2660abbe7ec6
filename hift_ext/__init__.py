"""hift_ext: HiFT (hierarchical full-parameter fine-tuning) with fused optimizer kernels."""
from hift_ext._ext import has_cuda_kernels, has_extension

__version__ = "0.1.0"
__all__ = ["has_cuda_kernels", "has_extension"]
