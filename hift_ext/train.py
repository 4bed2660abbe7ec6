"""The training loop behind ``hift-ext finetune``: one loop for every task (sequence classification,
causal-LM instruction tuning), with HiFT or full FT.

``run_finetune(cfg)`` takes a :class:`TrainConfig` and returns the final metrics dict. It validates
every input before it touches the output directory, then runs the loop (gradient accumulation,
clipping, the delayed LR schedule, AMP, evaluation after each epoch, skipping of steps whose loss or
gradients are not finite) and hands files to :mod:`hift_ext.checkpoint` (exact-resume checkpoints)
and :mod:`hift_ext.report` (metrics.jsonl, metrics.json, loss.png). What differs between tasks (data,
model loading, batches, evaluation, summary rows) is behind :class:`hift_ext.tasks.Task`. Argument
parsing and printing of errors live in :mod:`hift_ext.cli`, the output directory rules in
:mod:`hift_ext.outputs`.

Exact resume: a checkpoint holds the model, the optimizer (HiFT: per-group state + group schedule),
the LR scheduler, every RNG (python, numpy, torch CPU/CUDA), the data position (epoch, micro-batch)
and the counters behind the metrics. Epoch ``e`` is shuffled by a pure function of (seed, e), so the
batches after a resume are the ones the uninterrupted run sees.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shlex
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from hift_ext import hparams
from hift_ext.atomic_io import install_dir, make_temp_dir, remove_entry, write_text
from hift_ext.checkpoint import (
    POINTER,
    Checkpoint,
    changed_data_files,
    config_mismatch,
    file_fingerprint,
    nonfinite_tensors,
    open_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from hift_ext.data import epoch_permutation
from hift_ext.errors import NonFiniteTrainingError, RunInterrupted, UsageError
from hift_ext.outputs import check_output, prepare_output
from hift_ext.report import MetricsLog, dumps, plot_loss, write_metrics_json
from hift_ext.tasks import TASKS, Built, Task, detect_task, get_task
from hift_ext.tasks.classification import (  # noqa: F401  (kept importable from here)
    TOKENIZER_FILES,
    check_tokenizer,
    evaluate,
    load_model_and_tokenizer,
)
from hift_ext.tasks.common import check_token_ids  # noqa: F401

__all__ = [
    "TrainConfig",
    "UsageError",
    "NonFiniteTrainingError",
    "RunInterrupted",
    "run_finetune",
    "default_lr",
    "DEFAULT_MODEL_NAME",
    "TRAINING_KEYS",
    "RESUMED_RUN_KEYS",
    "LEGACY_CONFIG",
    "resolve_model_path",
    "torch_full_optimizer",
]

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"

# Default learning rates of the classification job (tuned on SST-2 with MiniLM, see
# benchmarks/bench_sst2.py and the README); each task has its own table (Task.default_lrs).
DEFAULT_LR = get_task("classification").default_lrs
OPTIMIZERS = ("adamw", "adagrad", "sgd")
STRATEGIES = ("down2up", "up2down", "random")
PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")


def flag(name: str) -> str:
    """The command-line flag of a TrainConfig field (messages name what the user typed)."""
    return "--" + name.replace("_", "-")


@dataclass
class TrainConfig:
    """One run's settings. The defaults are the classification job's; ``TrainConfig.for_task(task,
    **kw)`` starts from another task's (the CLI does that for ``--task causal-lm``)."""

    task: Optional[str] = None  # None: from the model's head (classification without --model)
    model: Optional[str] = None  # None: the task's packaged model (all-MiniLM-L6-v2, SmolLM2-135M-Instruct)
    tokenizer: Optional[str] = None  # None: the model directory's own tokenizer
    train: Optional[str] = None  # None: shipped SST-2 train
    eval: Optional[str] = None  # None: shipped SST-2 dev (when train is None too)
    optimizer: str = "adamw"
    full: bool = False
    # Layer units per group; a list: each group's units, bottom to top (an unequal split). None: the
    # task's default for the model (Task.group_size_for: 4 for classification, tuned on SST-2 with
    # MiniLM; causal-lm's 14+9+9, tuned on SmolLM2's 32 units, in proportion on other models).
    # run_finetune resolves None once the model is loaded, so configs and checkpoints record sizes.
    group_size: Union[int, List[int], None] = None
    strategy: str = "up2down"
    # consecutive optimizer steps on each group before switching (1: plain HiFT; K > 1: block-coordinate
    # HiFT, and with offload a group's state crosses to the device once per K steps). None: the task's
    # default for HiFT (Task.default_steps_per_group: 2 for classification and causal-lm, from the
    # bench_sst2 / bench_sft sweeps); --full takes 1
    steps_per_group: Optional[int] = None
    epochs: int = 3
    lr: Optional[float] = None  # None: DEFAULT_LR[(mode, optimizer)]
    weight_decay: float = 0.01
    momentum: float = 0.9  # sgd only
    batch_size: int = 32
    grad_accum: int = 1
    max_length: int = 64
    max_grad_norm: float = 1.0  # 0 disables clipping
    scheduler: str = "linear"
    warmup_ratio: float = 0.0  # transformers' default (the delayed LR warms up from the first cycle on)
    # how long the delayed LR is held (hift_ext.lr.HOLDS: "cycle" or "visit"); None: hift_ext.lr.DEFAULT_HOLD.
    # No command-line flag: the benchmarks set it (bench_sst2.py) and a checkpoint records it.
    lr_hold: Optional[str] = None
    seed: int = 0
    # fp32; bf16 / fp16: HiFT keeps the weights in that dtype and fp32 master copies in the optimizer
    # state; full fine-tuning (the baseline) keeps fp32 weights and autocasts. fp16 adds a GradScaler.
    precision: str = "fp32"
    max_steps: Optional[int] = None  # total optimizer steps (overrides epochs, defines the LR horizon)
    max_train_examples: Optional[int] = None
    max_eval_examples: Optional[int] = None
    offload: Optional[bool] = None  # None: on when training on a GPU
    # data parallel (under torchrun): each rank keeps 1/N of the optimizer state (run control: the
    # numbers are the replicated run's)
    shard_state: bool = False
    # processes the run trains on (set by run_finetune from torch.distributed, not a flag): the global
    # batch is batch_size x world_size, so a run resumes on as many processes as it started with
    world_size: int = 1
    gradient_checkpointing: bool = False  # recompute activations in backward (less memory, same numbers)
    # causal-lm evaluation: greedy generation on the first N dev prompts after the last epoch, scored
    # by exact match of the final answer (0: off); the longest continuation generated
    eval_generate: int = 0
    max_new_tokens: int = 256
    # -- run control (not part of the training configuration a resume must match)
    device: str = "auto"
    threads: Optional[int] = None  # torch CPU threads (None: torch's default, one per core)
    output: Optional[str] = None  # None: nothing is written (the CLI picks runs/<model>-<mode>-<time>)
    resume: Optional[str] = None
    overwrite: bool = False
    logging_steps: int = 10
    save_steps: Optional[int] = None  # extra checkpoint every N steps (always at each epoch end)
    # extra dev evaluation every N steps (always at each epoch end): a loss curve finer than epochs;
    # causal-lm generates (--eval-generate) only at the end
    eval_steps: Optional[int] = None
    stop_after: Optional[int] = None  # stop as if interrupted after N steps, leaving a checkpoint
    max_nonfinite_steps: int = 10  # stop (exit 3) after this many skipped steps in a row
    progress: bool = True
    save_model: bool = True  # export the final model with save_pretrained into OUTPUT/model

    @property
    def mode(self) -> str:
        return "full" if self.full else "hift"

    @property
    def low_precision(self) -> Optional[torch.dtype]:
        """bfloat16 / float16 for --bf16 / --fp16, None for fp32."""
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    @property
    def weights_dtype(self) -> torch.dtype:
        """The model's weights: low precision for HiFT (its optimizer keeps fp32 masters), fp32 for
        full fine-tuning (torch.optim updates them; forward/backward autocast)."""
        return self.low_precision if (self.low_precision is not None and not self.full) else torch.float32

    @classmethod
    def for_task(cls, task: str, **kw) -> "TrainConfig":
        """A config with ``task``'s defaults (batch size, max length, epochs, ...) under ``kw``."""
        return cls(**{**get_task(task).defaults, "task": task, **kw})

    def resolved_task(self) -> str:
        return self.task if self.task is not None else detect_task(self.model)

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else default_lr(self.mode, self.optimizer, self.resolved_task())

    def resolved_steps_per_group(self) -> int:
        if self.steps_per_group is not None:
            return self.steps_per_group
        return 1 if self.full else get_task(self.resolved_task()).default_steps_per_group

    def resolved_lr_hold(self) -> str:
        from hift_ext.lr import DEFAULT_HOLD

        return self.lr_hold if self.lr_hold is not None else DEFAULT_HOLD

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        if isinstance(d["group_size"], tuple):  # as JSON holds it: a resume compares it with the saved list
            d["group_size"] = list(d["group_size"])
        d["mode"] = self.mode
        d["task"] = self.resolved_task()
        d["lr"] = self.resolved_lr()
        d["lr_hold"] = self.resolved_lr_hold()  # recorded resolved: a resume keeps the run's own rule
        d["steps_per_group"] = self.resolved_steps_per_group()
        return d

    def validate(self) -> None:
        """UsageError for any value that cannot train: unknown choices, counts below 1, a seed torch
        refuses, and non-finite or out-of-range hyperparameters (the rules of :mod:`hift_ext.hparams`,
        shared with the transformers integration)."""
        from hift_ext.lr import HOLDS, SCHEDULER_NAMES  # the API takes every schedule lr.py has; the CLI offers four

        if self.task is not None and self.task not in TASKS:
            raise UsageError(f"--task {self.task}: choose {', '.join(TASKS)}")
        for name, choices in (("optimizer", OPTIMIZERS), ("strategy", STRATEGIES), ("scheduler", SCHEDULER_NAMES),
                              ("precision", PRECISIONS)):
            if getattr(self, name) not in choices:
                raise UsageError(f"{flag(name)} {getattr(self, name)}: choose {', '.join(choices)}")
        if self.lr_hold is not None and self.lr_hold not in HOLDS:
            raise UsageError(f"lr_hold {self.lr_hold!r}: choose {', '.join(HOLDS)} (or None for the default)")
        try:
            for name in ("epochs", "batch_size", "grad_accum", "max_length", "logging_steps",
                         "max_nonfinite_steps"):
                hparams.check_int(flag(name), getattr(self, name), low=1)
            for name in ("max_steps", "max_train_examples", "max_eval_examples", "save_steps", "eval_steps",
                         "stop_after", "threads", "steps_per_group"):
                if getattr(self, name) is not None:
                    hparams.check_int(flag(name), getattr(self, name), low=1)
            hparams.check_int("--seed", self.seed, hparams.SEED_MIN, hparams.SEED_MAX)
            hparams.check_int("--eval-generate", self.eval_generate, low=0)
            hparams.check_int("--max-new-tokens", self.max_new_tokens, low=1)
            hparams.check_all({"lr": self.resolved_lr(), "weight_decay": self.weight_decay,
                               "momentum": self.momentum, "max_grad_norm": self.max_grad_norm,
                               "warmup_ratio": self.warmup_ratio},
                              names={k: flag(k) for k in ("lr", "weight_decay", "momentum", "max_grad_norm",
                                                          "warmup_ratio")})
        except hparams.HParamError as exc:
            raise UsageError(str(exc)) from None
        from hift_ext.grouping import normalize_group_size

        try:
            if self.group_size is not None:
                normalize_group_size(self.group_size, "--group-size")
        except (TypeError, ValueError) as exc:
            raise UsageError(str(exc)) from None
        if self.full and self.world_size > 1:
            raise UsageError(f"--full on {self.world_size} processes: hift-ext's data parallelism is HiFT's "
                             "(torch.optim full fine-tuning would need DDP); run --full in one process, or drop "
                             "--full")
        if self.full and self.steps_per_group not in (None, 1):
            raise UsageError(f"--steps-per-group {self.steps_per_group} applies to HiFT only (--full updates "
                             "every parameter at every step); drop --full or --steps-per-group")
        if self.eval_generate and self.resolved_task() != "causal-lm":
            raise UsageError("--eval-generate scores generated answers: it is for --task causal-lm")


