"""Shared helpers of the optimizer tests (test_optim_dropin.py, test_hift*.py)."""
from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import hift_ext


def kernels_available() -> bool:
    # hift_ext.ops wraps the compiled extension; a development stand-in may be installed in
    # sys.modules["hift_ext.ops"] instead.
    return hift_ext.has_extension() or "hift_ext.ops" in sys.modules


needs_kernels = pytest.mark.skipif(
    not kernels_available(),
    reason="hift_ext._C is not built (pip install --no-build-isolation -e .)",
)
needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and hift_ext.has_cuda_kernels()),
    reason="needs a CUDA GPU and hift_ext built with its CUDA kernels",
)


def make_params(shapes, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        nn.Parameter(torch.randn(s, generator=g).to(dtype=dtype, device=device)) for s in shapes
    ]


def clone_params(params):
    return [nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad) for p in params]


def set_grads(params, step: int, seed: int = 1234, scale: float = 1.0):
    """Deterministic gradients for step ``step`` (the same for every optimizer under test)."""
    g = torch.Generator().manual_seed(seed + 7919 * step)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * scale).to(dtype=p.dtype, device=p.device)


class MLP(nn.Module):
    """A small stack of Linear layers; ``groups()`` returns one group per layer, bottom to top."""

    def __init__(self, sizes=(6, 12, 12, 10, 3), seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i + 1 < len(self.layers):
                x = torch.tanh(x)
        return x

    def groups(self):
        return [list(layer.parameters()) for layer in self.layers]


def batch(step: int, n: int = 8, d_in: int = 6, d_out: int = 3, seed: int = 99):
    g = torch.Generator().manual_seed(seed + 31 * step)
    return torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g)


def loss_fn(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def copy_model(model):
    import copy

    return copy.deepcopy(model)


def assert_params_equal(a, b, exact=True, rtol=1e-5, atol=1e-6):
    for i, (p, q) in enumerate(zip(a, b)):
        if exact:
            assert torch.equal(p.detach(), q.detach()), f"param {i} differs (max abs {(p - q).abs().max()})"
        else:
            torch.testing.assert_close(p.detach(), q.detach(), rtol=rtol, atol=atol, msg=lambda m: f"param {i}: {m}")
