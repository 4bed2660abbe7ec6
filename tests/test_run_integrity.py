"""Issue 12, run integrity, end to end through `hift-ext finetune` (and run_finetune): resume never
unpickles, outputs never follow planted links, --overwrite never costs the previous run or a
user's file, damaged checkpoints and changed data are refused, Ctrl-C says how to resume,
NaN/inf steps are skipped (and stop the run when they persist), bad flags and inputs are refused.

Tiny random BERT, a few dozen examples: each run takes about a second on 2 CPU cores.
"""
import json
import os
import pickle
import shlex
import shutil
import types

import pytest
import torch

pytest.importorskip("transformers")

from hift_ext import train  # noqa: E402
from hift_ext.cli import build_parser, main  # noqa: E402
from hift_ext.errors import UsageError  # noqa: E402
from hift_ext.train import NonFiniteTrainingError, TrainConfig, run_finetune  # noqa: E402

from _finetune_testutil import (  # noqa: E402  (fixtures: tiny_bert, tiny_bert_base, small_data)
    TOKENIZER_FILES,
    _minilm_dir,
    base_args,
    interrupt_factory,
    load_model_pt,
    nan_logits_factory,
    needs_kernels,
    run_cli,
    small_data,
    strict_json_lines,
    tiny_bert,
    tiny_bert_base,
)


def _stopped_run(tiny_bert, small_data, out, capsys, *extra):
    """A full-FT run stopped after 3 of its 10 steps (a checkpoint to resume from)."""
    rc, _, err = run_cli(base_args(tiny_bert, small_data, "--full", "--epochs", "2", "--output", out,
                                   "--stop-after", "3", *extra), capsys)
    assert rc == 0, err


def _weights(path):
    return torch.load(path, weights_only=True)


# --------------------------------------------------------------------------------- 1. security
class Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_resume_never_unpickles_a_planted_file(tiny_bert, small_data, tmp_path, capsys):
    marker = tmp_path / "pwned"
    run = tmp_path / "old-run"
    (run / "checkpoint").mkdir(parents=True)  # the layout hift-ext wrote before format 2
    with open(run / "checkpoint" / "trainer_state.pt", "wb") as fh:
        pickle.dump({"config": {"lr": 1e-3}, "payload": Marker(str(marker))}, fh, protocol=2)
    torch.save({}, run / "checkpoint" / "model.pt")
    rc, _, err = run_cli(["finetune", "--resume", str(run), "--no-progress"], capsys)
    assert rc == 2 and not marker.exists()
    assert "older hift-ext" in err and "unpickling" in err and "Traceback" not in err


def test_checkpoint_metadata_is_json_and_tensors_load_weights_only(tiny_bert, small_data, tmp_path, capsys):
    out = str(tmp_path / "r")
    _stopped_run(tiny_bert, small_data, out, capsys)
    ck = os.path.join(out, "checkpoint")
    state = json.load(open(os.path.join(ck, "trainer_state.json")))
    assert state["step"] == 3 and state["config"]["full"] is True and state["rng"]["python"][0] == 3
    assert state["data"]["train"]["sha256"] and state["data"]["train"]["size"] > 0
    tensors = torch.load(os.path.join(ck, "trainer_state.pt"), weights_only=True)
    assert set(tensors) == {"optimizer", "scheduler", "rng"}


# ------------------------------------------------------------------ 2. no writing through links
def test_resume_in_place_replaces_planted_links_not_their_targets(tiny_bert, small_data, tmp_path, capsys):
    out = tmp_path / "r"
    _stopped_run(tiny_bert, small_data, str(out), capsys)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "model").mkdir()
    (outside / "model" / "weights.bin").write_text("theirs")
    for name in ("config.json", "metrics.jsonl", "metrics.json", "loss.png"):
        (outside / name).write_text("theirs")
        if os.path.lexists(out / name):
            os.remove(out / name)
        os.symlink(outside / name, out / name)
    os.symlink(outside / "model", out / "model")
    rc, _, err = run_cli(["finetune", "--resume", str(out), "--no-progress"], capsys)
    assert rc == 0, err
    for name in ("config.json", "metrics.jsonl", "metrics.json", "loss.png"):
        assert (outside / name).read_text() == "theirs", name
        assert not os.path.islink(out / name), name
    assert os.listdir(outside / "model") == ["weights.bin"]
    assert not os.path.islink(out / "model") and (out / "model" / "config.json").exists()


