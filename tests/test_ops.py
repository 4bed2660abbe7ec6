"""Fused optimizer ops (torch.ops.hift_ext.*): parity with torch.optim, dtypes, sizes, AMP
arguments, opcheck, and a clear error for every bad input.

Tolerances: fp32 results are compared with torch.optim at fp32 rounding (the fused kernel and
torch's single-tensor path differ only in the order of a few fp32 roundings). bf16/fp16 are
compared with a reference that does the same update in fp32 on upcast copies and rounds back, so
at most one rounding step of the storage dtype separates the two.
"""
from __future__ import annotations

import pytest
import torch
from torch.optim import adam as torch_adam
from torch.optim import adagrad as torch_adagrad
from torch.optim import sgd as torch_sgd

import hift_ext
from hift_ext import ops

SIZES = [1, 3, 4097, 65537]
LOW = [torch.bfloat16, torch.float16]
FP32_TOL = dict(rtol=1e-5, atol=1e-6)


def _skip_unless_kernels(device: str) -> None:
    if device == "cuda" and not hift_ext.has_cuda_kernels():
        pytest.skip("hift_ext was built without CUDA kernels")


def _tol(dtype):
    return FP32_TOL if dtype == torch.float32 else {}  # {}: assert_close's bf16/fp16 defaults


def _rand(sizes, dtype, device, positive=False):
    ts = [torch.randn(n, dtype=torch.float32) for n in sizes]
    if positive:
        ts = [t.abs() * 1e-2 for t in ts]
    return [t.to(dtype=dtype, device=device) for t in ts]


def _steps(n, value, device):
    return [torch.tensor(float(value), device=device) for _ in range(n)]


# --------------------------------------------------------------------------- fp32 references
def ref_adamw(params, grads, ms, vs, xs, step, *, amsgrad, **kw):
    """One torch.optim AdamW step (single-tensor path) in fp32 on CPU copies, cast back."""
    f = lambda ts: [t.detach().float().cpu().clone() for t in ts]  # noqa: E731
    P, G, M, V, X = f(params), f(grads), f(ms), f(vs), f(xs)
    S = [torch.tensor(float(step - 1)) for _ in params]  # the functional API increments them
    torch_adam.adam(P, G, M, V, X, S, foreach=False, decoupled_weight_decay=True, amsgrad=amsgrad, **kw)
    back = lambda ts, like: [t.to(l.dtype) for t, l in zip(ts, like)]  # noqa: E731
    return back(P, params), back(M, ms), back(V, vs), back(X, xs)


def ref_adagrad(params, grads, sums, step, **kw):
    f = lambda ts: [t.detach().float().cpu().clone() for t in ts]  # noqa: E731
    P, G, Sm = f(params), f(grads), f(sums)
    S = [torch.tensor(float(step - 1)) for _ in params]
    torch_adagrad.adagrad(P, G, Sm, S, foreach=False, **kw)
    return [t.to(p.dtype) for t, p in zip(P, params)], [t.to(s.dtype) for t, s in zip(Sm, sums)]


def ref_sgd(params, grads, bufs, *, first, momentum, **kw):
    f = lambda ts: [t.detach().float().cpu().clone() for t in ts]  # noqa: E731
    P, G = f(params), f(grads)
    B = [None] * len(params) if (first or momentum == 0) else f(bufs)
    torch_sgd.sgd(P, G, B, foreach=False, momentum=momentum, **kw)
    outB = [b.to(p.dtype) for b, p in zip(B, params)] if momentum != 0 else []
    return [t.to(p.dtype) for t, p in zip(P, params)], outB


def _close(actual, expected, dtype=torch.float32):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.cpu(), e.cpu(), **_tol(dtype))


