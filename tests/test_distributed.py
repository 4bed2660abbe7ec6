"""Data-parallel HiFT (hift_ext.distributed): two gloo ranks on the CPU against one process.

Each test launches its ranks as separate processes (tests/_dist_worker.py, with a deadline) and
compares what they saved with single-process runs made here from the same helpers:

* N ranks with per-rank batch b train as one process with batch N*b (to the floating-point order of
  the reduction), for AdamW / AdaGrad / SGD, every strategy, K > 1, small buckets, bf16 with masters;
* sharded state (shard_state=True, resident and offloaded) equals replicated state bitwise (two
  ranks: a sum of two numbers has one rounding, whatever the algorithm), and both ranks hold the
  same weights;
* no_sync / accumulation_steps / sync in step() accumulate without communicating and agree;
* an AMP overflow on one rank (also in another rank's shard) skips the step on every rank;
* a configuration that differs between ranks, and ranks at different schedule positions, are refused;
* a checkpoint saved by 2 sharded ranks resumes on 2 ranks (sharded, offloaded, replicated:
  bitwise) and in 1 process;
* a rank raising in the middle of a step ends the others with a clear error (no hang).
"""
from __future__ import annotations

import os

import pytest
import torch

from _dist_testutil import load, run_ranks
from _optim_testutil import MLP, needs_kernels

import _dist_worker as W

pytestmark = [needs_kernels, pytest.mark.skipif(not torch.distributed.is_available()
                                                or not torch.distributed.is_gloo_available(),
                                                reason="needs torch.distributed with gloo")]


def _reference(spec, steps=W.STEPS):
    model, opt = W.build(spec)
    assert opt.world_size == 1 and opt.data_parallel is None
    seen = W.train(model, opt, steps, rank=0, world=1)
    return W.params_of(model), seen


def _close(a, b, spec_dtype="fp32"):
    tol = dict(rtol=1e-4, atol=1e-5) if spec_dtype == "fp32" else dict(rtol=5e-2, atol=5e-2)
    for i, (p, q) in enumerate(zip(a, b)):
        torch.testing.assert_close(p.float(), q.float(), **tol, msg=lambda m: f"param {i}: {m}")


def _equal(a, b, what=""):
    for i, (p, q) in enumerate(zip(a, b)):
        assert torch.equal(p, q), f"{what} param {i} differs (max abs {(p.float() - q.float()).abs().max()})"


