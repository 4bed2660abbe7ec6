"""Fused optimizer ops with fp32 master weights (``master_params=``): the mixed-precision variant.

With masters, param i is bf16/fp16/fp32, grad i has the param's dtype, the states and the master
are fp32. The update is today's fp32 math run on the master, so each test pins three facts:

* masters and states are BITWISE equal to the plain fp32 op run on an fp32 copy of the master with
  ``grad.float()`` (same update.h math, only the loads and stores differ);
* they match torch.optim's single-tensor (foreach=False) fp32 path at the tolerance of the plain
  fp32 tests in test_ops.py (the fused kernels and torch differ by the order of a few roundings);
* params are bitwise ``master.to(param.dtype)`` (round to nearest even) and are never read.
"""
from __future__ import annotations

import pytest
import torch

import hift_ext
from hift_ext import ops

SIZES = [1, 7, 4099, 65540]
MASTER_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
FP32_TOL = dict(rtol=1e-5, atol=1e-6)
ADAMW_KW = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8)


def _skip_unless_kernels(device: str) -> None:
    if device == "cuda" and not hift_ext.has_cuda_kernels():
        pytest.skip("hift_ext was built without CUDA kernels")


def _steps(n, value, device):
    return [torch.tensor(float(value), device=device) for _ in range(n)]


def _clones(ts):
    return [t.clone() for t in ts]


def _equal(actual, expected, what=""):
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and torch.equal(a.cpu(), e.cpu()), f"{what}[{i}] differs"


def _close(actual, expected):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.cpu(), e.detach().cpu(), **FP32_TOL)


def _params_from(masters, dtypes):
    """Params holding garbage: with masters they are written, never read."""
    return [torch.full_like(m, float("nan"), dtype=dt) for m, dt in zip(masters, dtypes)]


def _check_params(params, masters):
    _equal(params, [m.to(p.dtype) for m, p in zip(masters, params)], "params vs master.to(dtype)")