# --------------------------------------------------------------------------- AdamW
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_matches_torch_optim_fp32(device, amsgrad, maximize, weight_decay):
    """Several steps of FusedAdamW math vs the torch.optim.AdamW class on a list of odd sizes."""
    _skip_unless_kernels(device)
    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
    ref = [torch.nn.Parameter(torch.randn(n)) for n in SIZES]
    opt = torch.optim.AdamW(ref, foreach=False, **hp)
    params = [p.detach().clone().to(device) for p in ref]
    ms = [torch.zeros_like(p) for p in params]
    vs = [torch.zeros_like(p) for p in params]
    xs = [torch.zeros_like(p) for p in params] if amsgrad else []
    steps = _steps(len(params), 0, device)
    for _ in range(4):
        grads = [torch.randn(n) for n in SIZES]
        for p, g in zip(ref, grads):
            p.grad = g.clone()
        opt.step()
        for s in steps:
            s += 1
        ops.fused_adamw_(params, [g.to(device) for g in grads], ms, vs, xs, steps, lr=1e-2, beta1=0.9,
                         beta2=0.99, weight_decay=weight_decay, eps=1e-8, amsgrad=amsgrad, maximize=maximize)
        _close(params, [p.detach() for p in ref])
        _close(ms, [opt.state[p]["exp_avg"] for p in ref])
        _close(vs, [opt.state[p]["exp_avg_sq"] for p in ref])
        if amsgrad:
            _close(xs, [opt.state[p]["max_exp_avg_sq"] for p in ref])


@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adamw_dtypes_vs_fp32_math(device, dtype, amsgrad):
    """Each step from the same state: ours vs the fp32-math reference rounded to the dtype."""
    _skip_unless_kernels(device)
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8, maximize=False)
    params = _rand(SIZES, dtype, device)
    ms = [torch.zeros_like(p) for p in params]
    vs = [torch.zeros_like(p) for p in params]
    xs = [torch.zeros_like(p) for p in params] if amsgrad else []
    for step in range(1, 4):
        grads = _rand(SIZES, dtype, device)
        exp = ref_adamw(params, grads, ms, vs, xs, step, amsgrad=amsgrad, **kw)
        ops.fused_adamw_(params, grads, ms, vs, xs, _steps(len(params), step, device), amsgrad=amsgrad, **kw)
        for got, want in zip((params, ms, vs, xs), exp):
            _close(got, want, dtype)


def test_adamw_mixed_dtypes_and_sizes_in_one_call(device):
    _skip_unless_kernels(device)
    kw = dict(lr=1e-3, beta1=0.8, beta2=0.95, weight_decay=0.05, eps=1e-6, maximize=True)
    specs = [(4097, torch.float32), (65537, torch.bfloat16), (3, torch.float16), (0, torch.float32),
             (1, torch.bfloat16), (8, torch.float32), (131072 + 5, torch.float32)]
    params = [torch.randn(n).to(device=device, dtype=dt) for n, dt in specs]
    grads = [torch.randn(n).to(device=device, dtype=dt) for n, dt in specs]
    ms = [torch.randn_like(p) * 0.1 for p in params]
    vs = [torch.rand_like(p) * 0.1 for p in params]
    exp = ref_adamw(params, grads, ms, vs, [], 7, amsgrad=False, **kw)
    ops.fused_adamw_(params, grads, ms, vs, [], _steps(len(params), 7, device), amsgrad=False, **kw)
    for got, want in zip((params, ms, vs), exp):
        for g, w, (_, dt) in zip(got, want, specs):
            torch.testing.assert_close(g.cpu(), w, **_tol(dt))


