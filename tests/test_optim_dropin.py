"""Drop-in optimizers: FusedAdamW / FusedAdaGrad / FusedSGD against torch.optim.

Parity over many steps for every option, fp32 tight and bf16/fp16 sensible; state_dict round trips
both ways; GradScaler; parameters without grad skipped; bad input.
"""
from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn

from _optim_testutil import (
    clone_params, make_params, needs_cuda, needs_kernels, set_grads,
)
from hift_ext.optim import FusedAdaGrad, FusedAdamW, FusedSGD

pytestmark = needs_kernels

SHAPES = [(1,), (3,), (4,), (17, 33), (4097,), (2, 3, 5)]

PAIRS = {
    "adamw": (torch.optim.AdamW, FusedAdamW),
    "adagrad": (torch.optim.Adagrad, FusedAdaGrad),
    "sgd": (torch.optim.SGD, FusedSGD),
}

OPTIONS = [
    ("adamw", {}),
    ("adamw", {"lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1}),
    ("adamw", {"amsgrad": True}),
    ("adamw", {"maximize": True, "weight_decay": 0.0}),
    ("adamw", {"amsgrad": True, "maximize": True, "weight_decay": 0.05, "lr": 3e-3}),
    ("adagrad", {}),
    ("adagrad", {"lr_decay": 0.01}),
    ("adagrad", {"weight_decay": 0.1, "initial_accumulator_value": 0.5}),
    ("adagrad", {"eps": 1e-5, "maximize": True, "lr": 0.05}),
    ("adagrad", {"lr_decay": 0.05, "weight_decay": 0.01, "initial_accumulator_value": 0.1, "maximize": True}),
    ("sgd", {}),
    ("sgd", {"lr": 0.01, "momentum": 0.9}),
    ("sgd", {"lr": 0.01, "momentum": 0.9, "dampening": 0.5}),
    ("sgd", {"lr": 0.01, "momentum": 0.9, "nesterov": True}),
    ("sgd", {"lr": 0.01, "weight_decay": 0.01, "maximize": True}),
    ("sgd", {"lr": 0.01, "momentum": 0.5, "dampening": 0.1, "weight_decay": 0.02, "maximize": True}),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'defaults'}" for n, kw in OPTIONS]


def _run(opt, params, steps, start=0, scale=1.0):
    for t in range(start, start + steps):
        set_grads(params, t, scale=scale)
        opt.step()


# ------------------------------------------------------------------------------------ signatures
@pytest.mark.parametrize("name", list(PAIRS))
def test_constructor_signature_and_defaults_match_torch(name):
    torch_cls, ours = PAIRS[name]
    ts, os_ = inspect.signature(torch_cls.__init__), inspect.signature(ours.__init__)
    # torch's arguments in torch's order, then ours: master_weights (keyword-only, default None)
    assert list(ts.parameters) + ["master_weights"] == list(os_.parameters)
    assert os_.parameters["master_weights"].default is None
    assert os_.parameters["master_weights"].kind == inspect.Parameter.KEYWORD_ONLY
    for k, tp in ts.parameters.items():
        assert os_.parameters[k].default == tp.default, k
        assert os_.parameters[k].kind == tp.kind, k
    p = make_params([(3,)])
    assert ours(p).param_groups[0].keys() == torch_cls(clone_params(p)).param_groups[0].keys()
    assert ours(p).defaults == torch_cls(clone_params(p)).defaults


# ------------------------------------------------------------------------------------ fp32 parity
@pytest.mark.parametrize("name,kw", OPTIONS, ids=IDS)
def test_fp32_parity_many_steps(name, kw):
    torch_cls, ours = PAIRS[name]
    ref = make_params(SHAPES)
    mine = clone_params(ref)
    opt_ref, opt = torch_cls(ref, **kw), ours(mine, **kw)
    _run(opt_ref, ref, 30)
    _run(opt, mine, 30)
    for a, b in zip(ref, mine):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=2e-6)
    sd_ref, sd = opt_ref.state_dict(), opt.state_dict()
    assert sd["param_groups"] == sd_ref["param_groups"]
    assert sd["state"].keys() == sd_ref["state"].keys()
    for i, st in sd_ref["state"].items():
        assert st.keys() == sd["state"][i].keys()
        for k, v in st.items():
            if k == "step":
                assert sd["state"][i][k].dtype == torch.float32 and sd["state"][i][k].dim() == 0
                assert float(sd["state"][i][k]) == float(v) == 30.0
            else:
                torch.testing.assert_close(sd["state"][i][k], v, rtol=1e-5, atol=2e-6)


# ------------------------------------------------------------------------------------ bf16 / fp16
LOWP = [
    ("adamw", {"lr": 1e-2, "weight_decay": 0.1}),
    ("adamw", {"lr": 1e-2, "amsgrad": True, "maximize": True}),
    ("adagrad", {"lr": 0.05, "lr_decay": 0.01, "weight_decay": 0.01, "initial_accumulator_value": 0.1}),
    ("sgd", {"lr": 0.01, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    ("sgd", {"lr": 0.01, "momentum": 0.9, "dampening": 0.2, "maximize": True}),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name,kw", LOWP, ids=[n for n, _ in LOWP])
def test_low_precision_sensible(name, kw, dtype):
    """bf16/fp16 params and states without master weights (master_weights=False), fp32 math: close
    to torch's own fused kernel (which also computes in fp32), and to an fp32 run within the dtype's
    resolution. (With master weights, the default, see test_master_weights.py.)"""
    torch_cls, ours = PAIRS[name]
    shapes = [(3,), (4097,), (33, 17)]
    master = make_params(shapes)
    lowp = [nn.Parameter(p.detach().to(dtype)) for p in master]
    ref_fused = clone_params(lowp)
    ref32 = [nn.Parameter(p.detach().float()) for p in lowp]
    opt = ours(lowp, master_weights=False, **kw)
    opt_fused = torch_cls(ref_fused, fused=True, **kw)
    opt32 = torch_cls(ref32, **kw)
    steps = 20
    for t in range(steps):
        set_grads(ref32, t)
        for p, q, r in zip(lowp, ref_fused, ref32):
            p.grad = r.grad.to(dtype)
            q.grad = r.grad.to(dtype)
        opt.step()
        opt_fused.step()
        opt32.step()
    tol = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
    # torch < 2.14's CPU fused SGD/Adagrad for bf16/fp16 are not a usable reference: on torch 2.11
    # (the GPU machine's) fused SGD lands 1.15 away from the fp32 run where ours lands 0.07 (bf16)
    # and 0.007 (fp16); fused Adagrad bf16 rounds differently. The fp32 check below still applies.
    compare_fused = name == "adamw" or torch.__version__ >= "2.14"
    for p, q, r in zip(lowp, ref_fused, ref32):
        assert p.dtype == dtype
        if compare_fused:
            torch.testing.assert_close(p.float(), q.float(), rtol=tol, atol=tol)
        # a sensible distance from the fp32 trajectory: within a few ulps per step of drift
        torch.testing.assert_close(p.float(), r.detach(), rtol=4 * tol, atol=4 * tol)
    for st in opt.state.values():
        for k, v in st.items():
            assert v.dtype == (torch.float32 if k == "step" else dtype), k


# ------------------------------------------------------------------------------------ skipping
@pytest.mark.parametrize("name", list(PAIRS))
def test_params_without_grad_are_skipped(name):
    torch_cls, ours = PAIRS[name]
    kw = {"momentum": 0.9} if name == "sgd" else {}
    ps = make_params([(5,), (6,), (7,)])
    before = [p.detach().clone() for p in ps]
    opt = ours(ps, **kw)
    ref = clone_params(ps)
    opt_ref = torch_cls(ref, **kw)
    for t in range(3):
        set_grads(ps[:2], t)
        set_grads(ref[:2], t)
        ps[2].grad = ref[2].grad = None
        opt.step()
        opt_ref.step()
    assert torch.equal(ps[2], before[2])
    assert not torch.equal(ps[0], before[0])
    for a, b in zip(ps, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6)
    if name != "adagrad":  # AdaGrad creates state for every param in __init__, like torch
        assert len(opt.state[ps[2]]) == 0
    assert opt.state[ps[2]].keys() == opt_ref.state[ref[2]].keys()


@pytest.mark.parametrize("name", list(PAIRS))
def test_state_edits_between_steps_are_seen_like_torch(name):
    """The per-group plan kept between steps must follow whatever changes between them: which
    parameters have grads, state tensors replaced, a step count rewritten, an entry deleted
    (restarts that parameter's state), the whole state reset, a state_dict loaded."""
    torch_cls, ours = PAIRS[name]
    kw = {"momentum": 0.9, "lr": 0.01} if name == "sgd" else {}
    ps = make_params(SHAPES)
    ref = clone_params(ps)
    opt, opt_ref = ours(ps, **kw), torch_cls(ref, **kw)

    def both(fn):
        fn(opt, ps)
        fn(opt_ref, ref)

    def steps(first, n, only=None):
        for t in range(first, first + n):
            set_grads(ps, t)
            set_grads(ref, t)
            for i in range(len(ps)):
                if only is not None and i not in only:
                    ps[i].grad = ref[i].grad = None
            opt.step()
            opt_ref.step()

    key = {"adamw": "exp_avg", "adagrad": "sum", "sgd": "momentum_buffer"}[name]
    steps(0, 3)
    steps(3, 2, only={0, 2, 4})  # a different set of parameters with grads
    steps(5, 2)
    both(lambda o, p: o.state[p[1]].__setitem__(key, o.state[p[1]][key] * 0.5))  # replaced tensor
    steps(7, 2)
    if name != "sgd":
        both(lambda o, p: o.state[p[3]].__setitem__("step", torch.tensor(50.0)))  # step rewritten
        steps(9, 2)
    if name != "adagrad":  # torch's Adagrad cannot restart a deleted entry; the others re-create it
        both(lambda o, p: o.state.__delitem__(p[2]))
        steps(11, 2)
        both(lambda o, p: o.state[p[4]].clear())  # an emptied entry restarts too
        steps(13, 2)
    both(lambda o, p: o.load_state_dict(copy.deepcopy(o.state_dict())))
    steps(15, 2)
    for a, b in zip(ps, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6)
    for p, r in zip(ps, ref):
        assert opt.state[p].keys() == opt_ref.state[r].keys()
        for k, v in opt_ref.state[r].items():
            torch.testing.assert_close(opt.state[p][k].float(), v.float(), rtol=1e-5, atol=2e-6)


def test_one_op_call_per_group_with_mixed_dtypes(monkeypatch):
    from hift_ext import ops

    calls = []
    real = ops.fused_adamw_

    def spy(params, *args, **kwargs):
        calls.append([p.dtype for p in params])
        return real(params, *args, **kwargs)

    monkeypatch.setattr(ops, "fused_adamw_", spy)
    ps = [nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(7).bfloat16()),
          nn.Parameter(torch.randn(3).half())]
    p2 = nn.Parameter(torch.randn(4))
    opt = FusedAdamW([{"params": ps}, {"params": [p2], "lr": 0.1}], master_weights=False)
    for p in ps + [p2]:
        p.grad = torch.randn_like(p)
    opt.step()
    assert calls == [[torch.float32, torch.bfloat16, torch.float16], [torch.float32]]
    # with master weights (the default for bf16/fp16): one call for the parameters without masters,
    # one for those with them
    calls.clear()
    opt = FusedAdamW([{"params": ps}, {"params": [p2], "lr": 0.1}])
    opt.step()
    assert calls == [[torch.float32], [torch.bfloat16, torch.float16], [torch.float32]]


def test_tensor_lr_and_betas():
    ps = make_params([(10,)])
    ref = clone_params(ps)
    opt = FusedAdamW(ps, lr=torch.tensor(0.01), betas=(torch.tensor(0.8), torch.tensor(0.9)))
    opt_ref = torch.optim.AdamW(ref, lr=torch.tensor(0.01), betas=(torch.tensor(0.8), torch.tensor(0.9)))
    _run(opt, ps, 5)
    _run(opt_ref, ref, 5)
    torch.testing.assert_close(ps[0], ref[0], rtol=1e-5, atol=2e-6)


def test_closure_is_called_with_grad_enabled():
    ps = make_params([(4,)])
    opt = FusedSGD(ps, lr=0.1)

    def closure():
        assert torch.is_grad_enabled()
        opt.zero_grad()
        loss = (ps[0] ** 2).sum()
        loss.backward()
        return loss

    before = ps[0].detach().clone()
    with torch.no_grad():
        loss = opt.step(closure)
    torch.testing.assert_close(loss, (before ** 2).sum())
    torch.testing.assert_close(ps[0].detach(), before - 0.1 * 2 * before)


# ------------------------------------------------------------------------------------ state dicts
@pytest.mark.parametrize("name,kw", [OPTIONS[2], OPTIONS[4], OPTIONS[9], OPTIONS[13], OPTIONS[15]],
                         ids=["adamw-amsgrad", "adamw-all", "adagrad-all", "sgd-nesterov", "sgd-all"])
@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_state_dict_round_trip(name, kw, direction):
    torch_cls, ours = PAIRS[name]
    first_cls, second_cls = (torch_cls, ours) if direction == "torch_to_ours" else (ours, torch_cls)
    a = make_params(SHAPES[:5])
    opt_a = first_cls(a, **kw)
    _run(opt_a, a, 6)
    sd = copy.deepcopy(opt_a.state_dict())

    # the second optimizer loads a's state and continues; a (same class as before) continues too
    b = clone_params(a)
    opt_b = second_cls(b, **kw)
    opt_b.load_state_dict(copy.deepcopy(sd))
    for st in opt_b.state.values():
        if "step" in st:
            assert float(st["step"]) == 6.0
    _run(opt_a, a, 8, start=6)
    _run(opt_b, b, 8, start=6)
    for p, q in zip(a, b):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=2e-6)

    # and the torch optimizer continuing from its own state agrees as well (the reference)
    ref = clone_params(b)
    opt_ref = torch_cls(ref, **kw)
    opt_ref.load_state_dict(copy.deepcopy(opt_b.state_dict()))
    _run(opt_ref, ref, 3, start=14)
    _run(opt_b, b, 3, start=14)
    for p, q in zip(ref, b):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=2e-6)


@needs_cuda
def test_cuda_parity_and_cpu_step_moved_once():
    ref = make_params(SHAPES, device="cuda")
    opt_ref = torch.optim.AdamW(ref, amsgrad=True)
    _run(opt_ref, ref, 3)
    mine = clone_params(ref)  # the weights the saved state belongs to (3 steps in)
    sd = copy.deepcopy(opt_ref.state_dict())
    assert sd["state"][0]["step"].device.type == "cpu"
    opt = FusedAdamW(mine, amsgrad=True)
    opt.load_state_dict(sd)
    for st in opt.state.values():
        assert st["step"].device.type == "cuda" and st["step"].dtype == torch.float32
    _run(opt_ref, ref, 10, start=3)
    _run(opt, mine, 10, start=3)
    for a, b in zip(ref, mine):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=2e-6)