# --------------------------------------------------------------------------- AdamW
@pytest.mark.parametrize("dtype", MASTER_DTYPES)
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_master_adamw_matches_torch_optim(device, dtype, amsgrad, maximize, weight_decay):
    _skip_unless_kernels(device)
    ref = [torch.nn.Parameter(torch.randn(n)) for n in SIZES]
    opt = torch.optim.AdamW(ref, lr=ADAMW_KW["lr"], betas=(ADAMW_KW["beta1"], ADAMW_KW["beta2"]),
                            eps=ADAMW_KW["eps"], weight_decay=weight_decay, amsgrad=amsgrad,
                            maximize=maximize, foreach=False)
    masters = [p.detach().clone().to(device) for p in ref]
    params = _params_from(masters, [dtype] * len(SIZES))
    ms, vs = ([torch.zeros_like(m) for m in masters] for _ in range(2))
    xs = [torch.zeros_like(m) for m in masters] if amsgrad else []
    steps = _steps(len(SIZES), 0, device)
    kw = dict(ADAMW_KW, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
    for _ in range(3):
        grads = [torch.randn(n).to(device=device, dtype=dtype) for n in SIZES]
        for p, g in zip(ref, grads):
            p.grad = g.float().cpu()
        opt.step()
        for s in steps:
            s += 1
        # The plain fp32 op on copies: the bitwise reference for masters and states.
        w32, m32, v32, x32 = _clones(masters), _clones(ms), _clones(vs), _clones(xs)
        ops.fused_adamw_(w32, [g.float() for g in grads], m32, v32, x32, steps, **kw)
        ops.fused_adamw_(params, grads, ms, vs, xs, steps, master_params=masters, **kw)
        _equal(masters, w32, "masters")
        _equal(ms, m32, "exp_avgs")
        _equal(vs, v32, "exp_avg_sqs")
        _equal(xs, x32, "max_exp_avg_sqs")
        _check_params(params, masters)
        _close(masters, ref)
        _close(ms, [opt.state[p]["exp_avg"] for p in ref])
        _close(vs, [opt.state[p]["exp_avg_sq"] for p in ref])
        if amsgrad:
            _close(xs, [opt.state[p]["max_exp_avg_sq"] for p in ref])


# --------------------------------------------------------------------------- AdaGrad
@pytest.mark.parametrize("dtype", MASTER_DTYPES)
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("weight_decay,lr_decay,init_acc", [(0.0, 0.0, 0.0), (0.1, 0.01, 0.1)])
def test_master_adagrad_matches_torch_optim(device, dtype, maximize, weight_decay, lr_decay, init_acc):
    _skip_unless_kernels(device)
    ref = [torch.nn.Parameter(torch.randn(n)) for n in SIZES]
    opt = torch.optim.Adagrad(ref, lr=1e-2, lr_decay=lr_decay, weight_decay=weight_decay,
                              initial_accumulator_value=init_acc, eps=1e-10, foreach=False, maximize=maximize)
    masters = [p.detach().clone().to(device) for p in ref]
    params = _params_from(masters, [dtype] * len(SIZES))
    sums = [torch.full_like(m, init_acc) for m in masters]
    steps = _steps(len(SIZES), 0, device)
    kw = dict(lr=1e-2, lr_decay=lr_decay, weight_decay=weight_decay, eps=1e-10, maximize=maximize)
    for _ in range(3):
        grads = [torch.randn(n).to(device=device, dtype=dtype) for n in SIZES]
        for p, g in zip(ref, grads):
            p.grad = g.float().cpu()
        opt.step()
        for s in steps:
            s += 1
        w32, s32 = _clones(masters), _clones(sums)
        ops.fused_adagrad_(w32, [g.float() for g in grads], s32, steps, **kw)
        ops.fused_adagrad_(params, grads, sums, steps, master_params=masters, **kw)
        _equal(masters, w32, "masters")
        _equal(sums, s32, "state_sums")
        _check_params(params, masters)
        _close(masters, ref)
        _close(sums, [opt.state[p]["sum"] for p in ref])


# --------------------------------------------------------------------------- SGD
@pytest.mark.parametrize("dtype", MASTER_DTYPES)
@pytest.mark.parametrize(
    "momentum,dampening,nesterov", [(0.0, 0.0, False), (0.9, 0.0, False), (0.9, 0.1, False), (0.9, 0.0, True)]
)
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_master_sgd_matches_torch_optim(device, dtype, momentum, dampening, nesterov, maximize, weight_decay):
    _skip_unless_kernels(device)
    ref = [torch.nn.Parameter(torch.randn(n)) for n in SIZES]
    opt = torch.optim.SGD(ref, lr=1e-2, momentum=momentum, dampening=dampening, nesterov=nesterov,
                          weight_decay=weight_decay, maximize=maximize, foreach=False)
    masters = [p.detach().clone().to(device) for p in ref]
    params = _params_from(masters, [dtype] * len(SIZES))
    # Garbage in the fresh buffers: the first step must overwrite them without reading.
    bufs = [torch.full_like(m, float("nan")) for m in masters] if momentum else []
    kw = dict(lr=1e-2, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay,
              maximize=maximize)
    for step in range(3):
        grads = [torch.randn(n).to(device=device, dtype=dtype) for n in SIZES]
        for p, g in zip(ref, grads):
            p.grad = g.float().cpu()
        opt.step()
        w32, b32 = _clones(masters), _clones(bufs)
        ops.fused_sgd_(w32, [g.float() for g in grads], b32, is_first_step=step == 0, **kw)
        ops.fused_sgd_(params, grads, bufs, is_first_step=step == 0, master_params=masters, **kw)
        _equal(masters, w32, "masters")
        _equal(bufs, b32, "momentum_buffers")
        _check_params(params, masters)
        _close(masters, ref)
        if momentum:
            _close(bufs, [opt.state[p]["momentum_buffer"] for p in ref])


# --------------------------------------------------------------------------- one call, many dtypes
MIXED = [(4099, torch.float32), (65540, torch.bfloat16), (3, torch.float16), (0, torch.bfloat16),
         (1, torch.bfloat16), (8, torch.float16), (131072 + 5, torch.bfloat16), (65537, torch.float16)]


@pytest.mark.parametrize("op", ["adamw", "adagrad", "sgd"])
def test_master_mixed_dtypes_and_sizes_in_one_call(device, op):
    """bf16, fp16 and fp32 params (incl. empty and multi-chunk ones) in ONE call, two steps."""
    _skip_unless_kernels(device)
    masters = [torch.randn(n, device=device) for n, _ in MIXED]
    params = _params_from(masters, [dt for _, dt in MIXED])
    states = [[torch.rand_like(m) * 0.1 for m in masters] for _ in range(3)]
    for step in (1, 2):
        grads = [torch.randn(n).to(device=device, dtype=dt) for n, dt in MIXED]
        g32 = [g.float() for g in grads]
        w32, s32 = _clones(masters), [_clones(s) for s in states]
        steps = _steps(len(MIXED), step, device)
        if op == "adamw":
            kw = dict(lr=1e-3, beta1=0.8, beta2=0.95, weight_decay=0.05, eps=1e-6, amsgrad=True, maximize=True)
            ops.fused_adamw_(w32, g32, *s32, steps, **kw)
            ops.fused_adamw_(params, grads, *states, steps, master_params=masters, **kw)
            n_states = 3
        elif op == "adagrad":
            kw = dict(lr=1e-2, lr_decay=0.01, weight_decay=0.01, eps=1e-10, maximize=False)
            ops.fused_adagrad_(w32, g32, s32[0], steps, **kw)
            ops.fused_adagrad_(params, grads, states[0], steps, master_params=masters, **kw)
            n_states = 1
        else:
            kw = dict(lr=1e-2, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.01, maximize=False,
                      is_first_step=step == 1)
            ops.fused_sgd_(w32, g32, s32[0], **kw)
            ops.fused_sgd_(params, grads, states[0], master_params=masters, **kw)
            n_states = 1
        _equal(masters, w32, "masters")
        for k in range(n_states):
            _equal(states[k], s32[k], f"states{k}")
        _check_params(params, masters)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_master_misaligned_views(device, dtype):
    """Contiguous views at an odd offset take the scalar path of the CUDA kernel."""
    _skip_unless_kernels(device)
    n = 5000
    master = torch.randn(n + 1, device=device)[1:]
    param = torch.empty(n + 1, device=device, dtype=dtype)[1:]
    grad = torch.randn(n + 1).to(device=device, dtype=dtype)[1:]
    m, v = (torch.zeros(n + 1, device=device)[1:] for _ in range(2))
    w32, m32, v32 = master.clone(), m.clone(), v.clone()
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8, amsgrad=False, maximize=False)
    ops.fused_adamw_([w32], [grad.float()], [m32], [v32], [], _steps(1, 1, device), **kw)
    ops.fused_adamw_([param], [grad], [m], [v], [], _steps(1, 1, device), master_params=[master], **kw)
    _equal([master, m, v], [w32, m32, v32], "aligned vs misaligned")
    _check_params([param], [master])


