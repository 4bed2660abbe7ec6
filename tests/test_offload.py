"""Offload engine (csrc/offload + hift_ext/offload.py) and its use by the HiFT optimizers.

Engine tests run on the host-only engine (device "cpu": the same ring, queues and ordering with
background threads) everywhere, and on CUDA when a GPU is present.
"""
from __future__ import annotations

import random
import time

import pytest
import torch

from hift_ext._ext import has_extension

pytestmark = pytest.mark.skipif(not has_extension(), reason="hift_ext._C is not built")

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


def _engine(device="cpu", num_slots=2, **kw):
    from hift_ext.offload import OffloadEngine

    return OffloadEngine(device, num_slots, **kw)


def _rand_group(rng: random.Random, big: bool = False):
    """A list of tensors of very different sizes and dtypes (like a group's optimizer state)."""
    out = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.random()
        if kind < 0.15:
            out.append(torch.tensor(float(rng.randint(0, 100))))  # step count (0-dim)
        elif kind < 0.3:
            out.append(torch.randint(-1000, 1000, (rng.randint(1, 9),), dtype=torch.int64))
        elif kind < 0.45:
            out.append(torch.randn(rng.randint(1, 40), 3).to(torch.bfloat16))
        else:
            n = rng.randint(1, 20000 if big else 2000)
            out.append(torch.randn(n))
    return out


def _same(a, b):
    return len(a) == len(b) and all(
        x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.cpu(), y.cpu()) for x, y in zip(a, b)
    )


def _bump(ts, k):
    """Modify fetched device tensors in place (as an optimizer update would)."""
    for t in ts:
        t.add_(k)


