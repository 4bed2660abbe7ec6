"""HiFT optimizers: FusedHiFTAdamW / FusedHiFTAdaGrad / FusedHiFTSGD.

Every rule of docs/semantics.md that concerns the optimizer is pinned down here (grouping itself
is tested in test_grouping.py, the schedule in test_schedule.py, the delayed LR in test_lr.py; the
bitwise resume in a new process and the LLaMA end-to-end run in test_hift_resume.py).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from _optim_testutil import MLP, assert_params_equal, batch, loss_fn, needs_kernels
from hift_ext.hift_optim import FusedHiFTAdaGrad, FusedHiFTAdamW, FusedHiFTSGD
from hift_ext.optim import FusedAdaGrad, FusedAdamW, FusedSGD
from hift_ext.schedule import GroupSchedule

pytestmark = needs_kernels

KINDS = {
    # name: (HiFT class, drop-in class, torch class, kwargs exercising the options)
    "adamw": (FusedHiFTAdamW, FusedAdamW, torch.optim.AdamW,
              {"lr": 1e-2, "weight_decay": 0.05, "amsgrad": True}),
    "adagrad": (FusedHiFTAdaGrad, FusedAdaGrad, torch.optim.Adagrad,
                {"lr": 5e-2, "lr_decay": 0.01, "initial_accumulator_value": 0.1, "weight_decay": 0.01}),
    "sgd": (FusedHiFTSGD, FusedSGD, torch.optim.SGD,
            {"lr": 5e-2, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
}
STRATEGIES = ["down2up", "up2down", "random"]


def check_invariants(opt):
    """Only the active group requires grad; every other parameter has no gradient."""
    active = opt.active_group
    for i, group in enumerate(opt.param_groups):
        assert group["hift_group"] == i
        for p in group["params"]:
            assert p.requires_grad == (i == active), (i, active)
            if i != active:
                assert p.grad is None, (i, active)


def hift_train(model, opt, steps, start=0, check=True):
    seen = []
    for t in range(start, start + steps):
        opt.zero_grad()
        x, y = batch(t)
        loss_fn(model, x, y).backward()
        if check:
            check_invariants(opt)
        seen.append(opt.active_group)
        opt.step()
        if check:
            check_invariants(opt)
    return seen


def reference_train(model, make_opt, schedule, steps, start=0):
    """k separate optimizers (one per group); step t steps only optimizer schedule.group_at(t)."""
    opts = [make_opt(g) for g in model.groups()]
    seen = []
    for t in range(start, start + steps):
        model.zero_grad(set_to_none=True)
        x, y = batch(t)
        loss_fn(model, x, y).backward()
        g = schedule.group_at(t)
        seen.append(g)
        opts[g].step()
    return seen


# ------------------------------------------------------------------------------ equivalence
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_equivalent_to_separate_torch_optimizers(kind, strategy):
    hift_cls, fused_cls, torch_cls, kw = KINDS[kind]
    model = MLP()
    ref_torch = copy.deepcopy(model)
    ref_fused = copy.deepcopy(model)
    opt = hift_cls(model.groups(), strategy=strategy, seed=3, **kw)
    k = opt.num_groups
    assert k == 4
    steps = 4 * k  # four cycles
    seen = hift_train(model, opt, steps)
    sched = GroupSchedule(k, strategy, 3)
    seen_ref = reference_train(ref_torch, lambda g: torch_cls(g, **kw), sched, steps)
    seen_fused = reference_train(ref_fused, lambda g: fused_cls(g, **kw), sched, steps)
    assert seen == seen_ref == seen_fused
    if strategy == "down2up":
        assert seen == [0, 1, 2, 3] * 4
    elif strategy == "up2down":
        assert seen == [3, 2, 1, 0] * 4
    else:
        cycles = [seen[i:i + k] for i in range(0, steps, k)]
        assert all(sorted(c) == list(range(k)) for c in cycles)
        assert len({tuple(c) for c in cycles}) > 1  # reshuffled every cycle
    # against torch.optim: fp32 rounding; against the drop-in kernels: bitwise
    assert_params_equal(model.parameters(), ref_torch.parameters(), exact=False)
    assert_params_equal(model.parameters(), ref_fused.parameters(), exact=True)
    # every group's own step count: 4 updates each
    for st in opt.state.values():
        if "step" in st:
            assert float(st["step"]) == 4.0
    assert opt.hift_position == steps


@pytest.mark.parametrize("kind", list(KINDS))
def test_single_group_equals_torch_optimizer(kind):
    hift_cls, _, torch_cls, kw = KINDS[kind]
    model = MLP()
    ref = copy.deepcopy(model)
    opt = hift_cls([list(model.parameters())], **kw)
    opt_ref = torch_cls(ref.parameters(), **kw)
    assert opt.num_groups == 1
    for t in range(10):
        opt.zero_grad()
        opt_ref.zero_grad()
        x, y = batch(t)
        loss_fn(model, x, y).backward()
        loss_fn(ref, x, y).backward()
        opt.step()
        opt_ref.step()
        assert all(p.requires_grad for p in model.parameters())
    assert_params_equal(model.parameters(), ref.parameters(), exact=False)


# ------------------------------------------------------------------------------ switching
def test_construction_freezes_all_but_first_group_and_state_is_lazy():
    model = MLP()
    opt = FusedHiFTAdamW(model.groups(), strategy="up2down")
    assert opt.active_group == 3 and opt.order == [3, 2, 1, 0] and opt.hift_position == 0
    check_invariants(opt)
    assert len(opt.state) == 0
    assert opt.memory_report()["total_state_bytes"] == 0
    hift_train(model, opt, 1)
    top = model.groups()[3]
    assert set(opt.state) == set(top)  # state of a group is created when it is first active
    assert opt.memory_report()["total_state_bytes"] == sum(2 * p.numel() * 4 + 4 for p in top)
    hift_train(model, opt, 3, start=1)
    assert len(opt.state) == sum(len(g) for g in model.groups())


def test_adagrad_hift_state_is_lazy_too():
    model = MLP()
    opt = FusedHiFTAdaGrad(model.groups())
    assert len(opt.state) == 0
    hift_train(model, opt, 1)
    assert set(opt.state) == set(model.groups()[0])


def test_backward_computes_no_weight_grads_for_inactive_groups():
    model = MLP()
    opt = FusedHiFTSGD(model.groups(), strategy="up2down", lr=0.1)
    x, y = batch(0)
    loss_fn(model, x, y).backward()
    grads = [[p.grad is not None for p in g] for g in model.groups()]
    assert grads == [[False, False], [False, False], [False, False], [True, True]]
    # the first layer's input does not require grad and neither do its weights: autograd stops
    # at the top layer (backward never reaches the lower layers)
    out = model.layers[0](x)
    assert out.grad_fn is None
    opt.step()


def test_step_without_backward_raises_and_does_not_advance():
    model = MLP()
    opt = FusedHiFTAdamW(model.groups())
    with pytest.raises(RuntimeError, match="backward"):
        opt.step()
    assert opt.hift_position == 0 and opt.active_group == 0
    check_invariants(opt)
    hift_train(model, opt, 1)
    assert opt.active_group == 1
    with pytest.raises(RuntimeError, match="backward"):
        opt.step()  # the old group's grads were dropped, the new one has none yet
    assert opt.hift_position == 1 and opt.active_group == 1
    check_invariants(opt)


def test_gradient_accumulation_trains_the_same_group():
    """2 micro-batches of half size == 1 full batch (the group only switches in step())."""
    model = MLP()
    ref = copy.deepcopy(model)
    opt = FusedHiFTAdamW(model.groups(), strategy="random", lr=1e-2)
    opt_ref = FusedHiFTAdamW(ref.groups(), strategy="random", lr=1e-2)
    for t in range(8):
        x, y = batch(t, n=8)
        opt_ref.zero_grad()
        loss_fn(ref, x, y).backward()
        opt_ref.step()
        opt.zero_grad()
        active = opt.active_group
        for xs, ys in zip(x.split(4), y.split(4)):
            (loss_fn(model, xs, ys) / 2).backward()
            assert opt.active_group == active
            check_invariants(opt)
        opt.step()
        assert opt.active_group == opt_ref.active_group
    assert_params_equal(model.parameters(), ref.parameters(), exact=False, rtol=1e-5, atol=1e-6)


def test_clip_grad_norm_clips_the_active_group():
    model = MLP()
    opt = FusedHiFTAdamW(model.groups())
    hift_train(model, opt, 2)  # active group 2 now
    x, y = batch(5)
    loss_fn(model, x, y).backward()
    active = model.groups()[opt.active_group]
    expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in active]))
    before = [p.grad.clone() for p in active]
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e-3)
    torch.testing.assert_close(total, expected)
    for p, g in zip(active, before):
        torch.testing.assert_close(p.grad, g * (1e-3 / (expected + 1e-6)))
    opt.step()


# ------------------------------------------------------------------------------ AMP
def _snapshot(model, opt):
    return copy.deepcopy((model.state_dict(), opt.state_dict()))


def _assert_same_snapshot(a, b):
    (ma, oa), (mb, ob) = a, b
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k
    assert oa["hift"] == ob["hift"]
    assert oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        for k, v in oa["state"][i].items():
            assert torch.equal(v, ob["state"][i][k]), (i, k)


@pytest.mark.parametrize("kind", list(KINDS))
def test_grad_scaler_overflow_skips_and_retries_the_same_group(kind):
    hift_cls, _, _, kw = KINDS[kind]
    model = MLP()
    opt = hift_cls(model.groups(), strategy="random", seed=1, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for t in range(7):
        opt.zero_grad()
        x, y = batch(t)
        scaler.scale(loss_fn(model, x, y)).backward()
        overflow = t in (0, 4)  # on a first visit (no state yet) and later
        if overflow:
            active, pos, scale = opt.active_group, opt.hift_position, scaler.get_scale()
            next(iter(model.groups()[active])).grad.view(-1)[0] = float("inf")
            snap = _snapshot(model, opt)
        scaler.step(opt)
        scaler.update()
        if overflow:
            _assert_same_snapshot(snap, _snapshot(model, opt))
            assert opt.active_group == active and opt.hift_position == pos
            assert scaler.get_scale() < scale
            check_invariants(opt)
            assert model.groups()[active][0].grad is not None  # the retry may reuse zero_grad
    assert opt.hift_position == 5


def test_grad_scaler_training_matches_unscaled_training():
    model = MLP()
    ref = copy.deepcopy(model)
    opt = FusedHiFTAdamW(model.groups(), lr=1e-2)
    opt_ref = FusedHiFTAdamW(ref.groups(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    for t in range(8):
        x, y = batch(t)
        opt.zero_grad()
        scaler.scale(loss_fn(model, x, y)).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        scaler.step(opt)
        scaler.update()
        opt_ref.zero_grad()
        loss_fn(ref, x, y).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        opt_ref.step()
    assert_params_equal(model.parameters(), ref.parameters(), exact=False, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------ LR
def test_delayed_lr_with_get_scheduler():
    lr_mod = pytest.importorskip("hift_ext.lr")
    model = MLP()
    opt = FusedHiFTAdamW(model.groups(), lr=1e-2)
    k, total = opt.num_groups, 16
    sched = lr_mod.get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=total)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    used = []
    for t in range(total + 1):  # one overflowing step in the middle
        opt.zero_grad()
        x, y = batch(t)
        scaler.scale(loss_fn(model, x, y)).backward()
        if t == 6:
            model.groups()[opt.active_group][0].grad.view(-1)[0] = float("nan")
        else:
            used.append(opt.param_groups[opt.active_group]["lr"])
        scaler.step(opt)
        scaler.update()
        sched.step()
    expected = [1e-2 * (1 - k * (t // k) / total) for t in range(total)]
    assert used == pytest.approx(expected, rel=1e-12)


# ------------------------------------------------------------------------------ state dicts
@pytest.mark.parametrize("kind", list(KINDS))
def test_state_dict_load_continues_identically(kind):
    hift_cls, _, _, kw = KINDS[kind]
    model = MLP()
    opt = hift_cls(model.groups(), strategy="random", seed=7, **kw)
    hift_train(model, opt, 6)
    sd = opt.state_dict()
    assert sd["hift"]["optimizer"] == hift_cls.__name__
    assert sd["hift"]["schedule"]["position"] == 6
    assert sd["hift"]["shapes"] == [[list(p.shape) for p in g] for g in model.groups()]
    assert [g["hift_group"] for g in sd["param_groups"]] == [0, 1, 2, 3]

    model2 = MLP(seed=1)
    model2.load_state_dict(model.state_dict())
    opt2 = hift_cls(model2.groups(), strategy="random", seed=0, **kw)  # seed comes from the ckpt
    opt2.load_state_dict(copy.deepcopy(sd))
    assert opt2.active_group == opt.active_group and opt2.order == opt.order
    check_invariants(opt2)
    hift_train(model, opt, 9, start=6)
    hift_train(model2, opt2, 9, start=6)
    assert_params_equal(model.parameters(), model2.parameters(), exact=True)


def test_model_based_construction_and_group_size_fingerprint():
    model = MLP()
    opt = FusedHiFTAdamW(model, group_size=2)
    assert opt.num_groups == 2 and opt.group_size == 2
    assert [len(g.params) for g in opt.groups] == [4, 4]
    hift_train(model, opt, 3)
    sd = opt.state_dict()
    assert sd["hift"]["group_size"] == 2
    # a second HiFT optimizer on the same model sees every parameter again
    opt1 = FusedHiFTAdamW(model, group_size=1)
    assert opt1.num_groups == 4
    with pytest.raises(ValueError, match="group_size=2"):
        opt1.load_state_dict(sd)


def test_a_deep_copy_of_the_model_is_regrouped_whole_and_keeps_the_users_frozen_parameters():
    """copy.deepcopy(model) drops a Parameter's attributes (where the HiFT-frozen mark lives) but
    copies the modules, which remember what HiFT froze: a HiFT optimizer on the copy groups every
    parameter HiFT had frozen and leaves out those the user froze, before and after HiFT."""
    model = MLP()
    model.layers[0].bias.requires_grad_(False)  # frozen by the user before HiFT
    opt = FusedHiFTAdamW(model, group_size=1, strategy="up2down")
    hift_train(model, opt, 2)
    model.layers[opt.active_group].weight.requires_grad_(False)  # ... and one while HiFT trains
    user_frozen = {"layers.0.bias", f"layers.{opt.active_group}.weight"}
    assert sum(p.requires_grad for p in model.parameters()) == 1
    copied = copy.deepcopy(model)
    assert not any(hasattr(p, "_hift_frozen") for p in copied.parameters())  # what the modules make up for
    opt2 = FusedHiFTAdamW(copied, group_size=1, strategy="up2down")
    trainable = {n for n, p in copied.named_parameters() if any(p is q for g in opt2.groups for q in g.params)}
    assert trainable == {n for n, _ in copied.named_parameters()} - user_frozen
    # a copy of a submodule, and a refused construction on a copy changes nothing
    layers = copy.deepcopy(model.layers)
    before = [p.requires_grad for p in layers.parameters()]
    with pytest.raises(ValueError, match="covers 5 layer units"):
        FusedHiFTAdamW(layers, group_size=[3, 2])
    assert [p.requires_grad for p in layers.parameters()] == before
    assert sum(len(g.params) for g in FusedHiFTAdamW(layers, group_size=1).groups) == 6


def test_a_deep_copy_of_a_tied_model_regroups_the_tied_weight():
    """A weight shared by two modules (an embedding tied with its head) is remembered by both."""
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(11, 4)
            self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
            self.head = nn.Linear(4, 11, bias=False)
            self.head.weight = self.embed.weight

    model = Tied()
    opt = FusedHiFTAdamW([[model.embed.weight], list(model.layers[0].parameters()),
                          list(model.layers[1].parameters())], strategy="up2down")
    assert not model.embed.weight.requires_grad  # the top group is active; no module marks: groups given
    regrouped = FusedHiFTAdamW(model, group_size=1, strategy="up2down")  # the same model: the attribute
    assert regrouped.num_groups == 3  # the embedding (and its tied head), then each layer
    regrouped.zero_grad()
    copied = copy.deepcopy(model)
    assert copied.head.weight is copied.embed.weight and not copied.embed.weight.requires_grad
    assert [len(g.params) for g in FusedHiFTAdamW(copied, group_size=1).groups] == [1, 2, 2]
    del opt


def test_unequal_split_equals_the_same_explicit_groups_and_refuses_another_split():
    """group_size=[3, 1]: the bottom three layers in one group, the top one alone, exactly as
    explicit groups of those parameters train; its state_dict loads only into the same split."""
    model, ref = MLP(), MLP()
    opt = FusedHiFTAdamW(model, group_size=[3, 1], strategy="up2down", lr=1e-2)
    assert opt.num_groups == 2 and opt.group_size == (3, 1)
    assert [len(g.params) for g in opt.groups] == [6, 2]
    g = ref.groups()
    opt_ref = FusedHiFTAdamW([g[0] + g[1] + g[2], g[3]], strategy="up2down", lr=1e-2)
    assert hift_train(model, opt, 6) == hift_train(ref, opt_ref, 6) == [1, 0, 1, 0, 1, 0]
    assert_params_equal(model.parameters(), ref.parameters(), exact=True)
    sd = opt.state_dict()
    assert sd["hift"]["group_size"] == [3, 1]
    resumed = FusedHiFTAdamW(MLP(), group_size=(3, 1), strategy="up2down", lr=1e-2)
    resumed.load_state_dict(sd)
    assert resumed.hift_position == 6
    other = FusedHiFTAdamW(MLP(), group_size=[2, 2], strategy="up2down", lr=1e-2)
    with pytest.raises(ValueError, match=r"group_size=\[3, 1\]"):
        other.load_state_dict(sd)


@pytest.mark.parametrize("bad, exc, match", [
    ([3, 2], ValueError, r"covers 5 layer units but the model has 4"),
    ([4, 0], ValueError, "at least 1 layer unit"),
    ([2, 1.5, 1], TypeError, "must hold ints"),
    ([], TypeError, "must hold ints"),
])
def test_bad_unequal_split_is_refused_and_freezes_nothing(bad, exc, match):
    model = MLP()
    with pytest.raises(exc, match=match):
        FusedHiFTAdamW(model, group_size=bad)
    assert all(p.requires_grad for p in model.parameters())


def _mismatch_cases():
    def other_model():
        m = MLP(sizes=(6, 12, 11, 10, 3))
        return FusedHiFTAdamW(m.groups())

    def other_type():
        return FusedHiFTSGD(MLP().groups())

    def other_count():
        m = MLP(sizes=(6, 12, 10, 3))
        return FusedHiFTAdamW(m.groups())

    def other_strategy():
        return FusedHiFTAdamW(MLP().groups(), strategy="up2down")

    return {
        "model": (other_model, "different model"),
        "type": (other_type, "construct a FusedHiFTAdamW"),
        "count": (other_count, "HiFT groups"),
        "strategy": (other_strategy, "strategy='down2up'"),
    }


@pytest.mark.parametrize("case", ["model", "type", "count", "strategy", "not_hift"])
def test_mismatched_state_dict_is_refused_and_changes_nothing(case):
    src_model = MLP()
    src = FusedHiFTAdamW(src_model.groups())
    hift_train(src_model, src, 2)
    sd = src.state_dict()
    if case == "not_hift":
        plain = torch.optim.AdamW(MLP().parameters())
        make, match, sd = (lambda: src.__class__(MLP().groups())), "no 'hift' entry", plain.state_dict()
    else:
        make, match = _mismatch_cases()[case]
    target = make()
    model_params = [p for g in target.param_groups for p in g["params"]]
    # give the target some progress of its own
    for t in range(3):
        target.zero_grad()
        for p in target.param_groups[target.active_group]["params"]:
            p.grad = torch.ones_like(p)
        target.step()
    before = copy.deepcopy(target.state_dict())
    flags = [p.requires_grad for p in model_params]
    values = [p.detach().clone() for p in model_params]
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(sd)
    after = target.state_dict()
    assert after["hift"] == before["hift"]
    assert after["param_groups"] == before["param_groups"]
    for i in before["state"]:
        for k, v in before["state"][i].items():
            assert torch.equal(v, after["state"][i][k])
    assert flags == [p.requires_grad for p in model_params]
    assert all(torch.equal(a, b) for a, b in zip(values, model_params))


# ------------------------------------------------------------------------------ bad input
def test_bad_inputs():
    model = MLP()
    with pytest.raises(ValueError, match="unknown HiFT strategy"):
        FusedHiFTAdamW(model, strategy="sideways")
    with pytest.raises(ValueError, match="group_size"):
        FusedHiFTAdamW(model, group_size=0)
    with pytest.raises(ValueError, match="group_size"):
        FusedHiFTAdamW(model, group_size=5)  # 4 layer units
    with pytest.raises(TypeError, match="group_size"):
        FusedHiFTAdamW(model, group_size=1.5)
    with pytest.raises(ValueError, match="group_size"):
        FusedHiFTAdamW(model.groups(), group_size=2)
    g = model.groups()
    with pytest.raises(ValueError, match="exactly one group"):
        FusedHiFTAdamW([g[0], g[1] + [g[0][0]]])
    with pytest.raises(TypeError, match="flat list"):
        FusedHiFTAdamW(list(model.parameters()))
    frozen = MLP()
    frozen.layers[1].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        FusedHiFTAdamW([list(layer.parameters()) for layer in frozen.layers])
    integer = nn.Parameter(torch.zeros(3, dtype=torch.long), requires_grad=False)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        FusedHiFTAdamW([g[0], [integer]])
    nothing = MLP().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        FusedHiFTAdamW(nothing)
    with pytest.raises(ValueError, match="empty"):
        FusedHiFTAdamW([])
    with pytest.raises(TypeError, match="unexpected keyword"):
        FusedHiFTAdamW(model.groups(), momentum=0.9)
    with pytest.raises(ValueError, match="Nesterov"):
        FusedHiFTSGD(model.groups(), nesterov=True)
    opt = FusedHiFTAdamW(model.groups())
    with pytest.raises(RuntimeError, match="fixed at construction"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})


def test_frozen_params_of_a_model_are_left_alone():
    model = MLP()
    model.layers[0].requires_grad_(False)  # the user freezes the bottom layer
    opt = FusedHiFTAdamW(model)
    assert opt.num_groups == 3
    for t in range(6):
        hift_train(model, opt, 1, start=t)
        assert not any(p.requires_grad for p in model.layers[0].parameters())
    assert all(p.grad is None for p in model.layers[0].parameters())


def test_deepcopy_keeps_the_hift_state():
    model = MLP()
    opt = FusedHiFTAdamW(model.groups(), strategy="random", seed=2)
    hift_train(model, opt, 3)
    clone = copy.deepcopy(opt)
    assert clone.hift_position == 3 and clone.active_group == opt.active_group
    assert clone.num_groups == 4 and len(clone.groups) == 4
    assert clone.state_dict()["hift"] == opt.state_dict()["hift"]


# ------------------------------------------------------------------------------ steps per group
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_steps_per_group_equivalent_to_separate_torch_optimizers(kind, strategy):
    """steps_per_group=K: K consecutive steps on each group, every group keeping its own state and
    step count; equals k separate optimizers stepped in the K-block schedule."""
    hift_cls, fused_cls, torch_cls, kw = KINDS[kind]
    K = 3
    model = MLP()
    ref_torch = copy.deepcopy(model)
    ref_fused = copy.deepcopy(model)
    opt = hift_cls(model.groups(), strategy=strategy, seed=3, steps_per_group=K, **kw)
    assert opt.steps_per_group == K
    k = opt.num_groups
    steps = 2 * k * K + 2  # two cycles and two steps into the third (mid-block)
    seen = hift_train(model, opt, steps)
    sched = GroupSchedule(k, strategy, 3, steps_per_group=K)
    assert seen == reference_train(ref_torch, lambda g: torch_cls(g, **kw), sched, steps) \
        == reference_train(ref_fused, lambda g: fused_cls(g, **kw), sched, steps)
    blocks = [seen[i:i + K] for i in range(0, steps, K)]
    assert all(len(set(b)) == 1 for b in blocks)
    one = GroupSchedule(k, strategy, 3)
    assert [b[0] for b in blocks] == [one.group_at(i) for i in range(len(blocks))]
    assert_params_equal(model.parameters(), ref_torch.parameters(), exact=False)
    assert_params_equal(model.parameters(), ref_fused.parameters(), exact=True)
    counts = {p: seen.count(i) for i, g in enumerate(model.groups()) for p in g}
    for p, st in opt.state.items():
        if "step" in st:
            assert float(st["step"]) == counts[p]


def test_steps_per_group_one_is_plain_hift_bitwise():
    a, b = MLP(), MLP()
    opt_a = FusedHiFTAdamW(a.groups(), strategy="random", seed=4)
    opt_b = FusedHiFTAdamW(b.groups(), strategy="random", seed=4, steps_per_group=1)
    assert hift_train(a, opt_a, 11) == hift_train(b, opt_b, 11)
    assert_params_equal(a.parameters(), b.parameters(), exact=True)


def test_steps_per_group_requires_grad_flips_only_at_a_switch(monkeypatch):
    """Within a block nothing is frozen or thawed (requires_grad_ is not called); the gradients just
    applied are dropped, so step() without a new backward raises in the middle of a block too."""
    calls = []
    orig = nn.Parameter.requires_grad_

    def counting(self, flag=True):
        calls.append(flag)
        return orig(self, flag)

    monkeypatch.setattr(nn.Parameter, "requires_grad_", counting, raising=False)
    model = MLP()
    opt = FusedHiFTAdamW(model.groups(), steps_per_group=3)
    for t in range(9):
        calls.clear()
        hift_train(model, opt, 1, start=t)
        assert bool(calls) == (t % 3 == 2), (t, calls)  # only the block's last step switches
        check_invariants(opt)
        if t % 3 != 2:
            assert all(p.grad is None for p in model.groups()[opt.active_group])
            with pytest.raises(RuntimeError, match="backward"):
                opt.step()
            assert opt.hift_position == t + 1


def test_steps_per_group_gradient_accumulation_trains_the_same_group():
    model = MLP()
    ref = copy.deepcopy(model)
    opt = FusedHiFTAdamW(model.groups(), strategy="random", lr=1e-2, steps_per_group=2)
    opt_ref = FusedHiFTAdamW(ref.groups(), strategy="random", lr=1e-2, steps_per_group=2)
    for t in range(12):
        x, y = batch(t, n=8)
        opt_ref.zero_grad()
        loss_fn(ref, x, y).backward()
        opt_ref.step()
        opt.zero_grad()
        active = opt.active_group
        for xs, ys in zip(x.split(4), y.split(4)):
            (loss_fn(model, xs, ys) / 2).backward()
            assert opt.active_group == active
            check_invariants(opt)
        opt.step()  # one group per optimizer step, whatever the number of micro-batches
        assert opt.hift_position == t + 1 and opt.active_group == opt_ref.active_group
    assert_params_equal(model.parameters(), ref.parameters(), exact=False, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", list(KINDS))
def test_steps_per_group_amp_skip_does_not_count(kind):
    """An overflowing step changes nothing and does not count towards the block's K steps."""
    hift_cls, _, _, kw = KINDS[kind]
    K = 3
    model = MLP()
    opt = hift_cls(model.groups(), strategy="random", seed=1, steps_per_group=K, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    groups = []
    for t in range(10):
        opt.zero_grad()
        x, y = batch(t)
        scaler.scale(loss_fn(model, x, y)).backward()
        overflow = t in (0, 2, 3)  # first visit, mid-block, and twice in a row
        if overflow:
            active, pos = opt.active_group, opt.hift_position
            next(iter(model.groups()[active])).grad.view(-1)[0] = float("inf")
            snap = _snapshot(model, opt)
        else:
            groups.append(opt.active_group)
        scaler.step(opt)
        scaler.update()
        if overflow:
            _assert_same_snapshot(snap, _snapshot(model, opt))
            assert opt.active_group == active and opt.hift_position == pos
            check_invariants(opt)
    sched = GroupSchedule(opt.num_groups, "random", 1, steps_per_group=K)
    assert opt.hift_position == 7 and groups == [sched.group_at(t) for t in range(7)]


def test_steps_per_group_delayed_lr_holds():
    lr_mod = pytest.importorskip("hift_ext.lr")
    for hold in lr_mod.HOLDS:
        model = MLP()
        opt = FusedHiFTAdamW(model.groups(), lr=1e-2, steps_per_group=2)
        k, K, total = opt.num_groups, 2, 24
        sched = lr_mod.get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=total, hold=hold)
        used = []
        for t in range(total):
            used.append(opt.param_groups[opt.active_group]["lr"])
            hift_train(model, opt, 1, start=t, check=False)
            sched.step()
        H = k * K if hold == "cycle" else K
        assert used == pytest.approx([1e-2 * (1 - H * (t // H) / total) for t in range(total)], rel=1e-12)


def test_steps_per_group_state_dict_round_trip_and_mismatch():
    model = MLP()
    opt = FusedHiFTAdamW(model.groups(), strategy="up2down", steps_per_group=3)
    hift_train(model, opt, 5)  # mid-block
    sd = opt.state_dict()
    assert sd["hift"]["steps_per_group"] == 3 and sd["hift"]["schedule"]["steps_per_group"] == 3
    assert "steps_per_group=3" in repr(opt)
    model2 = MLP(seed=1)
    model2.load_state_dict(model.state_dict())
    opt2 = FusedHiFTAdamW(model2.groups(), strategy="up2down", steps_per_group=3)
    opt2.load_state_dict(copy.deepcopy(sd))
    assert opt2.active_group == opt.active_group and opt2.schedule.step_in_block == 2
    check_invariants(opt2)
    hift_train(model, opt, 7, start=5)
    hift_train(model2, opt2, 7, start=5)
    assert_params_equal(model.parameters(), model2.parameters(), exact=True)
    wrong = FusedHiFTAdamW(MLP().groups(), strategy="up2down")
    before = copy.deepcopy(wrong.state_dict())
    with pytest.raises(ValueError, match=r"saved with steps_per_group=3 but this optimizer has "
                                         r"steps_per_group=1; construct the optimizer with steps_per_group=3"):
        wrong.load_state_dict(sd)
    assert wrong.state_dict()["hift"] == before["hift"]
    # a state_dict saved before steps_per_group existed was made with one step per group
    old_model = MLP()
    old = FusedHiFTAdamW(old_model.groups())
    hift_train(old_model, old, 2)
    old_sd = old.state_dict()
    del old_sd["hift"]["steps_per_group"], old_sd["hift"]["schedule"]["steps_per_group"]
    FusedHiFTAdamW(MLP().groups()).load_state_dict(copy.deepcopy(old_sd))
    with pytest.raises(ValueError, match="steps_per_group=1 but this optimizer has steps_per_group=2"):
        FusedHiFTAdamW(MLP().groups(), steps_per_group=2).load_state_dict(old_sd)


@pytest.mark.parametrize("bad,exc", [(0, ValueError), (-1, ValueError), (2.5, TypeError), (True, TypeError),
                                     ("3", TypeError)])
def test_bad_steps_per_group(bad, exc):
    model = MLP()
    with pytest.raises(exc, match=r"FusedHiFTSGD: steps_per_group must be .*>= 1.*steps_per_group=1"):
        FusedHiFTSGD(model.groups(), lr=0.1, steps_per_group=bad)
    assert all(p.requires_grad for p in model.parameters())  # a refused construction froze nothing