# --------------------------------------------------------------------------- AMP: grad_scale / found_inf
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", ["adamw", "adagrad", "sgd"])
def test_master_grad_scale_unscales_in_registers(device, dtype, op):
    """Scaled low-precision grads + grad_scale == unscaled grads, bitwise (power-of-two scale)."""
    _skip_unless_kernels(device)
    scale = 1024.0
    masters = [torch.randn(n, device=device) for n in SIZES]
    grads = [torch.randn(n).to(device=device, dtype=dtype) for n in SIZES]
    scaled = [(g.float() * scale).to(dtype) for g in grads]
    before = _clones(scaled)
    states = [[torch.rand_like(m) * 0.1 for m in masters] for _ in range(2)]
    runs = []
    for gs, extra in ((grads, {}), (scaled, dict(grad_scale=torch.tensor(scale, device=device),
                                                 found_inf=torch.tensor(0.0, device=device)))):
        w, p, st = _clones(masters), _params_from(masters, [dtype] * len(SIZES)), [_clones(s) for s in states]
        steps = _steps(len(SIZES), 3, device)
        if op == "adamw":
            ops.fused_adamw_(p, gs, st[0], st[1], [], steps, lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.01,
                             eps=1e-8, amsgrad=False, maximize=False, master_params=w, **extra)
        elif op == "adagrad":
            ops.fused_adagrad_(p, gs, st[0], steps, lr=1e-2, lr_decay=0.0, weight_decay=0.01, eps=1e-10,
                               maximize=False, master_params=w, **extra)
        else:
            ops.fused_sgd_(p, gs, st[0], lr=1e-2, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.01,
                           maximize=False, is_first_step=False, master_params=w, **extra)
        runs.append((w, p, st))
    (w0, p0, s0), (w1, p1, s1) = runs
    _equal(w1, w0, "masters")
    _equal(p1, p0, "params")
    _equal(s1[0], s0[0], "states")
    _equal(s1[1], s0[1], "states")
    _equal(scaled, before, "grads (never written)")


