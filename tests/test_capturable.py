"""AdamW's lr as a tensor, capturable=True, and the two ways the CUDA kernels receive their tensor
table (issue 17).

- fused_adamw_ with lr as a tensor (float32 or float64, read by the kernel when it runs) is
  bitwise the same update as with the same lr as a float, with and without master weights;
- FusedAdamW(capturable=True, lr=tensor) trains bitwise like FusedAdamW(lr=float) while a
  scheduler writes new values into the tensor; the lr tensor is validated with a clear error;
- HiFT optimizers refuse capturable=True, naming why and what to use instead;
- the CUDA launch plan (csrc/optim/launch_plan.h, run here through _C._launch_plan): short lists
  and every piece of a long list during capture are inline launches of at most 40 tensors whose
  blocks locate every chunk of every non-empty tensor exactly once; a long list outside capture
  takes one launch over a device table;
- CUDA: short lists (table in the kernel arguments), long lists (table in device memory) and
  empty tensors between them give the CPU kernel's results; a FusedAdamW step captured in a CUDA
  graph and replayed with new grads and a new lr equals the same steps taken eagerly, for a short
  list and for a long one (launched as several inline tables during capture); a step captured
  before its state exists, or without capturable=True, is refused with the fix.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import hift_ext
from hift_ext import FusedAdamW, FusedHiFTAdamW, ops

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

KW = dict(beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8, maximize=False)
LR = float(torch.tensor(3e-3, dtype=torch.float32))  # exactly representable in float32 too


def _skip_unless_kernels(device: str) -> None:
    if device == "cuda" and not hift_ext.has_cuda_kernels():
        pytest.skip("hift_ext was built without CUDA kernels")


def _inputs(sizes, device, dtype=torch.float32, masters=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda n: torch.randn(n, generator=g)  # noqa: E731
    params = [rnd(n).to(device=device, dtype=dtype) for n in sizes]
    grads = [rnd(n).to(device=device, dtype=dtype) for n in sizes]
    sdt = torch.float32 if masters else dtype
    ms = [(rnd(n) * 0.1).to(device=device, dtype=sdt) for n in sizes]
    vs = [(rnd(n).abs() * 0.01).to(device=device, dtype=sdt) for n in sizes]
    mps = [p.float().clone() for p in params] if masters else []
    steps = [torch.tensor(3.0, device=device) for _ in sizes]
    return params, grads, ms, vs, mps, steps


def _clone(ts):
    return [t.clone() for t in ts]


def _adamw(inp, lr, amsgrad=False):
    params, grads, ms, vs, mps, steps = inp
    xs = [v.clone() for v in vs] if amsgrad else []
    ops.fused_adamw_(params, grads, ms, vs, xs, steps, lr=lr, amsgrad=amsgrad, master_params=mps, **KW)
    return params + ms + vs + xs + mps


# --------------------------------------------------------------------------- lr as a tensor
@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("masters", [False, True])
def test_tensor_lr_is_bitwise_the_float_lr(device, lr_dtype, amsgrad, masters):
    _skip_unless_kernels(device)
    sizes = [1, 7, 4099, 70001]
    dtype = torch.bfloat16 if masters else torch.float32
    base = _inputs(sizes, device, dtype, masters)
    a = [_clone(x) for x in base]
    b = [_clone(x) for x in base]
    out_float = _adamw(a, LR, amsgrad)
    out_tensor = _adamw(b, torch.tensor(LR, dtype=lr_dtype, device=device), amsgrad)
    for x, y in zip(out_float, out_tensor):
        assert torch.equal(x, y)


def test_host_tensor_lr_for_device_params_and_other_dtypes_are_read_correctly(device):
    _skip_unless_kernels(device)
    base = _inputs([5, 300], device)
    ref = _adamw([_clone(x) for x in base], 0.5)
    for lr in (torch.tensor(0.5), torch.tensor(0.5, dtype=torch.bfloat16, device=device),
               torch.tensor([0.5], device=device)):
        got = _adamw([_clone(x) for x in base], lr)
        for x, y in zip(ref, got):
            assert torch.equal(x, y)


def test_lr_tensor_is_validated():
    params, grads, ms, vs, _, steps = _inputs([4], "cpu")
    raw = torch.ops.hift_ext.fused_adamw_
    kw = dict(lr=0.0, amsgrad=False, master_params=[], **KW)
    with pytest.raises(RuntimeError, match="lr_tensor must be float32 or float64"):
        raw(params, grads, ms, vs, [], steps, lr_tensor=torch.tensor(1, dtype=torch.int64), **kw)
    with pytest.raises(RuntimeError, match="lr_tensor must hold exactly one element"):
        raw(params, grads, ms, vs, [], steps, lr_tensor=torch.ones(2), **kw)
    with pytest.raises(RuntimeError, match="lr_tensor is on meta but params are on cpu"):
        raw(params, grads, ms, vs, [], steps, lr_tensor=torch.ones((), device="meta"), **kw)
    with pytest.raises(ValueError, match="one-element tensor"):
        ops.fused_adamw_(params, grads, ms, vs, [], steps, lr=torch.ones(2), amsgrad=False, **KW)
    assert torch.equal(steps[0], torch.tensor(3.0))  # nothing ran


def test_opcheck_with_lr_tensor(device):
    _skip_unless_kernels(device)
    params, grads, ms, vs, _, steps = _inputs([5, 33], device)
    torch.library.opcheck(
        torch.ops.hift_ext.fused_adamw_.default, (params, grads, ms, vs, [], steps),
        dict(lr=0.0, amsgrad=False, master_params=[], lr_tensor=torch.tensor(1e-2, device=device), **KW),
    )


# --------------------------------------------------------------------------- FusedAdamW(capturable=True)
def _model(device):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(device)


def test_capturable_with_a_tensor_lr_trains_like_a_float_lr(device):
    _skip_unless_kernels(device)
    m1, m2 = _model(device), _model(device)
    lr = torch.tensor(1e-2, dtype=torch.float64, device=device)
    o1 = FusedAdamW(m1.parameters(), lr=lr, capturable=True, amsgrad=True)
    o2 = FusedAdamW(m2.parameters(), lr=1e-2, amsgrad=True)
    # torch's schedulers write a tensor lr in place (lr.fill_), a float one into the group
    s1, s2 = (torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.7) for o in (o1, o2))
    x = torch.randn(8, 6, device=device)
    for _ in range(5):
        for m in (m1, m2):
            m.zero_grad()
            m(x).square().mean().backward()
        o1.step()
        o2.step()
        s1.step()
        s2.step()
    assert o1.param_groups[0]["lr"] is lr and float(lr) == o2.param_groups[0]["lr"]
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"):
            assert torch.equal(o1.state[p][key], o2.state[q][key]), key


def test_capturable_is_refused_by_hift_with_the_alternative():
    with pytest.raises(ValueError, match="HiFT step chooses its layer group on the host.*capturable=True"):
        FusedHiFTAdamW(_model("cpu"), capturable=True)


# --------------------------------------------------------------------------- CUDA: tables and graphs
LIST_SIZES = {
    "one": [70001],
    "inline-full": [(i * 97) % 1000 + 1 for i in range(40)],
    "device-table": [(i * 97) % 1000 + 1 for i in range(41)],
    "long-with-empties": [0 if i % 9 == 4 else (i * 131) % 3000 + 1 for i in range(150)] + [200003],
}


@requires_cuda
@pytest.mark.parametrize("case", list(LIST_SIZES))
@pytest.mark.parametrize("masters", [False, True])
def test_cuda_tables_match_the_cpu_kernel(case, masters):
    _skip_unless_kernels("cuda")
    sizes = LIST_SIZES[case]
    dtype = torch.bfloat16 if masters else torch.float32
    base = _inputs(sizes, "cpu", dtype, masters, seed=1)
    on_cpu = _adamw([_clone(x) for x in base], LR)
    on_cuda = _adamw([[t.cuda() for t in x] for x in base], LR)
    for x, y in zip(on_cpu, on_cuda):
        torch.testing.assert_close(y.cpu(), x, rtol=1e-5, atol=1e-6)


def _graph_case(n_params, dtype):
    torch.manual_seed(0)
    sizes = [(i * 389) % 5000 + 1 for i in range(n_params)]
    params = [torch.randn(n, device="cuda", dtype=dtype, requires_grad=True) for n in sizes]
    twins = [p.detach().clone().requires_grad_(True) for p in params]
    grads = [[torch.randn(n, device="cuda", dtype=dtype) for n in sizes] for _ in range(5)]
    return params, twins, grads


@requires_cuda
@pytest.mark.parametrize("n_params", [3, 120])  # one inline table; a long list split into several
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_captures_and_replays_a_step(n_params, dtype):
    _skip_unless_kernels("cuda")
    params, twins, grads = _graph_case(n_params, dtype)
    lr = torch.tensor(1e-2, dtype=torch.float64, device="cuda")
    opt = FusedAdamW(params, lr=lr, weight_decay=0.1, capturable=True)
    eager = FusedAdamW(twins, lr=1e-2, weight_decay=0.1)
    lrs = [1e-2, 5e-3, 2e-3, 1e-3, 5e-4]

    def put_grads(ps, k):
        for p, g in zip(ps, grads[k]):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)  # the graph reads these very tensors

    put_grads(params, 0)
    opt.step()  # warm-up: creates the state outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for k in range(1, 5):
        put_grads(params, k)
        lr.fill_(lrs[k])
        graph.replay()
    for k in range(5):
        put_grads(twins, k)
        eager.param_groups[0]["lr"] = lrs[k]
        eager.step()
    torch.cuda.synchronize()
    for p, q in zip(params, twins):
        assert torch.equal(p, q)
        for key, v in eager.state[q].items():
            assert torch.equal(opt.state[p][key], v), key
    assert float(opt.state[params[0]]["step"]) == 5.0


@requires_cuda
def test_cuda_graph_capture_needs_state_and_capturable():
    _skip_unless_kernels("cuda")
    params, _, grads = _graph_case(2, torch.float32)
    for p, g in zip(params, grads[0]):
        p.grad = g
    fresh = FusedAdamW(params, capturable=True)
    with torch.cuda.graph(torch.cuda.CUDAGraph()):  # refused before anything is enqueued
        with pytest.raises(RuntimeError, match="take the same step once outside the graph first"):
            fresh.step()
    plain = FusedAdamW(params)
    plain.step()
    with torch.cuda.graph(torch.cuda.CUDAGraph()):
        with pytest.raises(RuntimeError, match="without capturable=True"):
            plain.step()
    assert float(plain.state[params[0]]["step"]) == 1.0


# --------------------------------------------------------------------------- the launch plan, on any machine
def _check_plan(numels, capturing):
    from hift_ext import _C

    launches = _C._launch_plan(numels, capturing)
    nonempty = [i for i, n in enumerate(numels) if n > 0]
    if launches is None:  # one launch over a device table: long lists outside capture only
        assert len(nonempty) > _C._INLINE_TENSORS and not capturing
        return None
    chunks = lambda n: -(-n // _C._CHUNK)  # noqa: E731
    covered = [pair for launch in launches for pair in launch]
    # every chunk of every non-empty tensor exactly once, in order; never an empty tensor
    assert covered == [(i, c) for i in nonempty for c in range(chunks(numels[i]))]
    for launch in launches:
        assert 0 < len({i for i, _ in launch}) <= _C._INLINE_TENSORS
    return launches


@pytest.mark.parametrize("capturing", [False, True])
def test_launch_plan_covers_every_chunk_once(capturing):
    from hift_ext import _C

    g = torch.Generator().manual_seed(0)
    cases = [
        [1], [0], [0, 0, 5], [_C._CHUNK], [_C._CHUNK + 1, 3 * _C._CHUNK, 7],
        [3] * _C._INLINE_TENSORS, [3] * (_C._INLINE_TENSORS + 1), [0] * 50 + [9] * 40,
        [int(n) for n in torch.randint(0, 3 * _C._CHUNK, (150,), generator=g)],
    ]
    for numels in cases:
        launches = _check_plan(numels, capturing)
        n_nonempty = sum(1 for n in numels if n > 0)
        if capturing or n_nonempty <= _C._INLINE_TENSORS:
            assert len(launches) == -(-n_nonempty // _C._INLINE_TENSORS)
        else:
            assert launches is None
