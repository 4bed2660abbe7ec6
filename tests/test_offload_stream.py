"""The offload engine's device side: a persistent arena under a budget, groups streamed in pieces,
copy failures that lose no state, and offloaded state that saves and copies.

Everything runs on the host-only engine (device "cpu": the same arena, ring, queues and ordering
with background threads); the CUDA variants run when a GPU is present.
"""
from __future__ import annotations

import copy
import io
import random

import pytest
import torch

from hift_ext._ext import has_extension

pytestmark = pytest.mark.skipif(not has_extension(), reason="hift_ext._C is not built")

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


def _engine(device="cpu", num_slots=2, **kw):
    from hift_ext.offload import OffloadEngine

    return OffloadEngine(device, num_slots, **kw)


def _same(a, b):
    return len(a) == len(b) and all(
        x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.cpu(), y.cpu()) for x, y in zip(a, b)
    )


# ----------------------------------------------------------------------------- piece plans
def test_plan_pieces_covers_everything_within_capacity():
    from hift_ext.offload import PIECE_UNIT, _packed_bytes, plan_pieces

    rng = random.Random(0)
    for _ in range(200):
        params = [(rng.choice([1, 3, 127, 128, 129, 1000, 5000]), rng.choice([[4, 4], [4, 4, 4], [2, 2], [4], []]))
                  for _ in range(rng.randint(1, 6))]
        need = max([_packed_bytes(min(PIECE_UNIT, n), sz) for n, sz in params if sz] or [256])
        cap = rng.randint(need, 4 * need + 20000)
        pieces = plan_pieces(params, cap)
        seen = {i: [] for i, (_, sz) in enumerate(params) if sz}
        for piece in pieces:
            assert piece and sum(_packed_bytes(b - a, params[i][1]) for i, a, b in piece) <= cap
            for i, a, b in piece:
                assert a % PIECE_UNIT == 0 and a < b or (a == 0 and b == params[i][0] == 0)
                seen[i].append((a, b))
        for i, ranges in seen.items():
            ranges.sort()
            assert ranges[0][0] == 0 and ranges[-1][1] == params[i][0]
            assert all(x[1] == y[0] for x, y in zip(ranges, ranges[1:]))
    with pytest.raises(ValueError, match="cannot hold"):
        plan_pieces([(1000, [4, 4, 4])], 1024)


# ----------------------------------------------------------------------------- engine: pieces
@pytest.mark.parametrize("device", DEVICES)
def test_pieces_stream_through_a_small_arena(device):
    """A group four times the budget streams in quarter pieces: fetch piece j while j+1 copies in
    and j-1 copies out; the device never holds more than the budget, nothing outside the arena."""
    from hift_ext.offload import plan_pieces

    torch.manual_seed(0)
    shadow = [torch.randn(3000), torch.randn(1000), torch.tensor(2.0), torch.randn(40, 7).to(torch.bfloat16)]
    eng = _engine(device, 2, debug=True, debug_delay_us=50)
    eng.add_group(0, shadow)
    eng.set_device_budget(8192)
    params = [(t.numel(), [t.element_size()]) for t in shadow]
    plan = plan_pieces(params, 2048)
    assert len(plan) > 4
    eng.set_pieces(0, [[(i, a, b) for i, a, b in piece] for piece in plan])
    assert eng.num_pieces(0) == len(plan) and max(eng.piece_bytes(0)) <= 2048
    for cycle in range(3):
        eng.prefetch(0, 0)
        for j, piece in enumerate(plan):
            views = eng.fetch(0, j)
            if j + 1 < len(plan):
                eng.prefetch(0, j + 1)
            for (i, a, b), v in zip(piece, views):
                want = shadow[i].reshape(-1)[a:b]
                assert torch.equal(v.cpu().reshape(-1), want), (cycle, j, i)
                v.add_(cycle + 1)
            eng.release(0, j)
        shadow = [t + (cycle + 1) for t in shadow]
    assert _same(eng.host_tensors(0), shadow)
    rep, st = eng.memory_report(), eng.stats()
    assert rep["device_bytes"] == rep["device_budget_bytes"] == 8192
    assert rep["device_leased_peak_bytes"] <= 8192 and rep["device_leased_bytes"] == 0
    assert st["overflow_allocs"] == 0 and st["arena_allocs"] == 1 and st["violations"] == 0


