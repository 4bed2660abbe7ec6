"""A run's output directory: its default name, checks before a run, and ``--overwrite``.

hift-ext owns only the entries it writes (:func:`is_own_output`): ``--overwrite`` removes those and
nothing else, and only after every input has been validated, so a typo in a flag cannot cost the
previous run, and a user's files kept beside the outputs (data, notes) survive.
"""
from __future__ import annotations

import datetime
import os
import re
from typing import Callable, Iterable, List, Optional

from hift_ext.atomic_io import is_own_temp, remove_entry
from hift_ext.checkpoint import is_checkpoint_name
from hift_ext.errors import UsageError

__all__ = ["OWN_FILES", "OWN_DIRS", "is_own_output", "default_run_dir", "check_output_path", "check_output",
           "prepare_output"]

OWN_FILES = ("config.json", "metrics.jsonl", "metrics.json", "loss.png", "samples.jsonl")
OWN_DIRS = ("model",)
LEGACY = ("checkpoint.tmp",)  # the temporary checkpoint directory of hift-ext < format 2


def is_own_output(name: str) -> bool:
    return (name in OWN_FILES or name in OWN_DIRS or name in LEGACY or is_checkpoint_name(name)
            or is_own_temp(name))


def default_run_dir(model_name: str, mode: str, root: str = "runs",
                    now: Optional[datetime.datetime] = None) -> str:
    """``runs/<model>-<mode>-<YYYYmmdd-HHMMSS>`` (relative to the current directory), made unique."""
    stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name).strip("._") or "model"
    base = os.path.join(root, f"{safe}-{mode}-{stamp}")
    path, n = base, 1
    while os.path.lexists(path):
        n += 1
        path = f"{base}-{n}"
    return path


def check_output_path(out: str) -> None:
    """Refuse an output path that cannot become a writable directory, without creating anything."""
    p = os.path.abspath(out)
    if os.path.lexists(p) and not os.path.isdir(p):
        raise UsageError(f"--output {out}: exists and is not a directory")
    anc = p
    while not os.path.lexists(anc):
        anc = os.path.dirname(anc)
    if not os.path.isdir(anc):
        raise UsageError(f"--output {out}: {anc} is a file, so no directory can be made under it")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise UsageError(f"--output {out}: cannot write in {anc} (permission denied); choose another --output")


def check_output(out: str, *, overwrite: bool, resuming_here: bool) -> None:
    """Everything :func:`prepare_output` would refuse, checked before the run loads anything."""
    check_output_path(out)
    if os.path.isdir(out) and not resuming_here and not overwrite and os.listdir(out):
        raise UsageError(f"--output {out}: directory exists and is not empty; pass --overwrite to "
                         "replace the outputs of the run in it, or --resume to continue that run")


def _inside(path: str, root: str) -> bool:
    path, root = os.path.realpath(path), os.path.realpath(root)
    return path == root or path.startswith(root + os.sep)


def prepare_output(out: str, *, overwrite: bool, resuming_here: bool, inputs: Iterable[str],
                   log: Callable[[str], None]) -> None:
    """Create ``out`` or make it ready for a new run. A non-empty directory needs ``overwrite`` (or
    a resume of the run that lives there); ``overwrite`` removes hift-ext's own entries only."""
    check_output(out, overwrite=overwrite, resuming_here=resuming_here)
    if os.path.isdir(out) and not resuming_here:
        entries = sorted(os.listdir(out))
        own = [e for e in entries if is_own_output(e)]
        for e in own:
            for src in inputs:
                if src and _inside(src, os.path.join(out, e)):
                    raise UsageError(f"--overwrite would delete {os.path.join(out, e)}, which holds the "
                                     f"input {src}; move it out of --output {out} first")
        for e in own:
            try:
                remove_entry(os.path.join(out, e))
            except OSError as exc:
                raise UsageError(f"--overwrite: cannot remove {os.path.join(out, e)} "
                                 f"({exc.strerror or exc})") from None
        kept: List[str] = [e for e in entries if not is_own_output(e)]
        if own:
            log(f"--overwrite: removed the previous run's outputs from {out}"
                + (f" (kept {len(kept)} other file(s): {', '.join(kept[:5])}{' ...' if len(kept) > 5 else ''})"
                   if kept else ""))
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--output {out}: cannot create it ({exc.strerror or exc})") from None
