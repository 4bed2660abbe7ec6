"""hift_ext.hparams: the range rules shared by `hift-ext finetune` and the Trainer integration."""
import math

import pytest

from hift_ext import hparams
from hift_ext.hparams import RULES, HParamError


@pytest.mark.parametrize("key,good,bad", [
    ("lr", [1e-4, 3.0], [0.0, -1e-3, math.inf, math.nan]),
    ("weight_decay", [0.0, 0.01], [-0.1, math.inf, math.nan]),
    ("momentum", [0.0, 0.9], [-0.5, math.nan, math.inf]),
    ("max_grad_norm", [0.0, 1.0], [-1.0, math.nan, math.inf]),
    ("warmup_ratio", [0.0, 0.5], [1.0, -0.1, math.nan]),
    ("eps", [1e-8], [0.0, math.inf]),
    ("beta", [0.0, 0.999], [1.0, math.nan]),
])
def test_rules(key, good, bad):
    for v in good:
        assert hparams.check("x", v, RULES[key]) == v
    for v in bad:
        with pytest.raises(HParamError, match=r"^--x must be"):
            hparams.check("--x", v, RULES[key])


def test_non_finite_message_says_why():
    with pytest.raises(HParamError) as e:
        hparams.check("--lr", float("inf"), RULES["lr"])
    assert "--lr must be a finite number > 0, got inf" in str(e.value) and "NaN weights" in str(e.value)


def test_check_all_names_and_skips_none():
    hparams.check_all({"lr": 1e-3, "momentum": None})
    with pytest.raises(HParamError, match="args.weight_decay"):
        hparams.check_all({"weight_decay": float("nan")}, names={"weight_decay": "args.weight_decay"})
    with pytest.raises(HParamError, match="must be a number"):
        hparams.check("--lr", "fast", RULES["lr"])
    with pytest.raises(HParamError, match="must be a number"):
        hparams.check("--lr", True, RULES["lr"])


def test_check_int_and_seed_range():
    assert hparams.check_int("--seed", 0, hparams.SEED_MIN, hparams.SEED_MAX) == 0
    assert hparams.check_int("--seed", hparams.SEED_MAX, hparams.SEED_MIN, hparams.SEED_MAX) == 2**64 - 1
    for bad in (10**23, hparams.SEED_MIN - 1):
        with pytest.raises(HParamError, match=r"--seed must be an integer in \["):
            hparams.check_int("--seed", bad, hparams.SEED_MIN, hparams.SEED_MAX)
    for bad in (1e23, True, "3"):
        with pytest.raises(HParamError, match="must be an integer"):
            hparams.check_int("--seed", bad)
    with pytest.raises(HParamError, match=">= 1"):
        hparams.check_int("--epochs", 0, low=1)