def test_set_pieces_and_budget_errors():
    eng = _engine("cpu")
    eng.add_group(0, [torch.zeros(1000), torch.zeros(10)])
    with pytest.raises(RuntimeError, match="in no piece"):
        eng.set_pieces(0, [[(0, 0, 512)], [(1, 0, 10)]])
    with pytest.raises(RuntimeError, match="in two pieces"):
        eng.set_pieces(0, [[(0, 0, 640)], [(0, 512, 1000), (1, 0, 10)]])
    with pytest.raises(RuntimeError, match="multiple of 64 elements"):
        eng.set_pieces(0, [[(0, 0, 100)], [(0, 100, 1000), (1, 0, 10)]])
    with pytest.raises(RuntimeError, match="names tensor 2"):
        eng.set_pieces(0, [[(2, 0, 1)]])
    assert eng.num_pieces(0) == 1  # refused calls change nothing
    with pytest.raises(RuntimeError, match="too small"):
        eng.set_device_budget(100)
    eng.set_device_budget(2048)
    with pytest.raises(RuntimeError, match="does not fit half of the device budget"):
        eng.fetch(0)
    eng.set_pieces(0, [[(0, 0, 256)], [(0, 256, 512)], [(0, 512, 768)], [(0, 768, 1000), (1, 0, 10)]])
    assert eng.piece_bytes(0) == [1024, 1024, 1024, 1024 + 256]  # 256-byte aligned segments
    with pytest.raises(RuntimeError, match="does not fit half of the device budget"):
        eng.fetch(0, 3)
    eng.set_pieces(0, [[(0, 0, 256)], [(0, 256, 512)], [(0, 512, 768)], [(0, 768, 1000)], [(1, 0, 10)]])
    ts = eng.fetch(0, 3) + eng.fetch(0, 4)
    assert [t.shape for t in ts] == [torch.Size([232]), torch.Size([10])]  # a range, a whole tensor
    with pytest.raises(RuntimeError, match="on the device"):
        eng.set_pieces(0, [])
    eng.release(0, 3)
    eng.release(0, 4)


def test_unusual_patterns_overflow_instead_of_deadlocking():
    """More pieces on the device at once than the arena holds (never done by the optimizer): the
    extra ones get temporary buffers, counted, and everything stays correct."""
    eng = _engine("cpu", 2, debug=True)
    groups = {g: [torch.full((500,), float(g))] for g in range(6)}
    for g, ts in groups.items():
        eng.add_group(g, ts)
    eng.set_device_budget(4 * 2048)
    held = {g: eng.fetch(g) for g in groups}  # six groups of 2 KiB in four quarters of 2 KiB
    for g, ts in held.items():
        assert torch.equal(ts[0], groups[g][0])
        ts[0].add_(1)
    for g in groups:
        eng.release(g)
    for g in groups:
        assert torch.equal(eng.host_tensors(g)[0], groups[g][0] + 1)
    assert eng.stats()["overflow_allocs"] == 2 and eng.stats()["violations"] == 0
    assert eng.memory_report()["device_bytes"] == 4 * 2048