def test_many_small_tensors_one_call(device):
    """300 tensors of random sizes (incl. empty) in one call: the flat parallel split is exact."""
    _skip_unless_kernels(device)
    g = torch.Generator().manual_seed(1)
    sizes = [int(x) for x in torch.randint(0, 3000, (300,), generator=g)] + [0, 0, 70000]
    params = _rand(sizes, torch.float32, device)
    grads = _rand(sizes, torch.float32, device)
    ms = [torch.zeros_like(p) for p in params]
    vs = [torch.zeros_like(p) for p in params]
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, maximize=False)
    exp = ref_adamw(params, grads, ms, vs, [], 1, amsgrad=False, **kw)
    ops.fused_adamw_(params, grads, ms, vs, [], _steps(len(params), 1, device), amsgrad=False, **kw)
    _close(params, exp[0])
    _close(vs, exp[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_misaligned_views(device, dtype):
    """Contiguous views at an odd offset take the scalar path of the CUDA kernel."""
    _skip_unless_kernels(device)
    n = 5000
    bases = [torch.randn(n + 1).to(device=device, dtype=dtype) for _ in range(4)]
    p, g, m, v = (b[1:] for b in bases)
    m.zero_()
    v.zero_()
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8, maximize=False)
    exp = ref_adamw([p], [g], [m], [v], [], 1, amsgrad=False, **kw)
    ops.fused_adamw_([p], [g], [m], [v], [], _steps(1, 1, device), amsgrad=False, **kw)
    _close([p, m, v], [exp[0][0], exp[1][0], exp[2][0]], dtype)


# --------------------------------------------------------------------------- AdaGrad
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("weight_decay,lr_decay,init_acc", [(0.0, 0.0, 0.0), (0.1, 0.01, 0.1)])
def test_adagrad_matches_torch_optim_fp32(device, maximize, weight_decay, lr_decay, init_acc):
    _skip_unless_kernels(device)
    ref = [torch.nn.Parameter(torch.randn(n)) for n in SIZES]
    opt = torch.optim.Adagrad(ref, lr=1e-2, lr_decay=lr_decay, weight_decay=weight_decay,
                              initial_accumulator_value=init_acc, eps=1e-10, foreach=False, maximize=maximize)
    params = [p.detach().clone().to(device) for p in ref]
    sums = [torch.full_like(p, init_acc) for p in params]
    steps = _steps(len(params), 0, device)
    for _ in range(4):
        grads = [torch.randn(n) for n in SIZES]
        for p, g in zip(ref, grads):
            p.grad = g.clone()
        opt.step()
        for s in steps:
            s += 1
        ops.fused_adagrad_(params, [g.to(device) for g in grads], sums, steps, lr=1e-2, lr_decay=lr_decay,
                           weight_decay=weight_decay, eps=1e-10, maximize=maximize)
        _close(params, [p.detach() for p in ref])
        _close(sums, [opt.state[p]["sum"] for p in ref])


@pytest.mark.parametrize("dtype", LOW)
def test_adagrad_low_precision_vs_fp32_math(device, dtype):
    _skip_unless_kernels(device)
    kw = dict(lr=1e-2, lr_decay=0.01, weight_decay=0.01, eps=1e-10, maximize=False)
    params = _rand(SIZES, dtype, device)
    sums = [torch.full_like(p, 0.1) for p in params]
    for step in range(1, 4):
        grads = _rand(SIZES, dtype, device)
        exp_p, exp_s = ref_adagrad(params, grads, sums, step, **kw)
        ops.fused_adagrad_(params, grads, sums, _steps(len(params), step, device), **kw)
        _close(params, exp_p, dtype)
        _close(sums, exp_s, dtype)


# --------------------------------------------------------------------------- SGD
@pytest.mark.parametrize(
    "momentum,dampening,nesterov", [(0.0, 0.0, False), (0.9, 0.0, False), (0.9, 0.1, False), (0.9, 0.0, True)]
)
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_sgd_matches_torch_optim_fp32(device, momentum, dampening, nesterov, maximize, weight_decay):
    _skip_unless_kernels(device)
    ref = [torch.nn.Parameter(torch.randn(n)) for n in SIZES]
    opt = torch.optim.SGD(ref, lr=1e-2, momentum=momentum, dampening=dampening, nesterov=nesterov,
                          weight_decay=weight_decay, maximize=maximize, foreach=False)
    params = [p.detach().clone().to(device) for p in ref]
    # Garbage in the fresh buffers: the first step must overwrite them without reading.
    bufs = [torch.full_like(p, float("nan")) for p in params] if momentum else []
    for step in range(4):
        grads = [torch.randn(n) for n in SIZES]
        for p, g in zip(ref, grads):
            p.grad = g.clone()
        opt.step()
        ops.fused_sgd_(params, [g.to(device) for g in grads], bufs, lr=1e-2, momentum=momentum,
                       dampening=dampening, nesterov=nesterov, weight_decay=weight_decay,
                       maximize=maximize, is_first_step=step == 0)
        _close(params, [p.detach() for p in ref])
        if momentum:
            _close(bufs, [opt.state[p]["momentum_buffer"] for p in ref])


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_low_precision_vs_fp32_math(device, dtype, momentum):
    _skip_unless_kernels(device)
    kw = dict(lr=1e-2, dampening=0.0, nesterov=momentum > 0, weight_decay=0.01, maximize=False)
    params = _rand(SIZES, dtype, device)
    bufs = [torch.empty_like(p) for p in params] if momentum else []
    for step in range(3):
        grads = _rand(SIZES, dtype, device)
        exp_p, exp_b = ref_sgd(params, grads, bufs, first=step == 0, momentum=momentum, **kw)
        ops.fused_sgd_(params, grads, bufs, momentum=momentum, is_first_step=step == 0, **kw)
        _close(params, exp_p, dtype)
        _close(bufs, exp_b, dtype)


# --------------------------------------------------------------------------- AMP: grad_scale / found_inf
def _adamw_call(device, dtype=torch.float32, **extra):
    params = _rand(SIZES, dtype, device)
    grads = _rand(SIZES, dtype, device)
    ms = [torch.randn_like(p) * 0.1 for p in params]
    vs = [torch.rand_like(p) * 0.1 for p in params]
    return params, grads, ms, vs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_scale_unscales_in_registers(device, dtype):
    _skip_unless_kernels(device)
    params, grads, ms, vs = _adamw_call(device, dtype)
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8, maximize=False)
    exp = ref_adamw(params, grads, ms, vs, [], 3, amsgrad=False, **kw)
    scale = 1024.0  # a power of two: scaling and unscaling are exact
    scaled = [(g.float() * scale).to(dtype) for g in grads]
    before = [g.clone() for g in scaled]
    ops.fused_adamw_(params, scaled, ms, vs, [], _steps(len(params), 3, device), amsgrad=False,
                     grad_scale=torch.tensor(scale, device=device), found_inf=torch.tensor(0.0, device=device), **kw)
    for got, want in zip((params, ms, vs), exp[:3]):
        _close(got, want, dtype)
    for a, b in zip(scaled, before):  # grads are never written
        assert torch.equal(a, b)


