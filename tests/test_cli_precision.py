"""`hift-ext finetune --bf16 / --fp16`: HiFT trains low-precision weights with fp32 master weights
(and fp16 with a GradScaler), full fine-tuning autocasts fp32 weights; both resume exactly."""
import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from _finetune_testutil import (  # noqa: E402
    _hift_available,
    base_args,
    load_model_pt,
    run_cli,
    small_data,
    tiny_bert,
)

__all__ = ["tiny_bert", "small_data"]  # fixtures

needs_kernels = pytest.mark.skipif(not _hift_available(), reason="hift_ext._C (fused kernels) is not built")


@needs_kernels
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_hift_low_precision_trains_with_fp32_masters(tiny_bert, small_data, tmp_path, capsys, precision):
    out = str(tmp_path / "run")
    rc, stdout, err = run_cli(base_args(tiny_bert, small_data, f"--{precision}", "--epochs", "2", "--lr", "1e-3",
                                        "--group-size", "1", "--output", out), capsys)
    assert rc == 0, err
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    weights = load_model_pt(out)
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {dtype}
    from hift_ext.checkpoint import open_checkpoint

    ck = open_checkpoint(out)
    _, tensors = ck.load_tensors(map_location="cpu")
    states = tensors["optimizer"]["state"]
    assert states and all(st["master_param"].dtype == torch.float32 and st["exp_avg"].dtype == torch.float32
                          for st in states.values())
    # the masters are the weights before rounding: the rounded master is the weight
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["precision"] == precision and m["completed"]
    assert precision in stdout  # the summary says it
    if precision == "fp16":
        assert "scaler" in tensors


@needs_kernels
@pytest.mark.parametrize("precision,full", [("bf16", False), ("fp16", False), ("fp16", True)])
def test_low_precision_resume_is_exact(tiny_bert, small_data, tmp_path, capsys, precision, full):
    common = ["--epochs", "2", "--lr", "1e-3", "--grad-accum", "2", "--seed", "3", f"--{precision}"] + (
        ["--full"] if full else ["--group-size", "1"])
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    rc, _, err = run_cli(base_args(tiny_bert, small_data, *common, "--output", a), capsys)
    assert rc == 0, err
    rc, _, err = run_cli(base_args(tiny_bert, small_data, *common, "--output", b, "--stop-after", "4"), capsys)
    assert rc == 0, err
    rc, _, err = run_cli(["finetune", "--resume", b, "--no-progress", "--logging-steps", "2"], capsys)
    assert rc == 0, err
    wa, wb = load_model_pt(a), load_model_pt(b)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    if full:  # autocast keeps fp32 weights
        assert {v.dtype for v in wa.values() if v.is_floating_point()} == {torch.float32}


def test_bf16_and_fp16_are_exclusive(capsys):
    from hift_ext.cli import main

    with pytest.raises(SystemExit) as e:
        main(["finetune", "--bf16", "--fp16"])
    assert e.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_clip_scaled_grads_equals_clipping_the_unscaled_ones():
    from hift_ext.train import _clip_scaled_grads

    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(50).half()) for _ in range(3)]
    grads = [torch.randn(50) * 3 for _ in ps]
    scale = 1024.0
    for p, g in zip(ps, grads):
        p.grad = (g * scale).half()
    ref = [torch.nn.Parameter(torch.zeros(50)) for _ in ps]
    for r, p in zip(ref, ps):
        r.grad = p.grad.float() / scale
    want = float(torch.nn.utils.clip_grad_norm_(ref, 1.0))
    got = _clip_scaled_grads(ps, 1.0, scale)
    assert abs(got - want) < 1e-3 * want
    for r, p in zip(ref, ps):
        torch.testing.assert_close(p.grad.float() / scale, r.grad, rtol=2e-3, atol=1e-5)
    for p in ps:
        p.grad[0] = float("inf")
    assert not (_clip_scaled_grads(ps, 1.0, scale) < float("inf"))