# ----------------------------------------------------------------------------- engine: faults
@pytest.mark.parametrize("after", [0, 1])
def test_failed_write_back_keeps_the_last_good_state(after):
    eng = _engine("cpu", 2, debug=True)
    good = [torch.arange(300.0), torch.ones(5, dtype=torch.float64)]
    eng.add_group(7, good)
    eng.add_group(8, [torch.zeros(3)])
    ts = eng.fetch(7)
    ts[0].mul_(-1)
    eng.inject_fault("d2h", after)
    eng.release(7)
    with pytest.raises(RuntimeError, match=r"write-back \(device -> host\) of group 7 piece 0 failed: injected"):
        eng.synchronize()
    with pytest.raises(RuntimeError, match="group 7 piece 0 failed"):
        eng.host_tensors(7)
    with pytest.raises(RuntimeError, match="group 7 piece 0 failed"):
        eng.fetch(7)  # the device copy is gone; the group must be reloaded
    assert _same(eng.host_views(7), good)  # the store still holds the last good state
    eng.fetch(8)  # other groups are unaffected
    eng.release(8)
    eng.load_host(7, good)  # reloading clears the failure
    assert _same(eng.fetch(7), good)
    eng.release(7)
    eng.synchronize()
    assert eng.stats()["violations"] == 0


def test_failed_prefetch_changes_nothing_and_can_be_retried():
    eng = _engine("cpu", 2, debug=True)
    good = [torch.arange(100.0)]
    eng.add_group(0, good)
    eng.inject_fault("h2d", 0)
    with pytest.raises(RuntimeError, match=r"prefetch \(host -> device\) of group 0 piece 0 failed: injected"):
        eng.fetch(0)
    assert eng.residency(0) == "host" and eng.memory_report()["device_leased_bytes"] == 0
    assert _same(eng.fetch(0), good)  # the retry works
    eng.release(0)
    assert _same(eng.host_tensors(0), good)


def test_inject_fault_needs_debug():
    with pytest.raises(RuntimeError, match="debug=True"):
        _engine("cpu").inject_fault("d2h")
    with pytest.raises(RuntimeError, match="'h2d' or 'd2h'"):
        _engine("cpu", debug=True).inject_fault("x")


# ----------------------------------------------------------------------------- the optimizers
def _hift(name):
    from hift_ext.hift_optim import FusedHiFTAdaGrad, FusedHiFTAdamW, FusedHiFTSGD

    return {
        "adamw": (FusedHiFTAdamW, dict(lr=1e-2, weight_decay=0.1)),
        "adamw_amsgrad": (FusedHiFTAdamW, dict(lr=1e-2, amsgrad=True)),
        "adagrad": (FusedHiFTAdaGrad, dict(lr=1e-2, lr_decay=0.01, initial_accumulator_value=0.1)),
        "sgd": (FusedHiFTSGD, dict(lr=1e-2, momentum=0.9, dampening=0.1)),
    }[name]


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    widths = [6, 96, 3, 130, 40, 4]  # groups from 164 to 5240 parameters
    return torch.nn.Sequential(*[torch.nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:])]).to(dtype)


def _groups(model):
    return [[m.weight, m.bias] for m in model]


def _batches(n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g).to(dtype), torch.randn(16, 4, generator=g).to(dtype)) for _ in range(n)]


def _train(model, opt, batches):
    for x, y in batches:
        torch.nn.functional.mse_loss(model(x).float(), y.float()).backward()
        opt.step()
        opt.zero_grad()


def _clone(model):
    m = copy.deepcopy(model)
    for p in m.parameters():
        p.requires_grad_(True)
    return m


def _assert_same_training(ref_model, ref, model, opt):
    for a, b in zip(ref_model.parameters(), model.parameters()):
        assert torch.equal(a, b)
    sa, sb = ref.state_dict(), opt.state_dict()
    for pid in sa["state"]:
        for k, v in sa["state"][pid].items():
            w = sb["state"][pid][k]
            assert torch.equal(v.cpu(), w.cpu()) if torch.is_tensor(v) else v == w, (pid, k)