# ----------------------------------------------------------------------------- engine round trips
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_slots", [1, 2, 3])
@pytest.mark.parametrize("budget", ["auto", "fixed"])
def test_round_trip_cycles(device, num_slots, budget):
    rng = random.Random(num_slots)
    sizes = [1, 7, 50000, 3, 120000, 2]  # very different group sizes
    shadow = {g: [torch.randn(n), torch.randn(max(1, n // 3)).double(), torch.tensor(0.0)]
              for g, n in enumerate(sizes)}
    eng = _engine(device, num_slots, debug=True, debug_delay_us=20)
    for g, ts in shadow.items():
        eng.add_group(g, ts)
    largest = max(eng.group_bytes(g) for g in shadow)
    if budget == "fixed":
        eng.set_device_budget(2 * largest)
    k = len(sizes)
    order = list(range(k))
    for cycle in range(6):
        if cycle % 2:
            rng.shuffle(order)
        eng.prefetch(order[0])
        for i, g in enumerate(order):
            ts = eng.fetch(g)
            assert all(t.device.type == torch.device(device).type for t in ts)
            assert _same(ts, shadow[g]), (cycle, g)
            _bump(ts, cycle + 1)
            shadow[g] = [s + (cycle + 1) for s in shadow[g]]
            eng.release(g)
            if i + 1 < k:
                eng.prefetch(order[i + 1])  # overlaps the next group's "forward/backward"
    for g in range(k):
        assert _same(eng.host_tensors(g), shadow[g])
    eng.synchronize()
    st = eng.stats()
    assert st["violations"] == 0
    rep = eng.memory_report()
    assert rep["device_leased_bytes"] == 0 and rep["num_groups"] == k
    # one arena, never more than two groups on it, nothing outside it
    assert rep["device_bytes"] == rep["device_budget_bytes"] >= 2 * largest
    assert rep["device_leased_peak_bytes"] <= 2 * largest
    if budget == "fixed":
        assert st["arena_allocs"] == 1 and st["overflow_allocs"] == 0
    eng.close()


@pytest.mark.parametrize("num_slots", [1, 2, 3])
def test_randomized_stress(num_slots):
    """Thousands of random prefetch/fetch/release/host_tensors/load_host operations in random
    orders with random data, random delays in the copy threads: no slot is read before its write
    finished (debug ownership + checksum checks) and no group's state is mixed up or lost."""
    rng = random.Random(1234 + num_slots)
    torch.manual_seed(num_slots)
    eng = _engine("cpu", num_slots, debug=True, debug_delay_us=30)
    k = 9
    shadow = {}
    for g in range(k):
        shadow[g] = _rand_group(rng, big=(g % 4 == 0))
        eng.add_group(g, shadow[g])
    resident = {}  # g -> device tensors from fetch()
    ops = 0
    deadline = time.monotonic() + 3.0
    while ops < 10000 and time.monotonic() < deadline:
        g = rng.randrange(k)
        r = rng.random()
        if r < 0.25:
            eng.prefetch(g)
        elif r < 0.55:
            ts = eng.fetch(g)
            assert _same(ts, shadow[g]), f"group {g} state mixed up after {ops} ops"
            delta = rng.randint(1, 5)
            _bump(ts, delta)
            shadow[g] = [s + delta for s in shadow[g]]
            resident[g] = ts
        elif r < 0.8:
            eng.release(g)
            resident.pop(g, None)
        elif r < 0.9:
            assert _same(eng.host_tensors(g), shadow[g]), f"host copy of {g} wrong after {ops} ops"
        else:
            new = [torch.randn(s.shape).to(s.dtype) if s.is_floating_point()
                   else torch.randint_like(s, -50, 50) for s in shadow[g]]
            eng.load_host(g, new)
            shadow[g] = [t.clone() for t in new]
            if g in resident:
                assert _same(resident[g], shadow[g])
        ops += 1
    for g in range(k):
        assert _same(eng.host_tensors(g), shadow[g])
    eng.synchronize()
    st = eng.stats()
    assert st["violations"] == 0, st
    assert ops >= 1000
    eng.close()


def test_host_tensors_during_inflight_copies():
    eng = _engine("cpu", 2, debug=True, debug_delay_us=3000)  # slow copy threads
    a = [torch.randn(1000), torch.tensor(1.0)]
    b = [torch.randn(300)]
    eng.add_group(0, a)
    eng.add_group(1, b)
    ts = eng.fetch(0)
    _bump(ts, 2.0)
    eng.release(0)  # write-back in flight
    eng.prefetch(1)  # prefetch in flight, sharing the ring
    assert eng.residency(0) in ("writing_back", "host")
    assert _same(eng.host_tensors(0), [x + 2 for x in a])
    # resident group: the device copy is the truth, host_tensors copies it back and keeps it usable
    tb = eng.fetch(1)
    _bump(tb, 5.0)
    assert _same(eng.host_tensors(1), [b[0] + 5])
    assert eng.residency(1) == "device"
    _bump(tb, 1.0)
    eng.release(1)
    assert _same(eng.host_tensors(1), [b[0] + 6])
    assert eng.stats()["violations"] == 0


def test_load_host_every_residency():
    eng = _engine("cpu", 1, debug=True, debug_delay_us=200)
    eng.add_group(0, [torch.zeros(10), torch.zeros(2, 2, dtype=torch.float64)])
    new = [torch.arange(10.0), torch.ones(2, 2, dtype=torch.float64)]
    eng.load_host(0, new)  # on the host
    assert _same(eng.fetch(0), new)
    new2 = [torch.full((10,), 3.0), torch.full((2, 2), 4.0, dtype=torch.float64)]
    ts = eng.fetch(0)
    eng.load_host(0, new2)  # resident: the device copy is updated in place
    assert _same(ts, new2)
    eng.release(0)
    eng.prefetch(0)
    eng.load_host(0, new)  # prefetched: dropped and re-read
    assert _same(eng.fetch(0), new)
    eng.release(0)
    with pytest.raises(RuntimeError, match="shape"):
        eng.load_host(0, [torch.zeros(11), torch.zeros(2, 2, dtype=torch.float64)])
    with pytest.raises(RuntimeError, match="expected 2 tensors"):
        eng.load_host(0, [torch.zeros(10)])
    assert _same(eng.host_tensors(0), new)


def test_memory_report_and_slots():
    eng = _engine("cpu", 3)
    sizes = [100, 5000, 17]
    for g, n in enumerate(sizes):
        eng.add_group(g, [torch.zeros(n), torch.zeros(n)])
    per = [2 * ((n * 4 + 255) // 256 * 256) for n in sizes]
    rep = eng.memory_report()
    assert rep["host_store_bytes"] == sum(per)
    assert rep["largest_group_bytes"] == max(per) == rep["largest_piece_bytes"]
    assert rep["device_bytes"] == 0 and rep["num_slots"] == 3 and rep["pinned_bytes"] == 0
    eng.fetch(1)
    eng.prefetch(2)
    rep = eng.memory_report()
    # the arena is sized on first use to two halves of the largest piece, and stays
    assert rep["device_budget_bytes"] == rep["device_bytes"] >= 2 * max(per)
    assert rep["device_leased_bytes"] == per[1] + per[2]
    assert rep["resident_groups"] == 1
    for g in range(3):
        eng.release(g)
    eng.synchronize()
    rep = eng.memory_report()
    assert rep["device_leased_bytes"] == 0 and rep["device_bytes"] == rep["device_budget_bytes"]
    assert rep["device_leased_peak_bytes"] == per[1] + per[2]
    assert eng.stats()["arena_allocs"] == 1 and eng.stats()["overflow_allocs"] == 0
    # slots are sized to the largest piece when they are first used
    assert rep["slot_bytes"] % max(per) == 0 and rep["slot_bytes"] >= max(per)
    eng.reserve(10 * max(per))
    assert eng.memory_report()["slot_bytes"] >= 10 * max(per)


def test_bad_input():
    from hift_ext.offload import OffloadEngine

    with pytest.raises(ValueError, match="num_slots"):
        OffloadEngine("cpu", 0)
    eng = OffloadEngine("cpu", 2)
    with pytest.raises(RuntimeError, match="unknown group"):
        eng.fetch(3)
    eng.add_group(3, [torch.zeros(2)])
    with pytest.raises(RuntimeError, match="already added"):
        eng.add_group(3, [torch.zeros(2)])
    eng.remove_group(3)
    assert not eng.has_group(3)
    if not CUDA:
        with pytest.raises(RuntimeError, match="CUDA"):
            OffloadEngine("cuda", 2)
    eng.close()
    with pytest.raises(RuntimeError, match="closed"):
        eng.prefetch(3)


def test_empty_and_scalar_groups():
    eng = _engine("cpu", 2, debug=True)
    eng.add_group(0, [])
    eng.add_group(1, [torch.tensor(5.0)])
    assert eng.fetch(0) == []
    t = eng.fetch(1)
    t[0].add_(1)
    eng.release(0)
    eng.release(1)
    assert eng.host_tensors(1)[0].item() == 6.0


def test_tuning_defaults_and_errors():
    eng = _engine("cpu", 2)
    assert eng.tuning() == {"pipeline_bytes": 32 << 20, "copy_threads": 4}
    eng.set_tuning(copy_threads=1)
    assert eng.tuning() == {"pipeline_bytes": 32 << 20, "copy_threads": 1}
    with pytest.raises(RuntimeError, match="copy_threads must be >= 1"):
        eng.set_tuning(copy_threads=0)
    with pytest.raises(RuntimeError, match="pipeline_bytes must be >= 0"):
        eng.set_tuning(pipeline_bytes=-1)
    assert eng.tuning()["copy_threads"] == 1  # a refused call changes nothing


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_pinned_slots_and_streams():
    eng = _engine("cuda", 2)
    eng.add_group(0, [torch.randn(1 << 20, device="cuda")])
    eng.add_group(1, [torch.randn(1 << 18, device="cuda")])
    ref = [t.clone() for t in eng.host_tensors(0)]
    eng.prefetch(0)
    ts = eng.fetch(0)
    # the compute stream waited on the copy event: a kernel enqueued now sees the data
    assert torch.equal(ts[0].cpu(), ref[0])
    ts[0].mul_(2)
    eng.release(0)
    eng.prefetch(1)
    assert torch.equal(eng.host_tensors(0)[0], ref[0] * 2)
    rep = eng.memory_report()
    assert rep["pinned_bytes"] >= rep["largest_group_bytes"]
    eng.synchronize()


# ----------------------------------------------------------------------------- optimizer integration
def _hift_classes():
    from hift_ext.hift_optim import FusedHiFTAdaGrad, FusedHiFTAdamW, FusedHiFTSGD

    return {
        "adamw": (FusedHiFTAdamW, dict(lr=1e-2, weight_decay=0.1)),
        "adamw_amsgrad": (FusedHiFTAdamW, dict(lr=1e-2, amsgrad=True)),
        "adagrad": (FusedHiFTAdaGrad, dict(lr=1e-2, lr_decay=0.01)),
        "sgd": (FusedHiFTSGD, dict(lr=1e-2, momentum=0.9, nesterov=True)),
    }


def _uneven_model(seed=0):
    """Layers of very different sizes (groups from 4 to ~8k parameters)."""
    torch.manual_seed(seed)
    widths = [6, 64, 2, 96, 8, 4]
    return torch.nn.Sequential(*[torch.nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:])])


def _groups_of(model):
    return [[m.weight, m.bias] for m in model]


def _clone_model(model):
    import copy

    clone = copy.deepcopy(model)
    for p in clone.parameters():  # a HiFT optimizer may have frozen some (inactive groups)
        p.requires_grad_(True)
    return clone


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g), torch.randn(16, 4, generator=g)) for _ in range(n)]


