"""Checkpoints of ``hift-ext finetune``: atomic to write, verified before loading, never unpickled.

Layout inside a run's output directory::

    checkpoint -> checkpoint-120         a symlink: the current checkpoint
    checkpoint-120/
        model.pt             model.state_dict()                     torch.load(weights_only=True)
        trainer_state.pt     optimizer, scheduler, torch RNG states  torch.load(weights_only=True)
        trainer_state.json   run configuration, data position, counters, python/numpy RNG states,
                             data fingerprints: everything that is not a tensor, read as JSON
        metrics.jsonl        the run's metrics history up to this step
        manifest.json        written last: size and sha256 of each file above

Saving writes a new ``checkpoint-<step>`` completely under a temporary name (files fsynced, the
manifest last), renames it into place, swaps the ``checkpoint`` symlink with one ``rename`` (atomic:
a kill leaves either the old or the new pointer) and only then deletes older checkpoints. Resuming
follows the pointer; when it is missing it takes the newest complete ``checkpoint-<step>``.
Every file is checked against the manifest (a missing, empty, truncated or altered file is a
:class:`UsageError`, not a traceback), and tensors are loaded with ``weights_only=True``: a planted
pickle cannot run code. Checkpoints of older hift-ext versions (a pickled ``trainer_state.pt``) are
refused rather than unpickled.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from hift_ext.atomic_io import (
    HashingWriter,
    atomic_file,
    fsync_dir,
    install_symlink,
    is_own_temp,
    make_temp_dir,
    remove_entry,
    sha256_file,
    write_text,
)
from hift_ext.errors import NonFiniteTrainingError, UsageError

__all__ = [
    "POINTER",
    "MODEL_FILE",
    "TENSORS_FILE",
    "STATE_FILE",
    "HISTORY_FILE",
    "MANIFEST_FILE",
    "FORMAT",
    "Checkpoint",
    "is_checkpoint_name",
    "open_checkpoint",
    "save_checkpoint",
    "rng_state",
    "set_rng_state",
    "file_fingerprint",
    "changed_data_files",
    "config_mismatch",
    "nonfinite_tensors",
]

POINTER = "checkpoint"
MODEL_FILE = "model.pt"
TENSORS_FILE = "trainer_state.pt"
STATE_FILE = "trainer_state.json"
HISTORY_FILE = "metrics.jsonl"
MANIFEST_FILE = "manifest.json"
FORMAT = 2

_DIR_RE = re.compile(r"^checkpoint-(\d+)(?:-(\d+))?$")


def is_checkpoint_name(name: str) -> bool:
    """``checkpoint`` (the pointer) or ``checkpoint-<step>[-<n>]``: names hift-ext writes."""
    return name == POINTER or _DIR_RE.match(name) is not None


# ------------------------------------------------------------------------------------ RNG states
def rng_state() -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(JSON-able part, tensor part) of every RNG a training step may draw from."""
    version, internal, gauss = random.getstate()
    js: Dict[str, Any] = {"python": [version, list(internal), gauss]}
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        js["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    tensors: Dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state_all()
    return js, tensors


def set_rng_state(js: Dict[str, Any], tensors: Dict[str, Any]) -> None:
    version, internal, gauss = js["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    if "numpy" in js:
        import numpy as np

        name, keys, pos, has_gauss, cached = js["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda"])


# ---------------------------------------------------------------------------- data fingerprints
def file_fingerprint(path: str) -> Dict[str, Any]:
    """What identifies a data file's content: its size and sha256."""
    return {"path": os.path.abspath(path), "size": os.path.getsize(path), "sha256": sha256_file(path)}


def changed_data_files(saved: Dict[str, Optional[Dict[str, Any]]],
                       paths: Dict[str, Optional[str]]) -> List[str]:
    """One line per data file (by role: train, eval) whose content differs from the saved print."""
    out = []
    for role, path in paths.items():
        before = saved.get(role)
        if path is None or before is None:
            continue
        try:
            now = file_fingerprint(path)
        except OSError as exc:
            out.append(f"{role} data {path}: cannot read it ({exc.strerror or exc})")
            continue
        if (now["size"], now["sha256"]) != (before.get("size"), before.get("sha256")):
            out.append(f"{role} data {path} changed since the run started "
                       f"({before.get('size')} bytes, sha256 {str(before.get('sha256'))[:12]}... then; "
                       f"{now['size']} bytes, sha256 {now['sha256'][:12]}... now)")
    return out


def config_mismatch(saved: Dict[str, Any], now: Dict[str, Any], keys: Sequence[str]) -> List[str]:
    return [f"{k}: checkpoint {saved.get(k)!r} vs now {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]


def nonfinite_tensors(state: Dict[str, torch.Tensor]) -> List[str]:
    """Names of the floating-point tensors holding NaN or inf."""
    return [k for k, v in state.items()
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


# ----------------------------------------------------------------------------------------- save
def _save_tensors(obj: Any, path: str) -> Dict[str, Any]:
    with atomic_file(path, binary=True, fsync=True) as fh:
        w = HashingWriter(fh)
        torch.save(obj, w)
    return {"size": w.size, "sha256": w.hexdigest()}


def _save_text(text: str, path: str) -> Dict[str, Any]:
    data = text.encode("utf-8")
    with atomic_file(path, binary=True, fsync=True) as fh:
        w = HashingWriter(fh)
        w.write(data)
    return {"size": w.size, "sha256": w.hexdigest()}


def _unique_name(run_dir: str, step: int) -> str:
    name, n = f"checkpoint-{step}", 1
    while os.path.lexists(os.path.join(run_dir, name)):
        n += 1
        name = f"checkpoint-{step}-{n}"
    return name


def save_checkpoint(run_dir: str, *, step: int, model_state: Dict[str, torch.Tensor],
                    tensors: Dict[str, Any], state: Dict[str, Any], history: Sequence[str]) -> str:
    """Write a checkpoint of ``step`` into ``run_dir``, make it the current one, delete the older
    ones; returns its directory. ``state`` must be JSON-able (``trainer_state.json``).

    Raises NonFiniteTrainingError, before writing anything, when a weight is NaN/inf: a checkpoint
    of a diverged model must not replace the last good one."""
    bad = nonfinite_tensors(model_state)
    if bad:
        raise NonFiniteTrainingError(
            f"the model's weights became non-finite (NaN/inf) by step {step} ({len(bad)} tensor(s), e.g. "
            f"{bad[0]}); the checkpoint was not replaced")
    tmp = make_temp_dir(run_dir, f"checkpoint-{step}")
    try:
        files = {
            MODEL_FILE: _save_tensors(model_state, os.path.join(tmp, MODEL_FILE)),
            TENSORS_FILE: _save_tensors(tensors, os.path.join(tmp, TENSORS_FILE)),
            STATE_FILE: _save_text(json.dumps({"format": FORMAT, **state}, allow_nan=False),
                                   os.path.join(tmp, STATE_FILE)),
            HISTORY_FILE: _save_text("".join(history), os.path.join(tmp, HISTORY_FILE)),
        }
        # written last: a directory with a valid manifest is a complete checkpoint
        write_text(os.path.join(tmp, MANIFEST_FILE),
                   json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1), fsync=True)
        fsync_dir(tmp)
        name = _unique_name(run_dir, step)
        os.rename(tmp, os.path.join(run_dir, name))
    except BaseException:
        remove_entry(tmp)
        raise
    fsync_dir(run_dir)
    install_symlink(name, os.path.join(run_dir, POINTER))
    _remove_stale(run_dir, keep=name)
    return os.path.join(run_dir, name)


def _remove_stale(run_dir: str, keep: str) -> None:
    """Older checkpoints and the temporary directories of saves that were killed."""
    for entry in os.listdir(run_dir):
        if entry == keep or entry == POINTER:
            continue
        if _DIR_RE.match(entry) or (is_own_temp(entry) and entry[len(".hift-"):].startswith("checkpoint")):
            try:
                remove_entry(os.path.join(run_dir, entry))
            except OSError:
                pass  # a leftover is harmless: the pointer decides


# ----------------------------------------------------------------------------------------- load
@dataclass
class Checkpoint:
    """A verified checkpoint directory: its JSON state and metrics history are read (once, when it
    is verified); the tensors load on demand."""

    path: str
    run_dir: str
    state: Dict[str, Any]
    history_text: str = ""
    note: Optional[str] = None  # e.g. "the checkpoint link was missing: used checkpoint-8"

    @property
    def config(self) -> Dict[str, Any]:
        return dict(self.state["config"])

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def history(self) -> List[str]:
        return self.history_text.splitlines(keepends=True)

    def load_tensors(self, map_location) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
        """(model state_dict, trainer tensors), both with ``weights_only=True``."""
        out = []
        for name in (MODEL_FILE, TENSORS_FILE):
            try:
                out.append(torch.load(os.path.join(self.path, name), map_location=map_location,
                                      weights_only=True))
            except Exception as exc:  # noqa: BLE001 - anything unloadable is a bad checkpoint
                first = str(exc).splitlines()[0] if str(exc) else ""
                raise UsageError(f"--resume: {os.path.join(self.path, name)} cannot be loaded safely "
                                 f"({exc.__class__.__name__}: {first}); only plain tensors and containers "
                                 "are accepted") from None
        return out[0], out[1]


def _check_file(fp: str, want: Dict[str, Any], keep: bool) -> Optional[bytes]:
    """Compare a file with its manifest entry (size, then sha256); its bytes when ``keep`` (the
    small JSON files are parsed from the bytes that were hashed: read once)."""
    if not os.path.isfile(fp):
        raise UsageError(f"--resume: {fp} is missing: the checkpoint is damaged")
    size, expected = os.path.getsize(fp), want.get("size")
    if size == 0 and expected:
        raise UsageError(f"--resume: {fp} is empty: the checkpoint is damaged")
    if isinstance(expected, int) and size < expected:
        raise UsageError(f"--resume: {fp} is truncated ({size} of {expected} bytes): the checkpoint is damaged")
    if size != expected:
        raise UsageError(f"--resume: {fp} has {size} bytes, its manifest says {expected}: the checkpoint is damaged")
    data = None
    if keep:
        with open(fp, "rb") as fh:
            data = fh.read()
        digest = hashlib.sha256(data).hexdigest()
    else:
        digest = sha256_file(fp)
    if digest != want.get("sha256"):
        raise UsageError(f"--resume: {fp} does not match its manifest (sha256 differs): the checkpoint is damaged")
    return data


def _verify(path: str) -> Checkpoint:
    """The checkpoint in ``path`` after checking every file against the manifest (run_dir unset)."""
    manifest_path = os.path.join(path, MANIFEST_FILE)
    if not os.path.isfile(manifest_path):
        if os.path.isfile(os.path.join(path, TENSORS_FILE)) and not os.path.exists(os.path.join(path, STATE_FILE)):
            raise UsageError(
                f"--resume: {path} was written by an older hift-ext: its {TENSORS_FILE} can only be read "
                "by unpickling, which would run any code planted in it, so it is not loaded. Start the "
                "run again (with --overwrite to reuse the directory)")
        raise UsageError(f"--resume: {path} is incomplete (no {MANIFEST_FILE}: the run was stopped while "
                         "saving it)")
    try:
        with open(manifest_path, encoding="utf-8") as fh:
            manifest = json.load(fh)
        files = manifest["files"]
        assert isinstance(files, dict)
    except Exception:  # noqa: BLE001
        raise UsageError(f"--resume: {manifest_path} is damaged (not a checkpoint manifest)") from None
    if manifest.get("format") != FORMAT:
        raise UsageError(f"--resume: {path} has checkpoint format {manifest.get('format')!r}; this "
                         f"hift-ext reads format {FORMAT}")
    text = {}
    for name in (MODEL_FILE, TENSORS_FILE, STATE_FILE, HISTORY_FILE):
        data = _check_file(os.path.join(path, name), files.get(name) or {}, keep=name.endswith("json")
                           or name.endswith("jsonl"))
        if data is not None:
            text[name] = data.decode("utf-8", errors="replace")
    try:
        state = json.loads(text[STATE_FILE])
        for key in ("config", "step", "epoch", "micro", "counters", "rng"):
            state[key]
    except Exception:  # noqa: BLE001
        raise UsageError(f"--resume: {os.path.join(path, STATE_FILE)} is damaged") from None
    return Checkpoint(path, "", state, history_text=text[HISTORY_FILE])


def _newest_complete(run_dir: str) -> Tuple[Optional[Checkpoint], List[str]]:
    """(newest checkpoint-<step> that verifies, why the newer ones do not)."""
    cands = []
    for entry in os.listdir(run_dir):
        m = _DIR_RE.match(entry)
        p = os.path.join(run_dir, entry)
        if m and os.path.isdir(p) and not os.path.islink(p):
            cands.append((int(m.group(1)), int(m.group(2) or 1), p))
    problems = []
    for _, _, p in sorted(cands, reverse=True):
        try:
            return _verify(p), problems
        except UsageError as exc:
            problems.append(str(exc).replace("--resume: ", ""))
    return None, problems


def _is_checkpoint_dir(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in (MANIFEST_FILE, STATE_FILE, TENSORS_FILE))


def _in_run(ck: Checkpoint, run_dir: str, note: Optional[str] = None) -> Checkpoint:
    ck.run_dir, ck.note = run_dir, note
    return ck


def open_checkpoint(path: str) -> Checkpoint:
    """Find and verify the checkpoint of ``--resume PATH``: PATH is a run's output directory (its
    current checkpoint) or a checkpoint directory itself."""
    if not os.path.isdir(path):
        raise UsageError(f"--resume {path}: no such directory")
    if _is_checkpoint_dir(path):
        parent, base = os.path.split(os.path.normpath(os.path.abspath(path)))
        return _in_run(_verify(path), parent if is_checkpoint_name(base) else os.path.abspath(path))
    pointer = os.path.join(path, POINTER)
    note = None
    if os.path.islink(pointer):
        target = os.readlink(pointer)
        if not _DIR_RE.match(target):  # only the relative name hift-ext writes
            raise UsageError(f"--resume {path}: {pointer} points to {target!r}, not to a checkpoint "
                             "of this directory (hift-ext links checkpoint -> checkpoint-<step>)")
        if os.path.isdir(os.path.join(path, target)):
            return _in_run(_verify(os.path.join(path, target)), path)
        note = f"{pointer} pointed to the missing {target}"
    elif os.path.isdir(pointer):  # a run copied without its symlink (cp -L): a plain directory
        return _in_run(_verify(pointer), path)
    found, problems = _newest_complete(path)
    if found is None:
        if problems:
            raise UsageError(f"--resume {path}: no complete checkpoint there ({'; '.join(problems)})")
        raise UsageError(f"--resume {path}: no checkpoint there (expected {POINTER}/, written by `hift-ext "
                         "finetune --output DIR` after each epoch and every --save-steps)")
    return _in_run(found, path, (note or f"{pointer} was missing")
                   + f": resuming from the newest complete checkpoint, {os.path.basename(found.path)}")