@pytest.mark.parametrize("strategy", ["down2up", "random"])
@pytest.mark.parametrize("name", ["adamw", "adamw_amsgrad", "adagrad", "sgd"])
@pytest.mark.parametrize("budget", [None, 32 << 10, 8 << 10])
def test_streamed_update_equals_resident(name, strategy, budget):
    """offload_device_bytes smaller than the largest group: that group streams through the arena in
    pieces; training is bitwise the resident run's, device memory never exceeds the budget."""
    cls, kw = _hift(name)
    ref_model = _model()
    model = _clone(ref_model)
    ref = cls(_groups(ref_model), strategy=strategy, seed=1, offload=False, **kw)
    opt = cls(_groups(model), strategy=strategy, seed=1, offload=True, offload_device_bytes=budget, **kw)
    batches = _batches(3 * ref.num_groups + 1)
    _train(ref_model, ref, batches)
    _train(model, opt, batches)
    _assert_same_training(ref_model, ref, model, opt)
    rep, st = opt.memory_report(), opt.offload_engine.stats()
    assert st["overflow_allocs"] == 0 and st["arena_allocs"] == 1 and st["violations"] == 0
    if budget is not None:
        assert rep["device_bytes"] == rep["device_budget_bytes"] <= budget
        assert max(rep["pieces_per_group"]) > 1  # the big groups were streamed
    else:
        assert rep["pieces_per_group"] == [1] * opt.num_groups
        assert rep["device_budget_bytes"] <= 2 * rep["largest_group_bytes"] + 1024


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_streamed_group_streams_every_step_with_steps_per_group(name):
    """steps_per_group=3 with a budget smaller than the big groups: a group of one piece stays on the
    device for its block (one fetch, one write-back), a group streamed in pieces still streams at
    every step of its block; training is bitwise the resident run's."""
    cls, kw = _hift(name)
    K = 3
    ref_model = _model()
    model = _clone(ref_model)
    ref = cls(_groups(ref_model), steps_per_group=K, offload=False, **kw)
    opt = cls(_groups(model), steps_per_group=K, offload=True, offload_device_bytes=8 << 10,
              offload_prefetch=False, **kw)
    eng = opt.offload_engine
    k = opt.num_groups
    batches = _batches(2 * k * K)
    _train(ref_model, ref, batches[:k * K])
    _train(model, opt, batches[:k * K])  # first cycle: every group gets its state
    pieces = opt.memory_report()["pieces_per_group"]
    assert 1 in pieces and max(pieces) > 1
    for b in range(k):
        g = opt.active_group
        before = eng.stats()
        _train(model, opt, batches[k * K + b * K:k * K + (b + 1) * K])
        after = eng.stats()
        moved = 1 if pieces[g] == 1 else K * pieces[g]
        assert after["h2d_copies"] - before["h2d_copies"] == moved, (g, pieces[g])
        assert after["d2h_copies"] - before["d2h_copies"] == moved, (g, pieces[g])
    _train(ref_model, ref, batches[k * K:])
    _assert_same_training(ref_model, ref, model, opt)
    rep, st = opt.memory_report(), eng.stats()
    assert rep["device_bytes"] == rep["device_budget_bytes"] <= 8 << 10
    assert st["overflow_allocs"] == 0 and st["violations"] == 0


def test_budget_errors():
    cls, kw = _hift("adamw")
    with pytest.raises(ValueError, match="too small.*pass at least"):
        cls(_groups(_model()), offload=True, offload_device_bytes=1000, **kw)
    with pytest.raises(ValueError, match="positive int"):
        cls(_groups(_model()), offload=True, offload_device_bytes=-5, **kw)
    with pytest.raises(ValueError, match="only with offload=True"):
        cls(_groups(_model()), offload=False, offload_device_bytes=1 << 20, **kw)


