"""fp32 master weights in the optimizers (bf16/fp16 parameters).

- one update == torch.optim on an fp32 copy of the master, followed by param.copy_(master), for the
  drop-in optimizers and the HiFT ones (per-group reference, every strategy);
- offloaded (also streamed in pieces through a tiny device budget) == resident, bitwise;
- state_dict -> torch.save -> a new process -> load -> continue == never stopping, bitwise, with
  masters and mixed dtypes (bf16, fp16, fp32 in one model, also in one group);
- a checkpoint without masters (torch.optim, an fp32 run) loads and makes them from the parameters;
- fp16 with a GradScaler: an overflow changes neither masters nor parameters;
- bad input: master_weights=True on fp32 parameters.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import _master_resume_worker as worker
from _optim_testutil import needs_kernels
from hift_ext.hift_optim import FusedHiFTAdaGrad, FusedHiFTAdamW, FusedHiFTSGD
from hift_ext.optim import FusedAdaGrad, FusedAdamW, FusedSGD

pytestmark = needs_kernels
ROOT = Path(__file__).resolve().parents[1]
TOL = dict(rtol=1e-5, atol=1e-6)

OPTS = {
    "adamw": (FusedAdamW, FusedHiFTAdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "amsgrad": (FusedAdamW, FusedHiFTAdamW, torch.optim.AdamW, dict(lr=1e-2, amsgrad=True, maximize=True)),
    "adagrad": (FusedAdaGrad, FusedHiFTAdaGrad, torch.optim.Adagrad, dict(lr=5e-2, lr_decay=0.01,
                                                                         initial_accumulator_value=0.1)),
    "sgd": (FusedSGD, FusedHiFTSGD, torch.optim.SGD, dict(lr=5e-2, momentum=0.9, dampening=0.1,
                                                          weight_decay=0.01)),
    "nesterov": (FusedSGD, FusedHiFTSGD, torch.optim.SGD, dict(lr=5e-2, momentum=0.9, nesterov=True)),
}


def _mlp(dtype, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 33), torch.nn.Tanh(), torch.nn.Linear(33, 7),
                               torch.nn.Tanh(), torch.nn.Linear(7, 2)).to(dtype)


def _data(t, dtype):
    g = torch.Generator().manual_seed(t)
    return torch.randn(6, 5, generator=g).to(dtype), torch.randn(6, 2, generator=g)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", list(OPTS))
def test_dropin_equals_torch_on_an_fp32_copy(name, dtype):
    ours_cls, _, torch_cls, kw = OPTS[name]
    model = _mlp(dtype)
    params = [p for p in model.parameters()]
    masters = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
    opt = ours_cls(params, **kw)  # master_weights=None: on for bf16/fp16
    ref = torch_cls(masters, foreach=False, **kw)
    for t in range(5):
        x, y = _data(t, dtype)
        torch.nn.functional.mse_loss(model(x).float(), y).backward()
        for p, m in zip(params, masters):
            m.grad = p.grad.float()
        opt.step()
        ref.step()
        opt.zero_grad()
        for p, m in zip(params, masters):
            st = opt.state[p]
            assert st["master_param"].dtype == torch.float32
            torch.testing.assert_close(st["master_param"], m.detach(), **TOL)
            assert torch.equal(p.detach(), st["master_param"].to(dtype))  # the rounded master
            for k, v in ref.state[m].items():
                if k != "step":
                    assert st[k].dtype == torch.float32
                    torch.testing.assert_close(st[k], v, **TOL)


@pytest.mark.parametrize("strategy", ["down2up", "up2down", "random"])
@pytest.mark.parametrize("name", ["adamw", "adagrad", "sgd"])
def test_hift_equals_per_group_torch_on_fp32_copies(name, strategy):
    _, cls, torch_cls, kw = OPTS[name]
    dtype = torch.bfloat16
    model = _mlp(dtype, seed=1)
    groups = [[m.weight, m.bias] for m in model if isinstance(m, torch.nn.Linear)]
    opt = cls(groups, strategy=strategy, seed=4, **kw)
    masters = {p: torch.nn.Parameter(p.detach().float().clone()) for g in groups for p in g}
    refs = [torch_cls([masters[p] for p in g], foreach=False, **kw) for g in groups]
    for t in range(3 * len(groups) + 1):
        g = opt.active_group
        x, y = _data(t, dtype)
        torch.nn.functional.mse_loss(model(x).float(), y).backward()
        for p in groups[g]:
            masters[p].grad = p.grad.float()
        refs[g].step()
        opt.step()
        opt.zero_grad()
        for p in groups[g]:
            torch.testing.assert_close(opt.state[p]["master_param"], masters[p].detach(), **TOL)
            assert torch.equal(p.detach(), opt.state[p]["master_param"].to(dtype))


@pytest.mark.parametrize("name", ["adamw", "adagrad", "sgd"])
@pytest.mark.parametrize("budget", [None, 8192])
def test_offloaded_masters_equal_resident(name, budget):
    """Masters live in the host store with the state; an 8 KiB budget streams the bigger groups in
    pieces. Bitwise the resident run."""
    model, ref = worker.build(name, False, init_seed=0)
    model_off = copy.deepcopy(model)
    cls, kw = worker.KINDS[name]
    groups_off = [[model_off[0].weight], [model_off[0].bias, model_off[2].bias],
                  [model_off[1].weight, model_off[1].bias], [model_off[2].weight]]
    for p in model_off.parameters():
        p.requires_grad_(True)
    off = cls(groups_off, strategy="random", seed=5, offload=True, offload_device_bytes=budget, **kw)
    worker.train(model, ref, 0, 11)
    worker.train(model_off, off, 0, 11)
    for a, b in zip(model.parameters(), model_off.parameters()):
        assert torch.equal(a, b)
    sa, sb = ref.state_dict(), off.state_dict()
    for pid, st in sa["state"].items():
        for k, v in st.items():
            assert torch.equal(v.cpu(), sb["state"][pid][k].cpu()), (pid, k)
    masters = [st["master_param"] for st in sb["state"].values() if "master_param" in st]
    assert masters and all(m.dtype == torch.float32 and m.device.type == "cpu" for m in masters)
    if budget is not None:
        assert max(off.memory_report()["pieces_per_group"]) > 1
        assert off.offload_engine.stats()["overflow_allocs"] == 0


@pytest.mark.parametrize("offload", [False, True])
def test_resume_in_a_new_process_with_masters_and_mixed_dtypes(tmp_path, offload):
    jobs = []
    expected = {}
    for kind in worker.KINDS:
        model, opt = worker.build(kind, offload, init_seed=0)
        worker.train(model, opt, 0, 6)
        ckpt = tmp_path / f"{kind}.ckpt.pt"
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, ckpt)
        worker.train(model, opt, 6, 7)
        expected[kind] = worker.result(model, opt)
        jobs.append((kind, str(ckpt), str(tmp_path / f"{kind}.out.pt")))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")] + [p for p in [env.get("PYTHONPATH")] if p])
    for kind, ckpt, out in jobs:
        proc = subprocess.run([sys.executable, worker.__file__, kind, "1" if offload else "0", ckpt, out, "6", "7"],
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got, exp = torch.load(out, weights_only=True), expected[kind]
        assert got["active"] == exp["active"]
        for a, b in zip(exp["params"], got["params"]):
            assert a.dtype == b.dtype and torch.equal(a, b), kind
        for pid, st in exp["opt"]["state"].items():
            for k, v in st.items():
                assert torch.equal(v, got["opt"]["state"][pid][k]), (kind, pid, k)


@pytest.mark.parametrize("source", ["torch", "fp32_run"])
def test_checkpoint_without_masters_makes_them_from_the_parameters(source):
    model = _mlp(torch.float32, seed=2)
    params = list(model.parameters())
    if source == "torch":
        src = torch.optim.AdamW(params, lr=1e-2)
    else:
        src = FusedAdamW(params, lr=1e-2)
    for t in range(2):
        x, y = _data(t, torch.float32)
        torch.nn.functional.mse_loss(model(x), y).backward()
        src.step()
        src.zero_grad()
    sd = copy.deepcopy(src.state_dict())
    model.to(torch.bfloat16)
    opt = FusedAdamW(model.parameters(), lr=1e-2)
    opt.load_state_dict(sd)
    for p, pid in zip(model.parameters(), sd["param_groups"][0]["params"]):
        st = opt.state[p]
        assert torch.equal(st["master_param"], p.detach().float())  # made from the parameter
        assert st["exp_avg"].dtype == torch.float32  # the loaded fp32 state keeps its precision
        assert torch.equal(st["exp_avg"], sd["state"][pid]["exp_avg"])
    x, y = _data(3, torch.bfloat16)
    torch.nn.functional.mse_loss(model(x).float(), y).backward()
    opt.step()
    # and back: a master-weight checkpoint into an fp32 optimizer drops the masters
    sd2 = copy.deepcopy(opt.state_dict())
    model32 = _mlp(torch.float32, seed=2)
    opt32 = FusedAdamW(model32.parameters(), lr=1e-2)
    opt32.load_state_dict(sd2)
    assert all("master_param" not in st for st in opt32.state.values())


@pytest.mark.parametrize("hift", [False, True])
def test_fp16_grad_scaler_overflow_touches_no_master(hift):
    model = _mlp(torch.float16, seed=3)
    groups = [[m.weight, m.bias] for m in model if isinstance(m, torch.nn.Linear)]
    opt = FusedHiFTAdamW(groups, lr=1e-2) if hift else FusedAdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for t in range(4):
        x, y = _data(t, torch.float16)
        scaler.scale(torch.nn.functional.mse_loss(model(x).float(), y)).backward()
        if t == 2:  # an overflow
            next(p for p in model.parameters() if p.grad is not None).grad[0] = float("inf")
            before = {id(p): (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()
                                                  if torch.is_tensor(v)}) for p in model.parameters()}
            active = getattr(opt, "active_group", None)
            scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if t == 2:
            for p in model.parameters():
                w, st = before[id(p)]
                assert torch.equal(p.detach(), w)
                for k, v in st.items():
                    assert torch.equal(opt.state[p][k], v), k
            assert getattr(opt, "active_group", None) == active  # HiFT retries the same group
            assert scaler.get_scale() < scale
    assert all(torch.isfinite(st["master_param"]).all() for st in opt.state.values() if "master_param" in st)


def test_bad_input():
    with pytest.raises(ValueError, match="master_weights=True, but every parameter is torch.float32"):
        FusedAdamW(_mlp(torch.float32).parameters(), master_weights=True)
    with pytest.raises(ValueError, match="fp32 parameters are their own masters"):
        FusedHiFTSGD(_mlp(torch.float32), master_weights=True)
    with pytest.raises(TypeError, match="master_weights must be None, True or False"):
        FusedAdamW(_mlp(torch.bfloat16).parameters(), master_weights="yes")
    # forced off: bf16 state, no masters (today's low-precision path)
    model = _mlp(torch.bfloat16)
    opt = FusedAdamW(model.parameters(), master_weights=False)
    x, y = _data(0, torch.bfloat16)
    torch.nn.functional.mse_loss(model(x).float(), y).backward()
    opt.step()
    st = next(iter(opt.state.values()))
    assert "master_param" not in st and st["exp_avg"].dtype == torch.bfloat16
