"""Speed of several training setups measured side by side in one process.

On a shared machine a run's own clock moves with the load other jobs put on it, so two runs timed
one after the other (or even in parallel) are not comparable. Here the setups take training steps
in rotation on the same batches (who goes first rotates too): every setup sees the same load, and
the ratio of their times is the speed ratio. Each step is what the training loop does: forward,
backward, gradient clipping, optimizer step, zero_grad."""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

__all__ = ["train_step", "rotate"]


def train_step(model, optimizer, batch: Dict[str, torch.Tensor], max_grad_norm: float,
               loss: Optional[Callable] = None) -> None:
    """``loss(model, batch)``: the job's loss (a task's :meth:`~hift_ext.tasks.base.Task.loss`);
    default the model's own."""
    from hift_ext.train import _total_grad_norm

    (loss(model, batch) if loss is not None else model(**batch).loss).backward()
    _total_grad_norm([p for p in model.parameters()], max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def rotate(steps: Dict[str, Callable[[Dict[str, torch.Tensor]], None]], batches: Sequence[Dict[str, torch.Tensor]],
           log: Callable[[str], None] = lambda m: None,
           per_step: Optional[Dict[str, List[float]]] = None,
           sync: Optional[Callable[[], None]] = None) -> Dict[str, float]:
    """Seconds each of ``steps`` (name -> one training step on a batch) spent over ``batches``,
    taking the steps in rotation on each batch; ``per_step`` (when given) receives each step's seconds.
    ``sync`` (a GPU's synchronize) runs before each clock reading, so a step's time includes its
    queued device work and no other step's."""
    names: List[str] = list(steps)
    seconds = {n: 0.0 for n in names}
    for i, batch in enumerate(batches):
        r = i % len(names)
        for name in names[r:] + names[:r]:
            if sync is not None:
                sync()
            t0 = time.perf_counter()
            steps[name](batch)
            if sync is not None:
                sync()
            dt = time.perf_counter() - t0
            seconds[name] += dt
            if per_step is not None:
                per_step.setdefault(name, []).append(dt)
        log(f"batch {i + 1}/{len(batches)}: " + ", ".join(f"{n} {s:.1f}s" for n, s in seconds.items()))
    return seconds
