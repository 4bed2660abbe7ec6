"""Helpers every benchmark uses: device description, environment stamp (torch version, git commit),
timing, a table printer, writing benchmarks/results/<name>-<device>.json and an optional PNG."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_average() -> list[str] | None:
    """The 1, 5 and 15 minute load averages as /proc/loadavg gives them, None where it is absent: a
    record of how busy the machine was (a loaded machine tilts timings, side-by-side ratios too)."""
    try:
        with open("/proc/loadavg") as fh:
            return fh.read().split()[:3]
    except OSError:
        return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    """Human-readable description of the device a benchmark ran on."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    n = torch.get_num_threads()
    return f"{cpu_name()} ({n} thread{'' if n == 1 else 's'})"


def device_tag(device) -> str:
    """Short tag used in result file names: 'cpu', the card ('h100', 'h200', ...) or 'cuda'."""
    device = str(device)
    if not device.startswith("cuda"):
        return "cpu"
    name = torch.cuda.get_device_name(torch.device(device)).lower()
    for key in ("h200", "h100", "a100", "a6000", "l40", "l4", "a10", "4090", "3090", "v100", "t4"):
        if key in name:
            return key
    return "cuda"


def git_commit() -> str:
    """HEAD (+ "-dirty"); HIFT_GIT_COMMIT names it where the tree has no .git (the GPU machine's copy)."""
    if os.environ.get("HIFT_GIT_COMMIT"):
        return os.environ["HIFT_GIT_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "unknown") + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device) -> dict:
    device = str(device)
    env = {
        "device": device_name(device),
        "device_type": device_tag(device),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "hostname_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import hift_ext

        env["hift_ext_cuda_kernels"] = hift_ext.has_cuda_kernels()
    except Exception:  # noqa: BLE001 - the stamp must never break a benchmark
        pass
    return env


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def time_fn(fn: Callable[[], object], device: str, *, warmup: int = 2, min_iters: int = 5,
            min_time: float = 0.3, max_iters: int = 200, stat: str = "median") -> float:
    """Seconds per call of fn() (stat: "median" or "min" over the timed calls). Runs at least
    min_iters calls and at least min_time seconds. On a shared machine "min" is the estimate least
    disturbed by other processes (a descheduled thread adds whole time slices to a call)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < max_iters and (len(times) < min_iters or time.perf_counter() - start_all < min_time):
        if device.startswith("cuda"):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return min(times) if stat == "min" else statistics.median(times)


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """columns: (key, header, format spec). Returns the table as text."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        line = []
        for key, _, fmt in columns:
            v = r.get(key)
            v = "" if v is None else v
            line.append(format(v, fmt) if isinstance(v, (int, float)) and fmt else str(v))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    out = []
    for j, c in enumerate(cells):
        out.append("  ".join(s.rjust(w) if j else s.ljust(w) for s, w in zip(c, widths)))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def print_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> None:
    print(format_table(rows, columns), flush=True)


def results_path(name: str, device: str, suffix: str = "json") -> str:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    return os.path.join(RESULTS_DIR, f"{name}-{device_tag(device)}.{suffix}")


def write_json(path: str, data, indent: int = 2) -> None:
    """Write a results file new and rename it into place: an interrupted run (or two runs finishing
    at once) never leaves a half-written JSON where the last good one was."""
    from hift_ext.atomic_io import atomic_file

    with atomic_file(path) as f:
        json.dump(data, f, indent=indent)
        f.write("\n")


def write_results(name: str, device: str, payload: dict) -> str:
    """Writes benchmarks/results/<name>-<device>.json with the environment stamp; returns the path."""
    path = results_path(name, device)
    write_json(path, {"benchmark": name, "environment": environment(device), **payload})
    return path


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401

        return True
    except ImportError:
        return False


def pyplot(who: str):
    """matplotlib.pyplot on the file-only Agg backend, or None (and a note) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        import sys

        print(f"{who}: matplotlib missing, no PNG", file=sys.stderr)
        return None
    return plt


# Settings that change what a training step costs; the others (lr, epochs, schedule, seed, ...) do
# not, so one side-by-side speed run serves every record that differs from it only in those.
STEP_COST_KEYS = ("full", "optimizer", "precision", "group_size", "strategy", "steps_per_group", "batch_size",
                  "max_length", "max_grad_norm", "max_train_examples")


def eval_step(ev: dict, run: dict) -> float:
    """The optimizer step evaluation ``ev`` of ``run`` followed (older records only name the epoch)."""
    return ev["step"] if ev.get("step") is not None else ev["epoch"] * run["steps"] / run["epochs"]


def interpolate(points: Sequence[tuple], t: float):
    """Linear interpolation of (time, value) points, sorted by time, at ``t``; clamped to the ends."""
    if t <= points[0][0]:
        return points[0][1]
    for (t0, v0), (t1, v1) in zip(points, points[1:]):
        if t <= t1:
            return v0 + (v1 - v0) * (t - t0) / max(t1 - t0, 1e-9)
    return points[-1][1]


def equal_time_verdict(ahead: bool, hift_time_over_full_time: float):
    """The equal-time target of bench_sst2 and bench_sft: HiFT at least as good as full FT after the same
    training time (``ahead``: its final figure against full FT's curve at HiFT's time). Where HiFT
    trained longer than full FT's whole run, full FT's curve ends first and its end is compared: HiFT
    behind it has missed (the extra time did not make up for it); ahead of it, None: no verdict, since
    full FT could have trained on in that time."""
    if hift_time_over_full_time > 1.0:
        return None if ahead else False
    return ahead


def align_rows(rows: Sequence[Sequence[str]]) -> str:
    """Rows of strings (the first a header) as left-aligned columns."""
    w = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(row)) for row in rows)
