"""Step time of FusedHiFTAdamW with optimizer-state offload vs with all state resident.

Same model (two copies with the same weights), same run, same batches: whole HiFT cycles
alternate between the resident and the offloading optimizer after a warm-up cycle each (every group
visited, so every transfer size counts). A training step = forward + backward + optimizer step. With
offload, the next group's state is prefetched on the H2D stream while this group's forward/backward
runs, and the updated state is written back on the D2H stream, so the overhead should be small
(target: <= 5% on an H100).

``--steps-per-group K ...`` measures each K (K consecutive steps per group; a cycle is k * K steps):
the active group's state stays on the device for its block, so a group's state crosses once per K
steps and the engine's traffic per step (bytes moved per step, from engine.stats() over the timed
cycles) falls by K.

    python benchmarks/bench_overlap.py                    # CPU: tiny model; CUDA: 1b
    python benchmarks/bench_overlap.py --models 1b 3b --cycles 3
    python benchmarks/bench_overlap.py --steps-per-group 1 4 16 --min-steps 224 --tag steps-per-group

Writes benchmarks/results/overlap[-TAG]-<device>.json: rows {model, params, steps_per_group,
cycle_s_resident, cycle_s_offload, overhead (whole cycles), overhead_pairs_median, step_s_*, traffic per step
(h2d/d2h bytes and copies), per-group step times, ...}.
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

from bench_memory import CONFIGS, DTYPES, build_model  # noqa: E402


def _time_cycles(model, opt, ids, cycles: int, device) -> tuple[list[float], list[float]]:
    """(seconds per step, seconds per cycle). A step is timed on the compute stream: what a training
    loop waits for (loss.item() synchronizes that stream only). A device-wide synchronize per step
    would also wait for the previous group's write-back on the D2H stream, which real training
    overlaps with the next forward (seen on an H200: it added ~7 ms, the 352 MB DMA, to every
    step). A cycle (every group once) is timed from device-idle to device-idle: everything counts."""
    cuda = device.type == "cuda"
    n = opt.schedule.cycle_length  # k groups x steps_per_group
    step_times, cycle_times = [], []
    for _ in range(cycles):
        if cuda:
            torch.cuda.synchronize()
        c0 = time.perf_counter()
        for _ in range(n):
            t0 = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.current_stream().synchronize()
            step_times.append(time.perf_counter() - t0)
        if cuda:
            torch.cuda.synchronize()
        cycle_times.append(time.perf_counter() - c0)
    return step_times, cycle_times


def _allocator_counters(device) -> dict:
    if device.type != "cuda":
        return {}
    st = torch.cuda.memory_stats(device)
    keys = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")
    return {k: int(st.get(k, 0)) for k in keys}


def _profile_cycle(model, opt, ids, device, top: int = 15) -> list[dict]:
    """The top host-side ops (self CPU time) of one profiled cycle: shows a slower launch path
    (cudaLaunchKernel) or allocator calls (cudaMalloc/cudaFree) in one mode against the other."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        _time_cycles(model, opt, ids, 1, device)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [{"name": e.key, "count": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
             "device_ms": getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) / 1e3}
            for e in rows]


def pinned_bandwidth(device, nbytes: int = 256 << 20, reps: int = 5) -> dict:
    """Pinned host <-> device copy bandwidth (GB/s, best of ``reps``), measured in this run: the
    floor of a step whose transfers outlast its compute is bytes moved / this bandwidth."""
    if device.type != "cuda":
        return {}
    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    out = {}
    for label, dst, src in (("h2d_gb_s", dev, host), ("d2h_gb_s", host, dev)):
        best = float("inf")
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src, non_blocking=True)
            b.record()
            b.synchronize()
            best = min(best, a.elapsed_time(b) / 1e3)
        out[label] = nbytes / best / 1e9
    del host, dev
    return out