def _train(model, opt, batches, fail_at=()):
    for t, (x, y) in enumerate(batches):
        if t in fail_at:
            with pytest.raises(RuntimeError, match="boom"):
                _ = model[0](x)
                raise RuntimeError("boom")  # an exception in the middle of forward
            opt.zero_grad()
            continue
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()


def _assert_state_equal(sd_a, sd_b):
    assert sd_a["state"].keys() == sd_b["state"].keys()
    for pid in sd_a["state"]:
        a, b = sd_a["state"][pid], sd_b["state"][pid]
        assert a.keys() == b.keys(), (pid, a.keys(), b.keys())
        for k in a:
            va, vb = a[k], b[k]
            if isinstance(va, torch.Tensor):
                assert torch.equal(va.cpu().float(), vb.cpu().float()), (pid, k)
            else:
                assert va == vb


@pytest.mark.parametrize("strategy", ["down2up", "up2down", "random"])
@pytest.mark.parametrize("opt_name", ["adamw", "adamw_amsgrad", "adagrad", "sgd"])
def test_offloaded_training_bitwise_identical(opt_name, strategy):
    """offload=True with R = 1, 2, 3 slots == offload=False, bit for bit, over several cycles of
    groups of very different sizes (parameters and every state tensor)."""
    cls, kw = _hift_classes()[opt_name]
    ref_model = _uneven_model()
    models = {r: _clone_model(ref_model) for r in (1, 2, 3)}
    ref = cls(_groups_of(ref_model), strategy=strategy, seed=3, offload=False, **kw)
    batches = _batches(3 * ref.num_groups + 2)  # several cycles, ending mid-cycle
    _train(ref_model, ref, batches)
    ref_sd = ref.state_dict()
    for r, model in models.items():
        off = cls(_groups_of(model), strategy=strategy, seed=3, offload=True, offload_slots=r, **kw)
        assert ref.offload_engine is None and off.offload_engine.num_slots == r
        _train(model, off, batches)
        for a, b in zip(ref_model.parameters(), model.parameters()):
            assert torch.equal(a, b), r
        _assert_state_equal(ref_sd, off.state_dict())
        assert off.offload_engine.stats()["violations"] == 0
        assert off.offload_engine.stats()["overflow_allocs"] == 0
        rep = off.memory_report()
        assert rep["host_store_bytes"] > 0
        assert rep["num_groups"] == off.num_groups


