"""Delayed learning-rate schedules for HiFT.

HiFT updates one of ``k`` groups per step, ``K = steps_per_group`` consecutive
steps on each (a *visit*), so a whole model update takes a cycle of ``k * K``
steps. The paper's *delayed* LR holds the LR constant over a window of ``H``
steps:

* ``hold="cycle"`` (the default, :data:`DEFAULT_HOLD`): ``H = k * K``, every
  group sees the same LR within a cycle (for ``K = 1`` the paper's rule);
* ``hold="visit"``: ``H = K``, the LR is constant within one visit of a group
  and moves between visits (for ``K = 1`` this is the plain per-step schedule).

The LR used at HiFT step ``t`` (0-based, counting successful steps) is
``base_lr * schedule(s(t))`` with ``a = H * floor(t / H)`` the window's first step and

    s(t) = a                          when a >= W (after warmup: the window's start)
    s(t) = min(a + H - 1, W)          when a <  W (warmup: the window's last step)

where ``schedule`` is the named transformers schedule on the user's own horizon
``T = num_training_steps`` (counted in optimizer steps, as usual) and ``W =
num_warmup_steps``. So the LR still decays over the whole run (the official
code steps the scheduler once per cycle without rescaling ``T``, so its LR
barely decays), and a warmup warms up: evaluated at the window's start, as
before, the first window would get ``schedule(0) = 0`` (with k = 35 groups, 35
steps, every group's first update, wasted). During warmup the schedule rises,
so a held window takes its last step's value instead, capped at the end of the
warmup (a window that straddles ``W`` gets the peak). Every group still sees
the same LR within a window. After the warmup the hold is exactly the old one.
With ``H = 1`` nothing is held and ``s(t) = t``: the transformers schedule
itself (plain optimizers, or ``hold="visit"`` with ``K = 1``; its first step
has LR 0 like any transformers warmup).

``t`` is ``optimizer.hift_position`` when the optimizer has it (an AMP step
skipped on overflow does not advance it, so the LR does not move either), else
the scheduler's own step count. ``k = getattr(optimizer, "num_groups", 1)`` and
``K = getattr(optimizer, "steps_per_group", 1)`` are read from the optimizer
(plain optimizers: the ordinary schedule).

Usage is the usual one: call ``scheduler.step()`` after every
``optimizer.step()``; ``state_dict()``/``load_state_dict()`` resume.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["DelayedLRScheduler", "get_scheduler", "SCHEDULER_NAMES", "HOLDS", "DEFAULT_HOLD"]

# Step-indexed schedules of transformers (reduce_lr_on_plateau and greedy are not).
SCHEDULER_NAMES = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
)

LRLambda = Callable[[int], float]

#: How long the delayed LR is held: a whole cycle of k * K steps, or one visit of K steps.
HOLDS = ("cycle", "visit")
#: The hold used when none is given (get_scheduler, DelayedLRScheduler, hift-ext finetune, the Trainer
#: integration). "cycle" is the paper's rule and today's behaviour at K = 1; flip it here to change
#: every entry point at once ("visit" at K = 1 holds nothing: the plain per-step schedule).
#: Measured (bench_sst2, K = 2, seed 0): cycle 88.53% / visit 88.53%, no difference; "cycle" stays
#: because every group of a cycle then trains with the same LR (a visit hold gives the later groups
#: of each cycle systematically smaller ones) and old K = 1 runs resume unchanged.
DEFAULT_HOLD = "cycle"


def check_hold(hold: Any) -> str:
    """``hold`` resolved (None: :data:`DEFAULT_HOLD`); ValueError naming the choices otherwise."""
    if hold is None:
        return DEFAULT_HOLD
    if hold not in HOLDS:
        raise ValueError(f"hold must be one of {', '.join(repr(h) for h in HOLDS)} (or None for "
                         f"the default {DEFAULT_HOLD!r}), got {hold!r}")
    return hold


def _check_warmup(w: Any) -> int:
    """A number of warmup steps: an int >= 0 (a whole float is accepted, as transformers does)."""
    if isinstance(w, float) and w.is_integer():
        w = int(w)
    if isinstance(w, bool) or not isinstance(w, int) or w < 0:
        raise ValueError(f"num_warmup_steps must be a whole number of steps >= 0, got {w!r}")
    return w


class DelayedLRScheduler(LRScheduler):
    """LR scheduler that holds ``lr_lambda`` constant over windows of HiFT steps (module docstring).

    Args:
        optimizer: the (HiFT) optimizer. ``num_groups`` and ``steps_per_group`` (default 1) and
            ``hift_position`` (default: this scheduler's step count) are read from it at every step.
        lr_lambda: a function of the step returning the LR multiplier, or one per
            param group (as for ``torch.optim.lr_scheduler.LambdaLR``).
        last_epoch: as for every LRScheduler.
        hold: ``"cycle"`` (hold over ``k * K`` steps), ``"visit"`` (over ``K`` steps) or None
            (:data:`DEFAULT_HOLD`).
        num_warmup_steps: ``W``, the warmup of ``lr_lambda`` (0: none); windows starting before
            ``W`` take the value of their last step (capped at ``W``) so that warmup warms up.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        lr_lambda: Union[LRLambda, Sequence[LRLambda]],
        last_epoch: int = -1,
        *,
        hold: Optional[str] = None,
        num_warmup_steps: int = 0,
    ) -> None:
        self.hold = check_hold(hold)
        self.num_warmup_steps = _check_warmup(num_warmup_steps)
        n = len(optimizer.param_groups)
        if callable(lr_lambda):
            self.lr_lambdas: List[LRLambda] = [lr_lambda] * n
        else:
            lr_lambda = list(lr_lambda)
            if len(lr_lambda) != n:
                raise ValueError(f"expected {n} lr_lambdas (one per param group), got {len(lr_lambda)}")
            self.lr_lambdas = lr_lambda
        super().__init__(optimizer, last_epoch)

    @property
    def num_groups(self) -> int:
        """``k``: the optimizer's number of HiFT groups (1 for a plain optimizer)."""
        k = getattr(self.optimizer, "num_groups", 1)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"optimizer.num_groups must be an int >= 1, got {k!r}")
        return k

    @property
    def steps_per_group(self) -> int:
        """``K``: the optimizer's steps per group visit (1 for a plain optimizer)."""
        k = getattr(self.optimizer, "steps_per_group", 1)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"optimizer.steps_per_group must be an int >= 1, got {k!r}")
        return k

    @property
    def hold_steps(self) -> int:
        """``H``: steps the LR is held for, ``k * K`` (hold="cycle") or ``K`` (hold="visit")."""
        if self.hold == "visit":
            return self.steps_per_group
        return self.num_groups * self.steps_per_group

    @property
    def position(self) -> int:
        """``t``: the optimizer's successful HiFT steps, else this scheduler's step count."""
        t = getattr(self.optimizer, "hift_position", None)
        return self.last_epoch if t is None else int(t)

    @property
    def schedule_step(self) -> int:
        """The step the schedule is evaluated at: the held window's first step ``a = H * floor(t / H)``,
        or during warmup (``a < W``) its last step ``min(a + H - 1, W)``."""
        h = self.hold_steps
        a = h * (self.position // h)
        w = self.num_warmup_steps
        return a if a >= w else min(a + h - 1, w)

    def get_lr(self) -> List[Any]:
        s = self.schedule_step
        return [base_lr * lmbda(s) for base_lr, lmbda in zip(self.base_lrs, self.lr_lambdas)]

    def state_dict(self) -> Dict[str, Any]:
        # The lambdas are functions/partials of the construction arguments: rebuilt, not saved.
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "lr_lambdas")}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        # A state saved before `hold` existed was held per cycle; this scheduler's own rule is
        # kept then. A state saved with another hold is refused: the LRs would silently change.
        saved = state_dict.get("hold", self.hold)
        if saved != self.hold:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the state was saved with hold={saved!r} but "
                f"this scheduler has hold={self.hold!r}; build it with hold={saved!r} "
                f"(get_scheduler(..., hold={saved!r})) to resume"
            )
        state_dict = {k: v for k, v in state_dict.items() if k not in ("lr_lambdas", "hold")}
        self.__dict__.update(state_dict)