def run_one(name: str, device, *, batch: int, seq: int, cycles: int, num_slots: int, gc_on: bool,
            attn: str, tuning: dict | None = None, profile: bool = False, steps_per_group: int = 1,
            min_steps: int = 0, dtype: str = "fp32", budget_bytes: int | None = None) -> dict:
    """Two copies of the model (same weights), one optimizer each; whole cycles alternate between
    them (resident, offload, resident, ...), so machine drift hits both the same way. At least
    ``cycles`` timed cycles per mode, more when needed for ``min_steps`` timed steps."""
    from hift_ext.hift_optim import FusedHiFTAdamW as HiFT

    cfg = CONFIGS[name]
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    runs = {}
    for tag, offload in (("resident", False), ("offload", True)):
        model = build_model(cfg, device, dtype=DTYPES[dtype], attn=attn)
        if gc_on:
            from hift_ext.train import enable_gradient_checkpointing

            enable_gradient_checkpointing(model)
        opt = HiFT(model, lr=1e-6, offload=offload, steps_per_group=steps_per_group,
                   **({"offload_slots": num_slots, "offload_device_bytes": budget_bytes} if offload else {}))
        if offload and tuning:
            opt.offload_engine.set_tuning(**tuning)
        _time_cycles(model, opt, ids, 1, device)  # warm-up: creates every group's state
        runs[tag] = (model, opt, [], [])
    params = sum(p.numel() for p in runs["resident"][0].parameters())
    cycle_len = runs["offload"][1].schedule.cycle_length
    cycles = max(cycles, -(-min_steps // cycle_len))
    eng = getattr(runs["offload"][1], "_offload", None)
    stats_before = eng.engine.stats() if eng is not None else None
    alloc_events: dict = {"resident": {}, "offload": {}}
    for _ in range(cycles):
        for tag in ("resident", "offload"):
            model, opt, times, cycle_times = runs[tag]
            before = _allocator_counters(device)
            st, ct = _time_cycles(model, opt, ids, 1, device)
            times.extend(st)
            cycle_times.extend(ct)
            after = _allocator_counters(device)
            for key in after:
                alloc_events[tag][key] = alloc_events[tag].get(key, 0) + after[key] - before[key]
    res_t, off_t = runs["resident"][2], runs["offload"][2]
    opt = runs["offload"][1]
    stats_after = eng.engine.stats() if eng is not None else None  # before memory_report's sync
    rep = opt.memory_report()
    half = len(res_t) // 2
    drift = abs(statistics.mean(res_t[half:]) / statistics.mean(res_t[:half]) - 1) if half else 0.0
    row = dict(model=name, params=params, dtype=dtype, batch=batch, seq=seq, gradient_checkpointing=gc_on,
               budget_bytes=budget_bytes, pieces_per_group=rep.get("pieces_per_group"),
               num_slots=num_slots, steps_per_group=steps_per_group, num_groups=opt.num_groups,
               cycle_steps=cycle_len, cycles_per_mode=cycles, steps_per_mode=len(off_t),
               step_s_resident=statistics.mean(res_t), step_s_offload=statistics.mean(off_t),
               step_s_resident_median=statistics.median(res_t),
               step_s_offload_median=statistics.median(off_t),
               resident_drift=drift, pinned_bytes=rep.get("pinned_bytes"),
               host_store_bytes=rep.get("host_store_bytes"))
    res_c, off_c = runs["resident"][3], runs["offload"][3]
    row["cycle_s_resident"] = statistics.mean(res_c)
    row["cycle_s_offload"] = statistics.mean(off_c)
    row["overhead_steps"] = row["step_s_offload"] / row["step_s_resident"] - 1
    # the headline: whole cycles, device idle to device idle (every copy finished)
    row["overhead"] = row["cycle_s_offload"] / row["cycle_s_resident"] - 1
    # the same from each pair of adjacent cycles (resident, then offload), median over the pairs:
    # robust to load that changes during the run (a busy machine, long cycles at large K)
    row["overhead_pairs_median"] = statistics.median(o / r for o, r in zip(off_c, res_c)) - 1
    # caching-allocator events during the timed cycles: cudaMalloc/cudaFree (which can wait for
    # the copies in flight) are a suspect for the offload overhead seen on an H200
    row["allocator_events"] = alloc_events
    if eng is not None:
        row["engine_stats"] = stats_after
        row["engine_tuning"] = eng.engine.tuning()
        # the engine's traffic during the timed cycles (whole cycles: every group fetched and
        # written back the same number of times), per training step
        delta = {key: stats_after[key] - stats_before[key] for key in
                 ("h2d_bytes", "d2h_bytes", "h2d_copies", "d2h_copies")}
        n = len(off_t)
        row["engine_traffic_timed"] = delta
        row["h2d_bytes_per_step"] = delta["h2d_bytes"] / n
        row["d2h_bytes_per_step"] = delta["d2h_bytes"] / n
        row["bytes_per_step"] = (delta["h2d_bytes"] + delta["d2h_bytes"]) / n
        row["h2d_copies_per_step"] = delta["h2d_copies"] / n
        row["d2h_copies_per_step"] = delta["d2h_copies"] / n
        row["state_bytes_all_groups"] = rep.get("host_store_bytes")
        bw = pinned_bandwidth(device)
        if bw:
            # when the transfers outlast the compute, a step cannot beat bytes moved / bandwidth (H2D
            # and D2H run at the same time)
            row.update(bw)
            row["transfer_floor_s_per_step"] = max(row["h2d_bytes_per_step"] / (bw["h2d_gb_s"] * 1e9),
                                                   row["d2h_bytes_per_step"] / (bw["d2h_gb_s"] * 1e9))
            row["floor_s_per_step"] = max(row["step_s_resident"], row["transfer_floor_s_per_step"])
            row["offload_over_floor"] = row["step_s_offload"] / row["floor_s_per_step"] - 1
    # per HiFT group (bottom to top, down2up: step j of a cycle updates group j // K): where the
    # offload overhead sits
    k, K = opt.num_groups, steps_per_group
    by_group = lambda ts: [statistics.mean([t for j, t in enumerate(ts) if (j % cycle_len) // K == g])  # noqa: E731
                           for g in range(k)]
    row["step_s_by_group_resident"] = by_group(res_t)
    row["step_s_by_group_offload"] = by_group(off_t)
    if profile:
        row["profile_top_ops"] = {tag: _profile_cycle(runs[tag][0], runs[tag][1], ids, device)
                                  for tag in ("resident", "offload")}
    del runs, opt, eng
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--cycles", type=int, default=2, help="timed cycles per mode (at least)")
    ap.add_argument("--steps-per-group", type=int, nargs="+", default=[1], metavar="K",
                    help="steps per group to measure, e.g. 1 4 16 (one row per model and K) [default: 1]")
    ap.add_argument("--min-steps", type=int, default=0,
                    help="at least this many timed steps per mode (more cycles for small K) [default: 0]")
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                    help="weights dtype (bf16/fp16: fp32 master weights in the offloaded state)")
    ap.add_argument("--budget-gib", type=float, default=None,
                    help="offload_device_bytes in GiB (groups larger than half of it stream in pieces)")
    ap.add_argument("--gc", action="store_true", help="gradient checkpointing")
    ap.add_argument("--pipeline-mb", type=float, default=None,
                    help="offload staging piece size in MiB (0: one copy per group; default: the engine's)")
    ap.add_argument("--copy-threads", type=int, default=None, help="threads per host memcpy (default: the engine's)")
    ap.add_argument("--tag", default="", help="suffix of the result name (A/B runs)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one cycle per mode (top host-side ops into the JSON)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    if any(k < 1 for k in args.steps_per_group):
        ap.error(f"--steps-per-group: every K must be >= 1, got {args.steps_per_group}")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    seq = args.seq or (512 if cuda else 128)
    models = args.models or (["1b"] if cuda else ["tiny"])
    rows = []
    print(f"{'model':>6} {'params':>8} {'K':>3} {'cycle res s':>11} {'cycle off s':>11} {'overhead':>9} "
          f"{'pairs ovh':>9} {'step res s':>10} {'step off s':>10} {'drift':>6} {'MiB/step':>9} {'copies/step':>11}")
    for name in models:
        tuning = {}
        if args.pipeline_mb is not None:
            tuning["pipeline_bytes"] = int(args.pipeline_mb * (1 << 20))
        if args.copy_threads is not None:
            tuning["copy_threads"] = args.copy_threads
        for K in args.steps_per_group:
            r = run_one(name, device, batch=args.batch, seq=seq, cycles=args.cycles, num_slots=args.slots,
                        gc_on=args.gc, attn="sdpa" if cuda else "eager", tuning=tuning, profile=args.profile,
                        steps_per_group=K, min_steps=args.min_steps, dtype=args.dtype,
                        budget_bytes=None if args.budget_gib is None else int(args.budget_gib * (1 << 30)))
            rows.append(r)
            print(f"{name:>6} {r['params'] / 1e6:7.1f}M {K:>3} {r['cycle_s_resident']:11.4f} "
                  f"{r['cycle_s_offload']:11.4f} {100 * r['overhead']:8.1f}% {100 * r['overhead_pairs_median']:8.1f}% "
                  f"{r['step_s_resident']:10.4f} {r['step_s_offload']:10.4f} {100 * r['resident_drift']:5.1f}% "
                  f"{r.get('bytes_per_step', 0) / 2**20:9.2f} "
                  f"{r.get('h2d_copies_per_step', 0) + r.get('d2h_copies_per_step', 0):11.3f}", flush=True)
            if "floor_s_per_step" in r:
                print(f"{'':>6} pinned H2D {r['h2d_gb_s']:.1f} / D2H {r['d2h_gb_s']:.1f} GB/s: transfer floor "
                      f"{r['transfer_floor_s_per_step']:.4f} s/step, floor max(compute, transfer) "
                      f"{r['floor_s_per_step']:.4f} s, offload {100 * r['offload_over_floor']:+.1f}% over it", flush=True)
    from bench_memory import write_results

    path = write_results(rows, device, args.out, name="overlap" + (f"-{args.tag}" if args.tag else ""))
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
