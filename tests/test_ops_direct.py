"""hift_ext/ops.py calls the ops through _C's direct entry points (csrc/optim/bindings.cpp) outside
torch.compile, and through torch.ops while dynamo traces. Both must be the same call:

- identical results, bitwise, for AdamW (float and tensor lr), AdaGrad and SGD;
- identical errors: RuntimeError with the op's message and no C++ backtrace; an argument pybind
  cannot convert (None in a list) falls back to torch.ops, whose parser names it;
- the dispatcher's keys still apply on the direct path: a TorchDispatchMode sees the op, and the
  autograd kernel refuses params that require grad under grad mode.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hift_ext import ops


@pytest.fixture(params=["direct", "torch.ops"])
def path(request, monkeypatch):
    if request.param == "torch.ops":  # what ops.py does while torch.compile traces
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    return request.param


def _lists(k, sizes=(3, 4099), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(n, generator=g) for n in sizes] for _ in range(k)]


def _run_all():
    p, g, m, v = _lists(4)
    v = [t.abs() for t in v]
    steps = [torch.tensor(2.0) for _ in p]
    ops.fused_adamw_(p, g, m, v, [], steps, lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8,
                     amsgrad=False, maximize=False)
    q, h, mq, vq = _lists(4, seed=1)
    vq = [t.abs() for t in vq]
    ops.fused_adamw_(q, h, mq, vq, [], steps, lr=torch.tensor(3e-3, dtype=torch.float64), beta1=0.9,
                     beta2=0.99, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=True)
    a, b, s = _lists(3, seed=2)
    ops.fused_adagrad_(a, b, [t.abs() for t in s], steps, lr=1e-2, lr_decay=0.01, weight_decay=0.1,
                       eps=1e-10, maximize=False, grad_scale=torch.tensor(2.0))
    c, d, buf = _lists(3, seed=3)
    ops.fused_sgd_(c, d, buf, lr=1e-2, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.01,
                   maximize=False, is_first_step=False, found_inf=torch.tensor(0.0))
    return p + m + v + q + mq + vq + a + s + c + buf


def test_direct_and_torch_ops_paths_agree(monkeypatch):
    direct = _run_all()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    via_torch_ops = _run_all()
    for x, y in zip(direct, via_torch_ops):
        assert torch.equal(x, y)


def test_errors_are_the_ops_message_without_a_backtrace(path):
    p, g, m, v = _lists(4)
    with pytest.raises(RuntimeError) as info:
        ops.fused_adamw_(p, g[:1], m, v, [], [torch.tensor(1.0)] * 2, lr=1e-2, beta1=0.9, beta2=0.999,
                         weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)
    msg = str(info.value)
    assert msg.startswith("hift_ext::fused_adamw_: grads has 1 tensors but params has 2"), msg
    assert "Exception raised from" not in msg and "frame #" not in msg


def test_dispatch_modes_and_autograd_still_apply(path):
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    c, d, buf = _lists(3)
    with Record():
        ops.fused_sgd_(c, d, buf, lr=1e-2, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0,
                       maximize=False, is_first_step=True)
    assert "hift_ext.fused_sgd_.default" in seen
    w = torch.nn.Parameter(torch.randn(5))
    with pytest.raises(RuntimeError, match="params require grad and grad mode is enabled"):
        ops.fused_sgd_([w], [torch.randn(5)], [], lr=1e-2, momentum=0.0, dampening=0.0, nesterov=False,
                       weight_decay=0.0, maximize=False, is_first_step=False)


def test_an_argument_pybind_cannot_convert_gets_torch_ops_message(path):
    p = [torch.randn(3)]
    with pytest.raises(RuntimeError, match="for argument 'grads'"):
        ops.fused_sgd_(p, [None], [], lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
                       maximize=False, is_first_step=False)
