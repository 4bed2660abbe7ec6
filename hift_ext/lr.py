"""Delayed learning-rate schedules for HiFT.

HiFT updates one of ``k`` groups per step, so a whole model update takes a
cycle of ``k`` steps. The paper's *delayed* LR keeps the LR constant within a
cycle: the LR used at HiFT step ``t`` (0-based, counting successful steps) is

    base_lr * schedule(k * floor(t / k))

where ``schedule`` is the named transformers schedule on the user's own
horizon ``T = num_training_steps`` (counted in optimizer steps, as usual). So
the LR still decays over the whole run; the official code instead steps the
scheduler once per cycle without rescaling ``T``, so its LR barely decays.

``t`` is ``optimizer.hift_position`` when the optimizer has it (an AMP step
skipped on overflow does not advance it, so the LR does not move either), else
the scheduler's own step count. ``k = getattr(optimizer, "num_groups", 1)``
(plain optimizers: the ordinary schedule).

Usage is the usual one: call ``scheduler.step()`` after every
``optimizer.step()``; ``state_dict()``/``load_state_dict()`` resume.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["DelayedLRScheduler", "get_scheduler", "SCHEDULER_NAMES"]

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


class DelayedLRScheduler(LRScheduler):
    """LR scheduler that evaluates ``lr_lambda`` at the start of the current HiFT cycle.

    Args:
        optimizer: the (HiFT) optimizer. ``num_groups`` (default 1) and ``hift_position``
            (default: this scheduler's step count) are read from it at every step.
        lr_lambda: a function of the step returning the LR multiplier, or one per
            param group (as for ``torch.optim.lr_scheduler.LambdaLR``).
        last_epoch: as for every LRScheduler.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        lr_lambda: Union[LRLambda, Sequence[LRLambda]],
        last_epoch: int = -1,
    ) -> None:
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
    def position(self) -> int:
        """``t``: the optimizer's successful HiFT steps, else this scheduler's step count."""
        t = getattr(self.optimizer, "hift_position", None)
        return self.last_epoch if t is None else int(t)

    @property
    def schedule_step(self) -> int:
        """The step the schedule is evaluated at: ``k * floor(t / k)``."""
        k = self.num_groups
        return k * (self.position // k)

    def get_lr(self) -> List[Any]:
        s = self.schedule_step
        return [base_lr * lmbda(s) for base_lr, lmbda in zip(self.base_lrs, self.lr_lambdas)]

    def state_dict(self) -> Dict[str, Any]:
        # The lambdas are functions/partials of the construction arguments: rebuilt, not saved.
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "lr_lambdas")}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state_dict = {k: v for k, v in state_dict.items() if k != "lr_lambdas"}
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
    **kwargs: Any,
) -> DelayedLRScheduler:
    """A transformers schedule (by name), delayed for HiFT.

    The LR used at HiFT step ``t`` is ``base_lr * schedule(k * floor(t / k))`` with
    ``schedule`` transformers' lr lambda for ``name`` on the horizon
    ``num_training_steps`` (total optimizer steps), ``k = optimizer.num_groups``
    (1 for non-HiFT optimizers) and ``t = optimizer.hift_position`` (successful
    steps; the scheduler's step count for non-HiFT optimizers). ``kwargs`` are the
    schedule-specific arguments (``num_cycles``, ``power``, ``lr_end``, ``min_lr``...).

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
    if num_warmup_steps < 0:
        raise ValueError(f"num_warmup_steps must be >= 0, got {num_warmup_steps}")
    needs_horizon = key not in ("constant", "constant_with_warmup", "inverse_sqrt", "warmup_stable_decay")
    if needs_horizon and num_training_steps is None:
        raise ValueError(f"schedule {key!r} needs num_training_steps (the total number of optimizer steps)")
    if num_training_steps is not None and num_training_steps < 1:
        raise ValueError(f"num_training_steps must be >= 1, got {num_training_steps}")
    lr_lambda = _transformers_lambda(key, optimizer, num_warmup_steps, num_training_steps, kwargs)
    return DelayedLRScheduler(optimizer, lr_lambda)