# ------------------------------------------------------------------------------------ AMP
def _amp_train(opt_cls, kw, use_scaler, inject_inf_at=(), steps=6):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    opt = opt_cls(model.parameters(), **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12) if use_scaler else None
    g = torch.Generator().manual_seed(5)
    skipped = []
    for t in range(steps):
        x, y = torch.randn(4, 8, generator=g), torch.randn(4, 2, generator=g)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        if scaler is None:
            loss.backward()
            if t not in inject_inf_at:  # the reference simply leaves those steps out
                opt.step()
            continue
        scaler.scale(loss).backward()
        if t in inject_inf_at:
            next(model.parameters()).grad[0, 0] = float("inf")
            before = copy.deepcopy((model.state_dict(), opt.state_dict()))
        scaler.step(opt)
        scaler.update()
        if t in inject_inf_at:
            skipped.append((before, copy.deepcopy((model.state_dict(), opt.state_dict()))))
    return model, opt, scaler, skipped


@pytest.mark.parametrize("name", list(PAIRS))
def test_grad_scaler_matches_unscaled_training(name):
    _, ours = PAIRS[name]
    kw = {"momentum": 0.9, "lr": 0.01} if name == "sgd" else {}
    m_scaled, opt, scaler, _ = _amp_train(ours, kw, True)
    m_plain, _, _, _ = _amp_train(ours, kw, False)
    assert getattr(opt, "grad_scale", None) is None and getattr(opt, "found_inf", None) is None
    for p, q in zip(m_scaled.parameters(), m_plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(PAIRS))
