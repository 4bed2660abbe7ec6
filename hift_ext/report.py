"""What a fine-tuning run reports: metrics.jsonl, metrics.json, loss.png and the printed summary.

Every file is written new and renamed into place (:mod:`hift_ext.atomic_io`). Both JSON files stay
strict JSON: a float that is NaN or infinite is written as ``null`` (never the bare ``NaN`` /
``Infinity`` that ``json.dumps`` emits by default and most JSON readers reject); records of skipped
steps say in their ``reason`` field which value was not finite.
"""
from __future__ import annotations

import json
import math
import shlex
from typing import IO, Any, Dict, List, Optional, Sequence

from hift_ext.atomic_io import atomic_file, write_text

__all__ = ["json_safe", "dumps", "MetricsLog", "write_metrics_json", "plot_loss", "format_summary",
           "human_bytes", "human_time"]


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (recursively)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps(obj: Any, **kw) -> str:
    return json.dumps(json_safe(obj), allow_nan=False, **kw)


class MetricsLog:
    """``metrics.jsonl``: one JSON record a line, appended as training goes.

    :meth:`start` writes the history a resumed run continues from (the checkpoint's lines) into a
    new file renamed over the old one, and keeps that file open: appends go to the file this run
    created, never through a link someone put at the name. Without a directory the records are
    only kept in memory (:attr:`lines`, which the loss plot and checkpoints use)."""

    def __init__(self, path: Optional[str]):
        self.path = path
        self.lines: List[str] = []
        self._fh: Optional[IO] = None

    def start(self, history: Sequence[str]) -> None:
        self.lines = [ln if ln.endswith("\n") else ln + "\n" for ln in history]
        if self.path:
            with atomic_file(self.path, keep_open=True) as fh:
                fh.writelines(self.lines)
            self._fh = fh

    def emit(self, record: Dict[str, Any]) -> None:
        line = dumps(record) + "\n"
        self.lines.append(line)
        if self._fh is not None:
            self._fh.write(line)
            self._fh.flush()

    def records(self) -> List[Dict[str, Any]]:
        return [json.loads(ln) for ln in self.lines if ln.strip()]

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def write_metrics_json(path: str, metrics: Dict[str, Any]) -> None:
    write_text(path, dumps(metrics, indent=2))


def plot_loss(records: Sequence[Dict[str, Any]], png_path: str, title: str,
              eval_key: Sequence = ("eval_accuracy", "eval accuracy (%)", 100.0)) -> bool:
    """Training loss and an eval figure (``eval_key`` = (record key, axis label, scale): the eval
    accuracy in %, or the dev loss) against the step; False when there is nothing to plot or
    matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [(r["step"], r["loss"]) for r in records if r.get("type") == "train" and r.get("loss") is not None]
    key, label, scale = eval_key
    evals = [(r["step"], r[key]) for r in records if r.get("type") == "eval" and r.get(key) is not None]
    if not train:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([s for s, _ in train], [v for _, v in train], label="train loss", color="tab:blue")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    if evals and key == "eval_loss":  # same scale as the training loss: one axis
        ax.plot([s for s, _ in evals], [scale * a for _, a in evals], "o-", color="tab:orange", label=label)
    elif evals:
        ax2 = ax.twinx()
        ax2.plot([s for s, _ in evals], [scale * a for _, a in evals], "o-", color="tab:orange",
                 label=label.replace(" (%)", ""))
        ax2.set_ylabel(label)
    fig.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    try:
        with atomic_file(png_path, binary=True) as fh:
            fig.savefig(fh, format="png", dpi=110)
    finally:
        plt.close(fig)
    return True


def human_bytes(n: Optional[int]) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def human_time(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _groups_phrase(num_groups: int, group_size) -> str:
    if isinstance(group_size, (list, tuple)):  # an unequal split, bottom to top
        from hift_ext.grouping import format_group_size

        return f"{num_groups} groups of {format_group_size(group_size, sep='+')} units"
    return f"{num_groups} groups of {group_size} unit(s)"


def format_summary(cfg, m: Dict[str, Any]) -> str:
    """The table ``hift-ext finetune`` prints at the end of a run."""
    from hift_ext.tasks import get_task

    mode = "full fine-tuning" if m["mode"] == "full" else (
        f"HiFT, {_groups_phrase(m['num_groups'], m['group_size'])}, {m['strategy']}"
        + (f", {m['steps_per_group']} steps per group" if (m.get("steps_per_group") or 1) > 1 else ""))
    rows = [
        ("mode", f"{mode}, {m['optimizer']} lr {m['lr']:g}"
                 + (f", {m['precision']}" if m.get("precision", "fp32") != "fp32" else "")
                 + (", gradient checkpointing" if m.get("gradient_checkpointing") else "")),
        *get_task(m.get("task", "classification")).summary_rows(m),
        ("train time", f"{human_time(m['train_time_s'])} ({m['steps']} steps, {m['epochs']} epochs, "
                       f"{m['device']})"),
    ]
    if (m.get("world_size") or 1) > 1:
        rows.append(("processes", f"{m['world_size']} (global batch {m['global_batch_size']}; optimizer state "
                                  + ("sharded)" if m.get("shard_state") else "replicated)")))
    if m.get("skipped_steps"):
        rows.append(("skipped steps", f"{m['skipped_steps']} (non-finite loss or gradients; not applied)"))
    rows += [
        ("peak memory", f"{human_bytes(m['peak_memory_bytes'])} ({m['peak_memory_kind']})"),
        ("optimizer state on device", f"{human_bytes(m['optimizer_state_device_bytes'])} (max over the run)"),
        ("  largest group's state", f"{human_bytes(m['optimizer_state_largest_group_bytes'])}"
                                    + (" (all HiFT needs on a GPU with offload)" if m["mode"] == "hift" else "")),
        ("  full fine-tuning holds", f"{human_bytes(m['optimizer_state_full_ft_bytes'])}"),
    ]
    w = max(len(k) for k, _ in rows)
    line = "-" * (w + 2 + max(len(v) for _, v in rows))
    out = [line] + [f"{k:<{w}}  {v}" for k, v in rows] + [line]
    if not m.get("completed", True):
        launcher = ("hift-ext" if (m.get("world_size") or 1) == 1
                    else f"torchrun --nproc-per-node {m['world_size']} $(which hift-ext)")
        out.append(f"(stopped early after step {m['steps']}/{m['total_steps']}: "
                   f"continue with: {launcher} finetune --resume {shlex.quote(cfg.output)})")
    if cfg.output:
        samples = " samples.jsonl" if m.get("exact_match_examples") else ""
        out.append(f"outputs in {cfg.output}: config.json metrics.jsonl metrics.json loss.png{samples} checkpoint/"
                   + (" model/" if cfg.save_model and m.get("completed", True) else ""))
    return "\n".join(out)