# Keys a resumed run must share with the checkpoint (everything that changes the numbers).
TRAINING_KEYS = (
    "task", "model", "tokenizer", "train", "eval", "optimizer", "full", "group_size", "strategy", "steps_per_group",
    "epochs", "lr", "weight_decay", "momentum", "batch_size", "grad_accum", "max_length", "max_grad_norm",
    "scheduler", "warmup_ratio", "lr_hold", "seed", "precision", "max_steps", "max_train_examples",
    "max_eval_examples", "world_size",
)
# What a checkpoint written before a training key existed ran with (its config lacks the key).
LEGACY_CONFIG = {"steps_per_group": 1, "lr_hold": "cycle", "precision": "fp32", "world_size": 1,
                 "task": "classification", "gradient_checkpointing": False, "eval_generate": 0,
                 "max_new_tokens": 256}
# Run control a resumed run keeps unless the command line sets it again.
RESUMED_RUN_KEYS = ("offload", "logging_steps", "save_steps", "eval_steps", "max_nonfinite_steps", "save_model",
                    "shard_state", "gradient_checkpointing", "eval_generate", "max_new_tokens")


def default_lr(mode: str, optimizer: str, task: str = "classification") -> float:
    return get_task(task).default_lrs[(mode, optimizer)]


# ----------------------------------------------------------------------------------- model loading
def resolve_model_path(model: Optional[str]) -> str:
    """The directory ``--model`` names (the packaged all-MiniLM-L6-v2 without one); for a GGUF model
    the path of its file. UsageError when it names no model."""
    from hift_ext.model_source import CLASSIFICATION, default_model, resolve_model

    return str(resolve_model(model) if model is not None else default_model(CLASSIFICATION))