@pytest.mark.parametrize("strategy", ["down2up", "random"])
@pytest.mark.parametrize("steps_per_group", [1, 3])
@pytest.mark.parametrize("opt_name", ["adamw", "adamw_amsgrad", "adagrad", "sgd"])
def test_offloaded_training_bitwise_identical_steps_per_group(opt_name, steps_per_group, strategy):
    """steps_per_group=K with offload (the active group kept on the device for its block) ==
    offload=False, bit for bit, with state_dict() taken mid-block along the way."""
    cls, kw = _hift_classes()[opt_name]
    K = steps_per_group
    ref_model = _uneven_model()
    model = _clone_model(ref_model)
    ref = cls(_groups_of(ref_model), strategy=strategy, seed=3, steps_per_group=K, offload=False, **kw)
    off = cls(_groups_of(model), strategy=strategy, seed=3, steps_per_group=K, offload=True, **kw)
    batches = _batches(2 * ref.num_groups * K + 2)  # two cycles, ending mid-block
    for t in range(len(batches)):
        _train(ref_model, ref, batches[t:t + 1])
        _train(model, off, batches[t:t + 1])
        if t % 4 == 1:
            _assert_state_equal(ref.state_dict(), off.state_dict())  # the resident group flushed
    for a, b in zip(ref_model.parameters(), model.parameters()):
        assert torch.equal(a, b)
    _assert_state_equal(ref.state_dict(), off.state_dict())
    st = off.offload_engine.stats()
    assert st["violations"] == 0 and st["overflow_allocs"] == 0