@pytest.mark.parametrize("op", ["adamw", "adagrad", "sgd"])
def test_found_inf_skips_everything(device, op):
    _skip_unless_kernels(device)
    params, grads, ms, vs = _adamw_call(device)
    before = [t.clone() for t in (*params, *ms, *vs)]
    inf = torch.tensor(1.0, device=device)
    scale = torch.tensor(2.0, device=device)
    steps = _steps(len(params), 2, device)
    if op == "adamw":
        ops.fused_adamw_(params, grads, ms, vs, [], steps, lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.1,
                         eps=1e-8, amsgrad=False, maximize=False, grad_scale=scale, found_inf=inf)
    elif op == "adagrad":
        ops.fused_adagrad_(params, grads, ms, steps, lr=1e-2, lr_decay=0.0, weight_decay=0.1, eps=1e-10,
                           maximize=False, grad_scale=scale, found_inf=inf)
    else:
        ops.fused_sgd_(params, grads, ms, lr=1e-2, momentum=0.9, dampening=0.0, nesterov=False,
                       weight_decay=0.1, maximize=False, is_first_step=False, grad_scale=scale, found_inf=inf)
    for a, b in zip((*params, *ms, *vs), before):
        assert torch.equal(a, b)


def test_version_counters_are_bumped():
    params, grads, ms, vs = _adamw_call("cpu")
    v0 = [t._version for t in (*params, *ms, *vs)]
    ops.fused_adamw_(params, grads, ms, vs, [], _steps(len(params), 1, "cpu"), lr=1e-2, beta1=0.9,
                     beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)
    assert all(t._version > v for t, v in zip((*params, *ms, *vs), v0))
    assert all(g._version == 0 for g in grads)