@pytest.mark.parametrize("op", ["adamw", "adagrad", "sgd"])
def test_master_found_inf_skips_everything(device, op):
    _skip_unless_kernels(device)
    masters = [torch.randn(n, device=device) for n in SIZES]
    params = [m.to(torch.bfloat16) for m in masters]
    grads = [torch.randn(n).to(device=device, dtype=torch.bfloat16) for n in SIZES]
    ms, vs = ([torch.rand_like(m) for m in masters] for _ in range(2))
    everything = [*masters, *params, *grads, *ms, *vs]
    before = _clones(everything)
    inf = torch.tensor(float("inf"), device=device)
    scale = torch.tensor(2.0, device=device)
    steps = _steps(len(SIZES), 2, device)
    common = dict(master_params=masters, grad_scale=scale, found_inf=inf)
    if op == "adamw":
        ops.fused_adamw_(params, grads, ms, vs, [], steps, lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.1,
                         eps=1e-8, amsgrad=False, maximize=False, **common)
    elif op == "adagrad":
        ops.fused_adagrad_(params, grads, ms, steps, lr=1e-2, lr_decay=0.0, weight_decay=0.1, eps=1e-10,
                           maximize=False, **common)
    else:
        ops.fused_sgd_(params, grads, ms, lr=1e-2, momentum=0.9, dampening=0.0, nesterov=False,
                       weight_decay=0.1, maximize=False, is_first_step=True, **common)
    _equal(everything, before, "untouched")


def test_master_version_counters_are_bumped():
    masters = [torch.randn(n) for n in (5, 9)]
    params = [m.half() for m in masters]
    grads = [torch.randn(n).half() for n in (5, 9)]
    bufs = [torch.zeros_like(m) for m in masters]
    mutated = [*params, *masters, *bufs]
    v0 = [t._version for t in mutated]
    ops.fused_sgd_(params, grads, bufs, lr=1e-2, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0,
                   maximize=False, is_first_step=True, master_params=masters)
    assert all(t._version > v for t, v in zip(mutated, v0))
    assert all(g._version == 0 for g in grads)


def test_master_fp32_params_equal_plain_fp32_op():
    """fp32 params with fp32 masters: the param becomes an exact copy of the updated master."""
    masters = [torch.randn(n) for n in SIZES]
    params = _params_from(masters, [torch.float32] * len(SIZES))
    grads = [torch.randn(n) for n in SIZES]
    ms, vs = ([torch.zeros_like(m) for m in masters] for _ in range(2))
    ref = _clones(masters)
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8, amsgrad=False, maximize=False)
    ops.fused_adamw_(ref, grads, _clones(ms), _clones(vs), [], _steps(len(SIZES), 1, "cpu"), **kw)
    ops.fused_adamw_(params, grads, ms, vs, [], _steps(len(SIZES), 1, "cpu"), master_params=masters, **kw)
    _equal(params, ref, "params")
    _equal(masters, ref, "masters")