@pytest.mark.parametrize("prefetch", [False, True])
def test_steps_per_group_one_fetch_and_one_write_back_per_block(prefetch):
    """K = 3: a group's state crosses once in at the block's first step and once out after its last
    step (engine stats); between the steps of a block it stays on the device; the next group is
    prefetched only after the block's last step. K = 1: once in and once out at every step."""
    cls, kw = _hift_classes()["adamw"]
    for K in (1, 3):
        model = _uneven_model()
        opt = cls(_groups_of(model), steps_per_group=K, offload=True, offload_prefetch=prefetch, **kw)
        eng = opt.offload_engine
        k = opt.num_groups
        batches = _batches(2 * k * K)
        blocks = []
        for t in range(2 * k * K):
            g = opt.active_group
            before = eng.stats()
            _train(model, opt, batches[t:t + 1])
            after = eng.stats()
            d_h2d, d_d2h = (after[c] - before[c] for c in ("h2d_copies", "d2h_copies"))
            last = t % K == K - 1
            if t % K == 0:
                blocks.append(g)
            # an h2d copy: the block's own fetch at its first step (first cycle: no prefetch, the
            # state is created by that step), or the next group's prefetch after the block's last
            fetch_here = (t % K == 0) and (not prefetch or t < k * K)
            prefetch_next = prefetch and last and t + 1 >= k * K  # the next group has state by then
            assert d_h2d == int(fetch_here) + int(prefetch_next), (K, t, d_h2d)
            assert d_d2h == int(last), (K, t, d_d2h)
            if not last:
                assert eng.residency(g) == "device", (K, t)  # kept for the rest of its block
            else:
                assert eng.residency(g) != "device", (K, t)
        st = eng.stats()
        sizes = {g: eng.group_bytes(g) for g in range(k)}
        assert st["d2h_copies"] == len(blocks) == 2 * k
        assert st["d2h_bytes"] == sum(sizes[g] for g in blocks)
        assert st["h2d_copies"] == len(blocks) + int(prefetch)  # + the prefetch of the next cycle's first
        assert st["h2d_bytes"] == sum(sizes[g] for g in blocks) + (sizes[0] if prefetch else 0)
        assert st["violations"] == 0