def test_empty_lists_are_a_noop():
    ops.fused_adamw_([], [], [], [], [], [], lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8,
                     amsgrad=False, maximize=False)
    ops.fused_sgd_([], [], [], lr=1.0, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
                   maximize=False, is_first_step=True)


# --------------------------------------------------------------------------- opcheck
def _opcheck_cases(device):
    # The raw ops take master_params as a required keyword ([] = none; the ops.py wrappers default
    # it). Master-weight cases: tests/test_master_ops.py.
    def lists(k, n=(5, 33)):
        return [[torch.randn(s, device=device) for s in n] for _ in range(k)]

    p, g, m, v, x = lists(5)
    v = [t.abs() for t in v]
    x = [t.abs() for t in x]
    steps = _steps(2, 3, device)
    yield torch.ops.hift_ext.fused_adamw_.default, (p, g, m, v, x, steps), dict(
        lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8, amsgrad=True, maximize=False,
        master_params=[], grad_scale=torch.tensor(2.0, device=device), found_inf=torch.tensor(0.0, device=device))
    p, g, s = lists(3)
    yield torch.ops.hift_ext.fused_adagrad_.default, (p, g, [t.abs() for t in s], _steps(2, 2, device)), dict(
        lr=1e-2, lr_decay=0.01, weight_decay=0.0, eps=1e-10, maximize=True, master_params=[])
    p, g, b = lists(3)
    yield torch.ops.hift_ext.fused_sgd_.default, (p, g, b), dict(
        lr=1e-2, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.01, maximize=False, is_first_step=False,
        master_params=[])


def test_opcheck(device):
    _skip_unless_kernels(device)
    for op, args, kwargs in _opcheck_cases(device):
        torch.library.opcheck(op, args, kwargs)


# --------------------------------------------------------------------------- bad input
def _adamw(params, grads, ms, vs, steps, xs=(), amsgrad=False, **extra):
    ops.fused_adamw_(params, grads, ms, vs, list(xs), steps, lr=1e-2, beta1=0.9, beta2=0.999,
                     weight_decay=0.0, eps=1e-8, amsgrad=amsgrad, maximize=False, **extra)


def _good(n=2, size=8, dtype=torch.float32):
    mk = lambda: [torch.randn(size, dtype=dtype) for _ in range(n)]  # noqa: E731
    return mk(), mk(), mk(), mk(), _steps(n, 1, "cpu")


def test_error_lists_of_different_lengths():
    p, g, m, v, s = _good()
    with pytest.raises(RuntimeError, match=r"grads has 1 tensors but params has 2"):
        _adamw(p, g[:1], m, v, s)
    with pytest.raises(RuntimeError, match=r"state_steps has 1 tensors"):
        _adamw(p, g, m, v, s[:1])
    with pytest.raises(RuntimeError, match=r"max_exp_avg_sqs has 1 tensors"):
        _adamw(p, g, m, v, s, xs=m[:1], amsgrad=True)
    with pytest.raises(RuntimeError, match=r"max_exp_avg_sqs must be empty when amsgrad=False"):
        _adamw(p, g, m, v, s, xs=m, amsgrad=False)
    with pytest.raises(RuntimeError, match=r"momentum_buffers must be empty when momentum == 0"):
        ops.fused_sgd_(p, g, m, lr=1.0, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
                       maximize=False, is_first_step=False)


def test_error_different_devices():
    p, g, m, v, s = _good()
    g[1] = torch.empty(8, device="meta")
    with pytest.raises(RuntimeError, match=r"grads\[1\] is on meta but params\[0\] is on cpu"):
        _adamw(p, g, m, v, s)
    p, g, m, v, s = _good()
    s[0] = torch.tensor(1.0, device="meta")
    with pytest.raises(RuntimeError, match=r"state_steps\[0\] is on meta"):
        _adamw(p, g, m, v, s)


