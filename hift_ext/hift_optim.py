"""HiFT optimizers (hierarchical full-parameter fine-tuning, arXiv 2401.15207).

:class:`FusedHiFTAdamW`, :class:`FusedHiFTAdaGrad`, :class:`FusedHiFTSGD` take a model (grouped by
:func:`hift_ext.grouping.group_model`) or an explicit list of groups, bottom to top. They keep one
param_group per HiFT group and update ONE group per step(), with exactly the drop-in classes' update
code: each is :class:`_HiFTMixin` over a drop-in optimizer of hift_ext.optim, so there is no second
copy of the math. The mixin adds the group schedule (hift_ext.schedule), the switching of
requires_grad, the optimizer-state offload (hift_ext.offload), data parallelism
(hift_ext.distributed) and the checked state_dict.
"""
from __future__ import annotations

import math
import weakref
from collections import defaultdict
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from hift_ext.optim import FusedAdaGrad, FusedAdamW, FusedSGD, _check_param
from hift_ext.schedule import GroupSchedule, check_steps_per_group

__all__ = ["FusedHiFTAdamW", "FusedHiFTAdaGrad", "FusedHiFTSGD"]

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