def test_steps_per_group_state_dict_load_and_deepcopy_while_resident():
    """Mid-block (the active group on the device, its host views stale): state_dict() is the true
    state and the group stays resident; load_state_dict replaces it (also the resident copy); a
    deep copy trains on like the original."""
    import copy

    cls, kw = _hift_classes()["adamw"]
    K = 3
    ref_model = _uneven_model(5)
    model = _clone_model(ref_model)
    ref = cls(_groups_of(ref_model), strategy="random", seed=2, steps_per_group=K, offload=False, **kw)
    off = cls(_groups_of(model), strategy="random", seed=2, steps_per_group=K, offload=True, **kw)
    eng = off.offload_engine
    batches = _batches(4 * K + 6, seed=5)
    _train(ref_model, ref, batches[:4])
    _train(model, off, batches[:4])  # block 1, one step done: resident
    g = off.active_group
    assert eng.residency(g) == "device" and off.schedule.step_in_block == 1
    saved_ref, saved_off = copy.deepcopy(ref.state_dict()), copy.deepcopy(off.state_dict())
    _assert_state_equal(saved_ref, saved_off)
    assert eng.residency(g) == "device"  # flushed, still resident
    saved_params = [p.detach().clone() for p in model.parameters()]
    # a deep copy mid-block: its own engine, the same training
    twins = copy.deepcopy({"m": model, "o": off})
    _train(model, off, batches[4:9])
    _train(twins["m"], twins["o"], batches[4:9])
    _train(ref_model, ref, batches[4:9])
    for a, b, c in zip(ref_model.parameters(), model.parameters(), twins["m"].parameters()):
        assert torch.equal(a, b) and torch.equal(a, c)
    _assert_state_equal(ref.state_dict(), twins["o"].state_dict())
    # load the mid-block checkpoint while another group is resident, and continue
    assert off.active_group != g or off.schedule.step_in_block != 1
    for o, m in ((off, model), (ref, ref_model)):
        o.load_state_dict(copy.deepcopy(saved_ref))
        with torch.no_grad():
            for p, q in zip(m.parameters(), saved_params):
                p.copy_(q)
    assert off.active_group == g
    _train(model, off, batches[4:5])  # g is resident again
    _train(ref_model, ref, batches[4:5])
    # load while the loaded group itself is resident: engine.load_host replaces its device copy
    assert eng.residency(g) == "device"
    for o, m in ((off, model), (ref, ref_model)):
        o.load_state_dict(copy.deepcopy(saved_off))
        with torch.no_grad():
            for p, q in zip(m.parameters(), saved_params):
                p.copy_(q)
    assert eng.residency(g) == "device"
    _train(model, off, batches[4:])
    _train(ref_model, ref, batches[4:])
    for a, b in zip(ref_model.parameters(), model.parameters()):
        assert torch.equal(a, b)
    _assert_state_equal(ref.state_dict(), off.state_dict())
    assert eng.stats()["violations"] == 0


def test_load_state_dict_of_a_run_that_never_visited_some_groups():
    """A checkpoint saved before every group was visited (those groups have no state) loads into an
    optimizer whose engine holds state for them: they leave the engine, are not prefetched, and get
    fresh state at their first step, like in the run that saved it."""
    import copy

    cls, kw = _hift_classes()["adamw"]
    src_model = _uneven_model(6)
    src = cls(_groups_of(src_model), offload=False, **kw)
    batches = _batches(3 * src.num_groups, seed=6)
    _train(src_model, src, batches[:2])
    sd = copy.deepcopy(src.state_dict())
    model = _clone_model(src_model)
    off = cls(_groups_of(model), offload=True, **kw)
    _train(model, off, batches[:off.num_groups + 1])  # every group has state here
    off.load_state_dict(sd)
    with torch.no_grad():
        for p, q in zip(model.parameters(), src_model.parameters()):
            p.copy_(q)
    _train(src_model, src, batches[2:])
    _train(model, off, batches[2:])
    for a, b in zip(src_model.parameters(), model.parameters()):
        assert torch.equal(a, b)
    _assert_state_equal(src.state_dict(), off.state_dict())