# ----------------------------------------------------------------------------- 3. --overwrite
def test_overwrite_validates_first_and_keeps_user_files(tiny_bert, small_data, tmp_path, capsys):
    tr, dev = small_data
    out = tmp_path / "r"
    rc, _, err = run_cli(base_args(tiny_bert, small_data, "--full", "--max-steps", "2", "--output", str(out)),
                         capsys)
    assert rc == 0, err
    before = sorted(os.listdir(out))
    before_model = _weights(out / "checkpoint" / "model.pt")
    # a typo in --train: refused before anything in the run directory is touched
    args = ["finetune", "--model", tiny_bert, "--train", tr + "x", "--eval", dev, "--no-progress",
            "--output", str(out), "--overwrite"]
    rc, _, err = run_cli(args, capsys)
    assert rc == 2 and "no such file" in err
    assert sorted(os.listdir(out)) == before
    after_model = _weights(out / "checkpoint" / "model.pt")
    assert all(torch.equal(before_model[k], after_model[k]) for k in before_model)
    # data kept inside the output directory is read, and it survives with the user's other files
    shutil.copy(tr, out / "train.tsv")
    (out / "notes.txt").write_text("mine")
    rc, _, err = run_cli(["finetune", "--model", tiny_bert, "--train", str(out / "train.tsv"), "--eval", dev,
                          "--no-progress", "--batch-size", "8", "--max-steps", "1", "--full", "--output",
                          str(out), "--overwrite"], capsys)
    assert rc == 0, err
    assert (out / "notes.txt").read_text() == "mine" and (out / "train.tsv").exists()
    assert json.load(open(out / "metrics.json"))["steps"] == 1


# -------------------------------------------------------------------------------- 4. checkpoints
@pytest.mark.parametrize("damage", ["missing", "empty", "truncated"])
def test_damaged_model_file_exit_2(tiny_bert, small_data, tmp_path, capsys, damage):
    out = str(tmp_path / "r")
    _stopped_run(tiny_bert, small_data, out, capsys)
    model = os.path.join(out, "checkpoint", "model.pt")
    if damage == "missing":
        os.remove(model)
    elif damage == "empty":
        open(model, "wb").close()
    else:
        data = open(model, "rb").read()
        open(model, "wb").write(data[:1000])
    rc, _, err = run_cli(["finetune", "--resume", out, "--no-progress"], capsys)
    assert rc == 2 and f"model.pt is {damage}" in err and "Traceback" not in err


def test_resume_after_a_kill_between_save_and_switch(tiny_bert, small_data, tmp_path, capsys):
    """The state a kill can leave: no pointer (killed before the first switch) and the temporary
    directory of a save that never finished. Resume takes the newest complete checkpoint; the next
    save clears the leftovers."""
    out = tmp_path / "r"
    _stopped_run(tiny_bert, small_data, str(out), capsys, "--save-steps", "2")
    (out / ".hift-checkpoint-4-dead.tmp").mkdir()
    os.remove(out / "checkpoint")
    rc, _, err = run_cli(["finetune", "--resume", str(out), "--no-progress"], capsys)
    assert rc == 0, err
    assert "newest complete checkpoint, checkpoint-3" in err and "resumed from" in err
    left = sorted(n for n in os.listdir(out) if "checkpoint" in n)
    assert len(left) == 2 and left[0] == "checkpoint" and os.readlink(out / "checkpoint") == left[1]


