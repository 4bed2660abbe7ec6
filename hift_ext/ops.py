"""Typed wrappers over the fused optimizer ops torch.ops.hift_ext.* (csrc/optim).

Every op updates lists of tensors IN PLACE; index i of every list belongs to the same parameter.
Per index, param, grad and states share dtype (float32, bfloat16 or float16; the math is fp32;
with ``master_params`` see below), shape and device, and are contiguous; different indices may
differ in dtype and size. A whole list is one call: one parallel region on CPU, one kernel launch
on CUDA.

``state_steps`` are float32 one-element tensors on the params' device, ALREADY incremented by the
caller (they hold the step number of this update, as in torch's fused path); kernels only read
them. ``grad_scale`` (grads are divided by it in registers; grads are never written) and
``found_inf`` (nonzero -> the call changes nothing) are optional float32 one-element tensors on
the params' device, as GradScaler passes them to optimizers with ``_step_supports_amp_scaling``.

``master_params`` (mixed precision with fp32 master weights): empty (the default: params are
updated in their own dtype, as above), or one float32 contiguous tensor per param with its shape
and device. Then param i may be bfloat16/float16 (or float32), grad i has the PARAM's dtype, and
every state tensor is float32: one pass per element reads grad + master + states, runs the same
fp32 update on the master (master and states are bitwise what the op computes without masters on
float32 copies with ``grad.float()``), writes master and states, and writes the param as the
master rounded to nearest even (``param == master.to(param.dtype)``). Params are never read.
``found_inf`` nonzero leaves masters and params untouched too.

The math is exactly torch.optim's (AdamW with decoupled weight decay, Adagrad, SGD); see
csrc/optim/update.h. Bad input raises RuntimeError with a message naming the list and index.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from hift_ext._ext import require_extension

__all__ = ["fused_adamw_", "fused_adagrad_", "fused_sgd_"]

_C = require_extension()  # loading _C registers torch.ops.hift_ext.*
_ops = torch.ops.hift_ext
# _C's entry points of the same ops (csrc/optim/bindings.cpp): one dispatcher call without
# torch.ops' per-call argument handling (8.6 -> 1.6 us for a one-tensor call on the CPU)
_direct = _C if hasattr(_C, "fused_sgd_") else None


def _call(name: str, lists: tuple, kw: dict) -> None:
    """Runs op ``name`` on its positional lists and its keyword arguments (``kw`` lists EVERY
    keyword in the schema's order): through _C's entry point, or through torch.ops while
    torch.compile traces (dynamo records torch.ops calls, not pybind functions)."""
    if _direct is not None and not torch.compiler.is_compiling():
        try:
            getattr(_direct, name)(*lists, *kw.values())
            return
        except TypeError:
            # pybind could not convert an argument (None in a list, ...): nothing ran, and
            # torch.ops' argument parser names the bad one
            pass
    getattr(_ops, name)(*lists, **kw)


def _scalar(x, name: str) -> float:
    # torch.optim accepts a Tensor lr; the kernels take python floats (float() syncs once on CUDA).
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(x.shape)}")
        return float(x.item())
    return float(x)


def _lr_args(lr, device: torch.device) -> tuple[float, Tensor | None]:
    """fused_adamw_'s (lr, lr_tensor): a tensor goes to the kernel as ``lr_tensor`` on the params'
    device (read when the kernel runs: no host sync, capturable); a host tensor for device params is
    read on the host (no device sync either); a float stays a float."""
    if not isinstance(lr, Tensor):
        return float(lr), None
    if lr.numel() != 1:
        raise ValueError(f"lr must be a number or a one-element tensor, got shape {tuple(lr.shape)}")
    if lr.device.type == "cpu" and device.type != "cpu":
        return float(lr), None
    if lr.dtype not in (torch.float32, torch.float64) or lr.device != device:
        lr = lr.to(device=device, dtype=torch.float64 if lr.dtype == torch.float64 else torch.float32,
                   non_blocking=True)
    # the float lr is ignored when lr_tensor is given: NaN makes a mistake there loud
    return math.nan, lr


def _all_empty(*lists: Sequence[Tensor]) -> bool:
    # The dispatcher needs at least one tensor to pick a kernel: an empty call is a no-op here.
    if len(lists[0]) != 0:
        return False
    for name_idx, lst in enumerate(lists[1:], 1):
        if len(lst) != 0:
            raise RuntimeError(
                f"hift_ext: list #{name_idx} has {len(lst)} tensors but params has 0 "
                "(every list needs one entry per parameter)"
            )
    return True


def fused_adamw_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    amsgrad: bool,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    master_params: Sequence[Tensor] = (),
) -> None:
    """In-place AdamW (decoupled weight decay) == torch.optim.AdamW. max_exp_avg_sqs is [] unless amsgrad.
    master_params: () or fp32 masters (then states are fp32; see the module docstring).
    lr: a float, or a one-element tensor that the kernel reads when it runs (no host sync; a CUDA
    graph that captured the call replays with the value last written into the tensor)."""
    if _all_empty(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, master_params):
        return
    lr_value, lr_tensor = _lr_args(lr, params[0].device)
    _call("fused_adamw_", (
        list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs), list(state_steps),
    ), dict(
        lr=lr_value, beta1=_scalar(beta1, "beta1"), beta2=_scalar(beta2, "beta2"),
        weight_decay=float(weight_decay), eps=float(eps), amsgrad=bool(amsgrad), maximize=bool(maximize),
        master_params=list(master_params), grad_scale=grad_scale, found_inf=found_inf, lr_tensor=lr_tensor,
    ))


def fused_adagrad_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state_sums: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    lr: float,
    lr_decay: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    master_params: Sequence[Tensor] = (),
) -> None:
    """In-place Adagrad == torch.optim.Adagrad: clr = lr / (1 + (step - 1) * lr_decay).
    master_params: () or fp32 masters (then state_sums are fp32; see the module docstring)."""
    if _all_empty(params, grads, state_sums, state_steps, master_params):
        return
    _call("fused_adagrad_", (list(params), list(grads), list(state_sums), list(state_steps)), dict(
        lr=_scalar(lr, "lr"), lr_decay=float(lr_decay), weight_decay=float(weight_decay),
        eps=float(eps), maximize=bool(maximize), master_params=list(master_params),
        grad_scale=grad_scale, found_inf=found_inf,
    ))


def fused_sgd_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    maximize: bool,
    is_first_step: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    master_params: Sequence[Tensor] = (),
) -> None:
    """In-place SGD == torch.optim.SGD. momentum_buffers is [] when momentum == 0; with
    is_first_step the buffers are SET to d_p (torch clones d_p on the first step), not read.
    master_params: () or fp32 masters (then momentum_buffers are fp32; see the module docstring)."""
    if _all_empty(params, grads, momentum_buffers, master_params):
        return
    _call("fused_sgd_", (list(params), list(grads), list(momentum_buffers)), dict(
        lr=_scalar(lr, "lr"), momentum=float(momentum), dampening=float(dampening),
        nesterov=bool(nesterov), weight_decay=float(weight_decay), maximize=bool(maximize),
        is_first_step=bool(is_first_step), master_params=list(master_params), grad_scale=grad_scale,
        found_inf=found_inf,
    ))


# No python fake impl: csrc/optim/ops.cpp registers a Meta kernel (validation only; the ops
# return nothing), which FakeTensor / torch.compile / torch.library.opcheck use.