# ------------------------------------------------------------------------------ optimizers and LR
OptimizerFactory = Callable[["TrainConfig", torch.nn.Module], torch.optim.Optimizer]


def default_group_size(model: torch.nn.Module, task: Optional[str]):
    """``task``'s group size for ``model`` (what ``group_size=None`` means; classification's without a
    task): an unequal split tuned on another model comes in proportion to this one's units."""
    from hift_ext import grouping

    return get_task(task or "classification").group_size_for(len(grouping.model_units(model)))


def effective_group_size(model: torch.nn.Module, group_size, task: Optional[str] = None):
    """A group size above the model's layer-unit count means one group of everything: the default
    (4, tuned for MiniLM) must not refuse a smaller model. A list (an unequal split) is taken as
    given: the optimizer refuses one that does not add up to the model's units. None: ``task``'s
    default (:func:`default_group_size`). Used by finetune and `groups`."""
    from hift_ext import grouping

    if group_size is None:
        group_size = default_group_size(model, task)
    if isinstance(group_size, (list, tuple)):
        return tuple(group_size)
    return min(group_size, len(grouping.model_units(model)))


def with_legacy_keys(saved: Dict[str, Any]) -> Dict[str, Any]:
    """A checkpoint's configuration with the training keys it predates filled in (LEGACY_CONFIG)."""
    return {**LEGACY_CONFIG, **saved}


TORCH_OPTIMIZERS = {"adamw": torch.optim.AdamW, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}
# where torch has a fused kernel for each (Adagrad's has no CUDA kernel in torch 2.11, the GPU machine's)
_TORCH_FUSED_DEVICES = {"adamw": ("cpu", "cuda"), "adagrad": ("cpu",), "sgd": ("cpu", "cuda")}


def torch_fused_available(name: str, params: Sequence[torch.Tensor]) -> bool:
    """Whether torch's fused implementation of optimizer ``name`` can step every one of ``params``."""
    devices = _TORCH_FUSED_DEVICES[name]
    return bool(params) and all(p.device.type in devices and p.is_floating_point() for p in params)


def torch_full_optimizer(name: str, params: Sequence[torch.Tensor], **kw: Any) -> torch.optim.Optimizer:
    """torch's ``name`` optimizer ("adamw", "adagrad", "sgd") over ``params``: full fine-tuning's, and
    every benchmark's baseline. Fused where torch has a kernel for the device: torch's default on the
    CPU is a loop over the tensors, 4.3x slower (0.74 s against 0.17 s an AdamW step for
    SmolLM2-135M's 134.5M parameters on one Xeon core, 2026-12-07, about 8% of a training step), and on
    CUDA foreach, whose temporaries add a copy of the state to the peak memory. The update is the same
    to rounding. A checkpoint written by another implementation keeps it when loaded (torch stores the
    choice in the param groups), so a resumed run continues as it began."""
    params = list(params)
    fused = {"fused": True} if torch_fused_available(name, params) else {}
    return TORCH_OPTIMIZERS[name](params, **kw, **fused)


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
        return torch_full_optimizer(cfg.optimizer, [p for p in model.parameters() if p.requires_grad], **kw)
    from hift_ext import hift_optim

    cls = {"adamw": hift_optim.FusedHiFTAdamW, "adagrad": hift_optim.FusedHiFTAdaGrad,
           "sgd": hift_optim.FusedHiFTSGD}[cfg.optimizer]
    group_size = effective_group_size(model, cfg.group_size, cfg.resolved_task())  # run_finetune says when it shrank
    offload = cfg.offload
    if offload is None:  # default: offload the inactive groups' state when training on a GPU
        offload = next(model.parameters()).device.type == "cuda"
        try:
            return cls(model, group_size=group_size, strategy=cfg.strategy, seed=cfg.seed,
                       steps_per_group=cfg.resolved_steps_per_group(), offload=offload, **kw,
                       **_data_parallel_kw(cfg))
        except NotImplementedError:  # an offload engine not available in this build
            offload = False
    return cls(model, group_size=group_size, strategy=cfg.strategy, seed=cfg.seed,
               steps_per_group=cfg.resolved_steps_per_group(), offload=offload, **kw, **_data_parallel_kw(cfg))


def _data_parallel_kw(cfg: TrainConfig) -> Dict[str, Any]:
    """Under torch.distributed the HiFT optimizer synchronizes the ranks itself (the default process
    group); one process passes nothing, so it builds the optimizer exactly as before."""
    return {"shard_state": True} if cfg.shard_state else {}


def precision_autocast(device: torch.device, low_precision: Optional[torch.dtype], *, full: bool):
    """The autocast context of a training step: full fine-tuning in bf16/fp16 autocasts its fp32
    weights; HiFT's weights already are bf16/fp16 (fp32 masters), so HiFT and fp32 runs do not."""
    return torch.autocast(device_type=device.type, dtype=low_precision or torch.bfloat16,
                          enabled=low_precision is not None and full)


def make_scheduler(cfg: TrainConfig, optimizer, total_steps: int):
    from hift_ext.lr import get_scheduler

    warmup = int(math.ceil(cfg.warmup_ratio * total_steps))
    return get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                         hold=cfg.resolved_lr_hold())


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