@pytest.fixture(scope="module")
def equiv(tmp_path_factory):
    out = tmp_path_factory.mktemp("equiv")
    run_ranks("equiv", out, timeout=300)
    return [load(out / f"equiv-rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("name", list(W.CONFIGS))
def test_two_ranks_equal_one_process_with_the_global_batch(equiv, name):
    spec = W.CONFIGS[name]
    r0, r1 = equiv[0][name], equiv[1][name]
    _equal(r0["params"], r1["params"], "rank 0 vs rank 1:")  # the ranks never drift apart
    assert r0["seen"].tolist() == r1["seen"].tolist()
    ref, seen = _reference(spec)
    assert r0["seen"].tolist() == seen  # the same group schedule (also random, also K > 1)
    _close(r0["params"], ref, spec["dtype"])
    assert int(r0["grad_bytes"]) > 0


@pytest.mark.parametrize("name", [n for n, s in W.CONFIGS.items() if s["shard"]])
def test_sharded_state_equals_replicated_bitwise(equiv, name):
    """Also across bucket sizes and with offload: the layout changes no number."""
    spec = W.CONFIGS[name]
    same = ("kind", "strategy", "k", "dtype")
    rep = next(n for n, s in W.CONFIGS.items() if not s["shard"] and all(s[k] == spec[k] for k in same))
    _equal(equiv[0][name]["params"], equiv[0][rep]["params"], f"{name} vs {rep}:")


def test_replicated_communicates_one_group_per_step(equiv):
    """The gradient bytes of a step are the active group's only: summed over a cycle of k steps,
    exactly one model's worth (k = 4 groups, STEPS = 7 steps: groups 0..3 then 0..2)."""
    model = MLP(seed=0)
    sizes = [sum(p.numel() * 4 for p in g) for g in model.groups()]
    seen = equiv[0]["adamw-down2up-K1-rep"]["seen"].tolist()
    assert int(equiv[0]["adamw-down2up-K1-rep"]["grad_bytes"]) == sum(sizes[g] for g in seen)


def test_no_sync_and_accumulation_steps(tmp_path):
    run_ranks("accum", tmp_path, timeout=240)
    r = [load(tmp_path / f"accum-rank{i}.pt") for i in range(2)]
    # the first micro-batch only accumulated: nothing was sent
    for mode in ("no_sync", "accumulation_steps", "sync_in_step"):
        assert int(r[0][f"{mode}-False-bytes_after_first"]) == 0, mode
    assert int(r[0]["accumulation_steps-True-bytes_after_first"]) == 0
    base = r[0]["no_sync-False"]
    _equal(base, r[1]["no_sync-False"], "rank 0 vs rank 1:")
    _equal(base, r[0]["accumulation_steps-False"], "accumulation_steps:")
    _equal(base, r[0]["sync_in_step-False"], "sync in step():")
    _equal(base, r[0]["accumulation_steps-True"], "sharded:")
    for i in range(2):
        assert "optimizer.no_sync()" in r[i]["twice"], r[i]["twice"]
    _equal(r[0]["after_twice"], r[1]["after_twice"], "after the refused backward:")
    # one process, the whole global batch at once
    from hift_ext.hift_optim import FusedHiFTAdamW

    model = MLP(seed=0)
    opt = FusedHiFTAdamW(model.groups(), lr=1e-2, strategy="random", seed=3)
    for t in range(5):
        x, y = W.local_batch(t, 0, 1, W.PER_RANK * 2)
        opt.zero_grad()
        W.loss_fn(model, x, y).backward()
        opt.step()
    _close(base, W.params_of(model))


def test_amp_overflow_on_one_rank_skips_everywhere(tmp_path):
    run_ranks("amp", tmp_path, timeout=240)
    r = [load(tmp_path / f"amp-rank{i}.pt") for i in range(2)]
    for shard in (False, True):
        t0, t1 = r[0][f"trace-{shard}"], r[1][f"trace-{shard}"]
        assert torch.equal(t0, t1), (shard, t0, t1)  # same positions and loss scales on both ranks
        positions = t0[:, 0].tolist()
        assert positions == [1, 1, 2, 3, 3], (shard, positions)  # step 1 (inf on rank 1) and the manual skip
        assert t0[1, 1] < t0[0, 1]  # both scalers backed off
        _equal(r[0][f"params-{shard}"], r[1][f"params-{shard}"], f"shard={shard}:")
    _equal(r[0]["params-False"], r[0]["params-True"], "sharded vs replicated:")
    for i in range(2):
        assert "seed" in r[i]["mismatch"] and "rank 0: 0" in r[i]["mismatch"] and "rank 1: 1" in r[i]["mismatch"]
        assert "HiFTDistributedError" in r[i]["desync"] and "different HiFT steps" in r[i]["desync"]


def test_checkpoint_of_two_sharded_ranks_resumes_on_two_and_on_one(tmp_path):
    run_ranks("ckpt", tmp_path, timeout=240, args=["--phase", "save"])
    saved = [load(tmp_path / f"ckpt-save-rank{i}.pt") for i in range(2)]
    for name in ("shard-off", "shard", "rep"):
        _equal(saved[0][f"final-{name}"], saved[1][f"final-{name}"], f"{name} rank 0 vs 1:")
    _equal(saved[0]["final-shard-off"], saved[0]["final-rep"], "sharded vs replicated:")
    _equal(saved[0]["final-shard"], saved[0]["final-rep"], "sharded resident vs replicated:")
    for name in ("shard-off", "shard"):
        assert "holds no optimizer state" in saved[1][f"partial-refused-{name}"]
    # rank 0's sharded state_dict is the replicated run's, tensor for tensor
    ck = {n: load(tmp_path / f"ckpt-{n}.pt") for n in ("shard-off", "shard", "rep")}
    rep = ck["rep"]["optimizer"]
    for n in ("shard-off", "shard"):
        sd = ck[n]["optimizer"]
        assert sd["state"].keys() == rep["state"].keys()
        for pid, st in rep["state"].items():
            assert st.keys() == sd["state"][pid].keys()
            for k, v in st.items():
                assert torch.equal(v.cpu(), sd["state"][pid][k].cpu()), (n, pid, k)
        assert sd["hift"]["schedule"] == rep["hift"]["schedule"]
        assert sd["hift"]["sharded"] == {"world_size": 2, "rank": 0, "complete": True}
    # resume on two ranks: bitwise the uninterrupted run, in every variant
    run_ranks("ckpt", tmp_path, timeout=240, args=["--phase", "resume"])
    resumed = [load(tmp_path / f"ckpt-resume-rank{i}.pt") for i in range(2)]
    for name in ("shard-off", "shard", "rep"):
        for i in range(2):
            _equal(resumed[i][f"resumed-{name}"], saved[0]["final-shard-off"], f"resumed {name} on rank {i}:")
    # resume in one process (batch of both ranks): the same training to rounding
    model, opt = W.build(W.CKPT_SPEC)
    model.load_state_dict(ck["shard-off"]["model"])
    opt.load_state_dict(ck["shard-off"]["optimizer"])
    W.train(model, opt, W.CKPT_AT, start=W.CKPT_AT)
    _close(W.params_of(model), saved[0]["final-shard-off"])


@pytest.mark.parametrize("phase", ["rep", "shard"])
def test_a_rank_raising_mid_step_stops_the_others_with_a_clear_error(tmp_path, phase):
    outs = run_ranks("raise", tmp_path, timeout=150, args=["--phase", phase], check=False)
    (rc0, out0), (rc1, out1) = outs
    assert rc1 != 0 and "injected failure on rank 1" in out1
    assert rc0 != 0, out0
    assert "WORKER-ERROR HiFTDistributedError" in out0, out0[-3000:]
    assert "rank 0 of 2" in out0 and "Another rank has probably stopped" in out0, out0[-3000:]


# ------------------------------------------------------------------------------ one process
def test_one_process_is_untouched_and_the_api_is_a_no_op():
    """Without torch.distributed: no hooks, no communication; no_sync/sync_grads do nothing and
    clip_grad_norm_ is torch's on the active group (bit for bit)."""
    from hift_ext.hift_optim import FusedHiFTAdamW

    a, b = MLP(seed=0), MLP(seed=0)
    oa = FusedHiFTAdamW(a.groups(), lr=1e-2, shard_state=True, accumulation_steps=2, comm_timeout=5)
    ob = FusedHiFTAdamW(b.groups(), lr=1e-2)
    assert (oa.world_size, oa.rank, oa.shard_state, oa.data_parallel, oa.comm_stats()) == (1, 0, False, None, {})
    for t in range(6):
        x, y = W.local_batch(t, 0, 1, 8)
        oa.zero_grad()
        ob.zero_grad()
        with oa.no_sync():
            W.loss_fn(a, x, y).backward()
        oa.sync_grads()
        W.loss_fn(b, x, y).backward()
        na = oa.clip_grad_norm_(0.05)
        nb = torch.nn.utils.clip_grad_norm_([p for p in b.parameters() if p.grad is not None], 0.05)
        assert torch.equal(na, nb)
        oa.step()
        ob.step()
    _equal(W.params_of(a), W.params_of(b))
    assert oa.state_dict()["hift"] == ob.state_dict()["hift"]


@pytest.mark.parametrize("kw, exc, words", [
    ({"shard_state": 1}, TypeError, "shard_state must be True or False"),
    ({"accumulation_steps": 0}, ValueError, "accumulation_steps must be an int >= 1"),
    ({"accumulation_steps": 2.0}, ValueError, "accumulation_steps must be an int >= 1"),
    ({"bucket_cap_mb": 0}, ValueError, "bucket_cap_mb must be a positive number"),
    ({"bucket_cap_mb": float("nan")}, ValueError, "bucket_cap_mb must be a positive number"),
    ({"comm_timeout": -1}, ValueError, "comm_timeout must be a positive number of seconds"),
    ({"process_group": object()}, ValueError, "torch.distributed is not initialized"),
])
def test_bad_data_parallel_arguments(kw, exc, words):
    from hift_ext.hift_optim import FusedHiFTSGD

    model = MLP(seed=0)
    with pytest.raises(exc, match=words):
        FusedHiFTSGD(model.groups(), lr=0.1, **kw)
    assert all(p.requires_grad for p in model.parameters())  # a refused construction changes nothing
