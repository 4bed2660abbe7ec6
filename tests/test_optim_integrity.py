"""Bad hyperparameters and bad state never train silently into NaN or leave a half-done step.

- inf/NaN hyperparameters are refused by every optimizer, at construction and at step();
- load_state_dict refuses a state tensor of the wrong shape or dtype, or a corrupt step count,
  before changing anything;
- a step refused by the kernel (e.g. a state tensor replaced by one of the wrong shape) changes
  nothing: parameters, state and step counts stay as they were;
- capturable=True is refused with a clear message where it is not supported (the HiFT optimizers;
  FusedAdamW supports it: tests/test_capturable.py).
"""
import math

import pytest
import torch
from torch import nn

from hift_ext import (FusedAdaGrad, FusedAdamW, FusedHiFTAdaGrad, FusedHiFTAdamW, FusedHiFTSGD,
                      FusedSGD)

BAD = [float("inf"), float("-inf"), float("nan")]

DROPIN_HYPERS = {
    FusedAdamW: ["lr", "eps", "weight_decay"],
    FusedAdaGrad: ["lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps"],
    FusedSGD: ["lr", "momentum", "dampening", "weight_decay"],
}
HIFT_OF = {FusedAdamW: FusedHiFTAdamW, FusedAdaGrad: FusedHiFTAdaGrad, FusedSGD: FusedHiFTSGD}


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _backward(model):
    x = torch.randn(4, 5)
    model(x).square().sum().backward()


@pytest.mark.parametrize("cls", list(DROPIN_HYPERS))
@pytest.mark.parametrize("bad", BAD)
def test_non_finite_hyperparameters_are_refused(cls, bad):
    for key in DROPIN_HYPERS[cls]:
        with pytest.raises(ValueError, match=f"{key}|Invalid"):
            cls(_model().parameters(), **{key: bad})
        with pytest.raises(ValueError, match=f"{key}|Invalid"):
            HIFT_OF[cls](_model(), **{key: bad})
    if cls is FusedAdamW:
        with pytest.raises(ValueError):
            cls(_model().parameters(), betas=(0.9, bad))


@pytest.mark.parametrize("cls", list(DROPIN_HYPERS))
def test_non_finite_lr_at_step_changes_nothing(cls):
    model = _model()
    opt = cls(model.parameters(), lr=0.1, **({"momentum": 0.9} if cls is FusedSGD else {}))
    _backward(model)
    opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    state_before = {k: v.clone() for k, v in opt.state[model[0].weight].items() if torch.is_tensor(v)}
    opt.param_groups[0]["lr"] = float("inf")  # e.g. a broken scheduler
    with pytest.raises(ValueError, match="lr=inf is not a finite number"):
        opt.step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    for k, v in opt.state[model[0].weight].items():
        if torch.is_tensor(v):
            assert torch.equal(v, state_before[k]), k


def test_capturable_is_refused_where_unsupported():
    with pytest.raises(ValueError, match="capturable=True"):
        FusedHiFTAdamW(_model(), capturable=True)
    FusedAdamW(_model().parameters(), capturable=True)  # supported


@pytest.mark.parametrize("hift", [False, True])
def test_load_state_dict_refuses_wrong_shapes_and_dtypes(hift):
    model = _model()
    opt = FusedHiFTAdamW(model, lr=0.1) if hift else FusedAdamW(model.parameters())
    for _ in range(3 if hift else 1):
        _backward(model)
        opt.step()
        opt.zero_grad()
    sd = opt.state_dict()
    snapshot = {id(p): {k: v.clone() for k, v in st.items() if torch.is_tensor(v)} for p, st in opt.state.items()}
    pid = next(iter(sd["state"]))

    def corrupt(fn):
        bad = {**sd, "state": {k: dict(v) for k, v in sd["state"].items()}}
        fn(bad["state"][pid])
        return bad

    cases = [
        (corrupt(lambda st: st.__setitem__("exp_avg", torch.zeros(3))), "has shape"),
        (corrupt(lambda st: st.__setitem__("exp_avg_sq", st["exp_avg_sq"].to(torch.int32))), "floating point"),
        (corrupt(lambda st: st.__setitem__("step", torch.tensor(float("nan")))), "step"),
        (corrupt(lambda st: st.__setitem__("step", -1.0)), "step"),
    ]
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(bad)
        for p, st in opt.state.items():  # nothing changed
            for k, v in st.items():
                if torch.is_tensor(v):
                    assert torch.equal(v, snapshot[id(p)][k])


@pytest.mark.parametrize("cls", [FusedAdamW, FusedAdaGrad, FusedSGD])
def test_a_refused_step_changes_nothing(cls):
    model = _model()
    kw = {"momentum": 0.9} if cls is FusedSGD else {}
    opt = cls(model.parameters(), lr=0.1, **kw)
    _backward(model)
    opt.step()
    w = model[0].weight
    key = {FusedAdamW: "exp_avg", FusedAdaGrad: "sum", FusedSGD: "momentum_buffer"}[cls]
    opt.state[w][key] = torch.zeros(3)  # user code broke the state between steps
    params = [p.detach().clone() for p in model.parameters()]
    steps = [float(st["step"]) for st in opt.state.values() if "step" in st]
    _backward(model)
    with pytest.raises(RuntimeError, match="shape"):
        opt.step()
    for p, b in zip(model.parameters(), params):
        assert torch.equal(p, b)
    assert [float(st["step"]) for st in opt.state.values() if "step" in st] == steps


def test_a_refused_hift_step_does_not_advance_the_schedule():
    model = _model()
    opt = FusedHiFTAdamW(model, lr=0.1)
    for _ in range(opt.num_groups):  # every group has state
        _backward(model)
        opt.step()
        opt.zero_grad()
    g = opt.active_group
    p0 = opt.param_groups[g]["params"][0]
    step = float(opt.state[p0]["step"])
    opt.state[p0]["exp_avg"] = torch.zeros(2)
    _backward(model)
    with pytest.raises(RuntimeError):
        opt.step()
    assert opt.active_group == g and float(opt.state[p0]["step"]) == step
    assert not math.isnan(float(p0.detach().sum()))