# ------------------------------------------------------------------------------------ the loop
def _pick_device(name: str, ranks=None) -> torch.device:
    if ranks is not None and ranks.distributed:  # under torchrun: this rank's GPU (LOCAL_RANK), or the CPU
        from hift_ext.distributed import local_rank

        if name in ("auto", "cuda") and torch.cuda.is_available():
            return torch.device("cuda", local_rank())
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"--device {name}: not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise UsageError(f"--device {name}: hift-ext trains on cpu or cuda (auto, cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return dev


class _TrainClock:
    """Training time as wall clock between reporting points. On a GPU it waits for the compute
    stream only when a figure is reported (logging steps, epoch ends, checkpoints): a synchronize
    after every step would also wait for the offload engine's copy streams and undo their overlap."""

    def __init__(self, device: torch.device, counters: Dict[str, Any]):
        self._cuda = device.type == "cuda"
        self._device = device
        self._counters = counters
        self._mark = time.perf_counter()
        self.examples = 0  # since the mark
        self.tokens = 0  # non-padding input tokens since the mark

    def restart(self) -> None:
        """Leave out what happened since the last account (evaluation, checkpoint writing)."""
        self._mark = time.perf_counter()
        self.examples = 0
        self.tokens = 0

    def account(self) -> None:
        if self._cuda:
            torch.cuda.current_stream(self._device).synchronize()
        now = time.perf_counter()
        self._counters["train_time_s"] += now - self._mark
        self._counters["train_examples"] += self.examples
        self._counters["train_tokens"] = self._counters.get("train_tokens", 0) + self.tokens
        self._mark, self.examples, self.tokens = now, 0, 0

    def rate(self, live: bool = False) -> float:
        """Examples/s over the accounted training time; ``live`` adds the interval since the last
        account (the progress bar, between reporting points)."""
        extra_n, extra_t = (self.examples, time.perf_counter() - self._mark) if live else (0, 0.0)
        return (self._counters["train_examples"] + extra_n) / max(self._counters["train_time_s"] + extra_t, 1e-9)

    def token_rate(self, live: bool = False) -> float:
        extra_n, extra_t = (self.tokens, time.perf_counter() - self._mark) if live else (0, 0.0)
        return (self._counters.get("train_tokens", 0) + extra_n) / max(self._counters["train_time_s"] + extra_t, 1e-9)


def _fresh_counters() -> Dict[str, Any]:
    return {"train_time_s": 0.0, "train_examples": 0, "train_tokens": 0, "max_device_state": 0, "max_group_state": 0,
            "evals": [], "skipped_steps": 0, "nonfinite_streak": 0,
            # the training loss since the last logged record: saved, so a resumed run logs the same means
            "window_loss": 0.0, "window_n": 0}


def _total_grad_norm(params: List[torch.Tensor], max_norm: float, optimizer=None) -> torch.Tensor:
    """Clip when ``max_norm > 0``; either way the total gradient norm (inf/NaN when a gradient is
    not finite: the caller skips the step). A HiFT optimizer with sharded state holds a part of the
    gradient on each rank: its own clip_grad_norm_ reduces the norm over the ranks."""
    if getattr(optimizer, "shard_state", False):
        return optimizer.clip_grad_norm_(max_norm if max_norm and max_norm > 0 else float("inf"))
    grads = [p for p in params if p.grad is not None]
    if max_norm and max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(grads, max_norm, error_if_nonfinite=False)
    return torch.nn.utils.get_total_norm([p.grad for p in grads], error_if_nonfinite=False)


def _clip_scaled_grads(params: List[torch.Tensor], max_norm: float, scale: float, optimizer=None) -> float:
    """fp16 with a GradScaler: the norm of the unscaled gradients (computed in fp32 from the scaled
    fp16 ones, which GradScaler.unscale_ refuses), clipping the scaled gradients by the factor the
    unscaled ones would get. inf/NaN: the scaled gradients overflowed. (Sharded state: the norm is
    reduced over the ranks.)"""
    grads = [p.grad for p in params if p.grad is not None]
    if getattr(optimizer, "shard_state", False):
        norm = float(optimizer.data_parallel.grad_norm(grads, 2.0)) / scale
    elif not grads:
        return 0.0
    else:
        norms = torch.stack([torch.linalg.vector_norm(g, 2, dtype=torch.float32) for g in grads])
        norm = float(torch.linalg.vector_norm(norms, 2)) / scale
    if max_norm and max_norm > 0 and math.isfinite(norm):
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            torch._foreach_mul_(grads, coef)
    return norm


def _batch_tokens(batch: Dict[str, torch.Tensor]) -> int:
    """Tokens a micro-batch trains on (for tokens/s): its attention mask's ones (read from the host
    batch: no device synchronization)."""
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0


def _loss_terms(ds, idx: Sequence[int]) -> int:
    """How many terms the model's mean loss over ``idx`` averages: one per example, or the dataset's
    own count (causal-lm: response tokens) where it has ``loss_terms``."""
    return ds.loss_terms(idx) if hasattr(ds, "loss_terms") else len(idx)


class _Training:
    """One run of the loop: the training state, the checkpoint it writes and what it reports."""

    def __init__(self, cfg: TrainConfig, *, task: Task, built: Built, optimizer, scheduler,
                 device: torch.device, total_steps: int,
                 steps_per_epoch: int, n_epochs: int, metrics: MetricsLog, state_extra: Dict[str, Any],
                 source: Optional[Checkpoint], log: Callable[[str], None], ranks=None):
        from hift_ext.distributed import Ranks

        self.ranks = ranks if ranks is not None else Ranks()  # rank 0 of 1 in one process
        self.cfg, self.model, self.optimizer, self.scheduler = cfg, built.model, optimizer, scheduler
        self.task, self.built = task, built
        self.train_ds, self.eval_ds, self.device = built.train_ds, built.eval_ds, device
        model = built.model
        self.total_steps, self.steps_per_epoch, self.n_epochs = total_steps, steps_per_epoch, n_epochs
        self.metrics, self.state_extra, self.source, self.log = metrics, state_extra, source, log
        self.out = cfg.output
        self.params = list(model.parameters())
        self.epoch, self.micro, self.step = 0, 0, 0
        self.counters = _fresh_counters()
        self.clock = _TrainClock(device, self.counters)
        # fp16's narrow range needs dynamic loss scaling; the HiFT optimizers unscale inside their
        # kernels and skip an overflowing step without advancing the group schedule
        self.scaler = (torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None)
        self.stopped = False
        self._pbar = None  # the progress bar of run()
        # where `--resume` finds the newest checkpoint: (path to pass, its step)
        self.resumable: Optional[Tuple[str, int]] = None
        if source is not None and self.out and _same_dir(source.run_dir, self.out):
            self.resumable = (self.out, source.step)

    # ---- state
    def restore(self, state: Dict[str, Any], tensors: Dict[str, Any]) -> None:
        self.epoch, self.micro, self.step = int(state["epoch"]), int(state["micro"]), int(state["step"])
        self.counters.update(state["counters"])
        per_rank = state.get("rng_ranks")
        if self.ranks.distributed and isinstance(per_rank, list) and len(per_rank) == self.ranks.world:
            r = self.ranks.rank  # every rank continues its own random stream (dropout)
            set_rng_state(per_rank[r], tensors["rng_ranks"][r])
        else:
            set_rng_state(state["rng"], tensors["rng"])
        if self.scaler is not None and "scaler" in tensors:
            self.scaler.load_state_dict(tensors["scaler"])

    def autocast(self):
        return precision_autocast(self.device, self.cfg.low_precision, full=self.cfg.full)

    def save(self) -> None:
        """Checkpoint the current position. Weights that are not finite stop the run instead (with
        or without an output directory): a diverged model must neither replace the last good
        checkpoint nor count as trained."""
        self.clock.account()
        model_state = self.model.state_dict()
        bad = nonfinite_tensors(model_state)
        if bad:
            raise self._stop_for_nonfinite(
                f"the model's weights became non-finite (NaN/inf) by step {self.step} ({len(bad)} tensor(s), "
                f"e.g. {bad[0]}), so they were not checkpointed")
        if self.out:
            ranks = self.ranks
            optimizer_state = self.optimizer.state_dict()  # with sharded state: gathered on rank 0 (every rank calls)
            js_rng, tensor_rng = rng_state()
            state = {"config": self.cfg.to_dict(), "epoch": self.epoch, "micro": self.micro, "step": self.step,
                     "counters": dict(self.counters), "rng": js_rng, **self.state_extra}
            tensors = {"optimizer": optimizer_state, "scheduler": self.scheduler.state_dict(), "rng": tensor_rng}
            if ranks.distributed:  # every rank's random streams, so that each continues its own
                everyone = ranks.gather_json({"js": js_rng, "torch": tensor_rng["torch"].tolist(),
                                              "cuda": [t.tolist() for t in tensor_rng.get("cuda", [])]})
                state["rng_ranks"] = [e["js"] for e in everyone]
                tensors["rng_ranks"] = [{"torch": torch.tensor(e["torch"], dtype=torch.uint8),
                                         **({"cuda": [torch.tensor(c, dtype=torch.uint8) for c in e["cuda"]]}
                                            if e["cuda"] else {})} for e in everyone]
            if self.scaler is not None:
                tensors["scaler"] = self.scaler.state_dict()
            failed: Optional[BaseException] = None
            if ranks.main:  # rank 0 alone writes (new directory renamed into place: never a partial one)
                try:
                    save_checkpoint(self.out, step=self.step, model_state=model_state, tensors=tensors,
                                    state=json_roundtrip(state), history=self.metrics.lines)
                except BaseException as exc:  # noqa: BLE001 - re-raised below, after telling the others
                    failed = exc
            if ranks.distributed and ranks.max([1.0 if failed is not None else 0.0])[0] > 0 and failed is None:
                raise RuntimeError(f"rank 0 could not write the checkpoint of step {self.step} (see its output); "
                                   "the last complete checkpoint is left in place")
            if failed is not None:
                raise failed
            self.resumable = (self.out, self.step)
        self.clock.restart()

    # ---- messages
    def resume_command(self) -> Optional[str]:
        prog = ("hift-ext" if not self.ranks.distributed
                else f"torchrun --nproc-per-node {self.ranks.world} $(which hift-ext)")
        if self.resumable is not None:
            return f"{prog} finetune --resume {shlex.quote(self.resumable[0])}"
        if self.source is not None:  # resumed into another directory, no checkpoint of its own yet
            cmd = f"{prog} finetune --resume {shlex.quote(self.source.path)}"
            return cmd + (f" --output {shlex.quote(self.out)} --overwrite" if self.out else "")
        return None

    def where_to_resume(self) -> str:
        cmd = self.resume_command()
        if cmd is None:
            if not self.out:
                return "nothing was saved (no --output)"
            first = (f"after epoch 1 or at step {self.cfg.save_steps}" if self.cfg.save_steps else "after epoch 1")
            return f"no checkpoint was written yet (the first one is written {first}); start the run again"
        step = self.resumable[1] if self.resumable else self.source.step
        where = (os.path.join(self.resumable[0], POINTER) if self.resumable else self.source.path)
        return f"the last checkpoint is {where} (step {step}); continue with:\n  {cmd}"

    def _stop_for_nonfinite(self, detail: str) -> NonFiniteTrainingError:
        return NonFiniteTrainingError(
            f"training stopped at step {self.step}/{self.total_steps}: {detail}; "
            f"{self.where_to_resume()}\nWhat to try: a lower --lr (now "
            f"{self.cfg.resolved_lr():g}), gradient clipping (--max-grad-norm 1.0; now {self.cfg.max_grad_norm:g}), "
            f"{'fp32 (no --' + self.cfg.precision + '), ' if self.cfg.low_precision else ''}or check the data for odd examples; "
            f"--max-nonfinite-steps N tolerates longer runs of bad steps")

    # ---- the loop
    def run(self, pbar) -> None:
        self._pbar = pbar
        try:
            self._loop(pbar)
        except KeyboardInterrupt:
            raise RunInterrupted(f"interrupted at step {self.step}/{self.total_steps}; "
                                 f"{self.where_to_resume()}") from None

    def _postfix(self, pbar, loss: Optional[float], group: str) -> None:
        skipped = self.counters["skipped_steps"]
        speed = (f"tok/s={self.clock.token_rate(live=True):.0f}" if self.task.rate_unit == "tok"
                 else f"ex/s={self.clock.rate(live=True):.1f}")
        pbar.set_postfix_str(f"loss={'nan' if loss is None else f'{loss:.4f}'} {speed} "
                             f"group={group} epoch={self.epoch + 1}" + (f" skipped={skipped}" if skipped else ""))

    def _skip(self, batches_len: int, loss_bad: Optional[float], grad_norm: float) -> None:
        """A step whose loss or gradient is not finite: nothing is applied (no optimizer or scheduler
        step, so the HiFT group is retried with the next batch), the gradients are dropped."""
        self.optimizer.zero_grad(set_to_none=True)
        c = self.counters
        c["skipped_steps"] += 1
        c["nonfinite_streak"] += 1
        what = "loss" if loss_bad is not None else "gradient norm"
        self.metrics.emit({"type": "skip", "step": self.step, "epoch": round(self.epoch + self.micro / batches_len, 4),
                           "reason": f"non-finite {what}", "loss": loss_bad, "grad_norm": grad_norm,
                           "skipped_steps": c["skipped_steps"], "in_a_row": c["nonfinite_streak"]})
        self.log(f"step {self.step + 1}: non-finite {what} ({loss_bad if loss_bad is not None else grad_norm}); "
                 f"step skipped ({c['nonfinite_streak']} in a row, {c['skipped_steps']} in all)")
        self._postfix(self._pbar, c["window_loss"] / c["window_n"] if c["window_n"] else None,
                      active_group_label(self.optimizer))
        if c["nonfinite_streak"] >= self.cfg.max_nonfinite_steps:
            raise self._stop_for_nonfinite(
                f"the loss or the gradients were not finite (NaN/inf) for {c['nonfinite_streak']} steps in a "
                f"row ({c['skipped_steps']} skipped in all; skipped steps change nothing)")

    def _amp_overflow(self) -> None:
        """fp16: the scaled gradients overflowed. The scaler lowers its scale; nothing is applied
        (the optimizer sees found_inf and changes nothing) and the step does not count."""
        self.scaler.step(self.optimizer)  # records found_inf: no update, no HiFT group switch
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.counters["amp_skipped_steps"] = self.counters.get("amp_skipped_steps", 0) + 1

    def _distributed_micro_batch(self, batches) -> Tuple[float, int, int]:
        """This rank's part of global micro-batch ``self.micro``: forward and backward (only the last
        micro-batch of an optimizer step synchronizes the gradients; earlier ones accumulate inside
        optimizer.no_sync()), then (loss, examples, tokens) of the whole global micro-batch, agreed by
        every rank. Each rank's loss is weighted by its share of the loss terms (examples; response
        tokens for causal-lm, see ``_loss_terms``), so the synchronized gradient is the global batch's
        mean even when the batch does not split evenly; a rank without examples still takes part in
        the synchronization."""
        import contextlib

        cfg, ranks = self.cfg, self.ranks
        global_idx = batches[self.micro]
        idx = ranks.split(global_idx)
        last = (self.micro + 1) % cfg.grad_accum == 0 or self.micro + 1 == len(batches)
        local_sum, bad, tokens, terms = 0.0, 0.0, 0, 0
        if idx:
            host = self.train_ds.collate(idx)
            batch = {k: v.to(self.device, non_blocking=True) for k, v in host.items()}
            tokens = _batch_tokens(host)
            with self.autocast():
                loss = self.task.loss(self.model, batch, host)
            terms, global_terms = _loss_terms(self.train_ds, idx), _loss_terms(self.train_ds, global_idx)
            weight = terms * ranks.world / max(global_terms, 1)
            scaled = (loss * weight if weight != 1.0 else loss) / cfg.grad_accum
            with contextlib.nullcontext() if last else self.optimizer.no_sync():
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            value = float(loss.detach().float())
            if math.isfinite(value):
                local_sum = value * terms
            else:
                bad = 1.0
        elif last:
            self.optimizer.sync_grads()  # the other ranks' last backward synchronizes: take part
        total, n_terms, n, tokens, bad = ranks.sum([local_sum, terms, len(idx), tokens, bad])
        return (total / max(n_terms, 1) if bad == 0 else float("nan")), int(n), int(tokens)

    def _loop(self, pbar) -> None:
        cfg, model, optimizer, scheduler, c = self.cfg, self.model, self.optimizer, self.scheduler, self.counters
        bad_loss: Optional[float] = None  # a non-finite loss among the step's micro-batches
        optimizer.zero_grad(set_to_none=True)
        self.clock.restart()
        ranks = self.ranks
        while self.epoch < self.n_epochs and self.step < self.total_steps and not self.stopped:
            order = epoch_permutation(len(self.train_ds), cfg.seed, self.epoch)
            # under torchrun a batch is global (batch_size x world_size examples) and each rank takes its part
            batches = self.train_ds.batches(order, cfg.batch_size * ranks.world)
            while self.micro < len(batches) and self.step < self.total_steps:
                if ranks.distributed:
                    loss_value, n_examples, n_tokens = self._distributed_micro_batch(batches)
                else:
                    idx = batches[self.micro]
                    host = self.train_ds.collate(idx)
                    batch = {k: v.to(self.device, non_blocking=True) for k, v in host.items()}
                    with self.autocast():
                        loss = self.task.loss(model, batch, host)
                    scaled = loss / cfg.grad_accum
                    (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
                    loss_value, n_examples, n_tokens = float(loss.detach().float()), len(idx), _batch_tokens(host)
                if math.isfinite(loss_value):
                    c["window_loss"] += loss_value
                    c["window_n"] += 1
                else:
                    bad_loss = loss_value
                self.clock.examples += n_examples
                self.clock.tokens += n_tokens
                self.micro += 1
                if self.micro % cfg.grad_accum != 0 and self.micro != len(batches):
                    continue
                if self.scaler is None:
                    grad_norm = float(_total_grad_norm(self.params, cfg.max_grad_norm, optimizer))
                else:
                    grad_norm = _clip_scaled_grads(self.params, cfg.max_grad_norm, self.scaler.get_scale(), optimizer)
                    if bad_loss is None and not math.isfinite(grad_norm):
                        self._amp_overflow()  # the scaler's business, not a bad step
                        continue
                if bad_loss is not None or not math.isfinite(grad_norm):
                    self._skip(len(batches), bad_loss, grad_norm)
                    bad_loss = None
                    continue
                c["nonfinite_streak"] = 0
                lr_used = optimizer.param_groups[0]["lr"]
                group_used = active_group_label(optimizer)
                if self.scaler is not None:
                    self.scaler.step(optimizer)
                    self.scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                self.step += 1
                pbar.update(1)
                mean_loss = c["window_loss"] / c["window_n"] if c["window_n"] else None
                self._postfix(pbar, mean_loss, group_used)
                if self.step % cfg.logging_steps == 0 or self.step == self.total_steps:
                    self.clock.account()
                    c["max_device_state"] = max(c["max_device_state"], device_state_bytes(optimizer, self.device))
                    c["max_group_state"] = max(c["max_group_state"], largest_group_state_bytes(optimizer))
                    self.metrics.emit({"type": "train", "step": self.step,
                                       "epoch": round(self.epoch + self.micro / len(batches), 4),
                                       "loss": mean_loss, "lr": lr_used,
                                       "group": group_used, "examples_per_s": self.clock.rate(),
                                       "tokens_per_s": self.clock.token_rate(), "elapsed_s": c["train_time_s"]})
                    c["window_loss"], c["window_n"] = 0.0, 0
                epoch_ends = self.micro >= len(batches) or self.step >= self.total_steps
                if cfg.eval_steps and self.step % cfg.eval_steps == 0 and not epoch_ends:
                    self._evaluate(round(self.epoch + self.micro / len(batches), 4), "steps", final=False)
                if cfg.save_steps and self.step % cfg.save_steps == 0 and not epoch_ends:
                    self.save()  # (the epoch end saves anyway) accounts the time before, restarts after
                if cfg.stop_after and self.step >= cfg.stop_after and self.step < self.total_steps:
                    self.stopped = True
                    break
            if self.stopped:
                break
            # end of epoch (or of max_steps): evaluate, checkpoint
            last = self.epoch + 1 >= self.n_epochs or self.step >= self.total_steps
            self._evaluate(self.epoch + 1, "epoch", final=last)
            self.epoch, self.micro = self.epoch + 1, 0
            self.save()
        if self.stopped:
            self.save()
            self.log(f"stopped after step {self.step}/{self.total_steps}; {self.where_to_resume()}")

    def _evaluate(self, epoch, trigger: str, *, final: bool) -> None:
        """Evaluate on the dev set (if any) and record it; ``trigger`` is "epoch" (an epoch's end, or
        max_steps') or "steps" (--eval-steps, mid-epoch: ``epoch`` is then the fraction reached)."""
        if self.eval_ds is None:  # nothing to time apart (the epoch end's save() accounts anyway)
            return
        self.clock.account()
        c = self.counters
        ev, files = self.task.evaluate(self.built, self.cfg, self.device, self.autocast, final=final, ranks=self.ranks)
        ev.update({"type": "eval", "step": self.step, "epoch": epoch, "trigger": trigger,
                   "elapsed_s": c["train_time_s"]})
        c["evals"].append(ev)
        self.metrics.emit(ev)
        where = (f"epoch {epoch}/{self.n_epochs}" if trigger == "epoch"
                 else f"step {self.step}/{self.total_steps} (epoch {epoch:g})")
        self.log(f"{where}: {self.task.eval_message(ev)}")
        if self.out and self.ranks.main:
            for name, text in files.items():
                write_text(os.path.join(self.out, name), text)
        self.clock.restart()  # evaluation is not training time

    # ---- the final figures
    def final_metrics(self, completed: bool) -> Dict[str, Any]:
        cfg, c, opt, device = self.cfg, self.counters, self.optimizer, self.device
        c["max_device_state"] = max(c["max_device_state"], device_state_bytes(opt, device))
        c["max_group_state"] = max(c["max_group_state"], largest_group_state_bytes(opt))
        peak, peak_kind = peak_memory_bytes(device)
        full_state = sum(p.numel() * 4 for p in self.params if p.is_floating_point()) * _state_slots(
            cfg.optimizer, cfg.momentum)
        return {
            "task": self.task.name,
            **self.task.final_metrics(c["evals"]),
            "train_examples_per_s": self.clock.rate(),
            "train_tokens_per_s": self.clock.token_rate(),
            "train_time_s": c["train_time_s"],
            "train_examples": c["train_examples"],
            "train_tokens": c.get("train_tokens", 0),
            "skipped_steps": c["skipped_steps"],
            "peak_memory_bytes": peak,
            "peak_memory_kind": peak_kind,
            "optimizer_state_device_bytes": c["max_device_state"],
            "optimizer_state_largest_group_bytes": c["max_group_state"],
            "optimizer_state_full_ft_bytes": full_state,
            "epochs": self.n_epochs if not cfg.max_steps else round(self.step / self.steps_per_epoch, 4),
            "steps": self.step,
            "total_steps": self.total_steps,
            "completed": completed,
            "optimizer": cfg.optimizer,
            "mode": cfg.mode,
            "lr": cfg.resolved_lr(),
            "group_size": getattr(opt, "group_size", cfg.group_size) if not cfg.full else None,
            "strategy": cfg.strategy if not cfg.full else None,
            "steps_per_group": getattr(opt, "steps_per_group", 1) if not cfg.full else None,
            "lr_hold": getattr(self.scheduler, "hold", None),
            "num_groups": getattr(opt, "num_groups", 1),
            "device": str(device),
            "seed": cfg.seed,
            "precision": cfg.precision,
            "gradient_checkpointing": cfg.gradient_checkpointing,
            "amp_skipped_steps": c.get("amp_skipped_steps", 0),
            **({"world_size": self.ranks.world, "global_batch_size": cfg.batch_size * self.ranks.world,
                "shard_state": bool(getattr(opt, "shard_state", False))} if self.ranks.distributed else {}),
        }


def json_roundtrip(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists; non-finite floats become None)."""
    return json.loads(dumps(obj))


def _same_dir(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _export_model(model, tokenizer, out: str) -> None:
    """OUTPUT/model, written to a new directory and renamed into place."""
    from hift_ext.tasks.common import quiet_transformers

    tmp = make_temp_dir(out, "model")
    try:
        with quiet_transformers():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except BaseException:
        remove_entry(tmp)
        raise
    install_dir(tmp, os.path.join(out, "model"))


def enable_gradient_checkpointing(model) -> None:
    """Gradient (activation) checkpointing on a transformers model, non-reentrant: HiFT freezes the
    layers below the active group, so a block's input may not require grad, and the reentrant
    variant would then drop the block's weight gradients. Uses transformers' current name
    (activation_checkpointing_enable) where it exists, the older one otherwise."""
    kw = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


def run_finetune(cfg: TrainConfig, *, optimizer_factory: Optional[OptimizerFactory] = None,
                 scheduler_factory=None, log: Callable[[str], None] = None,
                 checkpoint: Optional[Checkpoint] = None) -> Dict[str, Any]:
    """Fine-tune; returns the metrics dict (also written to OUTPUT/metrics.json).

    ``optimizer_factory(cfg, model)`` / ``scheduler_factory(cfg, optimizer, total_steps)`` replace
    the built-in ones (benchmarks and tests use this to compare implementations). ``checkpoint``:
    the already opened checkpoint of ``cfg.resume`` (the CLI opens it to read the configuration;
    passing it on reads every file once).

    Raises UsageError (bad input; nothing in OUTPUT changed), NonFiniteTrainingError (training
    diverged; the last good checkpoint is left in place) and RunInterrupted (Ctrl-C).
    """
    from tqdm.auto import tqdm

    from hift_ext.distributed import Ranks

    ranks = Ranks()  # under torchrun: this process's rank; rank 0 of 1 otherwise
    if log is None:
        def log(msg):
            tqdm.write(msg, file=sys.stderr)
    if not ranks.main:  # rank 0 speaks for every rank
        def log(msg):  # noqa: F811
            pass

    # ---- everything is validated before the output directory is touched
    if cfg.task is None:  # from the model's head (classification without --model)
        cfg = dataclasses.replace(cfg, task=cfg.resolved_task())
    cfg.world_size = ranks.world
    cfg.validate()
    task = get_task(cfg.task)
    device = _pick_device(cfg.device, ranks)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ck = checkpoint if checkpoint is not None or cfg.resume is None else open_checkpoint(cfg.resume)
    if ck is not None:
        saved_world = with_legacy_keys(ck.config)["world_size"]
        if saved_world != cfg.world_size:
            raise UsageError(
                f"--resume {cfg.resume}: the run trained on {saved_world} process(es) and this one has "
                f"{cfg.world_size}; its global batch is --batch-size x processes, so resume it on as many: "
                + ("`hift-ext finetune --resume ...` (one process)" if saved_world == 1 else
                   f"`torchrun --nproc-per-node {saved_world} $(which hift-ext) finetune --resume ...`"))
        if cfg.group_size is None:  # not given: the run's own, as the CLI takes every flag not given
            cfg.group_size = with_legacy_keys(ck.config).get("group_size")
        diff = config_mismatch(with_legacy_keys(ck.config), cfg.to_dict(), TRAINING_KEYS)
        if diff:
            raise UsageError(f"--resume {cfg.resume}: the checkpoint was written by another configuration:\n  "
                             + "\n  ".join(diff))
        if ck.note:
            log(ck.note)
    out = cfg.output
    resuming_here = ck is not None and bool(out) and os.path.isdir(out) and _same_dir(ck.run_dir, out)
    if out and ranks.main:  # (rank 0 alone writes it: another rank checking it would race its writes)
        check_output(out, overwrite=cfg.overwrite, resuming_here=resuming_here)

    train_path, eval_path = task.data_paths(cfg)
    data = task.load_data(cfg, train_path, eval_path)  # parse errors before any model is loaded
    data_prints = {"train": file_fingerprint(train_path), "eval": file_fingerprint(eval_path) if eval_path else None}
    if ck is not None:
        changed = changed_data_files(ck.state.get("data") or {}, {"train": train_path, "eval": eval_path})
        if changed:
            raise UsageError(f"--resume {cfg.resume}: the data are not the data the run started with:\n  "
                             + "\n  ".join(changed) + "\nrestore the file(s), or start a new run")

    # ---- model (seeded: a new classification head is random)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    built = task.build(cfg, data, log)
    model, tokenizer, train_ds = built.model, built.tokenizer, built.train_ds
    model_path = built.model_path
    model.to(device=device, dtype=cfg.weights_dtype)  # HiFT in bf16/fp16: low-precision weights, fp32 masters
    model.train()
    if cfg.group_size is None:  # the task's default for this model, recorded as sizes (config.json, checkpoints)
        gs = default_group_size(model, cfg.task)
        cfg.group_size = list(gs) if isinstance(gs, tuple) else gs
    if cfg.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise UsageError(f"--gradient-checkpointing: {type(model).__name__} does not support it")
        enable_gradient_checkpointing(model)
        if getattr(model.config, "use_cache", None):
            model.config.use_cache = False  # no KV cache in training forward passes (generation asks for it)

    n_batches = math.ceil(len(train_ds) / (cfg.batch_size * ranks.world))  # global batches
    steps_per_epoch = math.ceil(n_batches / cfg.grad_accum)
    total_steps = cfg.max_steps if cfg.max_steps else cfg.epochs * steps_per_epoch
    n_epochs = math.ceil(total_steps / steps_per_epoch)

    try:
        optimizer = (optimizer_factory or make_optimizer)(cfg, model)
    except (ValueError, TypeError) as exc:  # the model cannot be trained as asked (e.g. no trainable params)
        raise UsageError(f"cannot build the optimizer for this model: {exc}") from None
    if (not cfg.full and isinstance(cfg.group_size, int)
            and getattr(optimizer, "group_size", None) not in (None, cfg.group_size)):
        log(f"group_size {cfg.group_size} is more than the model's {optimizer.group_size} layer units: "
            f"one group of all of them (HiFT updates the whole model each step here)")
    try:
        scheduler = (scheduler_factory or make_scheduler)(cfg, optimizer, total_steps)
    except (ValueError, TypeError) as exc:  # e.g. a schedule that needs arguments TrainConfig has not
        raise UsageError(f"--scheduler {cfg.scheduler}: {exc}") from None
    if cfg.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError("--bf16: this GPU does not support bfloat16; use --fp16")

    if ranks.distributed and ranks.rank > 0:  # every rank its own dropout stream (rank 0 keeps the seed's)
        torch.manual_seed((cfg.seed * 1_000_003 + 7919 * ranks.rank) & ((1 << 63) - 1))
    metrics_log = MetricsLog(os.path.join(out, "metrics.jsonl") if out and ranks.main else None)
    training = _Training(cfg, task=task, built=built, optimizer=optimizer, scheduler=scheduler,
                         device=device, total_steps=total_steps,
                         steps_per_epoch=steps_per_epoch, n_epochs=n_epochs, metrics=metrics_log,
                         state_extra={"data": data_prints}, source=ck, log=log, ranks=ranks)
    if ck is not None:  # load (and so validate) the checkpoint before anything in OUTPUT changes
        model_state, tensors = ck.load_tensors(map_location="cpu")
        try:
            model.load_state_dict({k: v.to(device) for k, v in model_state.items()})
            optimizer.load_state_dict(tensors["optimizer"])
            scheduler.load_state_dict(tensors["scheduler"])
            training.restore(ck.state, tensors)
        except (ValueError, KeyError, RuntimeError, TypeError) as exc:
            raise UsageError(f"--resume {cfg.resume}: the checkpoint does not fit this model/optimizer "
                             f"({exc.__class__.__name__}: {exc})") from None
        history = ck.history()
        log(f"resumed from {ck.path} at step {training.step}/{total_steps} (epoch {training.epoch + 1}, "
            f"batch {training.micro})")

    # ---- from here on the output directory changes (rank 0 alone writes)
    if out and ranks.main:
        inputs = [train_path, eval_path, model_path, cfg.tokenizer] + ([ck.path] if ck else [])
        prepare_output(out, overwrite=cfg.overwrite, resuming_here=resuming_here, inputs=inputs, log=log)
        write_text(os.path.join(out, "config.json"), dumps(
            {**cfg.to_dict(), "model_path": model_path, "train_path": train_path, "eval_path": eval_path,
             "data": data_prints, **built.config_extra, "total_steps": total_steps,
             "steps_per_epoch": steps_per_epoch, "device_resolved": str(device),
             "global_batch_size": cfg.batch_size * ranks.world}, indent=2))
    metrics_log.start(history if ck is not None else [])

    desc = f"{'full' if cfg.full else 'HiFT'}-{cfg.optimizer}"
    pbar = tqdm(total=total_steps, initial=training.step, desc=desc, unit="step",
                disable=not cfg.progress or not ranks.main,
                dynamic_ncols=True, file=sys.stderr)
    try:
        training.run(pbar)
    except NonFiniteTrainingError:
        if out and ranks.main:
            _write_reports(training, out, desc, train_path, completed=False, stop_reason="non-finite")
        raise
    finally:
        pbar.close()
        metrics_log.close()

    metrics = training.final_metrics(completed=not training.stopped)
    if out and ranks.main:
        _write_reports(training, out, desc, train_path, completed=not training.stopped, metrics=metrics)
        if cfg.save_model and not training.stopped:
            _export_model(model, tokenizer, out)
    return metrics


def _write_reports(training: _Training, out: str, desc: str, train_path: str, *, completed: bool,
                   metrics: Optional[Dict[str, Any]] = None, stop_reason: Optional[str] = None) -> None:
    if metrics is None:
        metrics = training.final_metrics(completed=completed)
    if stop_reason:
        metrics["stop_reason"] = stop_reason
    write_metrics_json(os.path.join(out, "metrics.json"), metrics)
    plot_loss(training.metrics.records(), os.path.join(out, "loss.png"),
              f"{desc} on {os.path.basename(train_path)}", eval_key=training.task.plot_eval)
