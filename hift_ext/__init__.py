"""hift_ext: HiFT (hierarchical full-parameter fine-tuning) with fused optimizer kernels.

The optimizers, grouping, schedules and LR work without the compiled extension; the first call
into a kernel raises a clear error saying how to build hift_ext._C.
"""
from hift_ext._ext import has_cuda_kernels, has_extension
from hift_ext.distributed import HiFTDistributedError
from hift_ext.grouping import Group, Unit, describe_groups, group_model, groups_from_params, model_units
from hift_ext.lr import DelayedLRScheduler, get_scheduler
from hift_ext.offload import OffloadEngine
from hift_ext.hift_optim import FusedHiFTAdaGrad, FusedHiFTAdamW, FusedHiFTSGD
from hift_ext.optim import FusedAdaGrad, FusedAdamW, FusedSGD
from hift_ext.schedule import GroupSchedule

__version__ = "0.1.0"
__all__ = [
    "FusedAdamW", "FusedAdaGrad", "FusedSGD",
    "FusedHiFTAdamW", "FusedHiFTAdaGrad", "FusedHiFTSGD",
    "group_model", "groups_from_params", "model_units", "describe_groups", "Group", "Unit",
    "GroupSchedule", "get_scheduler", "DelayedLRScheduler",
    "OffloadEngine", "has_cuda_kernels", "has_extension", "HiFTDistributedError",
]
