"""Fused optimizers: drop-in replacements for torch.optim and their HiFT variants.

Drop-in (same constructor arguments, defaults, param_group keys and per-parameter state layout as
torch.optim, so state_dicts load both ways and training continues identically):

* :class:`FusedAdamW`   -- torch.optim.AdamW   (state: step, exp_avg, exp_avg_sq[, max_exp_avg_sq])
* :class:`FusedAdaGrad` -- torch.optim.Adagrad (state: step, sum; created in __init__ like torch)
* :class:`FusedSGD`     -- torch.optim.SGD     (state: momentum_buffer when momentum != 0)

Every update is one call of the compiled op (hift_ext.ops) per (param_group, device), covering all
tensors of that group whatever their dtypes. ``step`` counts are float32 scalar tensors on the
parameter's device; they are incremented here and then read by the kernel. The optimizers support
torch.amp.GradScaler directly (``_step_supports_amp_scaling``): the scale and the inf flag go to
the kernel, which unscales in registers and skips the whole update on an overflow.

HiFT (hierarchical full-parameter fine-tuning, arXiv 2401.15207):

* :class:`FusedHiFTAdamW`, :class:`FusedHiFTAdaGrad`, :class:`FusedHiFTSGD` take a model (grouped by
  :func:`hift_ext.grouping.group_model`) or an explicit list of groups, bottom to top. They keep one
  param_group per HiFT group and update ONE group per step(), with exactly the drop-in classes'
  update code (the HiFT classes are subclasses; there is no second copy of the math).

The residency of a group's optimizer state (for ``offload=True``) goes through three hooks,
``_bring_state_in(g)``, ``_send_state_out(g)`` and ``_sync_state()``, which do nothing while the
state stays on the parameters' device.
"""
from __future__ import annotations

import math
import operator
import weakref
from collections import defaultdict
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from hift_ext.schedule import GroupSchedule, check_steps_per_group

__all__ = [
    "FusedAdamW",
    "FusedAdaGrad",
    "FusedSGD",
    "FusedHiFTAdamW",
    "FusedHiFTAdaGrad",
    "FusedHiFTSGD",
]


_OPS = None


def _ops():
    """The kernel wrappers, imported on first use so that importing hift_ext never needs _C."""
    global _OPS
    if _OPS is None:
        from hift_ext import ops

        _OPS = ops
    return _OPS


def _scalar(x: Any) -> float:
    """Python float of a hyperparameter that may be a 1-element tensor (as torch.optim accepts)."""
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError("tensor hyperparameters must have exactly one element")
        return float(x.item())
    return float(x)


def _check_finite(owner: str, **values: Any) -> None:
    """Refuse inf/NaN hyperparameters: they train silently to NaN weights (torch.optim's own range
    checks let inf, and NaN momentum/dampening, through)."""
    for name, value in values.items():
        if type(value) is int or (type(value) is float and math.isfinite(value)):  # the usual case,
            continue                                                               # at every step
        items = value if isinstance(value, (tuple, list)) else (value,)
        for v in items:
            if isinstance(v, bool) or v is None:
                continue
            try:
                f = _scalar(v)
            except (TypeError, ValueError):
                raise TypeError(f"{owner}: {name} must be a number, got {v!r}") from None
            if not math.isfinite(f):
                raise ValueError(
                    f"{owner}: {name}={f} is not a finite number; pass a finite value (an inf or "
                    "NaN hyperparameter turns every weight into NaN)"
                )


def _masters_kw(masters) -> dict[str, Any]:
    """The kernels' master_params argument, only when there are masters (fp32 runs call the ops
    exactly as before)."""
    return {} if masters is None else {"master_params": masters}


def _check_param(p: Tensor, owner: str) -> None:
    if not isinstance(p, Tensor):
        raise TypeError(f"{owner}: expected parameters to be tensors, got {type(p).__name__}")
    if not p.is_floating_point():
        raise TypeError(
            f"{owner}: parameter of dtype {p.dtype} (shape {tuple(p.shape)}) is not a floating-point "
            "tensor; the fused kernels update fp32/bf16/fp16 parameters only. Leave integer buffers "
            "out of the optimizer (register them with register_buffer, or filter the parameter list)"
        )
    if p.is_sparse:
        raise TypeError(f"{owner}: sparse parameters are not supported; use a dense parameter")


def _stream_capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


#: the state key of a parameter's fp32 master copy (bf16/fp16 parameters with master weights)
MASTER_KEY = "master_param"
_LOW_PRECISION = (torch.bfloat16, torch.float16)


class _DeviceShare:
    """The parameters of one param group that one kernel call takes: same device, and all with or
    all without fp32 master weights."""

    __slots__ = ("index", "params", "dicts", "steps", "counters", "keys", "master")

    def __init__(self, index, params, dicts, steps, counters, keys, master) -> None:
        self.index = index  # positions in the group's updated list (None: all of them)
        self.params = params
        self.dicts = dicts  # the parameters' state dicts (never their tensors: offload swaps them)
        self.steps = steps  # state["step"] of each parameter: 0-dim views of counters
        self.counters = counters
        self.keys = keys  # the state tensors the kernel reads, MASTER_KEY last when master
        self.master = master


class _GroupPlan:
    """What one param group's update needs that rarely changes, kept between steps: the per-step
    Python work on thousands of parameters would otherwise cost more than the update itself."""

    __slots__ = ("group", "params", "state", "n_state", "keys", "shares")

    def __init__(self, group, params, state, n_state, keys, shares) -> None:
        self.group = group
        self.params = list(params)
        self.state = state
        self.n_state = n_state
        self.keys = keys
        self.shares = shares


