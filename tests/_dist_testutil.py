"""Launching a few ranks (separate processes, gloo on the CPU) for the data-parallel tests.

Every launch has a deadline: on a timeout every rank is killed and the test fails with what each
printed. Ranks rendezvous through a file store in the test's temporary directory (no port to race
for). Results come back as torch.save'd tensors read with ``weights_only=True``.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import List, Sequence, Tuple

import torch

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
WORKER = os.path.join(TESTS, "_dist_worker.py")


def rank_env(extra=None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO, TESTS] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("OMP_NUM_THREADS", "1")
    env["HF_HUB_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.update(extra or {})
    return env


def run_processes(cmds: Sequence[Sequence[str]], timeout: float, env=None, cwd=None) -> List[Tuple[int, str]]:
    """Start every command at once; (return code, output) of each. Kills all of them at the deadline."""
    procs = [subprocess.Popen(list(c), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env or rank_env(), cwd=cwd or REPO) for c in cmds]
    deadline = time.monotonic() + timeout
    outs: List[Tuple[int, str]] = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outs.append((p.returncode, out))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        texts = []
        for i, p in enumerate(procs):
            try:
                out, _ = p.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                out = "(no output)"
            texts.append(f"--- process {i} ---\n{out[-4000:] if out else ''}")
        raise AssertionError(f"the processes did not finish within {timeout:.0f} s:\n" + "\n".join(texts)) from None
    return outs


def run_ranks(case: str, out_dir, world: int = 2, timeout: float = 240, args: Sequence[str] = (),
              check: bool = True) -> List[Tuple[int, str]]:
    """Run ``_dist_worker.py --case CASE`` on ``world`` ranks; with ``check`` every rank must exit 0."""
    out_dir = str(out_dir)
    store = os.path.join(out_dir, f"store-{case}-{time.monotonic_ns()}")
    cmds = [[sys.executable, WORKER, "--case", case, "--rank", str(r), "--world", str(world),
             "--init", f"file://{store}", "--out", out_dir, *args] for r in range(world)]
    outs = run_processes(cmds, timeout)
    if check:
        bad = [(r, rc, out) for r, (rc, out) in enumerate(outs) if rc != 0]
        if bad:
            raise AssertionError("\n".join(f"--- rank {r} exited {rc} ---\n{out[-6000:]}" for r, rc, out in bad))
    return outs


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)
