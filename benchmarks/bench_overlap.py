"""Step time of FusedHiFTAdamW with optimizer-state offload vs with all state resident.

Same model, same run, same batches: resident, then offload, then resident again (drift check), each
timed over whole HiFT cycles after a warm-up cycle (every group visited, so every transfer size
counts). A training step = forward + backward + optimizer step. With offload, the next group's state
is prefetched on the H2D stream while this group's forward/backward runs, and the updated state is
written back on the D2H stream, so the overhead should be small (target: <= 5% on an H100).

    python benchmarks/bench_overlap.py                    # CPU: tiny model; CUDA: 1b
    python benchmarks/bench_overlap.py --models 1b 3b --cycles 3

Writes benchmarks/results/overlap-<device>.json: rows {model, params, step_s_resident,
step_s_offload, overhead, ...}.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_memory import CONFIGS, build_model  # noqa: E402


def _time_cycles(model, opt, ids, cycles: int, device) -> list[float]:
    cuda = device.type == "cuda"
    k = opt.num_groups
    times = []
    for _ in range(cycles * k):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def run_one(name: str, device, *, batch: int, seq: int, cycles: int, num_slots: int, gc_on: bool,
            attn: str) -> dict:
    from hift_ext.optim import FusedHiFTAdamW as HiFT

    cfg = CONFIGS[name]
    model = build_model(cfg, device, attn=attn)
    if gc_on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    results = {}
    for tag, offload in (("resident", False), ("offload", True), ("resident2", False)):
        opt = HiFT(model, lr=1e-6, offload=offload, **({"offload_slots": num_slots} if offload else {}))
        _time_cycles(model, opt, ids, 1, device)  # warm-up: creates every group's state
        ts = _time_cycles(model, opt, ids, cycles, device)
        results[tag] = ts
        if offload:
            rep = opt.memory_report()
            results["offload_report"] = {k: rep.get(k) for k in ("pinned_bytes", "host_store_bytes")}
            eng = getattr(opt, "_offload", None)
            if eng is not None:
                results["engine_stats"] = eng.stats()
        del opt
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    res = statistics.mean(results["resident"] + results["resident2"])
    off = statistics.mean(results["offload"])
    drift = abs(statistics.mean(results["resident2"]) / statistics.mean(results["resident"]) - 1)
    row = dict(model=name, params=params, batch=batch, seq=seq, gradient_checkpointing=gc_on,
               num_slots=num_slots, steps_per_mode=len(results["offload"]),
               step_s_resident=res, step_s_offload=off, overhead=off / res - 1,
               resident_drift=drift, **results.get("offload_report", {}))
    if "engine_stats" in results:
        row["engine_stats"] = results["engine_stats"]
    del model
    gc.collect()
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--cycles", type=int, default=2)
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--gc", action="store_true", help="gradient checkpointing")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    seq = args.seq or (512 if cuda else 128)
    models = args.models or (["1b"] if cuda else ["tiny"])
    rows = []
    print(f"{'model':>6} {'params':>8} {'resident s':>11} {'offload s':>10} {'overhead':>9} {'drift':>6}")
    for name in models:
        r = run_one(name, device, batch=args.batch, seq=seq, cycles=args.cycles, num_slots=args.slots,
                    gc_on=args.gc, attn="sdpa" if cuda else "eager")
        rows.append(r)
        print(f"{name:>6} {r['params'] / 1e6:7.1f}M {r['step_s_resident']:11.4f} {r['step_s_offload']:10.4f} "
              f"{100 * r['overhead']:8.1f}% {100 * r['resident_drift']:5.1f}%")
    from bench_memory import write_results

    path = write_results(rows, device, args.out, name="overlap")
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
