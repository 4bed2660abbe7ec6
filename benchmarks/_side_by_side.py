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

from hift_ext.host_memory import RETAINED_HEAP_TUNABLES

__all__ = ["train_step", "rotate", "RETAINED_HEAP", "speed_child_env", "process_cpu_usage", "longest"]

# glibc's malloc hands every block over 32 MB (weights' gradients, logits, a long batch's activations)
# back to the kernel when it is freed, so each step faults its memory in again. On this project's
# 2-core VM a fault costs 1-25 us depending on the host (one step of SmolLM2-135M full FT spent 12.8 s
# of its 24.6 s in the kernel, the same batch later 0.05 s: 2026-12-07), noise far above the ratios
# being measured. With no mmap'd blocks and no trimming the heap keeps what a step freed, and after a
# warm-up on the longest batch the timed steps fault much less (48 steps of the causal-lm default
# beside full FT: 28.8 s in the kernel with a one-step warm-up, 7.5 s with a cycle's, against 500 s
# of compute). A GPU run's device tensors are the caching allocator's anyway.
RETAINED_HEAP = RETAINED_HEAP_TUNABLES  # hift_ext.host_memory's, which `hift-ext finetune` sets in-process


def speed_child_env() -> Dict[str, str]:
    """The environment of a process that times steps: RETAINED_HEAP unless GLIBC_TUNABLES is set."""
    import os

    env = dict(os.environ)
    env.setdefault("GLIBC_TUNABLES", RETAINED_HEAP)
    return env


def process_cpu_usage(before=None) -> Dict[str, float]:
    """This process's page faults and seconds of CPU time in the kernel and in user space (since
    ``before``, an earlier result)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    now = {"minor_faults": float(r.ru_minflt), "kernel_s": r.ru_stime, "user_s": r.ru_utime}
    return now if before is None else {k: now[k] - before[k] for k in now}


def longest(batches: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """The batch with the most positions (padded): a warm-up on it leaves the heap at the run's peak."""
    return max(batches, key=lambda b: b["input_ids"].numel())


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