# --------------------------------------------------------------------------- opcheck / compile
def _master_opcheck_cases(device):
    sizes = (5, 33)
    dts = (torch.bfloat16, torch.float16)

    def lowp():
        return [torch.randn(n, device=device).to(dt) for n, dt in zip(sizes, dts)]

    def fp32(positive=False):
        ts = [torch.randn(n, device=device) for n in sizes]
        return [t.abs() for t in ts] if positive else ts

    yield torch.ops.hift_ext.fused_adamw_.default, (lowp(), lowp(), fp32(), fp32(True), fp32(True),
                                                    _steps(2, 3, device)), dict(
        lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8, amsgrad=True, maximize=False,
        master_params=fp32(), grad_scale=torch.tensor(2.0, device=device), found_inf=torch.tensor(0.0, device=device))
    yield torch.ops.hift_ext.fused_adagrad_.default, (lowp(), lowp(), fp32(True), _steps(2, 2, device)), dict(
        lr=1e-2, lr_decay=0.01, weight_decay=0.0, eps=1e-10, maximize=True, master_params=fp32())
    yield torch.ops.hift_ext.fused_sgd_.default, (lowp(), lowp(), fp32()), dict(
        lr=1e-2, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.01, maximize=False, is_first_step=False,
        master_params=fp32())


def test_master_opcheck(device):
    _skip_unless_kernels(device)
    for op, args, kwargs in _master_opcheck_cases(device):
        torch.library.opcheck(op, args, kwargs)


def test_master_torch_compile_fullgraph():
    sizes = [10, 3]
    masters = [torch.randn(n) for n in sizes]
    params = [m.bfloat16() for m in masters]
    grads = [torch.randn(n).bfloat16() for n in sizes]
    ms, vs = ([torch.rand(n) for n in sizes] for _ in range(2))
    s = _steps(2, 2, "cpu")
    p2, w2, m2, v2 = (_clones(lst) for lst in (params, masters, ms, vs))

    def f(p, g, m, v, s, w):
        ops.fused_adamw_(p, g, m, v, [], s, lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8,
                         amsgrad=False, maximize=False, master_params=w)

    torch.compile(f, fullgraph=True)(params, grads, ms, vs, s, masters)
    f(p2, grads, m2, v2, s, w2)
    _equal(params + masters + ms + vs, p2 + w2 + m2 + v2, "compiled vs eager")


# --------------------------------------------------------------------------- bad input
def _good(n=2, size=8, dtype=torch.bfloat16):
    params = [torch.randn(size).to(dtype) for _ in range(n)]
    grads = [torch.randn(size).to(dtype) for _ in range(n)]
    ms, vs, masters = ([torch.randn(size) for _ in range(n)] for _ in range(3))
    return params, grads, ms, vs, _steps(n, 1, "cpu"), masters


def _adamw(p, g, m, v, s, w, xs=(), amsgrad=False):
    ops.fused_adamw_(p, g, m, v, list(xs), s, lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8,
                     amsgrad=amsgrad, maximize=False, master_params=w)


def test_error_master_list_length():
    p, g, m, v, s, w = _good()
    with pytest.raises(RuntimeError, match=r"master_params has 1 tensors but params has 2"):
        _adamw(p, g, m, v, s, w[:1])
    with pytest.raises(RuntimeError, match=r"list #\d has 1 tensors but params has 0"):
        ops.fused_sgd_([], [], [], lr=1.0, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
                       maximize=False, is_first_step=True, master_params=w[:1])


