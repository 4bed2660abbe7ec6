"""Worker of test_hift_resume.py (not a test module).

    python _hift_resume_worker.py JOB CKPT OUT START STEPS [JOB CKPT ... (more jobs)]

JOB is KIND,STRATEGY,STEPS_PER_GROUP,OFFLOAD(0/1),HOLD. For each job, builds a fresh model (other
random init), HiFT optimizer and LR scheduler, loads CKPT (model +
optimizer + scheduler), trains STEPS steps from step START and saves the parameters, optimizer state
and LRs to OUT. test_hift_resume.py imports the same functions to make the uninterrupted run.
"""
from __future__ import annotations

import sys

import torch

from _optim_testutil import MLP, batch, loss_fn
from hift_ext.hift_optim import FusedHiFTAdaGrad, FusedHiFTAdamW, FusedHiFTSGD

KINDS = {
    "adamw": (FusedHiFTAdamW, {"lr": 1e-2, "weight_decay": 0.05, "amsgrad": True}),
    "adagrad": (FusedHiFTAdaGrad, {"lr": 5e-2, "lr_decay": 0.01, "initial_accumulator_value": 0.1}),
    "sgd": (FusedHiFTSGD, {"lr": 5e-2, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}),
}
TOTAL = 20


def parse_job(job: str):
    kind, strategy, k, offload, hold = job.split(",")
    return dict(kind=kind, strategy=strategy, steps_per_group=int(k), offload=offload == "1", hold=hold)


def build(kind: str, strategy: str, init_seed: int, steps_per_group: int = 1, offload: bool = False,
          hold: str = "cycle"):
    cls, kw = KINDS[kind]
    model = MLP(seed=init_seed)
    opt = cls(model.groups(), strategy=strategy, seed=11, steps_per_group=steps_per_group, offload=offload, **kw)
    try:
        from hift_ext.lr import get_scheduler

        sched = get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=TOTAL, hold=hold)
    except ImportError:  # pragma: no cover - hift_ext.lr is part of the package
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / TOTAL)
    return model, opt, sched


def train(model, opt, sched, start: int, steps: int):
    for t in range(start, start + steps):
        opt.zero_grad()
        x, y = batch(t)
        loss_fn(model, x, y).backward()
        opt.step()
        sched.step()


def result(model, opt):
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "opt": opt.state_dict(),
        "lrs": [g["lr"] for g in opt.param_groups],
        "active": opt.active_group,
    }


def checkpoint(model, opt, sched):
    return {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}


def main(argv):
    if not argv or len(argv) % 5:
        raise SystemExit(__doc__)
    for i in range(0, len(argv), 5):
        job(*argv[i:i + 5])


def job(spec, ckpt, out, start, steps):
    model, opt, sched = build(init_seed=12345, **parse_job(spec))  # the load must overwrite all
    ck = torch.load(ckpt, weights_only=True)
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    sched.load_state_dict(ck["sched"])
    train(model, opt, sched, int(start), int(steps))
    torch.save(result(model, opt), out)


if __name__ == "__main__":
    main(sys.argv[1:])