def test_error_mismatched_shapes_and_dtypes():
    p, g, m, v, s = _good()
    m[1] = torch.zeros(9)
    with pytest.raises(RuntimeError, match=r"exp_avgs\[1\] has shape \[9\] but params\[1\] has shape \[8\]"):
        _adamw(p, g, m, v, s)
    p, g, m, v, s = _good()
    v[0] = v[0].view(2, 4)
    with pytest.raises(RuntimeError, match=r"exp_avg_sqs\[0\] has shape \[2, 4\]"):
        _adamw(p, g, m, v, s)
    p, g, m, v, s = _good()
    g[0] = g[0].to(torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"grads\[0\] has dtype BFloat16 but params\[0\] has dtype Float"):
        _adamw(p, g, m, v, s)


def test_extension_shares_torchs_cpp_runtime():
    """A private (static) libstdc++ inside _C.so turns every C++ error into a segfault when torch's
    runtime catches it (seen on a GPU image whose g++ links libstdc++ statically); setup.py links
    the shared one. The module must need libstdc++.so.6 and define no __cxa_throw of its own."""
    import shutil
    import subprocess

    so = hift_ext._ext.require_extension().__file__
    if shutil.which("readelf") is None:
        pytest.skip("readelf (binutils) is not installed")
    dyn = subprocess.run(["readelf", "-d", so], capture_output=True, text=True).stdout
    assert "libstdc++.so" in dyn, dyn
    syms = subprocess.run(["readelf", "--dyn-syms", "-W", so], capture_output=True, text=True).stdout
    defined = [ln for ln in syms.splitlines() if ln.rstrip().endswith(" __cxa_throw") and " UND " not in ln]
    assert not defined, defined


def test_error_sparse_grads():
    p, g, m, v, s = _good()
    g[0] = g[0].to_sparse()
    with pytest.raises(RuntimeError, match=r"grads\[0\] is sparse"):
        _adamw(p, g, m, v, s)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float64])
def test_error_unsupported_dtypes(dtype):
    p, g, m, v, s = _good()
    p, g, m, v = ([t.to(dtype) for t in lst] for lst in (p, g, m, v))
    with pytest.raises(RuntimeError, match=r"params\[0\] has dtype .*supported dtypes are float32, bfloat16 and float16"):
        _adamw(p, g, m, v, s)


def test_error_non_contiguous():
    p, g, m, v, s = _good()
    g[1] = torch.randn(16)[::2]
    with pytest.raises(RuntimeError, match=r"grads\[1\] is not contiguous"):
        _adamw(p, g, m, v, s)
    p, g, m, v, s = _good(size=12)
    p[0] = torch.randn(4, 3).t()
    g[0], m[0], v[0] = (torch.randn(3, 4) for _ in range(3))
    with pytest.raises(RuntimeError, match=r"params\[0\] is not contiguous"):
        _adamw(p, g, m, v, s)


def test_error_bad_scalar_tensors():
    p, g, m, v, s = _good()
    s[1] = torch.tensor(1, dtype=torch.int64)
    with pytest.raises(RuntimeError, match=r"state_steps\[1\] must be a float32 tensor"):
        _adamw(p, g, m, v, s)
    p, g, m, v, s = _good()
    with pytest.raises(RuntimeError, match=r"grad_scale must hold exactly one element"):
        _adamw(p, g, m, v, s, grad_scale=torch.ones(2))
    with pytest.raises(RuntimeError, match=r"found_inf must be a float32 tensor"):
        _adamw(p, g, m, v, s, found_inf=torch.tensor(0.0, dtype=torch.float64))


def test_error_nesterov_without_momentum():
    p, g, m, v, s = _good()
    with pytest.raises(RuntimeError, match=r"nesterov momentum requires"):
        ops.fused_sgd_(p, g, m, lr=1.0, momentum=0.9, dampening=0.5, nesterov=True, weight_decay=0.0,
                       maximize=False, is_first_step=False)


def test_error_cuda_tensor_without_cuda_kernels():
    if hift_ext.has_cuda_kernels():
        pytest.skip("this build has CUDA kernels, so CUDA tensors are accepted")
    if not torch.cuda.is_available():
        pytest.skip("no GPU: a CUDA tensor cannot be created to reach the error path")
    p, g, m, v, s = (
        [t.cuda() for t in lst] for lst in _good()
    )
    with pytest.raises(RuntimeError, match=r"built without CUDA kernels"):
        _adamw(p, g, m, v, s)