def test_error_master_dtype_shape_layout_device():
    p, g, m, v, s, w = _good()
    w[1] = w[1].to(torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"master_params\[1\] has dtype BFloat16 but must be Float "
                                           r"\(master weights are float32\)"):
        _adamw(p, g, m, v, s, w)
    p, g, m, v, s, w = _good()
    w[0] = torch.randn(9)
    with pytest.raises(RuntimeError, match=r"master_params\[0\] has shape \[9\] but params\[0\] has shape \[8\]"):
        _adamw(p, g, m, v, s, w)
    p, g, m, v, s, w = _good()
    w[1] = torch.randn(16)[::2]
    with pytest.raises(RuntimeError, match=r"master_params\[1\] is not contiguous"):
        _adamw(p, g, m, v, s, w)
    p, g, m, v, s, w = _good()
    w[0] = torch.empty(8, device="meta")
    with pytest.raises(RuntimeError, match=r"master_params\[0\] is on meta but params\[0\] is on cpu"):
        _adamw(p, g, m, v, s, w)


def test_error_master_states_must_be_fp32():
    p, g, m, v, s, w = _good()
    m[1] = m[1].to(torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"exp_avgs\[1\] has dtype BFloat16 but must be Float "
                                           r"\(with master_params, optimizer states are float32"):
        _adamw(p, g, m, v, s, w)
    p, g, m, v, s, w = _good()
    with pytest.raises(RuntimeError, match=r"max_exp_avg_sqs\[0\] has dtype BFloat16 but must be Float"):
        _adamw(p, g, m, v, s, w, xs=[t.bfloat16() for t in m], amsgrad=True)
    p, g, m, v, s, w = _good()
    with pytest.raises(RuntimeError, match=r"state_sums\[0\] has dtype Half but must be Float"):
        ops.fused_adagrad_(p, g, [t.half() for t in m], s, lr=1e-2, lr_decay=0.0, weight_decay=0.0, eps=1e-10,
                           maximize=False, master_params=w)
    with pytest.raises(RuntimeError, match=r"momentum_buffers\[0\] has dtype BFloat16 but must be Float"):
        ops.fused_sgd_(p, g, [t.bfloat16() for t in m], lr=1e-2, momentum=0.9, dampening=0.0, nesterov=False,
                       weight_decay=0.0, maximize=False, is_first_step=False, master_params=w)


def test_error_master_grads_keep_param_dtype():
    p, g, m, v, s, w = _good()
    g[0] = g[0].float()
    with pytest.raises(RuntimeError, match=r"grads\[0\] has dtype Float but params\[0\] has dtype BFloat16 "
                                           r"\(with master_params, a grad keeps its param's dtype\)"):
        _adamw(p, g, m, v, s, w)


def test_error_master_requires_grad_in_grad_mode():
    p, g, m, v, s, w = _good()
    w[0].requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"master_params require grad .* torch.no_grad\(\)"):
        _adamw(p, g, m, v, s, w)
    with torch.no_grad():
        _adamw(p, g, m, v, s, w)


def test_states_stay_in_param_dtype_without_masters():
    """No masters: today's contract (states share the param's dtype) still holds."""
    p, g, m, v, s, _ = _good()
    with pytest.raises(RuntimeError, match=r"exp_avgs\[0\] has dtype Float but params\[0\] has dtype BFloat16 "
                                           r"\(a parameter's grad and states share its dtype\)"):
        _adamw(p, g, m, v, s, [])