def test_state_dict_mid_flight_is_true_state():
    from hift_ext.offload import OffloadEngine

    cls, kw = _hift_classes()["adamw"]
    ref_model = _uneven_model(1)
    off_model = _clone_model(ref_model)
    ref = cls(_groups_of(ref_model), offload=False, **kw)
    off = cls(_groups_of(off_model), offload=True, **kw)
    # slow copy threads, so that write-backs and prefetches are still in flight at state_dict()
    off._offload.engine = OffloadEngine("cpu", 2, debug=True, debug_delay_us=4000)
    for t, (x, y) in enumerate(_batches(2 * ref.num_groups + 1, seed=1)):
        for model, opt in ((ref_model, ref), (off_model, off)):
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        if t % 3 == 0:
            _assert_state_equal(ref.state_dict(), off.state_dict())
    _assert_state_equal(ref.state_dict(), off.state_dict())
    assert off.offload_engine.stats()["violations"] == 0


@pytest.mark.parametrize("src_offload", [True, False])
def test_load_state_dict_restores_engine(src_offload):
    import copy

    cls, kw = _hift_classes()["adamw"]
    model_a = _uneven_model(2)
    a = cls(_groups_of(model_a), strategy="random", offload=src_offload, **kw)
    batches = _batches(3 * a.num_groups + 4, seed=2)
    _train(model_a, a, batches[:2 * a.num_groups + 1])
    sd = copy.deepcopy(a.state_dict())
    model_b = _clone_model(model_a)
    b = cls(_groups_of(model_b), strategy="random", offload=True, offload_slots=3, **kw)
    _train(model_b, b, batches[:1])  # some state already in b's engine, overwritten by the load
    for pb, pa in zip(model_b.parameters(), model_a.parameters()):
        pb.data.copy_(pa.data)
    b.load_state_dict(sd)
    # the engine, not the device, holds the loaded state: only "step" stays with the parameters
    for st in b.state.values():
        for k, v in st.items():
            if k != "step":
                assert v.device.type == "cpu"
    _assert_state_equal(b.state_dict(), sd)
    _train(model_a, a, batches[2 * a.num_groups + 1:])
    _train(model_b, b, batches[2 * a.num_groups + 1:])
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)
    # and into a resident optimizer
    model_c = _clone_model(model_b)
    c = cls(_groups_of(model_c), strategy="random", offload=False, **kw)
    c.load_state_dict(copy.deepcopy(b.state_dict()))
    _train(model_b, b, batches[:3])
    _train(model_c, c, batches[:3])
    for pb, pc in zip(model_b.parameters(), model_c.parameters()):
        assert torch.equal(pb, pc)


@pytest.mark.parametrize("opt_name", ["adamw", "sgd"])
def test_exception_in_forward_keeps_state(opt_name):
    cls, kw = _hift_classes()[opt_name]
    ref_model = _uneven_model(4)
    off_model = _clone_model(ref_model)
    ref = cls(_groups_of(ref_model), offload=False, **kw)
    off = cls(_groups_of(off_model), offload=True, **kw)
    batches = _batches(4 * ref.num_groups, seed=4)
    fail_at = {3, 7, 8, 15}
    _train(ref_model, ref, [b for t, b in enumerate(batches) if t not in fail_at])
    _train(off_model, off, batches, fail_at=fail_at)
    for a, b in zip(ref_model.parameters(), off_model.parameters()):
        assert torch.equal(a, b)
    _assert_state_equal(ref.state_dict(), off.state_dict())


def test_offload_default_and_memory_report():
    cls, kw = _hift_classes()["adamw"]
    opt = cls(_groups_of(_uneven_model()), **kw)
    assert opt.offload_engine is None  # CPU parameters: resident unless asked
    model = _uneven_model()
    opt = cls(_groups_of(model), offload=True, **kw)
    _train(model, opt, _batches(opt.num_groups))
    rep = opt.memory_report()
    n_state = sum(2 * p.numel() * 4 for p in model.parameters())
    assert rep["host_store_bytes"] >= n_state
    assert rep["device_bytes"] == rep["device_budget_bytes"] <= rep["largest_group_bytes"] * 2 + 1024
    assert rep["num_groups"] == opt.num_groups


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("tuning", [None, dict(pipeline_bytes=1024, copy_threads=1),
                                    dict(pipeline_bytes=4096, copy_threads=4), dict(pipeline_bytes=0)],
                         ids=["default", "pieces1k", "pieces4k", "one-shot"])