def _transformers_lambda(
    name: str,
    optimizer: Optimizer,
    num_warmup_steps: Optional[int],
    num_training_steps: Optional[int],
    kwargs: Dict[str, Any],
) -> LRLambda:
    """Build transformers' own lr lambda for ``name`` (on a throwaway optimizer)."""
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - transformers is a dependency of the tests
        raise ImportError(
            "hift_ext.get_scheduler uses transformers' schedules; install transformers, or "
            "build hift_ext.lr.DelayedLRScheduler(optimizer, lr_lambda) yourself"
        ) from e

    # Schedules such as polynomial / cosine_with_min_lr read optimizer.defaults["lr"].
    base_lr = optimizer.defaults.get("lr", optimizer.param_groups[0]["lr"])
    if isinstance(base_lr, torch.Tensor):
        base_lr = float(base_lr)
    dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    sched = transformers.get_scheduler(
        name,
        dummy,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=kwargs or None,
    )
    lambdas = getattr(sched, "lr_lambdas", None)
    if not lambdas:
        raise ValueError(f"schedule {name!r} is not step-indexed; use one of {', '.join(SCHEDULER_NAMES)}")
    return lambdas[0]


def get_scheduler(
    name: str,
    optimizer: Optimizer,
    num_warmup_steps: int = 0,
    num_training_steps: Optional[int] = None,
    *,
    hold: Optional[str] = None,
    **kwargs: Any,
) -> DelayedLRScheduler:
    """A transformers schedule (by name), delayed for HiFT.

    The LR used at HiFT step ``t`` is ``base_lr * schedule(s(t))`` (module docstring): ``schedule``
    is transformers' lr lambda for ``name`` on the horizon ``num_training_steps`` (total optimizer
    steps), held over windows of ``H`` steps (``hold="cycle"``: ``H = k * K``, the default;
    ``hold="visit"``: ``H = K``) with ``k = optimizer.num_groups`` and ``K =
    optimizer.steps_per_group`` (1 for non-HiFT optimizers), ``t = optimizer.hift_position``
    (successful steps; the scheduler's step count for non-HiFT optimizers). A window starting after
    the warmup takes the schedule at its first step; a window starting within the warmup takes it at
    its last step (capped at ``num_warmup_steps``), so no step of the first window gets LR 0 when
    ``H > 1``. ``kwargs`` are the schedule-specific arguments (``num_cycles``, ``power``,
    ``lr_end``, ``min_lr``...).

    Names: linear, cosine, cosine_with_restarts, polynomial, constant,
    constant_with_warmup, inverse_sqrt, cosine_with_min_lr, cosine_warmup_with_min_lr,
    warmup_stable_decay.
    """
    key = getattr(name, "value", name)
    if key not in SCHEDULER_NAMES:
        raise ValueError(
            f"unknown or unsupported schedule {name!r}; valid names are: " + ", ".join(SCHEDULER_NAMES)
        )
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"{type(optimizer).__name__} is not a torch.optim.Optimizer")
    if num_warmup_steps is None:
        num_warmup_steps = 0
    num_warmup_steps = _check_warmup(num_warmup_steps)
    hold = check_hold(hold)
    needs_horizon = key not in ("constant", "constant_with_warmup", "inverse_sqrt", "warmup_stable_decay")
    if needs_horizon and num_training_steps is None:
        raise ValueError(f"schedule {key!r} needs num_training_steps (the total number of optimizer steps)")
    if num_training_steps is not None and num_training_steps < 1:
        raise ValueError(f"num_training_steps must be >= 1, got {num_training_steps}")
    lr_lambda = _transformers_lambda(key, optimizer, num_warmup_steps, num_training_steps, kwargs)
    return DelayedLRScheduler(optimizer, lr_lambda, hold=hold, num_warmup_steps=num_warmup_steps)
