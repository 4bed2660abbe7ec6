"""Range checks for numeric hyperparameters, shared by every entry point that takes them.

``hift-ext finetune`` (its flag parser and :class:`hift_ext.train.TrainConfig`) and the transformers
integration (``create_hift_optimizer_and_scheduler``) check the same quantities with the same rules,
so an ``inf`` learning rate or a ``nan`` momentum is refused before it can train a model to NaN.
Every check raises :class:`HParamError` (a ``ValueError``) whose message starts with the name the
caller knows the value by (``--lr``, ``args.learning_rate``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

__all__ = ["HParamError", "Range", "RULES", "check", "check_all", "check_int", "SEED_MIN", "SEED_MAX"]

# torch.manual_seed accepts exactly this range (a signed or an unsigned 64-bit integer).
SEED_MIN = -(1 << 63)
SEED_MAX = (1 << 64) - 1


class HParamError(ValueError):
    """A hyperparameter outside its range (or not a finite number)."""


@dataclass(frozen=True)
class Range:
    """A finite number with ``low < x`` (``low_open``) or ``low <= x``, and optionally below ``high``."""

    low: float
    low_open: bool = False
    high: Optional[float] = None
    high_open: bool = True

    def describe(self) -> str:
        lo = f"> {self.low:g}" if self.low_open else f">= {self.low:g}"
        if self.high is None:
            return f"a finite number {lo}"
        return (f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                f"{')' if self.high_open else ']'}")

    def contains(self, v: float) -> bool:
        if not math.isfinite(v):
            return False
        if v < self.low or (self.low_open and v == self.low):
            return False
        if self.high is not None and (v > self.high or (self.high_open and v == self.high)):
            return False
        return True


POSITIVE = Range(0.0, low_open=True)
NON_NEGATIVE = Range(0.0)

# One rule per quantity, whatever the entry point calls it.
RULES: Mapping[str, Range] = {
    "lr": POSITIVE,
    "weight_decay": NON_NEGATIVE,
    "momentum": NON_NEGATIVE,
    "max_grad_norm": NON_NEGATIVE,  # 0 turns clipping off
    "warmup_ratio": Range(0.0, high=1.0),
    "eps": POSITIVE,
    "beta": Range(0.0, high=1.0),
    "dist_timeout": POSITIVE,  # seconds a process waits for the others (torchrun)
}


def check(name: str, value: Any, rule: Range) -> float:
    """``value`` as a float when it satisfies ``rule``; HParamError naming ``name`` otherwise."""
    if isinstance(value, bool):
        raise HParamError(f"{name} must be a number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise HParamError(f"{name} must be a number, got {value!r}") from None
    if not rule.contains(v):
        extra = " (inf and nan train to NaN weights)" if not math.isfinite(v) else ""
        raise HParamError(f"{name} must be {rule.describe()}, got {value!r}{extra}")
    return v


def check_all(values: Mapping[str, Any], names: Optional[Mapping[str, str]] = None) -> None:
    """Check each ``values[key]`` (None: not set) against ``RULES[key]``; ``names`` maps a key to
    the name shown in the message (default: the key)."""
    names = names or {}
    for key, value in values.items():
        if value is not None:
            check(names.get(key, key), value, RULES[key])


def check_int(name: str, value: Any, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """An ``int`` (not a bool, not a float) within ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise HParamError(f"{name} must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]" if low is not None else f"<= {high}"
        raise HParamError(f"{name} must be an integer {bounds}, got {value}")
    return value
