"""Which HiFT group is updated at each step.

With ``k`` groups and ``K = steps_per_group`` consecutive steps on each group
(a *visit* or *block*; ``K = 1`` is the paper's HiFT), step ``t`` (the number
of completed, successful HiFT steps) is in block ``b = t // K`` and updates
group ``order_of_cycle(b // k)[b % k]``; a cycle is ``k * K`` steps:

* ``"down2up"``: 0, 1, ..., k-1 (bottom/input side first) every cycle;
* ``"up2down"``: k-1, ..., 1, 0 every cycle;
* ``"random"``: a fresh permutation every cycle. The permutation of cycle ``c``
  is a pure function of ``(seed, c)``, so the whole state of a schedule is
  ``(num_groups, strategy, seed, steps_per_group, position)`` and a resumed
  schedule continues exactly where it stopped, also in the middle of a block.
  (The official HiFT code shuffles once and never again.)

The schedule never advances by itself: the optimizer calls :meth:`advance`
after a successful step only (an AMP-skipped step retries the same group and
does not count towards the block's ``K`` steps). It knows nothing of the
optimizer: the optimizer asks it where a step is (:attr:`current`,
:attr:`next`) and acts on the answer (switching groups, keeping offloaded state
resident).
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch

__all__ = ["GroupSchedule", "STRATEGIES", "check_steps_per_group"]

STRATEGIES = ("down2up", "up2down", "random")

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _cycle_seed(seed: int, cycle: int) -> int:
    """Deterministic, well-mixed 63-bit seed for (seed, cycle); platform independent."""
    h = _splitmix64(int(seed) & _MASK64)
    h = _splitmix64(h ^ (int(cycle) & _MASK64))
    return h & ((1 << 63) - 1)  # torch.Generator.manual_seed accepts this range


def check_steps_per_group(value: Any, owner: str = "steps_per_group") -> int:
    """``value`` when it is an int >= 1 (not a bool); a TypeError / ValueError naming the fix."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{owner} must be an int >= 1 (optimizer steps on a group before switching to the next), "
            f"got {value!r}; pass e.g. steps_per_group=1 (plain HiFT) or steps_per_group=4"
        )
    if value < 1:
        raise ValueError(
            f"{owner} must be >= 1 (optimizer steps on a group before switching to the next), got "
            f"{value}; steps_per_group=1 is plain HiFT (one step per group)"
        )
    return value


def _check_strategy(strategy: Any) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(
            f"unknown HiFT strategy {strategy!r}; valid strategies are "
            + ", ".join(repr(s) for s in STRATEGIES)
        )
    return strategy


