import io
import math
import warnings

import pytest
import torch

import hift_ext.lr as lr_mod
from hift_ext.lr import DEFAULT_HOLD, HOLDS, SCHEDULER_NAMES, DelayedLRScheduler, get_scheduler

transformers = pytest.importorskip("transformers")


def stub(k=None, lr=1.0, position=True, groups=1, K=None):
    """A torch SGD standing in for a HiFT optimizer (num_groups, steps_per_group, hift_position set
    by the test)."""
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(groups)]
    opt = torch.optim.SGD([{"params": [p], "lr": lr * (i + 1)} for i, p in enumerate(params)], lr=lr)
    if k is not None:
        opt.num_groups = k
    if K is not None:
        opt.steps_per_group = K
    if position:
        opt.hift_position = 0
    return opt


def run(opt, sched, steps, skip=()):
    """LRs used at each optimizer step; steps in `skip` are AMP-skipped (position kept)."""
    used = []
    for i in range(steps):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        if hasattr(opt, "hift_position") and i not in skip:
            opt.hift_position += 1
        sched.step()
    return used


def close(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x == pytest.approx(y, abs=1e-12), (a, b)


def linear(s, W, T):
    return s / W if s < W else max(0.0, (T - s) / (T - W))


def held(t, H, W):
    """The step the delayed schedule is evaluated at (hift_ext/lr.py): the window's first step, or
    during warmup its last step capped at W."""
    a = H * (t // H)
    return a if a >= W else min(a + H - 1, W)


def test_linear_warmup_k1():
    opt = stub(k=1)
    sched = get_scheduler("linear", opt, num_warmup_steps=4, num_training_steps=16)
    close(run(opt, sched, 16), [linear(t, 4, 16) for t in range(16)])
    close(run(opt, sched, 3), [0.0] * 3)  # past the horizon


def test_linear_warmup_k4_exact():
    opt = stub(k=4)
    sched = get_scheduler("linear", opt, num_warmup_steps=4, num_training_steps=16)
    used = run(opt, sched, 16)
    # the first cycle is within the warmup: its last step's value, 3/4 (it used to be schedule(0) = 0)
    expected = [0.75] * 4 + [1.0] * 4 + [8 / 12] * 4 + [4 / 12] * 4
    close(used, expected)
    # constant within each cycle of k steps
    for c in range(4):
        assert len(set(used[4 * c:4 * c + 4])) == 1


def test_cosine_k4_exact():
    opt = stub(k=4, lr=2e-5)
    sched = get_scheduler("cosine", opt, num_warmup_steps=0, num_training_steps=16)
    used = run(opt, sched, 16)
    per_cycle = [0.5 * (1 + math.cos(math.pi * s / 16)) for s in (0, 4, 8, 12)]
    close(used, [2e-5 * v for v in per_cycle for _ in range(4)])


def test_cosine_k1_matches_transformers():
    opt = stub(k=1)
    sched = get_scheduler("cosine", opt, num_warmup_steps=3, num_training_steps=20)
    close(run(opt, sched, 20), [
        t / 3 if t < 3 else 0.5 * (1 + math.cos(math.pi * (t - 3) / 17)) for t in range(20)
    ])


def test_constant():
    for k in (1, 4):
        opt = stub(k=k, lr=0.3)
        sched = get_scheduler("constant", opt)
        close(run(opt, sched, 12), [0.3] * 12)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
@pytest.mark.parametrize("k", [1, 3])
def test_every_name_is_transformers_schedule_at_cycle_start(name, k):
    kwargs = {}
    if name in ("cosine_with_min_lr", "cosine_warmup_with_min_lr"):
        kwargs = {"min_lr_rate": 0.1}
    if name == "warmup_stable_decay":
        kwargs = {"num_decay_steps": 10}
    if name == "polynomial":
        kwargs = {"lr_end": 1e-3, "power": 2.0}
    T, W = 30, 4
    opt = stub(k=k, lr=0.5)
    sched = get_scheduler(name, opt, num_warmup_steps=W, num_training_steps=T, **kwargs)
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    ref = transformers.get_scheduler(name, ref_opt, num_warmup_steps=W, num_training_steps=T,
                                     scheduler_specific_kwargs=kwargs or None)
    ref_lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(T):
            ref_lrs.append(ref_opt.param_groups[0]["lr"])
            ref_opt.step()
            ref.step()
    close(run(opt, sched, T), [ref_lrs[held(t, k, W)] for t in range(T)])


def test_decays_over_whole_horizon_not_official_bug():
    # Official HiFT code: scheduler stepped once per cycle on the unscaled horizon T,
    # so after T steps it has only reached schedule(T / k): LR barely decays.
    T, k = 400, 8
    opt = stub(k=k)
    sched = get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=T)
    used = run(opt, sched, T)
    bug_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    bug = transformers.get_linear_schedule_with_warmup(bug_opt, 0, T)
    bug_lrs = []
    for t in range(T):
        bug_lrs.append(bug_opt.param_groups[0]["lr"])
        bug_opt.step()
        if (t + 1) % k == 0:
            bug.step()
    assert bug_lrs[-1] == pytest.approx(1 - (T // k - 1) / T) and bug_lrs[-1] > 0.85
    assert used[-1] == pytest.approx((T - (T - k)) / T)  # schedule(T - k) = k / T
    assert used[-1] < 0.05
    assert used[T // 2] == pytest.approx(0.5)
    # monotone non-increasing, and constant within cycles
    assert all(a >= b for a, b in zip(used, used[1:]))
    assert all(len(set(used[c * k:(c + 1) * k])) == 1 for c in range(T // k))


def test_amp_skip_keeps_lr():
    opt = stub(k=2)
    sched = get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=10)
    used = run(opt, sched, 8, skip={1, 2, 3})
    # positions: 0,1,1,1,1,2,3,4 -> schedule(0,0,0,0,0,2,2,4)
    close(used, [1.0, 1.0, 1.0, 1.0, 1.0, 0.8, 0.8, 0.6])
    assert opt.hift_position == 5
    assert sched.position == 5 and sched.schedule_step == 4


def test_no_hift_attributes_is_plain_schedule():
    opt = stub(k=None, position=False)
    sched = get_scheduler("linear", opt, num_warmup_steps=2, num_training_steps=10)
    assert sched.num_groups == 1
    close(run(opt, sched, 10), [linear(t, 2, 10) for t in range(10)])


def test_num_groups_without_position_uses_step_count():
    opt = stub(k=3, position=False)
    sched = get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=9)
    close(run(opt, sched, 9), [1.0] * 3 + [6 / 9] * 3 + [3 / 9] * 3)


def test_per_group_base_lrs():
    opt = stub(k=2, lr=0.1, groups=3)
    sched = get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=8)
    run(opt, sched, 2)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1 * 0.75, 0.2 * 0.75, 0.3 * 0.75])


@pytest.mark.parametrize("hift", [True, False])
def test_state_dict_round_trip(hift):
    T, k = 24, 4

    def make():
        opt = stub(k=k if hift else None, position=hift)
        return opt, get_scheduler("cosine", opt, num_warmup_steps=3, num_training_steps=T)

    opt, sched = make()
    full = run(opt, sched, T)

    opt, sched = make()
    first = run(opt, sched, 10)
    buf = io.BytesIO()
    torch.save({"sched": sched.state_dict(), "opt": opt.state_dict(),
                "pos": getattr(opt, "hift_position", None)}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    assert "lr_lambdas" not in ckpt["sched"]

    opt2, sched2 = make()
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    if hift:
        opt2.hift_position = ckpt["pos"]
    rest = run(opt2, sched2, T - 10)
    close(first + rest, full)


def test_delayed_scheduler_custom_lambda():
    opt = stub(k=2)
    sched = DelayedLRScheduler(opt, lambda s: 1.0 / (1 + s))
    close(run(opt, sched, 6), [1.0, 1.0, 1 / 3, 1 / 3, 1 / 5, 1 / 5])
    with pytest.raises(ValueError, match="one per param group"):
        DelayedLRScheduler(opt, [lambda s: 1.0, lambda s: 1.0])


def test_bad_inputs():
    opt = stub(k=2)
    with pytest.raises(ValueError, match="valid names.*linear.*cosine"):
        get_scheduler("cosine_annealing", opt, num_training_steps=10)
    with pytest.raises(ValueError, match="valid names"):
        get_scheduler("reduce_lr_on_plateau", opt)
    with pytest.raises(ValueError, match="num_training_steps"):
        get_scheduler("linear", opt, num_warmup_steps=2)
    with pytest.raises(ValueError, match="num_warmup_steps"):
        get_scheduler("linear", opt, num_warmup_steps=-1, num_training_steps=10)
    with pytest.raises(TypeError, match="not a torch.optim.Optimizer"):
        get_scheduler("linear", object(), num_training_steps=10)
    opt.num_groups = 0
    with pytest.raises(ValueError, match="num_groups"):
        get_scheduler("constant", opt)


# ------------------------------------------------------------------------ steps per group, hold, warmup
def test_default_hold_is_one_constant(monkeypatch):
    assert DEFAULT_HOLD in HOLDS and HOLDS == ("cycle", "visit")
    opt = stub(k=3, K=2)
    assert get_scheduler("linear", opt, num_training_steps=12).hold == DEFAULT_HOLD
    assert DelayedLRScheduler(opt, lambda s: 1.0).hold == DEFAULT_HOLD
    monkeypatch.setattr(lr_mod, "DEFAULT_HOLD", "visit")  # flipping the constant flips every default
    assert get_scheduler("linear", stub(k=3, K=2), num_training_steps=12).hold == "visit"


@pytest.mark.parametrize("hold", HOLDS)
@pytest.mark.parametrize("K", [1, 2, 5])
def test_hold_window_with_steps_per_group(hold, K):
    """hold="cycle": constant over k * K steps; hold="visit": over K steps. No warmup: the window's
    first step, on the user's horizon T."""
    k, T = 3, 60
    opt = stub(k=k, K=K)
    sched = get_scheduler("linear", opt, num_training_steps=T, hold=hold)
    H = k * K if hold == "cycle" else K
    assert sched.hold_steps == H and sched.steps_per_group == K
    used = run(opt, sched, T)
    close(used, [linear(H * (t // H), 0, T) for t in range(T)])
    assert all(len(set(used[a:a + H])) == 1 for a in range(0, T, H))
    if H > 1:
        assert used[H - 1] != used[H]  # moves at the window's end


def test_visit_hold_with_one_step_per_group_is_the_plain_schedule():
    opt = stub(k=4, K=1)
    sched = get_scheduler("cosine", opt, num_warmup_steps=3, num_training_steps=20, hold="visit")
    close(run(opt, sched, 20), [
        t / 3 if t < 3 else 0.5 * (1 + math.cos(math.pi * (t - 3) / 17)) for t in range(20)
    ])


@pytest.mark.parametrize("hold,K", [("cycle", 1), ("cycle", 3), ("visit", 3), ("visit", 2)])
@pytest.mark.parametrize("W", [1, 2, 5, 6, 9, 13])
def test_warmup_gives_no_step_of_the_first_cycle_lr_zero(hold, K, W):
    """Any warmup used to give the whole first cycle lr = schedule(0) = 0. Now no step of the first
    cycle has lr 0 (a window in the warmup takes its last step's value, capped at W), the LR never
    falls during warmup, and every window starting at or after W is held exactly as before
    (schedule(window start))."""
    k, T = 3, 80
    opt = stub(k=k, K=K)
    sched = get_scheduler("linear", opt, num_warmup_steps=W, num_training_steps=T, hold=hold)
    used = run(opt, sched, T)
    H = k * K if hold == "cycle" else K
    assert all(v > 0 for v in used[:k * K]), used[:k * K]
    close(used, [linear(held(t, H, W), W, T) for t in range(T)])
    for t in range(T):
        a = H * (t // H)
        if a >= W:
            assert used[t] == pytest.approx(linear(a, W, T), abs=1e-12)  # the old hold
        else:
            assert used[t] <= 1.0 and (t == 0 or used[t] >= used[t - 1])
    assert all(len(set(used[a:a + H])) == 1 for a in range(0, T, H))  # still held within windows


def test_steps_per_group_amp_skip_keeps_lr():
    opt = stub(k=2, K=2)
    sched = get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=16, hold="visit")
    used = run(opt, sched, 8, skip={1, 2})
    # positions: 0,1,1,1,2,3,4,5 -> windows of 2 start at 0,0,0,0,2,2,4,4
    close(used, [1.0, 1.0, 1.0, 1.0, 14 / 16, 14 / 16, 12 / 16, 12 / 16])


def test_hold_is_saved_and_a_mismatch_is_refused():
    opt = stub(k=2, K=3)
    sched = get_scheduler("linear", opt, num_warmup_steps=2, num_training_steps=30, hold="visit")
    run(opt, sched, 4)
    sd = sched.state_dict()
    assert sd["hold"] == "visit" and sd["num_warmup_steps"] == 2
    other = get_scheduler("linear", stub(k=2, K=3), num_warmup_steps=2, num_training_steps=30, hold="cycle")
    with pytest.raises(ValueError, match="hold='visit'.*hold='cycle'.*hold='visit'"):
        other.load_state_dict(sd)
    same = get_scheduler("linear", stub(k=2, K=3), num_warmup_steps=2, num_training_steps=30, hold="visit")
    same.load_state_dict(sd)
    assert same.last_epoch == sched.last_epoch
    old = {k: v for k, v in sd.items() if k not in ("hold", "num_warmup_steps")}  # saved before K existed
    other.load_state_dict(old)
    assert other.hold == "cycle" and other.num_warmup_steps == 2


def test_bad_hold_and_steps_per_group():
    with pytest.raises(ValueError, match="hold must be one of 'cycle', 'visit'"):
        get_scheduler("linear", stub(k=2), num_training_steps=10, hold="epoch")
    with pytest.raises(ValueError, match="num_warmup_steps must be a whole number"):
        get_scheduler("linear", stub(k=2), num_warmup_steps=1.5, num_training_steps=10)
    assert get_scheduler("linear", stub(k=2), num_warmup_steps=2.0, num_training_steps=10).num_warmup_steps == 2
    opt = stub(k=2, K=0)
    with pytest.raises(ValueError, match="steps_per_group"):
        get_scheduler("constant", opt)
