"""Fused optimizers: drop-in replacements for torch.optim (their HiFT variants, subclasses of these,
are in hift_ext.hift_optim).

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

Two methods are the seams the HiFT optimizers' offload overrides: ``_state_device(p)`` (where p's
state is created: here, p's device) and ``_run_plan(...)`` (one param_group's update: here, the
kernel calls on state that stays where it is).
"""
from __future__ import annotations

import math
import operator
from collections import defaultdict
from typing import Any, Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["FusedAdamW", "FusedAdaGrad", "FusedSGD"]


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