def test_offload_default_on_cuda_bitwise(tuning):
    """Offloaded == resident, bitwise, also when every group is staged in many small pieces (the
    pipelined path: each piece's DMA overlaps the next piece's memcpy, write-backs piece by piece)."""
    cls, kw = _hift_classes()["adamw"]
    ref_model = _uneven_model().cuda()
    off_model = _clone_model(ref_model)
    ref = cls(_groups_of(ref_model), offload=False, **kw)
    off = cls(_groups_of(off_model), **kw)
    assert off.offload_engine is not None  # default on CUDA
    if tuning is not None:
        off.offload_engine.set_tuning(**tuning)
    batches = [(x.cuda(), y.cuda()) for x, y in _batches(4 * ref.num_groups)]
    _train(ref_model, ref, batches)
    _train(off_model, off, batches)
    for a, b in zip(ref_model.parameters(), off_model.parameters()):
        assert torch.equal(a, b)
    _assert_state_equal(ref.state_dict(), off.state_dict())
    assert off.memory_report()["pinned_bytes"] > 0


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("budget", [None, 8 << 10], ids=["one-piece", "streamed"])
def test_steps_per_group_on_cuda_bitwise(budget):
    """CUDA, steps_per_group=3: the block's group kept in the device arena between its steps (or, for
    a group larger than half the budget, streamed at every step) == resident, bitwise; state_dict
    mid-block is the true state."""
    cls, kw = _hift_classes()["adamw"]
    ref_model = _uneven_model().cuda()
    off_model = _clone_model(ref_model)
    ref = cls(_groups_of(ref_model), steps_per_group=3, offload=False, **kw)
    off = cls(_groups_of(off_model), steps_per_group=3, offload_device_bytes=budget, **kw)
    assert off.offload_engine is not None
    batches = [(x.cuda(), y.cuda()) for x, y in _batches(2 * 3 * ref.num_groups + 2)]
    for t in range(len(batches)):
        _train(ref_model, ref, batches[t:t + 1])
        _train(off_model, off, batches[t:t + 1])
        if t % 5 == 4:
            _assert_state_equal(ref.state_dict(), off.state_dict())
    for a, b in zip(ref_model.parameters(), off_model.parameters()):
        assert torch.equal(a, b)
    _assert_state_equal(ref.state_dict(), off.state_dict())
    st = off.offload_engine.stats()
    assert st["violations"] == 0 and st["overflow_allocs"] == 0


# ----------------------------------------------------------------------------- gradient checkpointing
def _tiny_llama(seed=0):
    transformers = pytest.importorskip("transformers")
    conf = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=64, tie_word_embeddings=False,
                                    attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(conf)
    model.train()
    model.config.use_cache = False
    return model


@pytest.mark.parametrize("offload", [False, True])
def test_gradient_checkpointing_trains_the_same(offload):
    from hift_ext.hift_optim import FusedHiFTAdamW

    plain = _tiny_llama()
    ckpt = _tiny_llama()
    from hift_ext.train import enable_gradient_checkpointing

    enable_gradient_checkpointing(ckpt)
    assert any(getattr(m, "gradient_checkpointing", False) for m in ckpt.modules())
    opt_p = FusedHiFTAdamW(plain, lr=1e-2, offload=offload)
    opt_c = FusedHiFTAdamW(ckpt, lr=1e-2, offload=offload)
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 64, (2, 12), generator=g) for _ in range(2 * opt_p.num_groups + 1)]
    before = {n: p.detach().clone() for n, p in ckpt.named_parameters()}
    for x in ids:
        for model, opt in ((plain, opt_p), (ckpt, opt_c)):
            active = opt.active_group
            model(input_ids=x, labels=x).loss.backward()
            # every parameter of the active group got a gradient (no input-require-grads hack)
            assert all(p.grad is not None for p in opt.param_groups[active]["params"])
            opt.step()
            opt.zero_grad()
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=n)
        assert not torch.equal(b, before[n]), f"{n} never trained"