def test_grad_scaler_overflow_changes_nothing(name):
    _, ours = PAIRS[name]
    kw = {"momentum": 0.9, "lr": 0.01, "dampening": 0.3} if name == "sgd" else {}
    # inf on the very first step too (SGD must not create its momentum buffers then)
    _, opt, scaler, skipped = _amp_train(ours, kw, True, inject_inf_at=(0, 3))
    for (m0, o0), (m1, o1) in skipped:
        for k in m0:
            assert torch.equal(m0[k], m1[k]), k
        assert set(o0["state"]) <= set(o1["state"])
        for i, st in o1["state"].items():
            for k, v in st.items():
                if i in o0["state"]:
                    assert torch.equal(v, o0["state"][i][k]), (i, k)
                else:  # lazily created on an overflowing first step (as torch's fused path): pristine
                    assert k != "momentum_buffer"
                    assert torch.count_nonzero(v) == 0, (i, k)
    assert scaler.get_scale() < 2.0 ** 12
    # the two skipped steps are not counted
    for st in opt.state.values():
        if "step" in st:
            assert float(st["step"]) == 4.0
    # skipping == leaving those steps out (for SGD: the first successful step is the first step,
    # buffer = d_p, not (1 - dampening) * d_p)
    m_plain, _, _, _ = _amp_train(ours, kw, False, inject_inf_at=(0, 3))
    m_scaled, _, _, _ = _amp_train(ours, kw, True, inject_inf_at=(0, 3))
    for p, q in zip(m_scaled.parameters(), m_plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_grad_scaler_with_unscale_and_clipping():
    torch.manual_seed(0)
    model = nn.Linear(8, 2)
    ref = copy.deepcopy(model)
    opt = FusedAdamW(model.parameters(), lr=0.01)
    opt_ref = FusedAdamW(ref.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    x, y = torch.randn(4, 8), torch.randn(4, 2)
    for _ in range(3):
        opt.zero_grad()
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        scaler.step(opt)
        scaler.update()
        opt_ref.zero_grad()
        nn.functional.mse_loss(ref(x), y).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
        opt_ref.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_explicit_grad_scale_and_found_inf_kwargs():
    ps = make_params([(9,)])
    ref = clone_params(ps)
    opt, opt_ref = FusedAdamW(ps), FusedAdamW(ref)
    set_grads(ref, 0)
    ps[0].grad = ref[0].grad * 8
    opt.step(grad_scale=torch.tensor(8.0), found_inf=torch.tensor(0.0))
    opt_ref.step()
    assert torch.equal(ps[0], ref[0])
    before = ps[0].detach().clone()
    opt.step(grad_scale=torch.tensor(8.0), found_inf=torch.tensor(1.0))
    assert torch.equal(ps[0], before) and float(opt.state[ps[0]]["step"]) == 1.0


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("name", list(PAIRS))
def test_sparse_grad_is_refused(name):
    _, ours = PAIRS[name]
    emb = nn.Embedding(10, 4, sparse=True)
    opt = ours(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


@pytest.mark.parametrize("name", list(PAIRS))
def test_non_floating_param_is_refused(name):
    _, ours = PAIRS[name]
    with pytest.raises(TypeError, match="not a floating-point"):
        ours([torch.zeros(3, dtype=torch.long)])
    opt = ours(make_params([(2,)]))
    with pytest.raises(TypeError, match="not a floating-point"):
        opt.add_param_group({"params": [torch.zeros(3, dtype=torch.int32)]})


@pytest.mark.parametrize("name", list(PAIRS))
def test_differentiable_is_refused_and_torch_validation_kept(name):
    torch_cls, ours = PAIRS[name]
    with pytest.raises(ValueError, match="differentiable"):
        ours(make_params([(2,)]), differentiable=True)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        ours(make_params([(2,)]), lr=-1.0)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        torch_cls(make_params([(2,)]), lr=-1.0)


def test_sgd_nesterov_validation():
    with pytest.raises(ValueError, match="Nesterov"):
        FusedSGD(make_params([(2,)]), nesterov=True)


def test_memory_report_counts_state_bytes():
    ps = make_params([(100,), (10, 10)])
    opt = FusedAdamW(ps, amsgrad=True)
    assert opt.memory_report()["total_state_bytes"] == 0
    _run(opt, ps, 1)
    rep = opt.memory_report()
    assert rep["total_state_bytes"] == 200 * 4 * 3 + 2 * 4
    assert rep["state_bytes"] == {"cpu": rep["total_state_bytes"]}
    assert rep["total_grad_bytes"] == 200 * 4