# -------------------------------------------------------------------- 5. Ctrl-C, resumed settings
@needs_kernels
def test_ctrl_c_says_how_to_resume_and_that_resumes_exactly(tiny_bert, small_data, tmp_path, capsys,
                                                            monkeypatch):
    common = ["--epochs", "2", "--group-size", "1", "--lr", "1e-3", "--save-steps", "2", "--seed", "5"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b b")
    rc, _, err = run_cli(base_args(tiny_bert, small_data, *common, "--output", a), capsys)
    assert rc == 0, err
    with monkeypatch.context() as m:  # Ctrl-C in the 7th training forward pass: after step 6
        m.setattr(train, "make_optimizer", interrupt_factory(7, make=train.make_optimizer))
        rc, _, err = run_cli(base_args(tiny_bert, small_data, *common, "--output", b), capsys)
    assert rc == 130
    assert "interrupted at step 6/10" in err and "the last checkpoint is" in err and "(step 6)" in err
    cmd = f"hift-ext finetune --resume {shlex.quote(b)}"
    assert cmd in err
    rc, _, err = run_cli(shlex.split(cmd)[1:] + ["--no-progress"], capsys)
    assert rc == 0, err
    wa, wb = load_model_pt(a), load_model_pt(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_ctrl_c_before_any_checkpoint(tiny_bert, small_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "make_optimizer", interrupt_factory(2, make=train.make_optimizer))
    rc, _, err = run_cli(base_args(tiny_bert, small_data, "--full", "--output", str(tmp_path / "r")), capsys)
    assert rc == 130 and "no checkpoint was written yet" in err


def test_save_and_logging_steps_and_history_survive_a_resume_elsewhere(tiny_bert, small_data, tmp_path, capsys):
    a, b, c = (str(tmp_path / n) for n in "abc")
    common = ["--full", "--epochs", "2", "--save-steps", "4", "--logging-steps", "3"]
    rc, _, err = run_cli(base_args(tiny_bert, small_data, *common, "--output", a), capsys)
    assert rc == 0, err
    rc, _, err = run_cli(base_args(tiny_bert, small_data, *common, "--output", b, "--stop-after", "4"), capsys)
    assert rc == 0, err
    # resumed into a new directory, without repeating --save-steps / --logging-steps
    rc, _, err = run_cli(["finetune", "--resume", b, "--output", c, "--no-progress"], capsys)
    assert rc == 0, err
    cfg = json.load(open(os.path.join(c, "config.json")))
    assert cfg["save_steps"] == 4 and cfg["logging_steps"] == 3
    strip = lambda recs: [{k: v for k, v in r.items() if k not in ("examples_per_s", "tokens_per_s", "elapsed_s")} for r in recs]
    la, lc = (strict_json_lines(os.path.join(d, "metrics.jsonl")) for d in (a, c))
    assert strip(la) == strip(lc) and [r["step"] for r in lc if r["type"] == "train"] == [3, 6, 9, 10]
    wa, wc = load_model_pt(a), load_model_pt(c)
    assert all(torch.equal(wa[k], wc[k]) for k in wa)


# ---------------------------------------------------------------------------- 6. data fingerprint
def test_resume_refuses_changed_data(tiny_bert, small_data, tmp_path, capsys):
    tr, dev = small_data
    mine = tmp_path / "train.tsv"
    shutil.copy(tr, mine)
    out = str(tmp_path / "r")
    rc, _, err = run_cli(["finetune", "--model", tiny_bert, "--train", str(mine), "--eval", dev, "--full",
                          "--batch-size", "8", "--no-progress", "--output", out, "--stop-after", "2"], capsys)
    assert rc == 0, err
    lines = mine.read_text().splitlines(keepends=True)
    mine.write_text("".join(lines[1:] + lines[:1]))  # same size and examples, another order
    rc, _, err = run_cli(["finetune", "--resume", out, "--no-progress"], capsys)
    assert rc == 2 and f"train data {mine} changed since the run started" in err


# ------------------------------------------------------------------------------ 7. finite flags
@pytest.mark.parametrize("flag,value", [("--lr", "inf"), ("--weight-decay", "inf"), ("--momentum", "nan"),
                                        ("--max-grad-norm", "nan"), ("--warmup-ratio", "nan"),
                                        ("--lr", "nan"), ("--max-grad-norm", "-inf")])
def test_non_finite_flags_exit_2(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        main(["finetune", f"{flag}={value}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: value must be" in err and value in err


def test_train_config_validation_is_shared(tiny_bert, small_data):
    tr, dev = small_data
    for bad, words in [(dict(lr=float("inf")), "--lr must be a finite number > 0"),
                       (dict(momentum=float("nan")), "--momentum must be"),
                       (dict(seed=10**23), "--seed must be an integer in"),
                       (dict(device="foo"), "--device foo: not a device")]:
        cfg = TrainConfig(model=tiny_bert, train=tr, eval=dev, progress=False, **bad)
        with pytest.raises(train.UsageError, match=words):
            run_finetune(cfg)
    TrainConfig(scheduler="inverse_sqrt").validate()  # the API keeps every schedule of hift_ext.lr


# ----------------------------------------------------------------------------- 8. NaN/inf steps
@needs_kernels
def test_non_finite_loss_skips_the_step_and_training_continues(tiny_bert, small_data, tmp_path):
    tr, dev = small_data
    out = str(tmp_path / "r")
    keep = []
    cfg = TrainConfig(model=tiny_bert, train=tr, eval=dev, batch_size=8, max_length=32, epochs=2,
                      group_size=1, steps_per_group=1, lr=1e-3, logging_steps=1, progress=False, output=out)
    m = run_finetune(cfg, optimizer_factory=nan_logits_factory({3, 4}, keep=keep), log=lambda s: None)
    opt = keep[0]
    # two batches were skipped: 10 batches -> 8 steps; the HiFT schedule advanced on those only
    assert m["steps"] == 8 and m["skipped_steps"] == 2 and m["completed"]
    assert opt.hift_position == 8 and all(torch.isfinite(p).all() for p in opt.param_groups[0]["params"])
    recs = strict_json_lines(os.path.join(out, "metrics.jsonl"))  # no bare NaN anywhere
    skips = [r for r in recs if r["type"] == "skip"]
    assert [(r["step"], r["reason"], r["loss"], r["in_a_row"]) for r in skips] == [
        (2, "non-finite loss", None, 1), (2, "non-finite loss", None, 2)]
    train_recs = [r for r in recs if r["type"] == "train"]
    # the group schedule did not move on a skipped step: step 3 trains the group step 3 would have
    assert [r["group"] for r in train_recs][:4] == ["3/4", "2/4", "1/4", "0/4"]  # up2down
    assert json.load(open(os.path.join(out, "metrics.json")))["skipped_steps"] == 2


def test_non_finite_gradient_skips_the_step(tiny_bert, small_data):
    tr, dev = small_data

    def factory(cfg, model):
        calls = {"n": 0}

        def poison(grad):
            calls["n"] += 1
            return grad * float("inf") if calls["n"] == 2 else grad

        model.classifier.weight.register_hook(poison)
        return train.make_optimizer(cfg, model)

    cfg = TrainConfig(model=tiny_bert, train=tr, eval=None, batch_size=8, max_length=32, epochs=1, full=True,
                      max_grad_norm=0.0, progress=False)  # clipping off: the norm is still checked
    m = run_finetune(cfg, optimizer_factory=factory, log=lambda s: None)
    assert m["steps"] == 4 and m["skipped_steps"] == 1


def test_persistent_non_finite_steps_exit_3_with_the_checkpoint_intact(tiny_bert, small_data, tmp_path, capsys,
                                                                       monkeypatch):
    out = tmp_path / "r"
    monkeypatch.setattr(train, "make_optimizer", nan_logits_factory(lambda n: n >= 5, make=train.make_optimizer))
    rc, stdout, err = run_cli(base_args(tiny_bert, small_data, "--full", "--epochs", "2", "--save-steps", "2",
                                        "--max-nonfinite-steps", "3", "--output", str(out)), capsys)
    assert rc == 3, err
    assert "not finite (NaN/inf) for 3 steps in a row" in err and "--lr" in err and "--max-grad-norm" in err
    assert f"hift-ext finetune --resume {out}" in err and "Traceback" not in err
    # step 4 was saved (--save-steps 2), then again at the epoch end after one skipped batch
    assert os.readlink(out / "checkpoint").startswith("checkpoint-4") and not (out / "model").exists()
    w = load_model_pt(str(out))
    assert all(torch.isfinite(v).all() for v in w.values() if v.is_floating_point())
    m = json.load(open(out / "metrics.json"))
    assert m["completed"] is False and m["stop_reason"] == "non-finite" and m["skipped_steps"] == 3


def test_diverged_weights_never_replace_the_checkpoint(tiny_bert, small_data, tmp_path, capsys):
    tr, dev = small_data
    out = tmp_path / "r"

    def factory(cfg, model):
        opt = train.make_optimizer(cfg, model)
        step, calls = opt.step, {"n": 0}

        def poisoned_step(self, *a, **kw):  # the 3rd update writes inf into a weight
            calls["n"] += 1
            r = step(*a, **kw)
            if calls["n"] == 3:
                with torch.no_grad():
                    model.classifier.weight.fill_(float("inf"))
            return r

        opt.step = types.MethodType(poisoned_step, opt)  # a bound method, as LRScheduler expects
        return opt

    cfg = TrainConfig(model=tiny_bert, train=tr, eval=dev, batch_size=8, max_length=32, epochs=1, full=True,
                      save_steps=2, progress=False, output=str(out))
    with pytest.raises(NonFiniteTrainingError, match="weights became non-finite"):
        run_finetune(cfg, optimizer_factory=factory, log=lambda s: None)
    assert os.readlink(out / "checkpoint") == "checkpoint-2"
    assert torch.isfinite(load_model_pt(str(out))["classifier.weight"]).all()


# ---------------------------------------------------------------------------------- 9. tokenizer
def test_model_without_tokenizer_is_refused_with_the_fix(small_data, tmp_path, capsys, tiny_bert):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in os.listdir(tiny_bert):
        if f not in TOKENIZER_FILES:
            shutil.copy(os.path.join(tiny_bert, f), bare)
    args = base_args(str(bare), small_data, "--full", "--max-steps", "1", "--no-save-model")
    rc, _, err = run_cli(args, capsys)
    assert rc == 2 and "[UNK]" in err and "--tokenizer DIR" in err and "Traceback" not in err
    rc, _, err = run_cli(args + ["--tokenizer", _minilm_dir(), "--output", str(tmp_path / "o")], capsys)
    assert rc == 0, err


# ------------------------------------------------------------------------------- 10. eval labels
def test_eval_label_absent_from_training_is_refused(tiny_bert_base, small_data, tmp_path, capsys):
    tr, _ = small_data
    dev = tmp_path / "dev.tsv"
    dev.write_text("fine\t1\nso so\t2\n")
    rc, _, err = run_cli(["finetune", "--model", tiny_bert_base, "--train", tr, "--eval", str(dev), "--full",
                          "--no-progress", "--max-steps", "1"], capsys)
    assert rc == 2 and f"{dev}, line 2: unknown label '2'" in err and "must occur in the training data" in err


# --------------------------------------------------------------------------- 12. clear messages
def test_bad_output_device_and_seed_exit_2(tiny_bert, small_data, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for extra, words in [(["--output", str(afile / "run")], "is a file"),
                         (["--device", "foo"], "--device foo: not a device"),
                         (["--device", "tpu"], "not a device")]:
        rc, _, err = run_cli(base_args(tiny_bert, small_data, "--full", "--max-steps", "1", *extra), capsys)
        assert rc == 2 and words in err and "Traceback" not in err, err
    for seed in ("1e23", str(10**23)):
        with pytest.raises(SystemExit) as e:
            main(["finetune", "--seed", seed])
        assert e.value.code == 2
        assert "argument --seed" in capsys.readouterr().err


# ---------------------------------------------------------------------------- 13. default output
def test_no_output_flag_keeps_the_run_in_runs(tiny_bert, small_data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, stdout, err = run_cli(base_args(tiny_bert, small_data, "--full", "--max-steps", "2"), capsys)
    assert rc == 0, err
    [run] = os.listdir(tmp_path / "runs")
    assert run.startswith(f"{os.path.basename(tiny_bert)}-full-")
    where = os.path.join("runs", run)
    assert f"the run goes to {where}" in err and f"outputs in {where}:" in stdout
    for f in ("metrics.json", "metrics.jsonl", "loss.png", "model/config.json", "checkpoint/model.pt"):
        assert (tmp_path / where / f).exists(), f


# ---------------------------------------------------------------------------------- 14. --help
def test_help_shows_each_default_once_and_right():
    sub = build_parser()._subparsers._group_actions[0].choices["finetune"]
    text = sub.format_help()
    assert "(default:" not in text
    d = TrainConfig()
    for fl, value in [("--max-length", d.max_length), ("--batch-size", d.batch_size), ("--seed", d.seed),
                      ("--logging-steps", d.logging_steps), ("--device", d.device),
                      ("--max-nonfinite-steps", d.max_nonfinite_steps)]:
        action = next(a for a in sub._actions if fl in a.option_strings)
        assert action.help.count("[default:") == 1 and f"[default: {value}]" in action.help, fl


# ------------------------------------------------------------------------- 15. no per-step sync
def test_training_time_is_taken_at_reporting_points_only(tiny_bert, small_data, monkeypatch):
    tr, _ = small_data
    calls = []
    real = train._TrainClock.account
    monkeypatch.setattr(train._TrainClock, "account", lambda self: (calls.append(1), real(self)))
    cfg = TrainConfig(model=tiny_bert, train=tr, eval=None, batch_size=4, max_length=32, epochs=1, full=True,
                      logging_steps=5, progress=False)
    m = run_finetune(cfg, log=lambda s: None)
    assert m["steps"] == 10 and len(calls) <= 4  # 2 logging points + the epoch end (+ its checkpoint)


def test_the_clock_waits_for_the_compute_stream_only(monkeypatch):
    synced = []

    class Stream:
        def synchronize(self):
            synced.append("stream")

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: synced.append("device"))
    counters = {"train_time_s": 0.0, "train_examples": 0}
    clock = train._TrainClock(torch.device("cuda"), counters)
    clock.examples = 8
    clock.account()
    assert synced == ["stream"] and counters["train_examples"] == 8


# ------------------------------------------------------------------------------ 10. --eval-steps
def test_eval_steps_add_mid_epoch_evaluations_and_change_nothing_else(tiny_bert, small_data, tmp_path, capsys):
    a, b, c = (str(tmp_path / n) for n in "abc")
    common = ["--epochs", "2", "--group-size", "1", "--steps-per-group", "1", "--lr", "1e-3"]
    rc, _, err = run_cli(base_args(tiny_bert, small_data, *common, "--output", a), capsys)
    assert rc == 0, err
    rc, _, err = run_cli(base_args(tiny_bert, small_data, *common, "--eval-steps", "2", "--output", b), capsys)
    assert rc == 0, err
    assert "step 2/10 (epoch 0.4): eval accuracy" in err
    la, lb = (strict_json_lines(os.path.join(d, "metrics.jsonl")) for d in (a, b))
    evals = [r for r in lb if r["type"] == "eval"]
    # 5 steps per epoch: every 2nd step, and each epoch's end (step 10 is one: evaluated once)
    assert [(e["step"], e["epoch"], e["trigger"]) for e in evals] == [
        (2, 0.4, "steps"), (4, 0.8, "steps"), (5, 1, "epoch"), (6, 1.2, "steps"), (8, 1.6, "steps"), (10, 2, "epoch")]
    drop = ("examples_per_s", "tokens_per_s", "elapsed_s")
    strip = lambda recs: [{k: v for k, v in r.items() if k not in drop} for r in recs]
    assert strip([r for r in la if r["type"] == "train"]) == strip([r for r in lb if r["type"] == "train"])
    assert strip([r for r in la if r["type"] == "eval"]) == strip([e for e in evals if e["trigger"] == "epoch"])
    wa, wb = load_model_pt(a), load_model_pt(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # evaluating in between changes no weight
    m = json.load(open(os.path.join(b, "metrics.json")))
    assert [e["trigger"] for e in m["eval_history"]] == [e["trigger"] for e in evals]
    assert m["eval_accuracy"] == evals[-1]["eval_accuracy"]
    # a resumed run keeps --eval-steps (run control, like --save-steps) and repeats the same evaluations
    rc, _, err = run_cli(base_args(tiny_bert, small_data, *common, "--eval-steps", "2", "--output", c,
                                   "--save-steps", "3", "--stop-after", "3"), capsys)
    assert rc == 0, err
    assert f"stopped after step 3/10; the last checkpoint is {os.path.join(c, 'checkpoint')} (step 3); continue " \
        f"with:\n  hift-ext finetune --resume {c}" in err
    rc, _, err = run_cli(["finetune", "--resume", c, "--no-progress"], capsys)
    assert rc == 0, err
    assert json.load(open(os.path.join(c, "config.json")))["eval_steps"] == 2
    lc = strict_json_lines(os.path.join(c, "metrics.jsonl"))
    assert strip([r for r in lc if r["type"] == "eval"]) == strip(evals)


def test_eval_steps_must_be_a_positive_whole_number(tiny_bert, small_data, capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli(base_args(tiny_bert, small_data, "--eval-steps", "0"), capsys)
    assert exc.value.code == 2 and "--eval-steps: value must be an integer >= 1" in capsys.readouterr().err
    with pytest.raises(UsageError, match="--eval-steps"):
        TrainConfig(model=tiny_bert, eval_steps=-1).validate()


def test_a_stop_without_output_says_nothing_was_saved(tiny_bert, small_data, capsys):
    tr, dev = small_data
    logs = []
    cfg = TrainConfig(model=tiny_bert, train=tr, eval=dev, batch_size=8, max_length=32, epochs=1, full=True,
                      stop_after=2, progress=False, save_model=False)
    m = run_finetune(cfg, log=logs.append)
    assert m["completed"] is False and m["steps"] == 2
    assert "stopped after step 2/5; nothing was saved (no --output)" in logs
