"""``--task classification``: a sequence classifier on (text, label) data (default: all-MiniLM-L6-v2
on the shipped SST-2). Accuracy and loss on the eval data after each epoch."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from hift_ext.data import (
    Examples,
    TokenizedDataset,
    build_label_map,
    encode_labels,
    load_examples,
    shipped_sst2,
)
from hift_ext.errors import UsageError
from hift_ext.model_source import CLASSIFICATION, default_model, resolve_model
from hift_ext.tasks.base import Built, Task
from hift_ext.tasks.common import check_token_ids, quiet_transformers

__all__ = ["ClassificationTask", "load_model_and_tokenizer", "check_tokenizer", "evaluate", "TOKENIZER_FILES"]


def _load_config(path: str):
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    if not os.path.isdir(path):
        raise UsageError(f"--model {path}: not a directory (expected a local transformers checkpoint)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UsageError(f"--model {path}: no config.json, not a transformers model directory")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any parse problem is the user's file
        raise UsageError(f"--model {path}: cannot read its config.json ({exc})") from None
    if config.model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise UsageError(
            f"--model {path}: model type {config.model_type!r} has no sequence-classification head "
            "in transformers; pass a text encoder or decoder checkpoint (e.g. BERT, RoBERTa, LLaMA)"
        )
    return config


def _is_classifier_checkpoint(config) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))


def _has_custom_labels(config) -> bool:
    names = list((config.label2id or {}).keys())
    return bool(names) and not all(n.startswith("LABEL_") for n in names)


def load_model_and_tokenizer(path: str, num_labels: int, label_map: Dict[str, int], config,
                             tokenizer_path: Optional[str] = None):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok_path = tokenizer_path or path
    tok_flag = "--tokenizer" if tokenizer_path else "--model"
    if tokenizer_path and not os.path.isdir(tokenizer_path):
        raise UsageError(f"--tokenizer {tokenizer_path}: not a directory (expected a saved tokenizer)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"{tok_flag} {tok_path}: cannot load its tokenizer ({exc.__class__.__name__}: {exc})"
                         + ("" if tokenizer_path else "; pass --tokenizer DIR")) from None
    id2label = {i: l for l, i in label_map.items()} if not all(k.isdigit() for k in label_map) else None
    kw = dict(num_labels=num_labels, local_files_only=True)
    if id2label:
        kw.update(id2label=id2label, label2id=dict(label_map))
    with quiet_transformers():  # "newly initialized classifier" is expected here
        try:
            model = AutoModelForSequenceClassification.from_pretrained(path, **kw)
        except Exception as exc:  # noqa: BLE001
            raise UsageError(f"--model {path}: cannot load it as a sequence-classification model "
                             f"({exc.__class__.__name__}: {exc})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


def check_tokenizer(tokenizer, texts: Sequence[str], model_path: str, tokenizer_path: Optional[str]) -> None:
    """Refuse a tokenizer that turns real text into unknown tokens only. A model directory saved
    without its tokenizer files still "loads" one (transformers builds a 5-token vocabulary from
    the config), and training on [UNK] ids would run to the end and learn nothing."""
    sample = list(texts[:256])
    enc = tokenizer(sample, add_special_tokens=False, truncation=True, max_length=64)["input_ids"]
    ids = [i for seq in enc for i in seq]
    unk = tokenizer.unk_token_id
    if ids and not (unk is not None and all(i == unk for i in ids)):
        return
    where = tokenizer_path or model_path
    found = [f for f in TOKENIZER_FILES if os.path.exists(os.path.join(where, f))]
    what = (f"its tokenizer ({len(tokenizer)} tokens) turns every word of the training text into "
            f"{tokenizer.unk_token or 'the unknown token'}" if ids else "its tokenizer produces no tokens for the training text")
    files = (f"the directory has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)" if not found
             else f"tokenizer files found: {', '.join(found)}")
    if tokenizer_path:
        raise UsageError(f"--tokenizer {tokenizer_path}: {what}; {files}. Pass the tokenizer the model "
                         "was trained with")
    raise UsageError(f"--model {model_path}: {what}; {files}. Pass --tokenizer DIR (e.g. the base model "
                     "this checkpoint was fine-tuned from), or save the tokenizer beside the model "
                     "(tokenizer.save_pretrained(MODEL_DIR))")


@torch.no_grad()
def evaluate(model, ds: TokenizedDataset, device, batch_size: int, autocast_ctx, ranks=None) -> Dict[str, float]:
    """Accuracy and mean loss on ``ds``; with ``ranks`` (torchrun) each rank evaluates every N-th
    example and the counts are summed over the ranks."""
    was_training = model.training
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    order = sorted(range(len(ds)), key=lambda i: len(ds.input_ids[i]))  # less padding
    if ranks is not None and ranks.distributed:
        order = ranks.strided(order)
    try:
        for idx in ds.batches(order, batch_size):
            batch = {k: v.to(device) for k, v in ds.collate(idx).items()}
            with autocast_ctx():
                out = model(**batch)
            loss_sum += float(out.loss.float()) * len(idx)
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
            total += len(idx)
    finally:
        model.train(was_training)
    if ranks is not None and ranks.distributed:
        correct, total, loss_sum = ranks.sum([correct, total, loss_sum])
        correct, total = int(correct), int(total)
    return {"eval_accuracy": correct / total, "eval_loss": loss_sum / total, "eval_examples": total}


@dataclass
class _Data:
    train: Examples
    eval: Optional[Examples]
    train_path: str


class ClassificationTask(Task):
    name = CLASSIFICATION
    defaults: Dict[str, Any] = {}  # the TrainConfig dataclass defaults are this task's
    # Tuned on SST-2 with MiniLM (benchmarks/bench_sst2.py and the README). HiFT updates each group
    # once every k steps, so it wants a larger step than full fine-tuning.
    default_lrs = {
        ("hift", "adamw"): 1e-4,
        ("full", "adamw"): 5e-5,
        ("hift", "adagrad"): 3e-3,
        ("full", "adagrad"): 1e-3,
        ("hift", "sgd"): 5e-2,
        ("full", "sgd"): 1e-2,
    }
    # bench_sst2's sweep over K (seed 0: K = 1/2/4/8/16 gave 86.01/88.53/87.73/87.04/87.16%) and K = 2
    # over seeds 0-3 (README, Benchmarks): two consecutive steps on each of the 2 groups
    default_steps_per_group = 2
    # Tuned on SST-2 with MiniLM (bench_sst2.py): 2 groups of 4 units, top group first, lr 1e-4 averaged
    # 87.13% over 4 seeds at K = 1 against full fine-tuning's 87.79%; 4 groups down2up at 2e-4 86.09%
    # (3 seeds). An int fits any model (a smaller one gets one group of all its units).
    default_group_size = 4
    rate_unit = "ex"
    plot_eval = ("eval_accuracy", "eval accuracy (%)", 100.0)

    shipped_data_name = "SST-2"

    def shipped(self, split: str) -> str:
        return shipped_sst2(split)

    def load_data(self, cfg, train_path: str, eval_path: Optional[str]) -> _Data:
        train_ex = load_examples(train_path, cfg.max_train_examples)
        eval_ex = load_examples(eval_path, cfg.max_eval_examples) if eval_path else None
        return _Data(train_ex, eval_ex, train_path)

    def build(self, cfg, data: _Data, log: Callable[[str], None]) -> Built:
        src = resolve_model(cfg.model) if cfg.model is not None else default_model(CLASSIFICATION)
        if src.is_gguf:
            raise UsageError(f"--model {cfg.model}: a GGUF file holds a causal language model; train it with "
                             "--task causal-lm")
        model_path = src.path
        mconfig = _load_config(model_path)
        if _is_classifier_checkpoint(mconfig):
            label_map = build_label_map(data.train.labels, num_labels=mconfig.num_labels,
                                        label2id=mconfig.label2id if _has_custom_labels(mconfig) else None)
            known = "the model's labels are"
        else:  # a new head: its classes are the training data's, and eval must not add any
            label_map = build_label_map(data.train.labels)
            known = f"an eval label must occur in the training data {data.train_path}, whose labels are"
        num_labels = max(label_map.values()) + 1
        train_y = encode_labels(data.train, label_map)
        eval_y = encode_labels(data.eval, label_map, known=known) if data.eval else None
        model, tokenizer = load_model_and_tokenizer(model_path, num_labels, label_map, mconfig, cfg.tokenizer)
        check_tokenizer(tokenizer, data.train.texts, model_path, cfg.tokenizer)
        train_ds = TokenizedDataset(tokenizer, data.train.texts, train_y, cfg.max_length)
        eval_ds = TokenizedDataset(tokenizer, data.eval.texts, eval_y, cfg.max_length) if data.eval else None
        tok_flag = f"--tokenizer {cfg.tokenizer}" if cfg.tokenizer else f"--model {model_path}"
        for ds in (train_ds, eval_ds):
            if ds is not None:
                check_token_ids(ds, model, tok_flag)
        return Built(model, tokenizer, train_ds, eval_ds, model_path,
                     {"num_labels": num_labels, "label_map": label_map})

    def evaluate(self, built: Built, cfg, device, autocast, *, final: bool, ranks=None):
        return evaluate(built.model, built.eval_ds, device, 2 * cfg.batch_size, autocast, ranks), {}

    def eval_message(self, ev: Dict[str, Any]) -> str:
        return (f"eval accuracy {100 * ev['eval_accuracy']:.2f}% (loss {ev['eval_loss']:.4f}, "
                f"{ev['eval_examples']} examples)")

    def final_metrics(self, evals: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
        last = evals[-1] if evals else {}
        return {"eval_accuracy": last.get("eval_accuracy"), "eval_loss": last.get("eval_loss"),
                "eval_history": [{k: e[k] for k in ("epoch", "step", "trigger", "eval_accuracy", "elapsed_s")
                                  if k in e} for e in evals]}

    def summary_rows(self, m: Dict[str, Any]) -> List[Tuple[str, str]]:
        return [("eval accuracy", "n/a (no eval data)" if m["eval_accuracy"] is None
                 else f"{100 * m['eval_accuracy']:.2f}%"),
                ("train examples/s", f"{m['train_examples_per_s']:.1f}")]