@pytest.mark.parametrize("kind", ["d2h", "h2d"])
def test_injected_copy_failure_loses_no_state(kind):
    """A copy that fails names the HiFT group; the host store keeps that group's last good state;
    after load_state_dict of a checkpoint (d2h) or a retry (h2d), training goes on exactly like a
    run that never failed."""
    from hift_ext.offload import GroupStateOffload

    cls, kw = _hift("adamw")
    ref_model = _model(3)
    model = _clone(ref_model)
    ref = cls(_groups(ref_model), offload=False, **kw)
    opt = cls(_groups(model), offload=True, **kw)
    opt._offload = GroupStateOffload("cpu", debug=True, group_sizes=[[(p.numel(), [4, 4]) for p in g] for g in _groups(model)])
    batches = _batches(2 * ref.num_groups + 3, seed=3)
    k = ref.num_groups
    _train(ref_model, ref, batches[:k + 1])
    _train(model, opt, batches[:k])
    if kind == "h2d":  # the prefetch of the next group, started by this step, fails
        opt.offload_engine.synchronize()  # (not the prefetch of this step's group, still in flight)
        opt.offload_engine.inject_fault(kind, 0)
    _train(model, opt, batches[k:k + 1])
    good = copy.deepcopy(opt.state_dict())
    good_params = [p.detach().clone() for p in model.parameters()]
    g = opt.active_group
    x, y = batches[k + 1]
    torch.nn.functional.mse_loss(model(x), y).backward()
    if kind == "h2d":
        with pytest.raises(RuntimeError, match=f"HiFT group {g}: .*prefetch .* failed: injected"):
            opt.step()
        assert opt.active_group == g  # nothing happened: retry the same step
        for p, q in zip(model.parameters(), good_params):
            assert torch.equal(p, q)
        opt.step()
        opt.zero_grad()
    else:
        opt.offload_engine.inject_fault(kind, 0)
        opt.step()  # the write-back fails in the background
        opt.zero_grad()
        with pytest.raises(RuntimeError, match=f"write-back .* of group {g} piece 0 failed: injected"):
            opt.state_dict()
        host = opt.offload_engine.host_views(g)  # the last good state of that group
        saved = good["state"]
        ids = [pid for grp in good["param_groups"] if grp["hift_group"] == g for pid in grp["params"]]
        assert torch.equal(host[0], saved[ids[0]]["exp_avg"].cpu())
        opt.load_state_dict(good)  # back to the checkpoint
        with torch.no_grad():
            for p, q in zip(model.parameters(), good_params):
                p.copy_(q)
        _train(model, opt, [batches[k + 1]])
    _train(ref_model, ref, [batches[k + 1]])
    _train(ref_model, ref, batches[k + 2:])
    _train(model, opt, batches[k + 2:])
    _assert_same_training(ref_model, ref, model, opt)


def test_offloaded_mixed_dtype_state_saves_and_deepcopies():
    """State of bf16 (with fp32 masters) and fp32 parameters in one offloaded group: torch.save
    writes it (each tensor has its own storage), and a deep copy of the optimizer trains on like
    the original."""
    from hift_ext.hift_optim import FusedHiFTSGD

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 4))
    model[0].to(torch.bfloat16)
    groups = [[model[0].weight, model[0].bias, model[1].weight], [model[1].bias]]
    opt = FusedHiFTSGD(groups, lr=0.1, momentum=0.9, offload=True, master_weights=False)

    def run(m, o, n, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(n):
            x = torch.randn(4, 6, generator=g).bfloat16()
            m[1](m[0](x).float()).square().sum().backward()
            o.step()
            o.zero_grad()

    run(model, opt, 3, 0)
    sd = opt.state_dict()
    dtypes = {v.dtype for st in sd["state"].values() for k, v in st.items() if k != "step"}
    assert dtypes == {torch.bfloat16, torch.float32}
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=True)
    for pid, st in sd["state"].items():
        for k, v in st.items():
            assert torch.equal(back["state"][pid][k], v)
    twin_model = copy.deepcopy(model)
    pairs = copy.deepcopy({"m": model, "o": opt})  # one memo: the copy's optimizer holds the copy's params
    assert pairs["o"].offload_engine is not opt.offload_engine
    run(model, opt, 4, 1)
    run(pairs["m"], pairs["o"], 4, 1)
    for a, b in zip(model.parameters(), pairs["m"].parameters()):
        assert torch.equal(a, b)
    del twin_model
    with pytest.raises(TypeError, match="cannot be pickled"):
        import pickle

        pickle.dumps(opt)