class GroupSchedule:
    """Order in which HiFT updates its ``num_groups`` groups.

    Args:
        num_groups: number of groups ``k`` (>= 1).
        strategy: ``"down2up"``, ``"up2down"`` or ``"random"``.
        seed: seed of the ``"random"`` strategy (ignored by the others, but kept
            in the state).
        steps_per_group: ``K``, consecutive successful steps on a group before the
            schedule moves on (default 1).
    """

    def __init__(self, num_groups: int, strategy: str = "down2up", seed: int = 0, steps_per_group: int = 1):
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"num_groups must be an int >= 1, got {num_groups!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.num_groups = num_groups
        self.strategy = _check_strategy(strategy)
        self.seed = seed
        self.steps_per_group = check_steps_per_group(steps_per_group)
        self._position = 0
        self._cache_cycle = -1
        self._cache_order: List[int] = []

    # ---------------------------------------------------------------- queries
    @property
    def position(self) -> int:
        """Number of completed (successful) HiFT steps ``t``."""
        return self._position

    @property
    def cycle_length(self) -> int:
        """Steps in a cycle (every group visited once): ``k * K``."""
        return self.num_groups * self.steps_per_group

    @property
    def cycle(self) -> int:
        """Index of the current cycle, ``t // (k * K)``."""
        return self._position // self.cycle_length

    @property
    def block(self) -> int:
        """Index of the current block (visit of one group), ``t // K``."""
        return self._position // self.steps_per_group

    @property
    def step_in_block(self) -> int:
        """Successful steps already taken in the current block, ``t % K`` (0 at a switch)."""
        return self._position % self.steps_per_group

    def order_of_cycle(self, cycle: int) -> List[int]:
        """Group order (bottom-to-top indices) used during cycle ``cycle``."""
        k = self.num_groups
        if self.strategy == "down2up":
            return list(range(k))
        if self.strategy == "up2down":
            return list(range(k - 1, -1, -1))
        if cycle < 0:
            raise ValueError(f"cycle must be >= 0, got {cycle}")
        if cycle != self._cache_cycle:
            g = torch.Generator(device="cpu")
            g.manual_seed(_cycle_seed(self.seed, cycle))
            self._cache_order = torch.randperm(k, generator=g).tolist()
            self._cache_cycle = cycle
        return list(self._cache_order)

    @property
    def order(self) -> List[int]:
        """Group order of the current cycle."""
        return self.order_of_cycle(self.cycle)

    @property
    def current(self) -> int:
        """Group index updated at step ``t = position``."""
        return self.group_at(self._position)

    def group_at(self, t: int) -> int:
        """Group index updated at step ``t`` (any t >= 0; does not change the state)."""
        if t < 0:
            raise ValueError(f"step must be >= 0, got {t}")
        b = t // self.steps_per_group
        return self.order_of_cycle(b // self.num_groups)[b % self.num_groups]

    @property
    def next(self) -> int:
        """Group index that will be updated after the next :meth:`advance`."""
        return self.group_at(self._position + 1)

    # ---------------------------------------------------------------- update
    def advance(self) -> None:
        """Record one successful HiFT step (moves to the next group at the end of a block)."""
        self._position += 1

    # ---------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        return {
            "num_groups": self.num_groups,
            "strategy": self.strategy,
            "seed": self.seed,
            "steps_per_group": self.steps_per_group,
            "position": self._position,
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        missing = [key for key in ("num_groups", "strategy", "seed", "position") if key not in state_dict]
        if missing:
            raise ValueError(f"GroupSchedule state_dict is missing keys {missing}")
        if state_dict["num_groups"] != self.num_groups:
            raise ValueError(
                f"GroupSchedule state_dict has num_groups={state_dict['num_groups']} but this "
                f"schedule has num_groups={self.num_groups}; the checkpoint was made with a "
                "different model or group_size"
            )
        if state_dict["strategy"] != self.strategy:
            raise ValueError(
                f"GroupSchedule state_dict has strategy={state_dict['strategy']!r} but this "
                f"schedule has strategy={self.strategy!r}; construct the optimizer with "
                f"strategy={state_dict['strategy']!r} to resume"
            )
        # (a state saved before steps_per_group existed was made with one step per group)
        saved_k = state_dict.get("steps_per_group", 1)
        if saved_k != self.steps_per_group:
            raise ValueError(
                f"GroupSchedule state_dict has steps_per_group={saved_k!r} but this schedule has "
                f"steps_per_group={self.steps_per_group}; construct the optimizer with "
                f"steps_per_group={saved_k!r} to resume (the group of every step depends on it)"
            )
        position = state_dict["position"]
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise ValueError(f"GroupSchedule state_dict has an invalid position {position!r}")
        seed = state_dict["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"GroupSchedule state_dict has an invalid seed {seed!r}")
        self.seed = seed
        self._position = position
        self._cache_cycle = -1
        self._cache_order = []

    def __repr__(self) -> str:
        return (
            f"GroupSchedule(num_groups={self.num_groups}, strategy={self.strategy!r}, "
            f"seed={self.seed}, steps_per_group={self.steps_per_group}, position={self._position})"
        )
