"""Full fine-tuning's optimizer (the baseline of every benchmark): torch's fused implementation where
torch has one, the same update as torch's default to rounding, and a checkpoint of another
implementation resumes as it began."""
import copy

import pytest
import torch

from hift_ext.train import (TORCH_OPTIMIZERS, TrainConfig, make_optimizer, torch_fused_available,
                             torch_full_optimizer)

KW = {"adamw": dict(lr=1e-2, weight_decay=0.1), "adagrad": dict(lr=1e-1, weight_decay=0.1),
      "sgd": dict(lr=1e-1, momentum=0.9, weight_decay=0.1)}


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _steps(model, opt, n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(4, 8, generator=gen)
        model(x).square().sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", ["adamw", "adagrad", "sgd"])
def test_full_finetuning_uses_torchs_fused_optimizer_on_cpu(name):
    cfg = TrainConfig.for_task("classification", full=True, optimizer=name)
    opt = make_optimizer(cfg, _model())
    assert isinstance(opt, TORCH_OPTIMIZERS[name])
    assert all(g["fused"] is True for g in opt.param_groups)


@pytest.mark.parametrize("name", ["adamw", "adagrad", "sgd"])
def test_fused_baseline_matches_torchs_default_update(name):
    fused_model, loop_model = _model(), _model()
    fused = torch_full_optimizer(name, fused_model.parameters(), **KW[name])
    loop = TORCH_OPTIMIZERS[name](loop_model.parameters(), foreach=False, **KW[name])
    _steps(fused_model, fused, 5)
    _steps(loop_model, loop, 5)
    for a, b in zip(fused_model.parameters(), loop_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_no_fused_kernel_falls_back_to_torchs_default():
    meta = [torch.nn.Parameter(torch.zeros(3, device="meta"))]
    assert not torch_fused_available("adamw", meta)
    assert not torch_fused_available("adamw", [])
    assert not torch_fused_available("adamw", [torch.zeros(3, dtype=torch.int64)])
    assert torch_fused_available("adamw", [torch.zeros(3)])
    opt = torch_full_optimizer("adamw", meta, lr=1e-3)
    assert not opt.param_groups[0]["fused"]


def test_checkpoint_of_torchs_default_resumes_as_it_began():
    """A full-FT checkpoint written before the baseline went fused (torch's per-tensor loop) loads
    into the fused optimizer and continues exactly like the loop it was written by."""
    model, ref_model = _model(), _model()
    loop = torch.optim.AdamW(ref_model.parameters(), **KW["adamw"])
    _steps(ref_model, loop, 3)
    model.load_state_dict(ref_model.state_dict())
    resumed = torch_full_optimizer("adamw", model.parameters(), **KW["adamw"])
    resumed.load_state_dict(copy.deepcopy(loop.state_dict()))  # as from a file: no shared tensors
    assert not resumed.param_groups[0]["fused"]
    _steps(ref_model, loop, 3, seed=2)
    _steps(model, resumed, 3, seed=2)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)