class _FusedOptimizer(Optimizer):
    """Shared machinery: parameter validation, the per-(group, device) op call, AMP, step fix-ups.

    Subclasses implement ``_init_state(p, group)`` (creates the per-parameter state exactly as the
    torch.optim counterpart would, with :meth:`_new_state`), ``_state_keys(group)`` (the state
    tensors the kernel takes) and ``_apply(group, params, grads, states, steps, grad_scale,
    found_inf, masters, first)`` (calls one kernel for one device; ``states`` holds one list per
    state key, ``steps`` the already incremented step tensors, which this class counts, ``masters``
    the fp32 master weights or None, ``first`` per parameter whether this is its first update
    (SGD's momentum buffer) or None).

    Master weights (``master_weights``: None = on for bf16/fp16 parameters, True/False force it):
    a parameter with masters keeps an fp32 copy in ``state["master_param"]`` and fp32 state; the
    kernel updates the master in fp32 and writes the rounded parameter.
    """

    _step_supports_amp_scaling = True
    #: state is created lazily on the first step of a parameter (HiFT sets this for AdaGrad too)
    _eager_state = False
    _uses_steps = True

    #: the numeric hyperparameters of a param group (checked to be finite at every entry point)
    _hyper_keys: tuple[str, ...] = ()

    #: whether capturable=True (CUDA graph capture of step()) is accepted
    _supports_capturable = False
    _capturable_why = "only FusedAdamW supports it (as torch.optim.AdamW does among these optimizers)"

    def __init__(self, params, defaults: dict[str, Any]) -> None:
        self._check_hypers(defaults)
        if defaults.get("capturable") and not self._supports_capturable:
            raise ValueError(
                f"{type(self).__name__}: capturable=True (CUDA graph capture) is not supported: "
                f"{self._capturable_why}; leave capturable=False"
            )
        if defaults.get("differentiable"):
            raise ValueError(
                f"{type(self).__name__} does not support differentiable=True (the fused kernels "
                "update in place outside autograd); use torch.optim for differentiable optimizers"
            )
        mw = defaults.get("master_weights")
        if mw is not None and not isinstance(mw, bool):
            raise TypeError(f"{type(self).__name__}: master_weights must be None, True or False, got {mw!r}")
        super().__init__(params, defaults)
        if mw:
            for group in self.param_groups:
                if group.get("master_weights") and not any(p.dtype in _LOW_PRECISION for p in group["params"]):
                    raise ValueError(
                        f"{type(self).__name__}: master_weights=True, but every parameter is "
                        f"{group['params'][0].dtype}; fp32 parameters are their own masters. Convert the model "
                        "to bfloat16/float16 (model.to(torch.bfloat16)) or leave master_weights=None"
                    )
        if self._eager_state:
            for group in self.param_groups:
                for p in group["params"]:
                    self._prepare_state(p, group)

    # ----------------------------------------------------------------------------- param groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        plist = [params] if isinstance(params, Tensor) else list(params)
        for p in plist:
            _check_param(p, type(self).__name__)
        self._check_hypers(param_group)
        super().add_param_group(param_group)

    def _check_hypers(self, group: dict[str, Any], at_step: bool = False) -> None:
        values = {k: group[k] for k in self._hyper_keys if k in group}
        if at_step and group.get("capturable"):
            # reading a device tensor's value would sync the host (and fail during graph capture)
            values = {k: v for k, v in values.items() if not (isinstance(v, Tensor) and v.device.type != "cpu")}
        _check_finite(type(self).__name__, **values)

    # ----------------------------------------------------------------------------- to override
    def _init_state(self, p: Tensor, group: dict[str, Any]) -> None:  # pragma: no cover
        raise NotImplementedError

    def _apply(self, group, params, grads, states, steps, grad_scale, found_inf) -> None:  # pragma: no cover
        raise NotImplementedError

    # ----------------------------------------------------------------------------- helpers
    def _collect(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
        """Parameters with a gradient (others are skipped, as in torch) and their gradients."""
        params = group["params"]
        grads = [p.grad for p in params]
        # The usual case costs one cheap pass: every gradient present, dense and contiguous.
        if all([g is not None and not g.is_sparse and g.is_contiguous() for g in grads]):
            return params, grads
        kept_params: list[Tensor] = []
        kept_grads: list[Tensor] = []
        for p, g in zip(params, grads):
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError(
                    f"{type(self).__name__} does not support sparse gradients (parameter of shape "
                    f"{tuple(p.shape)}); use torch.optim.SparseAdam or a dense embedding "
                    "(nn.Embedding(sparse=False))"
                )
            kept_params.append(p)
            kept_grads.append(g.contiguous())  # read only by the kernel
        return kept_params, kept_grads

    @staticmethod
    def _check_contiguous(owner: str, params: list[Tensor]) -> None:
        for p in params:
            if not p.is_contiguous():
                raise RuntimeError(
                    f"{owner}: parameter of shape {tuple(p.shape)} and strides {p.stride()} is not "
                    "contiguous; the fused kernels need contiguous parameters (replace it with "
                    "p.data = p.data.contiguous() before building the optimizer)"
                )

    def _fix_step(self, state: dict[str, Any], p: Tensor) -> Tensor:
        """Steps live on the parameter's device as float32 scalars (a CPU step from torch.optim
        or an int from an old checkpoint is converted once)."""
        step = state["step"]
        if not isinstance(step, Tensor):
            step = state["step"] = torch.tensor(float(step), dtype=torch.float32, device=p.device)
        elif step.device != p.device or step.dtype != torch.float32 or step.dim() != 0:
            step = state["step"] = step.detach().reshape(()).to(
                device=p.device, dtype=torch.float32
            ).clone()
        return step

    # ----------------------------------------------------------------------------- state tensors
    @staticmethod
    def _uses_master(p: Tensor, group: dict[str, Any]) -> bool:
        """fp32 master weights for p: on for bf16/fp16 parameters unless master_weights=False."""
        return p.dtype in _LOW_PRECISION and group.get("master_weights") is not False

    def _state_device(self, p: Tensor) -> torch.device:
        """Where p's optimizer state is created (the HiFT optimizers put it in the host store
        when offloading)."""
        return p.device

    def _new_state(self, p: Tensor, group: dict[str, Any], fill: float = 0.0) -> Tensor:
        """A state tensor for p: its shape, fp32 with master weights (else p's dtype)."""
        dtype = torch.float32 if self._uses_master(p, group) else p.dtype
        return torch.full(self._state_shape(p), fill, dtype=dtype, device=self._state_device(p))

    def _state_shape(self, p: Tensor) -> tuple[int, ...]:
        """The shape of p's state tensors (the HiFT optimizers with sharded state: this rank's
        element range of p, 1-D)."""
        return tuple(p.shape)

    def _state_slice(self, p: Tensor, v: Tensor) -> Tensor:
        """This optimizer's part of a full-shape state tensor of p (all of it unless sharded)."""
        return v

    def _new_master(self, p: Tensor) -> Tensor:
        """The fp32 master copy of p (of this optimizer's part of p)."""
        return self._state_slice(p, p.detach()).to(device=self._state_device(p), dtype=torch.float32, copy=True)

    def _state_sizes(self, p: Tensor, group: dict[str, Any]) -> list[int]:
        """Element sizes of the tensors p's state will hold (sorted by key, as offloading lays them
        out), before it exists: for sizing the offload engine."""
        master = self._uses_master(p, group)
        keys = sorted(self._state_keys(group) + ((MASTER_KEY,) if master else ()))
        return [4 if master else p.element_size() for _ in keys]

    def _prepare_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        """p's state, created on its first update as the torch.optim counterpart would (plus the
        fp32 master copy of a bf16/fp16 parameter)."""
        state = self.state[p]
        if len(state) == 0:
            self._init_state(p, group)
        if self._uses_master(p, group) and MASTER_KEY not in state:
            state[MASTER_KEY] = self._new_master(p)
        return state

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        """The per-parameter state tensors _apply receives, as lists, in this order."""
        return ()

    def _build_plan(self, group: dict[str, Any], params: list[Tensor], keys: tuple[str, ...]) -> _GroupPlan:
        self._check_contiguous(type(self).__name__, params)
        by_call: dict[tuple[torch.device, bool], list[int]] = {}
        for i, p in enumerate(params):
            by_call.setdefault((p.device, self._uses_master(p, group)), []).append(i)
        shares = []
        for (_, master), index in by_call.items():
            ps = [params[i] for i in index]
            share_keys = keys + ((MASTER_KEY,) if master else ())
            # (an optimizer without per-parameter tensors, e.g. SGD, leaves self.state alone, as torch)
            dicts = [self._prepare_state(p, group) for p in ps] if share_keys or self._uses_steps else []
            steps = counters = None
            if self._uses_steps:
                # One flat float32 tensor whose elements ARE these parameters' step tensors (each
                # state["step"] becomes a 0-dim view of it), so a step bumps every counter with ONE
                # add_: torch._foreach_add_ on 2,000 scalars costs ~4 ms on CPU, more than the
                # update. The values are unchanged.
                counters = torch.stack([self._fix_step(d, p).detach() for d, p in zip(dicts, ps)])
                steps = [counters[i] for i in range(len(ps))]
                for d, st in zip(dicts, steps):
                    d["step"] = st
            shares.append(_DeviceShare(None if len(by_call) == 1 else index, ps, dicts, steps, counters,
                                       share_keys, master))
        return _GroupPlan(group, params, self.state, len(self.state), keys, shares)

    def _plan(self, group: dict[str, Any], params: list[Tensor]) -> _GroupPlan:
        """The cached plan of this group's update, rebuilt when anything it depends on changed:
        the parameters being updated, the state mapping (load_state_dict replaces it; deleting
        or adding entries changes its length), the state keys (amsgrad toggled) or a step tensor
        replaced or gone (a cleared per-parameter dict restarts that parameter, as in torch). The
        state tensors themselves are read from the state dicts at every step, so swapping them
        (offload, user code) needs no rebuild."""
        plans = self.__dict__.setdefault("_plans", {})
        keys = self._state_keys(group)
        plan = plans.get(id(group))
        if (
            plan is None
            or plan.group is not group
            or plan.state is not self.state
            or plan.n_state != len(self.state)
            or plan.keys != keys
            or len(plan.params) != len(params)
            or not all(map(operator.is_, plan.params, params))
            or (
                self._uses_steps
                and not all(
                    all(map(operator.is_, [d.get("step") for d in s.dicts], s.steps)) for s in plan.shares
                )
            )
            or (
                not self._uses_steps  # a deleted or None momentum buffer restarts, as in torch
                and not all(d.get(s.keys[0]) is not None for s in plan.shares if s.keys for d in s.dicts)
            )
        ):
            if _stream_capturing():
                raise RuntimeError(
                    f"{type(self).__name__}.step() is being captured before its state exists (or after "
                    "the parameters with gradients or the state changed); take the same step once "
                    "outside the graph first (the usual warm-up on a side stream), then capture"
                )
            plan = plans[id(group)] = self._build_plan(group, params, keys)
        return plan

    def _check_not_capturing(self) -> None:
        if _stream_capturing():
            raise RuntimeError(
                f"{type(self).__name__}.step() was called during CUDA graph capture without "
                "capturable=True; build FusedAdamW(..., capturable=True) (with a tensor lr on the GPU "
                "if a scheduler changes it), or step outside the captured region"
            )

    @staticmethod
    def _on(t: Tensor | None, device: torch.device, cache: dict) -> Tensor | None:
        if t is None:
            return None
        if device not in cache:
            cache[device] = t.to(device=device, dtype=torch.float32, non_blocking=True).reshape(())
        return cache[device]

    def _update_group(self, group, grad_scale: Tensor | None, found_inf: Tensor | None) -> int:
        """Update every parameter of ``group`` that has a gradient: one op call per share (device,
        master weights or not). Returns the number of parameters updated."""
        params, grads = self._collect(group)
        if not params:
            return 0
        self._check_hypers(group, at_step=True)  # a scheduler or user code may have set lr to inf/NaN
        if params[0].is_cuda and not group.get("capturable"):
            self._check_not_capturing()
        plan = self._plan(group, params)
        for share in plan.shares:
            if share.counters is not None:
                share.counters.add_(1)  # the kernels read the step number of this update
        try:
            self._run_plan(group, plan, grads, grad_scale, found_inf)
        except BaseException:
            # The kernels validate every input before writing: a refused call changed nothing,
            # so neither may the step counts.
            for share in plan.shares:
                if share.counters is not None:
                    share.counters.sub_(1)
            raise
        if found_inf is not None:
            for share in plan.shares:
                if share.counters is not None:  # an overflow leaves the step counts unchanged too
                    share.counters.sub_(self._on(found_inf, share.params[0].device, {}))
        self._after_update(params, found_inf)
        return len(params)

    def _run_plan(self, group, plan: _GroupPlan, grads: list[Tensor], grad_scale, found_inf) -> None:
        """One kernel call per share, on the state tensors in self.state."""
        for share in plan.shares:
            gs = grads if share.index is None else [grads[i] for i in share.index]
            states = [[d[k] for d in share.dicts] for k in share.keys]
            self._call_kernel(group, share, share.params, gs, states, None, grad_scale, found_inf)

    def _call_kernel(self, group, share: _DeviceShare, params, grads, states, idx, grad_scale, found_inf) -> None:
        """The kernel call of a share (or of pieces of its parameters: ``idx`` are their positions
        in the share, None for all of them)."""
        device = params[0].device
        masters = states[-1] if share.master else None
        if share.master:
            states = states[:-1]
        steps = share.steps
        if steps is not None and idx is not None:
            steps = [steps[i] for i in idx]
        first = self._first_flags(share.params if idx is None else [share.params[i] for i in idx])
        self._apply(group, params, grads, states, steps, self._on(grad_scale, device, {}),
                    self._on(found_inf, device, {}), masters=masters, first=first)

    def _first_flags(self, params: list[Tensor]) -> list[bool] | None:
        return None  # SGD: whether each parameter's momentum buffer starts now

    def _after_update(self, params: list[Tensor], found_inf: Tensor | None) -> None:
        pass

    def _amp_tensors(self, grad_scale, found_inf):
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and not isinstance(found_inf, Tensor):
            found_inf = torch.tensor(float(found_inf), dtype=torch.float32)
        if grad_scale is not None and not isinstance(grad_scale, Tensor):
            grad_scale = torch.tensor(float(grad_scale), dtype=torch.float32)
        return grad_scale, found_inf

    # ----------------------------------------------------------------------------- public API
    def step(self, closure: Callable[[], Any] | None = None, *, grad_scale=None, found_inf=None):
        """Perform one optimization step.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.
            grad_scale, found_inf: optional float32 scalar tensors (as torch.amp.GradScaler sets on
                the optimizer as attributes): gradients are divided by ``grad_scale`` inside the
                kernel, and a nonzero ``found_inf`` makes the whole step a no-op (step counts too).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale, found_inf = self._amp_tensors(grad_scale, found_inf)
        with torch.no_grad():
            for group in self.param_groups:
                self._update_group(group, grad_scale, found_inf)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_loaded_state(state_dict)  # refuse before changing anything
        # torch would cast every state tensor to its parameter's dtype and device: fp32 state of a
        # bf16 parameter with master weights would lose its precision, and offloaded state would
        # land on the GPU. So torch loads the rest and the tensors are placed here.
        tensors: dict[Any, dict[str, Tensor]] = {}
        rest: dict[Any, dict[str, Any]] = {}
        for pid, st in state_dict["state"].items():
            rest[pid] = {k: v for k, v in st.items() if k == "step" or not isinstance(v, Tensor)}
            tensors[pid] = {k: v for k, v in st.items() if k != "step" and isinstance(v, Tensor)}
        super().load_state_dict({**state_dict, "state": rest})
        self._place_loaded_state(state_dict, tensors)
        self._post_load()

    def _place_loaded_state(self, state_dict: dict[str, Any], tensors: dict[Any, dict[str, Tensor]]) -> None:
        """Loaded state tensors go to the state device as fp32 (parameters with master weights;
        missing masters are made from the parameters, as after an fp32 or torch.optim run) or in
        the parameter's dtype (torch's rule)."""
        for saved, group in zip(state_dict["param_groups"], self.param_groups):
            for pid, p in zip(saved["params"], group["params"]):
                st = tensors.get(pid)
                if st is None:
                    continue
                master = self._uses_master(p, group)
                dev = self._state_device(p)
                state = self.state[p]
                for k, v in st.items():
                    if k == MASTER_KEY and not master:
                        continue  # an fp32 parameter is its own master
                    dtype = torch.float32 if master else p.dtype
                    state[k] = self._state_slice(p, v.detach()).to(device=dev, dtype=dtype, copy=True)
                if master and MASTER_KEY not in state:
                    state[MASTER_KEY] = self._new_master(p)

    def _check_loaded_state(self, state_dict: dict[str, Any]) -> None:
        """Every state tensor must fit its parameter (a wrong shape would otherwise surface only at
        step(), inside the kernel), every step count must be a finite number >= 0."""
        name = type(self).__name__
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict) \
                or not isinstance(state_dict.get("param_groups"), list):
            raise ValueError(
                f"{name}.load_state_dict: expected a dict with 'state' and 'param_groups' (as saved by "
                "optimizer.state_dict()), got a corrupt or foreign object"
            )
        params: dict[Any, tuple[int, Tensor]] = {}
        for gi, (saved, group) in enumerate(zip(state_dict["param_groups"], self.param_groups)):
            ids = saved.get("params", []) if isinstance(saved, dict) else []
            for pid, p in zip(ids, group["params"]):
                params[pid] = (gi, p)
        for pid, st in state_dict["state"].items():
            if pid not in params:
                continue  # torch ignores state of unknown ids; the group-size check reports mismatches
            gi, p = params[pid]
            where = f"parameter {pid} (param group {gi}, shape {tuple(p.shape)})"
            if not isinstance(st, dict):
                raise ValueError(f"{name}.load_state_dict: the state of {where} is not a dict")
            for key, v in st.items():
                if key == "step":
                    try:
                        f = _scalar(v)
                    except (TypeError, ValueError):
                        f = float("nan")
                    if not (math.isfinite(f) and f >= 0):
                        raise ValueError(
                            f"{name}.load_state_dict: 'step' of {where} is {v!r}; a step count must be a "
                            "finite number >= 0 (the state_dict is corrupt)"
                        )
                elif isinstance(v, Tensor):
                    if not v.is_floating_point():
                        raise ValueError(
                            f"{name}.load_state_dict: state '{key}' of {where} has dtype {v.dtype}; "
                            "optimizer state must be floating point (the state_dict is corrupt)"
                        )
                    if v.shape != p.shape:
                        raise ValueError(
                            f"{name}.load_state_dict: state '{key}' of {where} has shape "
                            f"{tuple(v.shape)}; it must match its parameter. The state_dict was saved "
                            "for another model (or is corrupt): load it into an optimizer built on the "
                            "same model"
                        )

    def _post_load(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and "step" in state:
                    self._fix_step(state, p)

    def memory_report(self) -> dict[str, Any]:
        """Bytes of optimizer state per device (and of gradients currently held)."""
        state_bytes: dict[str, int] = defaultdict(int)
        grad_bytes: dict[str, int] = defaultdict(int)
        seen: set[int] = set()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    grad_bytes[str(p.grad.device)] += p.grad.numel() * p.grad.element_size()
                for v in self.state.get(p, {}).values():
                    if isinstance(v, Tensor) and id(v) not in seen:
                        seen.add(id(v))
                        state_bytes[str(v.device)] += v.numel() * v.element_size()
        return {
            "state_bytes": dict(state_bytes),
            "total_state_bytes": sum(state_bytes.values()),
            "grad_bytes": dict(grad_bytes),
            "total_grad_bytes": sum(grad_bytes.values()),
            "pinned_bytes": 0,
            "host_store_bytes": 0,
        }


# =============================================================================================
# AdamW
# =============================================================================================
class FusedAdamW(_FusedOptimizer):
    """torch.optim.AdamW with the fused hift_ext kernel (same arguments, defaults and state).

    ``foreach`` and ``fused`` are accepted for compatibility and stored in the param groups like
    torch does; the update is always the fused hift_ext kernel.

    ``capturable=True``: ``step()`` makes no host sync and uploads nothing, so it can be captured
    in a CUDA graph (``torch.cuda.graph``) and replayed: step counts, ``grad_scale`` and
    ``found_inf`` already live on the device, and a tensor ``lr`` on the parameters' device is read
    by the kernel when it runs (write a new lr with ``lr.fill_(...)``; a float lr is baked into the
    graph, as in torch). Take one step before capturing so that the state exists. A tensor lr is
    read by the kernel without capturable too (no ``.item()`` per step).
    """

    _supports_capturable = True

    _hyper_keys = ("lr", "betas", "eps", "weight_decay")

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        master_weights: bool | None = None,
    ) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        betas = (_scalar(betas[0]), _scalar(betas[1]))
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
            "decoupled_weight_decay": True,
        }
        if master_weights is not None:  # absent by default: param_groups stay exactly torch's
            defaults["master_weights"] = master_weights
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)
            group.setdefault("master_weights", None)
            group["decoupled_weight_decay"] = True

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        state["exp_avg"] = self._new_state(p, group)
        state["exp_avg_sq"] = self._new_state(p, group)
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = self._new_state(p, group)

    def _prepare_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = super()._prepare_state(p, group)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:  # amsgrad switched on after a load
            state["max_exp_avg_sq"] = self._new_state(p, group)
        return state

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        if group["amsgrad"]:
            return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
        return ("exp_avg", "exp_avg_sq")

    def _apply(self, group, params, grads, states, steps, grad_scale, found_inf, masters=None, first=None) -> None:
        amsgrad = bool(group["amsgrad"])
        exp_avgs, exp_avg_sqs = states[0], states[1]
        max_sqs = states[2] if amsgrad else []
        beta1, beta2 = group["betas"]
        _ops().fused_adamw_(
            params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps,
            lr=group["lr"], beta1=_scalar(beta1), beta2=_scalar(beta2),  # a tensor lr: read by the kernel
            weight_decay=_scalar(group["weight_decay"]), eps=_scalar(group["eps"]),
            amsgrad=amsgrad, maximize=bool(group["maximize"]),
            grad_scale=grad_scale, found_inf=found_inf, **_masters_kw(masters),
        )


# =============================================================================================
# AdaGrad
# =============================================================================================
class FusedAdaGrad(_FusedOptimizer):
    """torch.optim.Adagrad with the fused hift_ext kernel (same arguments, defaults and state;
    state is created in __init__ like torch does)."""

    _eager_state = True
    _hyper_keys = ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps")

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        master_weights: bool | None = None,
    ) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= lr_decay:
            raise ValueError(f"Invalid lr_decay value: {lr_decay}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= initial_accumulator_value:
            raise ValueError(f"Invalid initial_accumulator_value value: {initial_accumulator_value}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        defaults = {
            "lr": lr,
            "lr_decay": lr_decay,
            "eps": eps,
            "weight_decay": weight_decay,
            "initial_accumulator_value": initial_accumulator_value,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
            "fused": fused,
        }
        if master_weights is not None:  # absent by default: param_groups stay exactly torch's
            defaults["master_weights"] = master_weights
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("foreach", None)
            group.setdefault("maximize", False)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)
            group.setdefault("master_weights", None)

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        state["sum"] = self._new_state(p, group, _scalar(group["initial_accumulator_value"]))

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("sum",)

    def _apply(self, group, params, grads, states, steps, grad_scale, found_inf, masters=None, first=None) -> None:
        _ops().fused_adagrad_(
            params, grads, states[0], steps,
            lr=_scalar(group["lr"]), lr_decay=_scalar(group["lr_decay"]),
            weight_decay=_scalar(group["weight_decay"]), eps=_scalar(group["eps"]),
            maximize=bool(group["maximize"]),
            grad_scale=grad_scale, found_inf=found_inf, **_masters_kw(masters),
        )


# =============================================================================================
# SGD
# =============================================================================================
class FusedSGD(_FusedOptimizer):
    """torch.optim.SGD with the fused hift_ext kernel (same arguments, defaults and state:
    ``momentum_buffer`` per parameter when momentum != 0, created on its first step)."""

    _uses_steps = False
    _hyper_keys = ("lr", "momentum", "dampening", "weight_decay")

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        master_weights: bool | None = None,
    ) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "differentiable": differentiable,
            "fused": fused,
        }
        if master_weights is not None:  # absent by default: param_groups stay exactly torch's
            defaults["master_weights"] = master_weights
        self._fresh: set[Tensor] = set()  # parameters whose momentum buffer starts at their next update
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("differentiable", False)
            group.setdefault("fused", False)
            group.setdefault("master_weights", None)
        self.__dict__.setdefault("_fresh", set())

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("momentum_buffer",) if _scalar(group["momentum"]) != 0 else ()

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> None:
        pass  # the momentum buffer is created for the first update (_prepare_state)

    def _prepare_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = super()._prepare_state(p, group)
        if _scalar(group["momentum"]) != 0 and state.get("momentum_buffer") is None:
            # torch clones d_p into a new buffer at the first update: the kernel's first-step
            # mode writes the buffer without reading it, so its contents do not matter.
            state["momentum_buffer"] = self._new_state(p, group)
            self._fresh.add(p)
        return state

    def _first_flags(self, params: list[Tensor]) -> list[bool] | None:
        if not self._fresh:
            return None
        return [p in self._fresh for p in params]

    def _after_update(self, params: list[Tensor], found_inf: Tensor | None) -> None:
        if not self._fresh:
            return
        fresh = [p for p in params if p in self._fresh]
        if not fresh:
            return
        if found_inf is not None and bool(found_inf.item()):
            # An overflowing first step creates no buffers (the next step is then a first step);
            # this costs one host sync, on a parameter's first step only.
            for p in fresh:
                self.state[p].pop("momentum_buffer", None)
                if not self.state[p]:
                    del self.state[p]
            return
        self._fresh.difference_update(fresh)

    def _place_loaded_state(self, state_dict, tensors) -> None:
        self._fresh.clear()
        super()._place_loaded_state(state_dict, tensors)

    def _apply(self, group, params, grads, states, steps, grad_scale, found_inf, masters=None, first=None) -> None:
        momentum = _scalar(group["momentum"])
        kw = dict(
            lr=_scalar(group["lr"]), momentum=momentum, dampening=_scalar(group["dampening"]),
            nesterov=bool(group["nesterov"]), weight_decay=_scalar(group["weight_decay"]),
            maximize=bool(group["maximize"]), grad_scale=grad_scale, found_inf=found_inf,
        )
        bufs = states[0] if momentum != 0 else []
        if momentum == 0 or first is None or not any(first) or all(first):
            _ops().fused_sgd_(params, grads, bufs, is_first_step=bool(first and momentum != 0 and all(first)),
                              **kw, **_masters_kw(masters))
            return
        # Parameters with a buffer continue; those without start one (buf = d_p).
        for flag in (False, True):
            sel = [i for i, f in enumerate(first) if f == flag]
            _ops().fused_sgd_([params[i] for i in sel], [grads[i] for i in sel], [bufs[i] for i in sel],
                              is_first_step=flag, **kw,
                              **_masters_kw(None if masters is None else [masters[i] for i in sel]))


# =============================================================================================
# HiFT
# =============================================================================================
# A parameter frozen by a HiFT optimizer (because its group is inactive) carries this attribute.
# A HiFT optimizer built later on the same model must still see it as trainable (grouping only
# takes parameters that require grad), so it is unfrozen again before grouping; parameters the
# user froze are left alone.
_FROZEN_BY_HIFT = "_hift_frozen"
# ... and, when the optimizer was given the model, its name is in this set in the __dict__ of each
# module that owns it: copy.deepcopy(model) drops a Parameter's attributes but copies a module's
# __dict__, so a HiFT optimizer built on a copy still tells HiFT's freezing from the user's.
_FROZEN_NAMES = "_hift_frozen_names"


class _FreezeMarks:
    """Records which parameters a HiFT optimizer froze (see _FROZEN_BY_HIFT and _FROZEN_NAMES)."""

    def __init__(self, model: nn.Module | None = None) -> None:
        # id(parameter) -> the (module, name) pairs that hold it (two for a tied weight); weak, so
        # the optimizer does not keep a dropped model's buffers alive
        self._owners: dict[int, list[tuple[weakref.ref, str]]] = defaultdict(list)
        if model is not None:
            for mod in model.modules():
                for name, p in mod._parameters.items():
                    if p is not None:
                        self._owners[id(p)].append((weakref.ref(mod), name))

    def set(self, p: Tensor, frozen: bool) -> None:
        setattr(p, _FROZEN_BY_HIFT, frozen)
        for ref, name in self._owners.get(id(p), ()):
            mod = ref()
            if mod is not None:
                names = mod.__dict__.setdefault(_FROZEN_NAMES, set())
                (names.add if frozen else names.discard)(name)

    @staticmethod
    def frozen_in(model: nn.Module) -> list[Tensor]:
        """The model's parameters that are frozen and were frozen by a HiFT optimizer."""
        found: dict[int, Tensor] = {}
        for mod in model.modules():
            names = mod.__dict__.get(_FROZEN_NAMES, ())
            for name, p in mod._parameters.items():
                if p is None or p.requires_grad:
                    continue
                mark = getattr(p, _FROZEN_BY_HIFT, None)  # the parameter's own mark, where it kept one
                if mark if mark is not None else name in names:
                    found[id(p)] = p
        return list(found.values())

    def __deepcopy__(self, memo) -> "_FreezeMarks":
        # a copied optimizer's parameters are copies: it marks them, not the original's modules
        return _FreezeMarks()


