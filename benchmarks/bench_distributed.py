"""Data-parallel HiFT vs DDP full fine-tuning: bytes communicated per optimizer step, step time and
host optimizer-state bytes per rank.

Same model (tiny LLaMA by default), same global batch (``--world`` ranks x ``--batch`` sequences of
``--seq`` tokens), on ``--world`` processes started here (gloo on the CPU, NCCL on GPUs):

* ``ddp``: torch DistributedDataParallel + torch.optim.AdamW (fused) over every parameter (full FT). Its
  gradient bytes are counted by a DDP comm hook around the all-reduce of each bucket.
* ``hift``: FusedHiFTAdamW (group_size 1, optimizer state offloaded to the host store), replicated
  state: the active group's gradients are all-reduced.
* ``hift-sharded``: the same with ``shard_state=True``: gradients reduce-scattered, the updated
  parameters all-gathered, each rank's host store holding 1/N of the state.

Bytes are exact: hift_ext counts what it hands to each collective (``optimizer.comm_stats()``; the
buffer of an all-reduce, the input of a reduce-scatter, the output of an all-gather) and the DDP comm
hook counts its buckets the same way. HiFT is measured over whole cycles (every group once), DDP over
the same number of steps. Targets (checked, written into the JSON):

* HiFT gradient bytes per step <= DDP's / k (replicated: exactly a cycle's average; sharded: plus the
  padding of each bucket to N equal chunks, reported), the sharded run adding the parameter
  all-gather (the same bytes again);
* sharded host optimizer-state bytes per rank <= the replicated run's / N (plus the per-tensor
  256-byte alignment of the store, reported), the staging ring (slots, pinned on CUDA) on top.

    python benchmarks/bench_distributed.py                 # 2 gloo ranks, tiny LLaMA
    python benchmarks/bench_distributed.py --world 4 --model small --cycles 3

Writes benchmarks/results/distributed-<device>.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

MODES = ("ddp", "hift", "hift-sharded")


def _steps(model, opt, ids, n, ddp_model=None) -> list:
    times = []
    net = ddp_model or model
    for _ in range(n):
        t0 = time.perf_counter()
        loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ids.is_cuda:
            torch.cuda.current_stream().synchronize()
        times.append(time.perf_counter() - t0)
    return times


def run_rank(args) -> dict:
    import torch.distributed as dist

    from bench_memory import CONFIGS, build_model
    from hift_ext.hift_optim import FusedHiFTAdamW

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(args.rank)
    device = torch.device("cuda", args.rank) if cuda else torch.device("cpu")
    torch.set_num_threads(args.threads)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=args.init, rank=args.rank,
                            world_size=args.world, timeout=datetime.timedelta(seconds=600))
    g = torch.Generator().manual_seed(1000 + args.rank)
    cfg = CONFIGS[args.model]
    ids = torch.randint(3, cfg["vocab_size"], (args.batch, args.seq), generator=g).to(device)
    out = {}
    for mode in MODES:
        model = build_model(cfg, device, attn="sdpa" if cuda else "eager", seed=0)
        params = sum(p.numel() for p in model.parameters())
        row = {"mode": mode, "params": params}
        if mode == "ddp":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
            from torch.nn.parallel import DistributedDataParallel as DDP

            counter = {"bytes": 0, "calls": 0}

            def counting_hook(state, bucket):
                buf = bucket.buffer()
                counter["bytes"] += buf.numel() * buf.element_size()
                counter["calls"] += 1
                return default_hooks.allreduce_hook(None, bucket)

            ddp = DDP(model, device_ids=[args.rank] if cuda else None)
            ddp.register_comm_hook(None, counting_hook)
            from hift_ext.train import torch_full_optimizer

            opt = torch_full_optimizer("adamw", model.parameters(), lr=1e-4)  # fused, like every baseline
            n = args.ddp_steps
            _steps(model, opt, ids, 1, ddp)  # warm-up (state created, DDP buckets rebuilt)
            counter["bytes"] = counter["calls"] = 0
            times = _steps(model, opt, ids, n, ddp)
            row.update(steps=n, grad_bytes_per_step=counter["bytes"] / n, grad_calls_per_step=counter["calls"] / n,
                       param_gather_bytes_per_step=0.0, control_bytes_per_step=0.0,
                       host_state_bytes=sum(v.numel() * v.element_size() for st in opt.state.values()
                                            for v in st.values() if torch.is_tensor(v) and v.dim() > 0),
                       host_state_kind="torch.optim.AdamW (fused) state (resident with the model)", pinned_bytes=0,
                       ring_bytes=0,
                       num_groups=1)
            del ddp
        else:
            opt = FusedHiFTAdamW(model, lr=1e-4, group_size=1, offload=True, shard_state=mode == "hift-sharded")
            k = opt.num_groups
            _steps(model, opt, ids, k, None)  # warm-up cycle: every group's state exists
            opt.reset_comm_stats()
            n = k * args.cycles
            times = _steps(model, opt, ids, n, None)
            st = opt.comm_stats()
            rep = opt.memory_report()
            grad = st.get("grad_all_reduce_bytes", 0) + st.get("grad_reduce_scatter_bytes", 0)
            dp = opt.data_parallel
            numel_bytes = sum(b.numel * torch.empty((), dtype=b.dtype).element_size()
                              for bs in dp.buckets for b in bs)
            padded_bytes = sum(b.nbytes for bs in dp.buckets for b in bs)
            tensors = sum(1 for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
            row.update(steps=n, num_groups=k, grad_bytes_per_step=grad / n,
                       grad_calls_per_step=(st.get("grad_all_reduce_calls", 0) + st.get("grad_reduce_scatter_calls", 0)) / n,
                       param_gather_bytes_per_step=st.get("param_all_gather_bytes", 0) / n,
                       control_bytes_per_step=st.get("control_bytes", 0) / n,
                       padding_bytes_per_step=(padded_bytes - numel_bytes) / k,
                       host_state_bytes=rep["host_store_bytes"], host_state_kind="offload host store",
                       pinned_bytes=rep["pinned_bytes"], ring_bytes=rep.get("slot_bytes", 0),
                       device_arena_bytes=rep.get("device_bytes", 0),
                       store_alignment_slack_bytes=256 * tensors)
        row.update(step_s_median=statistics.median(times), step_s_min=min(times))
        row["total_bytes_per_step"] = (row["grad_bytes_per_step"] + row["param_gather_bytes_per_step"]
                                       + row["control_bytes_per_step"])
        out[mode] = row
        del model, opt
    dist.barrier()
    dist.destroy_process_group()
    return out


def check_targets(rows: dict, world: int) -> dict:
    ddp, rep, sh = rows["ddp"], rows["hift"], rows["hift-sharded"]
    k = rep["num_groups"]
    ddp_share = ddp["grad_bytes_per_step"] / k
    return {
        "k": k,
        "ddp_grad_bytes_per_step_over_k": ddp_share,
        "hift_grad_over_ddp": rep["grad_bytes_per_step"] / ddp["grad_bytes_per_step"],
        "hift_sharded_grad_over_ddp": sh["grad_bytes_per_step"] / ddp["grad_bytes_per_step"],
        "hift_grad_at_most_ddp_over_k": rep["grad_bytes_per_step"] <= ddp_share * (1 + 1e-12),
        "hift_sharded_grad_minus_padding_at_most_ddp_over_k":
            sh["grad_bytes_per_step"] - sh["padding_bytes_per_step"] <= ddp_share * (1 + 1e-12),
        "hift_sharded_param_gather_equals_its_grad_bytes":
            sh["param_gather_bytes_per_step"] == sh["grad_bytes_per_step"],
        "sharded_host_state_over_replicated": sh["host_state_bytes"] / rep["host_state_bytes"],
        "sharded_host_state_at_most_replicated_over_n_plus_alignment":
            sh["host_state_bytes"] <= rep["host_state_bytes"] / world + sh["store_alignment_slack_bytes"],
        "sharded_ring_bytes": sh["ring_bytes"],
        "replicated_ring_bytes": rep["ring_bytes"],
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cpu: gloo ranks; cuda: NCCL, one GPU per rank [default: cpu]")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--model", default="tiny", help="a bench_memory.py config [default: tiny]")
    ap.add_argument("--batch", type=int, default=2, help="sequences per rank")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--cycles", type=int, default=2, help="timed HiFT cycles")
    ap.add_argument("--ddp-steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--init", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rank is not None:  # one rank, started below
        rows = run_rank(args)
        if args.rank == 0:
            with open(args.part, "w") as fh:
                json.dump(rows, fh)
        return rows

    with tempfile.TemporaryDirectory() as tmp:
        part = os.path.join(tmp, "rank0.json")
        init = f"file://{os.path.join(tmp, 'store')}"
        base = [sys.executable, os.path.abspath(__file__), "--device", args.device, "--world", str(args.world),
                "--model", args.model, "--batch", str(args.batch), "--seq", str(args.seq), "--cycles",
                str(args.cycles), "--ddp-steps", str(args.ddp_steps), "--threads", str(args.threads),
                "--init", init, "--part", part]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        procs = [subprocess.Popen(base + ["--rank", str(r)], env=env) for r in range(args.world)]
        deadline = time.monotonic() + args.timeout
        try:
            codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise SystemExit(f"bench_distributed: the ranks did not finish within {args.timeout:.0f} s")
        if any(codes):
            raise SystemExit(f"bench_distributed: a rank failed (exit codes {codes})")
        with open(part) as fh:
            rows = json.load(fh)

    from _common import print_table, write_results

    targets = check_targets(rows, args.world)
    table = [{**r, "grad_MiB": r["grad_bytes_per_step"] / 2 ** 20,
              "gather_MiB": r["param_gather_bytes_per_step"] / 2 ** 20,
              "ctrl_B": r["control_bytes_per_step"], "state_MiB": r["host_state_bytes"] / 2 ** 20,
              "ring_MiB": r["ring_bytes"] / 2 ** 20} for r in rows.values()]
    print_table(table, [("mode", "mode", ""), ("num_groups", "k", "d"), ("grad_MiB", "grad MiB/step", ".3f"),
                        ("gather_MiB", "all-gather MiB/step", ".3f"), ("ctrl_B", "control B/step", ".0f"),
                        ("step_s_median", "step s (median)", ".4f"), ("state_MiB", "host state MiB/rank", ".3f"),
                        ("ring_MiB", "ring MiB", ".3f")])
    print(json.dumps(targets, indent=1))
    path = write_results("distributed", args.device, {
        "config": {"world": args.world, "model": args.model, "batch_per_rank": args.batch, "seq": args.seq,
                   "global_batch": args.batch * args.world, "cycles": args.cycles, "ddp_steps": args.ddp_steps,
                   "threads_per_rank": args.threads,
                   "backend": "nccl" if args.device == "cuda" else "gloo"},
        "rows": list(rows.values()), "targets": targets})
    print(f"wrote {path}")
    ok = all(v for key, v in targets.items() if key.startswith(("hift_grad_at", "hift_sharded_grad_minus",
                                                                "hift_sharded_param", "sharded_host_state_at")))
    if not ok:
        raise SystemExit("bench_distributed: a target was missed (see targets above)")
    return rows


if __name__ == "__main__":
    main()