# --------------------------------------------------------------------------- portable CPU kernels
_GENERIC_MASTER_CHECK = r"""
import torch
from hift_ext import _ext, ops
assert _ext._C.cpu_kernel_isa() == "generic", _ext._C.cpu_kernel_isa()
torch.manual_seed(0)
sizes = [1, 7, 4099, 65540]
for dtype in (torch.bfloat16, torch.float16):
    for ams in (False, True):
        w = [torch.randn(n) for n in sizes]
        p = [torch.full((n,), float("nan")).to(dtype) for n in sizes]
        g = [torch.randn(n).to(dtype) for n in sizes]
        m, v, x = ([torch.zeros(n) for n in sizes] for _ in range(3))
        w2, m2, v2, x2 = ([t.clone() for t in l] for l in (w, m, v, x))
        kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8, amsgrad=ams, maximize=True)
        s = [torch.tensor(1.0) for _ in p]
        ops.fused_adamw_(w2, [t.float() for t in g], m2, v2, x2 if ams else [], s, **kw)
        ops.fused_adamw_(p, g, m, v, x if ams else [], s, master_params=w, **kw)
        for a, b in zip(w + m + v + x + p, w2 + m2 + v2 + x2 + [t.to(dtype) for t in w]):
            assert torch.equal(a, b)
    w = [torch.randn(n) for n in sizes]; p = [t.to(dtype) for t in w]; g = [torch.randn(n).to(dtype) for n in sizes]
    b = [torch.empty(n) for n in sizes]; w2 = [t.clone() for t in w]; b2 = [t.clone() for t in b]
    kw = dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.01, maximize=False, is_first_step=True)
    ops.fused_sgd_(w2, [t.float() for t in g], b2, **kw)
    ops.fused_sgd_(p, g, b, master_params=w, **kw)
    for a, c in zip(w + b + p, w2 + b2 + [t.to(dtype) for t in w]):
        assert torch.equal(a, c)
    w = [torch.randn(n) for n in sizes]; p = [t.to(dtype) for t in w]; g = [torch.randn(n).to(dtype) for n in sizes]
    sm = [torch.full((n,), 0.1) for n in sizes]; w2 = [t.clone() for t in w]; sm2 = [t.clone() for t in sm]
    kw = dict(lr=0.1, lr_decay=0.01, weight_decay=0.01, eps=1e-10, maximize=False)
    ops.fused_adagrad_(w2, [t.float() for t in g], sm2, [torch.tensor(2.0) for _ in w], **kw)
    ops.fused_adagrad_(p, g, sm, [torch.tensor(2.0) for _ in w], master_params=w, **kw)
    for a, c in zip(w + sm + p, w2 + sm2 + [t.to(dtype) for t in w]):
        assert torch.equal(a, c)
print("ok")
"""


def test_master_portable_cpu_kernels_match():
    """The generic (non-AVX2) CPU kernels with masters, forced with HIFT_EXT_CPU_ISA=generic."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HIFT_EXT_CPU_ISA": "generic"}
    out = subprocess.run([sys.executable, "-c", _GENERIC_MASTER_CHECK], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, out.stdout + out.stderr


# --------------------------------------------------------------------------- CPU: one code path per element
@pytest.mark.parametrize("master", [False, True])
def test_cpu_result_independent_of_thread_split(master):
    """Tails (tensor ends, and a thread's share ending mid-vector) run the same SIMD step as the body
    on padded copies, so every element's bits are independent of the thread count. (A scalar tail
    used to differ in the last bits: GCC fuses a*b+c into FMAs differently in scalar code.)"""
    sizes = [7, 100003, 33, 65541]
    dt = torch.bfloat16 if master else torch.float32
    grads = [torch.randn(n).to(dt) for n in sizes]
    init = [torch.randn(n) for n in sizes]
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1, eps=1e-8, amsgrad=True, maximize=False)
    results = []
    threads = torch.get_num_threads()
    try:
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            w = _clones(init)
            p = [t.to(dt) for t in w]
            m, v, x = ([torch.full((n,), 0.01).to(torch.float32 if master else dt) for n in sizes] for _ in range(3))
            for step in (1, 2):
                ops.fused_adamw_(p, grads, m, v, x, _steps(len(sizes), step, "cpu"),
                                 master_params=w if master else (), **kw)
            results.append(p + m + v + x + (w if master else []))
    finally:
        torch.set_num_threads(threads)
    _equal(results[1], results[0], "2 threads vs 1")
    _equal(results[2], results[0], "3 threads vs 1")