def _check_data_parallel_args(name: str, shard_state, bucket_cap_mb, accumulation_steps, comm_timeout) -> None:
    """The data-parallel arguments are checked with or without torch.distributed, so a script that
    is wrong on many ranks is already refused on one."""
    if not isinstance(shard_state, bool):
        raise TypeError(f"{name}: shard_state must be True or False, got {shard_state!r}")
    if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float)) \
            or not math.isfinite(bucket_cap_mb) or bucket_cap_mb <= 0:
        raise ValueError(f"{name}: bucket_cap_mb must be a positive number of megabytes (default 25), "
                         f"got {bucket_cap_mb!r}")
    if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
        raise ValueError(f"{name}: accumulation_steps must be an int >= 1 (backward passes per optimizer step; "
                         f"gradients are synchronized at the last one), got {accumulation_steps!r}")
    if comm_timeout is not None and (isinstance(comm_timeout, bool) or not isinstance(comm_timeout, (int, float))
                                     or not math.isfinite(comm_timeout) or comm_timeout <= 0):
        raise ValueError(f"{name}: comm_timeout must be a positive number of seconds or None (the process "
                         f"group's timeout), got {comm_timeout!r}")


class _HiFTMixin:
    """HiFT on top of a fused drop-in optimizer (see the module docstring and docs/semantics.md)."""

    _eager_state = False  # a group's state is created the first time the group is active
    _supports_capturable = False
    _capturable_why = ("a HiFT step chooses its layer group on the host at every step, which a captured "
                       "graph would freeze; capture FusedAdamW(..., capturable=True) instead")

    def __init__(
        self,
        model_or_groups,
        *,
        group_size: int | Sequence[int] = 1,
        strategy: str = "down2up",
        seed: int = 0,
        steps_per_group: int = 1,
        offload: bool | None = None,
        offload_slots: int = 2,
        offload_prefetch: bool = True,
        offload_device_bytes: int | None = None,
        process_group=None,
        shard_state: bool = False,
        bucket_cap_mb: float = 25.0,
        accumulation_steps: int = 1,
        comm_timeout: float | None = None,
        **base_kwargs,
    ) -> None:
        name = type(self).__name__
        schedule_probe = GroupSchedule(1, strategy, seed)  # validates strategy and seed first
        del schedule_probe
        check_steps_per_group(steps_per_group, f"{name}: steps_per_group")
        _check_data_parallel_args(name, shard_state, bucket_cap_mb, accumulation_steps, comm_timeout)
        from hift_ext.grouping import normalize_group_size

        group_size = normalize_group_size(group_size, f"{name}: group_size")
        self._marks = _FreezeMarks(model_or_groups if isinstance(model_or_groups, nn.Module) else None)
        groups = self._resolve_groups(model_or_groups, group_size)
        self._hift_init = True
        self._groups = groups
        self._group_size = group_size if isinstance(model_or_groups, nn.Module) else None
        self._offload = None
        self._dp = None
        self._schedule = GroupSchedule(len(groups), strategy, seed, steps_per_group)
        param_groups = [{"params": list(g.params), "hift_group": i} for i, g in enumerate(groups)]
        super().__init__(param_groups, **base_kwargs)
        self._hift_init = False
        from hift_ext.distributed import resolve_process_group

        pg = resolve_process_group(process_group, name)
        if pg is not None:  # data parallel: before offload, which sizes the (sharded) state
            self._setup_data_parallel(pg, bool(shard_state), float(bucket_cap_mb), int(accumulation_steps),
                                      comm_timeout)
        if offload is None:  # default: offload when the parameters live on a GPU
            offload = all(p.is_cuda for grp in self.param_groups for p in grp["params"])
        if offload:
            self._setup_offload(int(offload_slots), bool(offload_prefetch), offload_device_bytes)
        elif offload_device_bytes is not None:
            raise ValueError(f"{name}: offload_device_bytes applies only with offload=True")
        self._activate(self._schedule.current)

    # ----------------------------------------------------------------------------- grouping
    def _resolve_groups(self, model_or_groups, group_size):
        from hift_ext import grouping

        name = type(self).__name__
        if isinstance(model_or_groups, nn.Module):
            # parameters frozen by an earlier HiFT optimizer (not by the user) are trainable
            thawed = _FreezeMarks.frozen_in(model_or_groups)
            for p in thawed:
                p.requires_grad_(True)
            try:
                if not any(p.requires_grad for p in model_or_groups.parameters()):
                    raise ValueError(
                        f"{name}: the model has no trainable parameters (every parameter has "
                        "requires_grad=False); unfreeze the parameters to fine-tune"
                    )
                groups = grouping.group_model(model_or_groups, group_size)
            except BaseException:
                for p in thawed:  # a refused construction changes nothing
                    p.requires_grad_(False)
                raise
            for p in thawed:
                self._marks.set(p, False)
        else:
            if group_size != 1:
                raise ValueError(
                    f"{name}: group_size={group_size} applies only when a model is passed; explicit "
                    "groups are used as given (merge the lists yourself)"
                )
            lists = model_or_groups
            if not isinstance(lists, (Tensor, list, tuple)) and isinstance(lists, Iterable):
                lists = list(lists)  # e.g. a generator of groups
            if isinstance(lists, (list, tuple)) and lists and all(isinstance(g, Tensor) for g in lists):
                raise TypeError(
                    f"{name}: expected a model or a list of groups (each a list of parameters, "
                    "bottom to top), got a flat list of tensors; wrap it as [[p, ...], [p, ...]] "
                    "or use the drop-in optimizer for a single group"
                )
            groups = grouping.groups_from_params(lists)
        if not groups:
            raise ValueError(f"{name}: no trainable parameters to fine-tune")
        seen: dict[int, int] = {}
        for gi, g in enumerate(groups):
            if not g.params:
                raise ValueError(f"{name}: group {gi} has no parameters")
            for p in g.params:
                _check_param(p, name)
                if id(p) in seen:
                    raise ValueError(
                        f"{name}: a parameter of shape {tuple(p.shape)} is in groups {seen[id(p)]} "
                        f"and {gi}; every parameter must belong to exactly one group"
                    )
                seen[id(p)] = gi
        return groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not getattr(self, "_hift_init", False):
            raise RuntimeError(
                f"{type(self).__name__}: HiFT groups are fixed at construction; build a new "
                "optimizer to change them"
            )
        super().add_param_group(param_group)

    # ----------------------------------------------------------------------------- properties
    @property
    def num_groups(self) -> int:
        return self._schedule.num_groups

    @property
    def active_group(self) -> int:
        """Index (bottom to top) of the group the next step() updates."""
        return self._schedule.current

    @property
    def order(self) -> list[int]:
        """Group order of the current cycle."""
        return self._schedule.order

    @property
    def steps_per_group(self) -> int:
        """``K``: consecutive successful steps on a group before switching to the next."""
        return self._schedule.steps_per_group

    @property
    def hift_position(self) -> int:
        """Number of successful HiFT steps so far (skipped AMP steps do not count)."""
        return self._schedule.position

    @property
    def schedule(self) -> GroupSchedule:
        return self._schedule

    @property
    def groups(self):
        """The HiFT groups (hift_ext.grouping.Group), bottom to top."""
        return self._groups

    @property
    def group_size(self) -> int | tuple[int, ...] | None:
        """Layer units per group when built from a model (a tuple for an unequal split, bottom to
        top); None for explicit groups."""
        return self._group_size

    # ----------------------------------------------------------------------------- residency
    # With offload=False every group's state stays in self.state on its parameters' device. With
    # offload (hift_ext.offload.GroupStateOffload) it lives in the engine's host store: self.state
    # holds host views of it between steps (the scalar "step" stays with the parameters), a new
    # group's state is created on the host, and the update streams the active group through the
    # device arena.
    @property
    def offload_engine(self):
        """The OffloadEngine holding the inactive groups' state (None without offload)."""
        return None if self._offload is None else self._offload.engine

    def _setup_offload(self, num_slots: int, prefetch: bool, device_bytes: int | None) -> None:
        from hift_ext.offload import GroupStateOffload

        name = type(self).__name__
        devices = {p.device for grp in self.param_groups for p in grp["params"]}
        if len(devices) != 1:
            raise ValueError(
                f"{name}: offload=True needs every parameter on one device, got "
                f"{sorted(str(d) for d in devices)}; move the model to one device or pass offload=False"
            )
        sizes = [[(self._state_numel(p), self._state_sizes(p, grp)) for p in grp["params"]]
                 for grp in self.param_groups]
        try:
            self._offload = GroupStateOffload(next(iter(devices)), num_slots=num_slots, prefetch=prefetch,
                                              device_bytes=device_bytes, group_sizes=sizes)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{name}: {exc}") from None

    def _state_device(self, p: Tensor) -> torch.device:
        return torch.device("cpu") if getattr(self, "_offload", None) is not None else p.device

    def _run_plan(self, group, plan, grads, grad_scale, found_inf) -> None:
        if self._sharded:
            return self._run_plan_sharded(group, plan, grads, grad_scale, found_inf)
        off = self._offload
        if off is None:
            return super()._run_plan(group, plan, grads, grad_scale, found_inf)
        g = group["hift_group"]
        params = group["params"]
        where = {id(p): i for i, p in enumerate(params)}
        off.register(g, params, self.state)
        calls = []
        for share in plan.shares:
            gs = grads if share.index is None else [grads[i] for i in share.index]
            calls.append((share, [where[id(p)] for p in share.params], gs, share.keys))

        def apply(share, ps, gs, states, idx):
            self._call_kernel(group, share, ps, gs, states, idx, grad_scale, found_inf)

        # With several steps per group, a group whose next step updates it again keeps its state on
        # the device (one fetch per block, one write-back after its last step). K = 1 writes back
        # after every step, as plain HiFT always did.
        sched = self._schedule
        keep = sched.steps_per_group > 1 and sched.next == g
        try:
            off.update(g, params, calls, apply, keep_resident=keep)
        except RuntimeError as exc:
            raise self._offload_error(g, exc) from exc

    def _offload_error(self, g: int, exc: BaseException) -> BaseException:
        if "hift_ext offload" not in str(exc):
            return exc
        return RuntimeError(f"{type(self).__name__}: HiFT group {g}: {exc}")

    def _sync_state(self, flush: bool = True) -> None:
        """Make self.state hold every group's true state (before state_dict / load_state_dict).
        ``flush=False``: only wait for the copies in flight (a group kept on the device for its
        block is not written back; enough for byte counts)."""
        if self._offload is not None:
            try:
                self._offload.synchronize(flush=flush)  # the host views in self.state are now current
            except RuntimeError as exc:
                raise RuntimeError(f"{type(self).__name__}: {exc}") from exc

    def _after_load(self) -> None:
        """self.state was replaced by load_state_dict: the engine takes the loaded tensors."""
        if self._offload is None:
            return
        if self._sharded:  # the engine holds this rank's elements only: hand it the views of those
            groups, smap = [], {}
            for g in range(self.num_groups):
                views, m = self._shard_views(g)
                groups.append({"params": views})
                smap.update(m)
            self._offload.after_load(groups, smap)
            return
        self._offload.after_load(self.param_groups, self.state)

    def _refuse_copy(self, what: str) -> None:
        if self.__dict__.get("_dp") is not None:
            raise TypeError(
                f"{type(self).__name__} synchronizing {self._dp.world_size} ranks cannot be {what} (it holds "
                "hooks on the model and a process group); save optimizer.state_dict() and load it into a new "
                "optimizer instead"
            )

    def __getstate__(self) -> dict[str, Any]:
        self._refuse_copy("pickled")
        if self.__dict__.get("_offload") is not None:
            raise TypeError(
                f"{type(self).__name__} with offload cannot be pickled (its engine owns threads, streams and "
                "device memory); save optimizer.state_dict() and load it into a new optimizer instead"
            )
        state = super().__getstate__()
        for key in ("_schedule", "_groups", "_group_size", "_offload", "_hift_init"):
            state[key] = self.__dict__[key]
        state["_dp"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_dp", None)
        self.__dict__.setdefault("_marks", _FreezeMarks())  # an unpickled optimizer holds copies, no model

    def __deepcopy__(self, memo):
        import copy

        self._refuse_copy("deep-copied")
        self._sync_state()
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            if k in ("_offload", "_plans"):
                continue
            new.__dict__[k] = copy.deepcopy(v, memo)
        new.__dict__["_offload"] = None
        if self._offload is not None:  # a new engine holding the copied state
            new.__dict__["_offload"] = self._offload.clone(new.param_groups, new.state)
        return new

    # ----------------------------------------------------------------------------- data parallel
    # With torch.distributed initialized (hift_ext.distributed.DataParallel): the optimizer averages the
    # active group's gradients over the ranks itself (hooks, buckets), and with shard_state=True each rank
    # keeps the state and masters of its 1/N of every bucket only (ZeRO-style per HiFT group).
    def _setup_data_parallel(self, pg, shard_state: bool, bucket_cap_mb: float, accumulation_steps: int,
                             comm_timeout: float | None) -> None:
        from hift_ext.distributed import DataParallel, fingerprint

        name = type(self).__name__
        sched = self._schedule
        dp = DataParallel(name, [grp["params"] for grp in self.param_groups], lambda: sched.current,
                          process_group=pg, shard_state=shard_state, bucket_cap_mb=bucket_cap_mb,
                          accumulation_steps=accumulation_steps, comm_timeout=comm_timeout)
        try:
            dp.check_agreement({
                "optimizer": name, "num_groups": self.num_groups, "group_size": self._group_size,
                "strategy": sched.strategy, "seed": sched.seed, "steps_per_group": sched.steps_per_group,
                "parameter_shapes": fingerprint(self._fingerprint()),
                "parameter_dtypes": fingerprint([[str(p.dtype) for p in g["params"]] for g in self.param_groups]),
                "shard_state": shard_state, "accumulation_steps": accumulation_steps, "bucket_cap_mb": bucket_cap_mb,
                "hyperparameters": {k: str(v) for k, v in sorted(self.defaults.items())},
            })
            dp.broadcast_params()  # every rank starts from rank 0's weights, as with DDP
        except BaseException:
            dp.remove_hooks()
            raise
        self._dp = dp

    @property
    def _sharded(self) -> bool:
        dp = self.__dict__.get("_dp")
        return dp is not None and dp.shard

    @property
    def world_size(self) -> int:
        """Ranks the optimizer synchronizes over (1 without torch.distributed)."""
        return 1 if self._dp is None else self._dp.world_size

    @property
    def rank(self) -> int:
        """This process's rank in the optimizer's process group (0 without torch.distributed)."""
        return 0 if self._dp is None else self._dp.rank

    @property
    def shard_state(self) -> bool:
        """Whether each rank keeps only its 1/N of the optimizer state (shard_state=True on N > 1 ranks)."""
        return self._sharded

    @property
    def data_parallel(self):
        """The hift_ext.distributed.DataParallel synchronizing the ranks (None in one process)."""
        return self._dp

    def no_sync(self):
        """Context manager: backward passes inside it only accumulate gradients locally (no
        communication), like DDP's no_sync; the first backward outside synchronizes the accumulated
        gradients. A no-op in a single process."""
        import contextlib

        return contextlib.nullcontext() if self._dp is None else self._dp.no_sync()

    def sync_grads(self) -> None:
        """Average the active group's gradients over the ranks now, unless the last backward already
        did (it does, unless it ran inside no_sync() or before the accumulation_steps-th backward).
        Call it before code that reads gradients when the last backward did not synchronize;
        step() calls it when needed. A no-op in a single process."""
        if self._dp is not None:
            self._dp.sync_grads()

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                        foreach: bool | None = None) -> Tensor:
        """torch.nn.utils.clip_grad_norm_ on the active group's gradients, after synchronizing them;
        returns the total norm. With shard_state=True each rank holds a disjoint part of the
        gradient, so the norm is reduced over the ranks (torch's clip_grad_norm_ would see this rank's
        part only)."""
        self.sync_grads()
        params = [p for p in self.param_groups[self.active_group]["params"] if p.grad is not None]
        if not self._sharded:
            return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite, foreach)
        grads = [p.grad for p in params]
        total = self._dp.grad_norm(grads, float(norm_type))
        if error_if_nonfinite and not bool(torch.isfinite(total)):
            raise RuntimeError(f"The total norm of order {float(norm_type)} for gradients is non-finite, so it "
                               "cannot be clipped. To disable this error and scale the gradients by the "
                               "non-finite norm anyway, set `error_if_nonfinite=False`")
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        if grads:
            torch._foreach_mul_(grads, coef.to(grads[0].device))
        return total

    def comm_stats(self) -> dict[str, int]:
        """Bytes and calls this rank handed to each kind of collective since construction (or
        reset_comm_stats): grad_all_reduce / grad_reduce_scatter (gradients), param_all_gather (sharded
        parameters), control (agreements, norms), state_gather (sharded state_dict), broadcast."""
        return {} if self._dp is None else self._dp.stats()

    def reset_comm_stats(self) -> None:
        if self._dp is not None:
            self._dp.reset_stats()

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        if self._dp is not None:
            self._dp.reset()  # a new accumulation window

    def _state_numel(self, p: Tensor) -> int:
        return self._dp.owned_numel(p) if self._sharded else p.numel()

    def _state_shape(self, p: Tensor) -> tuple[int, ...]:
        if self._sharded:
            return (self._dp.owned_numel(p),)
        return tuple(p.shape)

    def _state_slice(self, p: Tensor, v: Tensor) -> Tensor:
        if self._sharded:
            lo, hi = self._dp.owned(p)
            return v.reshape(-1)[lo:hi]
        return v

    def _shard_views(self, g: int) -> tuple[list[Tensor], dict]:
        """Group g's parameters this rank owns elements of, as 1-D views of those elements, and a
        mapping from each view to its parameter's state dict (what the offload engine is handed)."""
        views, smap = [], {}
        for p in self.param_groups[g]["params"]:
            lo, hi = self._dp.owned(p)
            if hi > lo:
                v = p.detach().view(-1)[lo:hi]
                views.append(v)
                if p in self.state:
                    smap[v] = self.state[p]
        return views, smap

    def _run_plan_sharded(self, group, plan, grads, grad_scale, found_inf) -> None:
        """Update this rank's elements of the group's parameters (their state is this rank's only)."""
        dp, off = self._dp, self._offload
        entries = []
        for share in plan.shares:
            gs = grads if share.index is None else [grads[i] for i in share.index]
            pos, ps, gv = [], [], []
            for j, (p, gr) in enumerate(zip(share.params, gs)):
                lo, hi = dp.owned(p)
                if hi > lo:
                    pos.append(j)
                    ps.append(p.view(-1)[lo:hi])
                    gv.append(gr.reshape(-1)[lo:hi])
            entries.append((share, pos, ps, gv))
        if off is None:
            for share, pos, ps, gv in entries:
                if ps:
                    states = [[share.dicts[j][k] for j in pos] for k in share.keys]
                    self._call_kernel(group, share, ps, gv, states, pos, grad_scale, found_inf)
            return
        g = group["hift_group"]
        views, smap = self._shard_views(g)
        where = {}
        for i, p in enumerate(p for p in group["params"] if dp.owned_numel(p)):
            where[id(p)] = i
        off.register(g, views, smap)
        calls = []
        for share, pos, _, gv in entries:
            if pos:
                calls.append(((share, pos), [where[id(share.params[j])] for j in pos], gv, share.keys))

        def apply(tag, ps, gs, states, idx):
            share, pos = tag
            self._call_kernel(group, share, ps, gs, states, [pos[c] for c in idx], grad_scale, found_inf)

        sched = self._schedule
        keep = sched.steps_per_group > 1 and sched.next == g
        try:
            off.update(g, views, calls, apply, keep_resident=keep)
        except RuntimeError as exc:
            raise self._offload_error(g, exc) from exc

    def _gather_sharded_state(self, sd: dict[str, Any]) -> None:
        """Replace this rank's slices in ``sd`` (a torch.optim-format state_dict) by the full state
        tensors, gathered on rank 0 (on the CPU); other ranks keep no state tensors."""
        dp = self._dp
        full_on_rank0 = dp.rank == 0
        for g, (group, saved) in enumerate(zip(self.param_groups, sd["param_groups"])):
            pid = dict(zip(map(id, group["params"]), saved["params"]))
            for bucket in dp.buckets[g]:
                states = [self.state[p] if p in self.state else {} for p in bucket.params]
                keys = sorted({k for st in states for k, v in st.items() if k != "step" and isinstance(v, Tensor)})
                for k in keys:
                    dtype = next(st[k].dtype for st in states if k in st)
                    chunk = torch.zeros(bucket.shard, dtype=dtype, device=dp.device)
                    for j, st in enumerate(states):
                        lo, hi, co = bucket.owned[j]
                        if k in st and hi > lo:
                            chunk[co: co + hi - lo].copy_(st[k].reshape(-1))
                    full = dp.comm.gather_to_first(chunk, "state_gather",
                                                   f"gathering the optimizer state of HiFT group {g} on rank 0")
                    if not full_on_rank0:
                        continue
                    full = full.cpu()
                    for p, off, st in zip(bucket.params, bucket.offsets, states):
                        if k in st:
                            entry = sd["state"][pid[id(p)]] = dict(sd["state"][pid[id(p)]])  # not self.state's dict
                            entry[k] = full[off: off + p.numel()].view(p.shape).clone()
        if not full_on_rank0:
            sd["state"] = {}

    # ----------------------------------------------------------------------------- switching
    def _activate(self, active: int) -> None:
        """Only the active group requires grad; every other parameter loses its gradient."""
        for i, group in enumerate(self.param_groups):
            on = i == active
            for p in group["params"]:
                if p.requires_grad != on:
                    p.requires_grad_(on)
                    self._marks.set(p, not on)
                if not on:
                    p.grad = None

    # ----------------------------------------------------------------------------- step
    def step(self, closure: Callable[[], Any] | None = None, *, grad_scale=None, found_inf=None):
        """Update the active group, then switch to the next one (with ``steps_per_group = K > 1``:
        after the group's K-th successful step; until then the same group stays active and its
        gradients are dropped, as at a switch).

        An AMP overflow (``found_inf`` set, e.g. by torch.amp.GradScaler) changes nothing and the
        same group is retried at the next step (it does not count towards K). Raises RuntimeError
        when the active group has no gradients (backward was not called).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        g = self._schedule.current
        group = self.param_groups[g]
        dp = self._dp
        if dp is not None:
            self._sync_for_step(found_inf)
        if all(p.grad is None for p in group["params"]):
            if dp is not None:
                dp.reset()
            raise RuntimeError(
                f"{type(self).__name__}.step(): the active HiFT group {g} has no gradients: "
                "backward() was not called since the last step()/zero_grad() (or the loss does not "
                "depend on this group)"
                + (" on any rank" if dp is not None else "")
                + ". The group did not change; call loss.backward() before step()."
            )
        grad_scale, found_inf = self._amp_tensors(grad_scale, found_inf)
        if dp is not None:
            if dp.agree_step(found_inf, self._schedule.position):  # an overflow on any rank: skipped on all
                dp.reset()
                return loss
        elif found_inf is not None and bool(found_inf.item()):
            return loss  # overflow: nothing changes and the schedule does not advance
        with torch.no_grad():
            self._update_group(group, grad_scale, None)
            if dp is not None and dp.shard:
                dp.gather_params(g)  # every rank's updated elements to every rank
        if dp is not None:
            dp.reset()
        self._schedule.advance()
        nxt = self._schedule.current
        if self._offload is not None:
            self._offload.after_step(g, nxt)
        if self._schedule.steps_per_group > 1 and nxt == g:
            # The block goes on: requires_grad stays as it is (it flips only at a switch); the
            # gradients just applied are dropped, so a step() without a new backward() still raises.
            for p in group["params"]:
                p.grad = None
        else:
            self._activate(nxt)
        return loss

    def _sync_for_step(self, found_inf) -> None:
        """Data parallel: the gradients step() applies are the synchronized ones."""
        dp = self._dp
        checked = found_inf if found_inf is not None else getattr(self, "found_inf", None)
        if checked is not None and not dp.synced:
            dp.reset()
            raise RuntimeError(
                f"{type(self).__name__}.step(): a GradScaler (found_inf) checked gradients that were not yet "
                "synchronized across the ranks, so the ranks could disagree on skipping this step. The step "
                "was not taken; call optimizer.sync_grads() before scaler.unscale_()/scaler.step() when the "
                "last backward ran inside optimizer.no_sync() (or before accumulation_steps backward passes)"
            )
        dp.sync_grads()

    # ----------------------------------------------------------------------------- state
    def _fingerprint(self) -> list[list[list[int]]]:
        return [[list(p.shape) for p in group["params"]] for group in self.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """Everything to resume (see docs/semantics.md). With ``shard_state=True`` this is a
        collective (every rank must call it): the ranks' slices are gathered on rank 0, which gets the
        same full state_dict an unsharded (or single-process) run saves; the other ranks get one
        without state tensors (``["hift"]["sharded"]["complete"] is False``) that load_state_dict
        refuses. One format for every world size is why: a checkpoint written with N ranks loads
        with M ranks (each rank takes its slice of the full tensors at load: re-sharding is slicing),
        into a single process and into an unsharded run, and it needs no file system shared by the
        nodes. The price: rank 0 holds the full state in host memory while saving (group by group
        it arrives through gathers of one bucket at a time)."""
        self._sync_state()
        sd = super().state_dict()
        if self._sharded:
            self._gather_sharded_state(sd)
        sd["hift"] = {
            "format": 1,
            "optimizer": type(self).__name__,
            "num_groups": self.num_groups,
            "group_size": list(self._group_size) if isinstance(self._group_size, tuple) else self._group_size,
            "strategy": self._schedule.strategy,
            "steps_per_group": self._schedule.steps_per_group,
            "schedule": self._schedule.state_dict(),
            "shapes": self._fingerprint(),
        }
        if self._sharded:
            sd["hift"]["sharded"] = {"world_size": self._dp.world_size, "rank": self._dp.rank,
                                     "complete": self._dp.rank == 0}
        return sd

    def _check_hift_state(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        name = type(self).__name__
        hift = state_dict.get("hift") if isinstance(state_dict, dict) else None
        if not isinstance(hift, dict):
            raise ValueError(
                f"{name}.load_state_dict: the state_dict has no 'hift' entry, so it was not saved "
                "by a FusedHiFT optimizer; load a state_dict saved by "
                f"{name}.state_dict() (a torch.optim state_dict loads into the drop-in optimizers)"
            )
        sharded = hift.get("sharded")
        if isinstance(sharded, dict) and sharded.get("complete") is False:
            raise ValueError(
                f"{name}.load_state_dict: this state_dict was returned on rank {sharded.get('rank')} of a run with "
                f"shard_state=True on {sharded.get('world_size')} ranks, which holds no optimizer state (rank 0's "
                "holds all of it); load the state_dict saved on rank 0 (on every rank)"
            )
        saved = hift.get("optimizer")
        if saved != name:
            raise ValueError(
                f"{name}.load_state_dict: the state_dict was saved by {saved}; construct a {saved} "
                f"to load it (the optimizer type must match)"
            )
        saved_k = hift.get("num_groups")
        saved_gs = hift.get("group_size")
        if saved_k != self.num_groups:
            fix = (
                f"construct the optimizer with group_size={saved_gs} on the same model"
                if saved_gs is not None
                else "construct the optimizer with the same explicit groups"
            )
            raise ValueError(
                f"{name}.load_state_dict: the state_dict has {saved_k} HiFT groups "
                f"(group_size={saved_gs}) but this optimizer has {self.num_groups} "
                f"(group_size={self._group_size}); {fix}"
            )
        saved_spg = hift.get("steps_per_group", 1)  # saved before it existed: one step per group
        if saved_spg != self.steps_per_group:
            raise ValueError(
                f"{name}.load_state_dict: the state_dict was saved with steps_per_group={saved_spg!r} but "
                f"this optimizer has steps_per_group={self.steps_per_group}; construct the optimizer with "
                f"steps_per_group={saved_spg!r} to resume (the group of every step, and with it the "
                "delayed LR, depends on it)"
            )
        shapes = hift.get("shapes")
        mine = self._fingerprint()
        if shapes != mine:
            where = ""
            for gi, (a, b) in enumerate(zip(shapes or [], mine)):
                if a != b:
                    where = f" (first difference in group {gi}: saved {a[:4]}{'...' if len(a) > 4 else ''}, here {b[:4]}{'...' if len(b) > 4 else ''})"
                    break
            raise ValueError(
                f"{name}.load_state_dict: the state_dict was saved for a different model: its "
                f"parameter shapes do not match this optimizer's groups{where}; load it into an "
                f"optimizer built on the same model with group_size={saved_gs}"
            )
        if len(state_dict.get("param_groups", [])) != self.num_groups:
            raise ValueError(
                f"{name}.load_state_dict: the state_dict has "
                f"{len(state_dict.get('param_groups', []))} param_groups, expected {self.num_groups}"
            )
        probe = GroupSchedule(self.num_groups, self._schedule.strategy, self._schedule.seed,
                              self._schedule.steps_per_group)
        probe.load_state_dict(hift["schedule"])  # raises with a fix (e.g. another strategy)
        return hift

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        hift = self._check_hift_state(state_dict)  # refuse before changing anything
        if self._offload is not None:
            try:
                self._offload.synchronize()  # no copy may touch the store while it is replaced
            except RuntimeError:
                pass  # a failed write-back: the state being loaded replaces that group's state

        base = {k: v for k, v in state_dict.items() if k != "hift"}
        super().load_state_dict(base)  # also moves steps to the parameters' devices
        self._schedule.load_state_dict(hift["schedule"])
        self._after_load()
        self._activate(self._schedule.current)

    def memory_report(self) -> dict[str, Any]:
        self._sync_state(flush=False)  # sizes only: a resident group need not be written back
        report = super().memory_report()
        engine_report = getattr(self._offload, "memory_report", None)
        if callable(engine_report):  # the offload engine adds pinned / host-store figures
            report.update(engine_report())
        report["num_groups"] = self.num_groups
        report["active_group"] = self.active_group
        if self._dp is not None:
            report["world_size"] = self._dp.world_size
            report["shard_state"] = self._dp.shard
        return report

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_groups={self.num_groups}, strategy="
            f"{self._schedule.strategy!r}, steps_per_group={self.steps_per_group}, "
            f"position={self.hift_position}, active_group={self.active_group})"
        )


def _hift_doc(base: str) -> str:
    return (
        f"HiFT with {base}: ``({base.split('.')[-1]}-kwargs)`` plus ``model_or_groups, group_size=1, "
        "strategy='down2up', seed=0, steps_per_group=1, offload=None, offload_slots=2, "
        "offload_prefetch=True``. group_size: layer units per group, or a list of them per group, "
        "bottom to top (an unequal split: ``[24, 8]``; they must add up to the model's units). "
        "steps_per_group=K > 1 takes K consecutive successful steps on each "
        "group before switching (block-coordinate HiFT; every group keeps its optimizer state, and with "
        "offload the active group's state stays on the device for its whole block). "
        "offload (default: True when the parameters are on CUDA) keeps every group's optimizer state "
        "in host memory and streams only the active group's state to the device. One param_group per HiFT group (bottom to top, "
        "key 'hift_group'); each step() updates only the active group with the base optimizer's "
        "math and that group's own step count, then switches to the next group (after K steps). "
        "Data parallel (``process_group=None, shard_state=False, bucket_cap_mb=25, accumulation_steps=1, "
        "comm_timeout=None``): with torch.distributed initialized on more than one rank the optimizer "
        "averages the active group's gradients over the ranks itself (no DDP wrapper; see "
        "hift_ext.distributed), ``no_sync()`` / ``accumulation_steps`` skip synchronizing micro-batches "
        "that only accumulate, ``shard_state=True`` keeps 1/N of the state and fp32 masters per rank."
    )


class FusedHiFTAdamW(_HiFTMixin, FusedAdamW):
    __doc__ = _hift_doc("torch.optim.AdamW")


class FusedHiFTAdaGrad(_HiFTMixin, FusedAdaGrad):
    __doc__ = _hift_doc("torch.optim.Adagrad")


class FusedHiFTSGD(_HiFTMixin, FusedSGD):
    __doc__ = _hift_doc("torch.optim.SGD")