# --------------------------------------------------------------------------- portable CPU kernels
_GENERIC_CHECK = r"""
import torch
from hift_ext import _ext, ops
assert _ext._C.cpu_kernel_isa() == "generic", _ext._C.cpu_kernel_isa()
torch.manual_seed(0)
sizes = [1, 3, 4097, 65537]
for dtype, tol in ((torch.float32, dict(rtol=1e-5, atol=1e-6)), (torch.bfloat16, {})):
    for ams in (False, True):
        ref = [torch.nn.Parameter(torch.randn(n).to(dtype).float()) for n in sizes]
        opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, amsgrad=ams, maximize=True, foreach=False)
        p = [r.detach().to(dtype) for r in ref]
        m, v, x = ([torch.zeros_like(t) for t in p] for _ in range(3))
        g = [torch.randn(n).to(dtype) for n in sizes]
        for r, gg in zip(ref, g):
            r.grad = gg.float()
        opt.step()
        ops.fused_adamw_(p, g, m, v, x if ams else [], [torch.tensor(1.0) for _ in p], lr=1e-2, beta1=0.9,
                         beta2=0.999, weight_decay=0.1, eps=1e-8, amsgrad=ams, maximize=True)
        for a, b in zip(p, ref):
            torch.testing.assert_close(a, b.detach().to(dtype), **tol)
p = [torch.randn(n) for n in sizes]; q = [t.clone() for t in p]; g = [torch.randn(n) for n in sizes]
ops.fused_sgd_(p, g, [], lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
               maximize=False, is_first_step=True)
for a, b, gg in zip(p, q, g):
    torch.testing.assert_close(a, b - 0.1 * gg)
s = [torch.zeros(n) for n in sizes]
ops.fused_adagrad_(q, g, s, [torch.tensor(1.0) for _ in q], lr=0.1, lr_decay=0.0, weight_decay=0.0, eps=1e-10,
                   maximize=False)
for a, gg in zip(s, g):
    torch.testing.assert_close(a, gg * gg)
print("ok")
"""


def test_portable_cpu_kernels_match(tmp_path):
    """The generic (non-AVX2) CPU kernels, forced with HIFT_EXT_CPU_ISA=generic in a subprocess."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HIFT_EXT_CPU_ISA": "generic"}
    out = subprocess.run([sys.executable, "-c", _GENERIC_CHECK], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, out.stdout + out.stderr


def test_cpu_kernel_isa_is_reported():
    from hift_ext import _ext

    assert _ext._C.cpu_kernel_isa() in ("avx2", "generic")


def test_torch_compile_fullgraph():
    """The ops trace under torch.compile(fullgraph=True) (Meta kernel + in-place schema) and
    give the same result as eager."""
    sizes = [10, 3]
    p, g, m, v = ([torch.randn(n) for n in sizes] for _ in range(4))
    v = [t.abs() for t in v]
    s = _steps(2, 2, "cpu")
    p2, m2, v2 = ([t.clone() for t in lst] for lst in (p, m, v))

    def f(p, g, m, v, s):
        ops.fused_adamw_(p, g, m, v, [], s, lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8,
                         amsgrad=False, maximize=False)

    torch.compile(f, fullgraph=True)(p, g, m, v, s)
    f(p2, g, m2, v2, s)
    for a, b in zip(p + m + v, p2 + m2 + v2):
        assert torch.equal(a, b)


def test_error_grad_mode_with_params_requiring_grad():
    p = torch.nn.Parameter(torch.randn(3))
    kw = dict(lr=1.0, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False,
              is_first_step=False)
    with pytest.raises(RuntimeError, match=r"call it under torch.no_grad\(\)"):
        ops.fused_sgd_([p], [torch.randn(3)], [], **kw)
    with torch.no_grad():
        ops.fused_sgd_([p], [torch.randn(3)], [], **kw)
    assert p._version == 1
