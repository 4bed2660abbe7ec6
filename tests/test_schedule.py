import pickle

import pytest

from hift_ext.schedule import STRATEGIES, GroupSchedule


def run(s, n):
    out = []
    for _ in range(n):
        out.append(s.current)
        s.advance()
    return out


def test_down2up():
    s = GroupSchedule(4, "down2up")
    assert s.position == 0 and s.cycle == 0 and s.order == [0, 1, 2, 3]
    assert run(s, 9) == [0, 1, 2, 3, 0, 1, 2, 3, 0]
    assert s.position == 9 and s.cycle == 2


def test_up2down():
    s = GroupSchedule(3, "up2down")
    assert s.order == [2, 1, 0]
    assert run(s, 7) == [2, 1, 0, 2, 1, 0, 2]


def test_default_is_down2up():
    assert GroupSchedule(2).strategy == "down2up"


def test_single_group():
    for strat in STRATEGIES:
        assert run(GroupSchedule(1, strat), 5) == [0] * 5


def test_random_is_permutation_each_cycle_and_reshuffles():
    k = 6
    s = GroupSchedule(k, "random", seed=123)
    seq = run(s, k * 20)
    cycles = [seq[i * k:(i + 1) * k] for i in range(20)]
    for c in cycles:
        assert sorted(c) == list(range(k))
    # A fresh permutation every cycle (the official code shuffles once only).
    assert len({tuple(c) for c in cycles}) > 1


def test_random_pure_function_of_seed_and_cycle():
    a = GroupSchedule(8, "random", seed=7)
    b = GroupSchedule(8, "random", seed=7)
    assert [a.order_of_cycle(c) for c in range(10)] == [b.order_of_cycle(c) for c in reversed(range(10))][::-1]
    c = GroupSchedule(8, "random", seed=8)
    assert [a.order_of_cycle(i) for i in range(10)] != [c.order_of_cycle(i) for i in range(10)]
    # Independent of the global RNG.
    import torch

    torch.manual_seed(0)
    x = GroupSchedule(8, "random", seed=7).order_of_cycle(3)
    torch.manual_seed(99)
    torch.rand(5)
    assert GroupSchedule(8, "random", seed=7).order_of_cycle(3) == x


def test_order_and_current_consistent():
    s = GroupSchedule(5, "random", seed=1)
    for t in range(23):
        assert s.current == s.order[t % 5] == s.group_at(t)
        assert s.next == s.group_at(t + 1)
        s.advance()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_state_dict_resume(strategy):
    s = GroupSchedule(5, strategy, seed=42)
    run(s, 13)
    sd = s.state_dict()
    sd = pickle.loads(pickle.dumps(sd))
    assert sd == {"num_groups": 5, "strategy": strategy, "seed": 42, "steps_per_group": 1, "position": 13}
    r = GroupSchedule(5, strategy)  # seed comes from the state
    r.load_state_dict(sd)
    assert r.position == 13 and r.seed == 42
    assert run(r, 17) == run(s, 17)


def test_unknown_strategy():
    with pytest.raises(ValueError, match="down2up.*up2down.*random"):
        GroupSchedule(3, "bottom_up")


def test_bad_num_groups():
    with pytest.raises(ValueError, match="num_groups"):
        GroupSchedule(0)
    with pytest.raises(ValueError, match="num_groups"):
        GroupSchedule(2.0)


def test_load_mismatch_refused():
    s = GroupSchedule(4, "random")
    with pytest.raises(ValueError, match="num_groups"):
        s.load_state_dict(GroupSchedule(3, "random").state_dict())
    with pytest.raises(ValueError, match="strategy"):
        s.load_state_dict(GroupSchedule(4, "down2up").state_dict())
    with pytest.raises(ValueError, match="missing"):
        s.load_state_dict({"num_groups": 4})
    bad = GroupSchedule(4, "random").state_dict()
    bad["position"] = -1
    with pytest.raises(ValueError, match="position"):
        s.load_state_dict(bad)
    assert s.position == 0


# ------------------------------------------------------------------------ several steps per group
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("K", [1, 2, 3])
def test_steps_per_group_repeats_each_group_K_times(strategy, K):
    """With steps_per_group=K every group of the K=1 order is updated K times in a row; a cycle is
    k * K steps and "random" draws the same permutation per cycle (a pure function of (seed, cycle))."""
    k = 4
    one = run(GroupSchedule(k, strategy, seed=5), 6 * k)
    s = GroupSchedule(k, strategy, seed=5, steps_per_group=K)
    assert s.cycle_length == k * K
    seq = []
    for t in range(6 * k * K):
        assert s.position == t and s.block == t // K and s.step_in_block == t % K and s.cycle == t // (k * K)
        assert s.current == s.group_at(t) == s.order[(t // K) % k]
        assert s.next == s.group_at(t + 1)
        seq.append(s.current)
        s.advance()
    assert seq == [g for g in one for _ in range(K)]
    fresh = GroupSchedule(k, strategy, seed=5, steps_per_group=K)
    assert [fresh.order_of_cycle(c) for c in range(6)] == [GroupSchedule(k, strategy, seed=5).order_of_cycle(c)
                                                          for c in range(6)]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_steps_per_group_state_dict_resumes_mid_block(strategy):
    s = GroupSchedule(3, strategy, seed=9, steps_per_group=4)
    run(s, 13)  # block 3, step 1 of 4
    sd = pickle.loads(pickle.dumps(s.state_dict()))
    assert sd["steps_per_group"] == 4 and sd["position"] == 13
    r = GroupSchedule(3, strategy, steps_per_group=4)
    r.load_state_dict(sd)
    assert r.step_in_block == 1 and r.current == s.current
    assert run(r, 30) == run(s, 30)


def test_steps_per_group_mismatch_refused_with_the_fix():
    sd = GroupSchedule(3, steps_per_group=4).state_dict()
    s = GroupSchedule(3)
    with pytest.raises(ValueError, match="steps_per_group=4 but this schedule has steps_per_group=1; "
                                         "construct the optimizer with steps_per_group=4"):
        s.load_state_dict(sd)
    assert s.position == 0
    old = GroupSchedule(3).state_dict()
    del old["steps_per_group"]  # saved before steps_per_group existed: one step per group
    GroupSchedule(3).load_state_dict(old)
    with pytest.raises(ValueError, match="steps_per_group=1 but this schedule has steps_per_group=2"):
        GroupSchedule(3, steps_per_group=2).load_state_dict(old)


@pytest.mark.parametrize("bad,exc", [(0, ValueError), (-2, ValueError), (2.0, TypeError), (True, TypeError),
                                     ("2", TypeError), (None, TypeError)])
def test_bad_steps_per_group(bad, exc):
    with pytest.raises(exc, match="steps_per_group must be .*>= 1.*steps_per_group=1"):
        GroupSchedule(3, steps_per_group=bad)
