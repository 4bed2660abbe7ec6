"""Worker of test_master_weights.py (not a test module).

    python _master_resume_worker.py KIND OFFLOAD CKPT OUT START STEPS

builds a fresh bf16/fp32 mixed model (another random init) and a HiFT optimizer with fp32 master
weights, loads CKPT, trains STEPS steps from step START and saves parameters and optimizer state
to OUT. test_master_weights.py imports the same functions for the uninterrupted run.
"""
from __future__ import annotations

import sys

import torch

from hift_ext.hift_optim import FusedHiFTAdaGrad, FusedHiFTAdamW, FusedHiFTSGD

KINDS = {
    "adamw": (FusedHiFTAdamW, {"lr": 1e-2, "weight_decay": 0.05, "amsgrad": True}),
    "adagrad": (FusedHiFTAdaGrad, {"lr": 5e-2, "lr_decay": 0.01}),
    "sgd": (FusedHiFTSGD, {"lr": 5e-2, "momentum": 0.9, "dampening": 0.1}),
}


def build(kind: str, offload: bool, init_seed: int):
    """Three layers: bf16, fp16 and fp32 (mixed dtypes, the fp32 one without masters), one group
    each plus one group mixing a bf16 and an fp32 tensor."""
    torch.manual_seed(init_seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 40), torch.nn.Linear(40, 24), torch.nn.Linear(24, 3))
    model[0].to(torch.bfloat16)
    model[1].to(torch.float16)
    groups = [[model[0].weight], [model[0].bias, model[2].bias], [model[1].weight, model[1].bias],
              [model[2].weight]]
    cls, kw = KINDS[kind]
    budget = 8192 if offload else None  # streams the larger groups in pieces
    opt = cls(groups, strategy="random", seed=5, offload=offload, offload_device_bytes=budget, **kw)
    return model, opt


def forward(model, x):
    h = model[0](x.bfloat16()).float().tanh()
    h = model[1](h.half()).float().tanh()
    return model[2](h)


def batch(t: int):
    g = torch.Generator().manual_seed(1000 + t)
    return torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)


def train(model, opt, start: int, steps: int):
    for t in range(start, start + steps):
        opt.zero_grad()
        x, y = batch(t)
        torch.nn.functional.mse_loss(forward(model, x), y).backward()
        opt.step()


def result(model, opt):
    return {"params": [p.detach().clone() for p in model.parameters()], "opt": opt.state_dict(),
            "active": opt.active_group}


def main(argv):
    kind, offload, ckpt, out, start, steps = argv
    model, opt = build(kind, offload == "1", init_seed=999)
    ck = torch.load(ckpt, weights_only=True)
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    train(model, opt, int(start), int(steps))
    torch.save(result(model, opt), out)


if __name__ == "__main__":
    main(sys.argv[1:])
