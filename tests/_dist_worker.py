"""One rank of the data-parallel tests (tests/test_distributed.py; not a test module).

    python _dist_worker.py --case CASE --rank R --world N --init file://STORE --out DIR [--phase P]

Joins a gloo process group, runs CASE and saves what the test compares into DIR/CASE-rankR.pt.
test_distributed.py imports the same helpers (CONFIGS, build, train) to make the single-process
references, so both sides build the same models and batches.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import traceback

import torch

from _optim_testutil import MLP, batch, loss_fn
from hift_ext.hift_optim import FusedHiFTAdaGrad, FusedHiFTAdamW, FusedHiFTSGD

KINDS = {
    "adamw": (FusedHiFTAdamW, {"lr": 1e-2, "weight_decay": 0.05, "amsgrad": True}),
    "adagrad": (FusedHiFTAdaGrad, {"lr": 5e-2, "lr_decay": 0.01, "initial_accumulator_value": 0.1,
                                   "weight_decay": 0.01}),
    "sgd": (FusedHiFTSGD, {"lr": 5e-2, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
}
PER_RANK = 4  # examples per rank and step; the single-process reference takes PER_RANK * world
STEPS = 7
TINY_BUCKETS = 0.0003  # MB: about one parameter per bucket on the MLP


def _cfg(kind, strategy, k=1, shard=False, offload=False, cap=None, dtype="fp32"):
    name = f"{kind}-{strategy}-K{k}-{'shard' if shard else 'rep'}{'-off' if offload else ''}" \
           f"{'-tiny' if cap else ''}{'-' + dtype if dtype != 'fp32' else ''}"
    return name, dict(kind=kind, strategy=strategy, k=k, shard=shard, offload=offload, cap=cap, dtype=dtype)


CONFIGS = dict(
    [_cfg(kind, strategy, shard=shard, cap=TINY_BUCKETS if strategy == "up2down" else None)
     for kind in KINDS for strategy in ("down2up", "up2down", "random") for shard in (False, True)]
    + [_cfg("adamw", "random", k=3, shard=shard) for shard in (False, True)]
    + [_cfg("sgd", "down2up", k=3, shard=shard, cap=TINY_BUCKETS) for shard in (False, True)]
    + [_cfg("adamw", "random", k=3, shard=True, offload=True, cap=TINY_BUCKETS),
       _cfg("adagrad", "down2up", shard=True, offload=True),
       _cfg("sgd", "up2down", shard=True, offload=True)]
    + [_cfg("adamw", "down2up", shard=shard, offload=shard, dtype="bf16") for shard in (False, True)]
)


def build(spec, **extra):
    cls, kw = KINDS[spec["kind"]]
    model = MLP(seed=0)
    if spec["dtype"] == "bf16":
        model = model.to(torch.bfloat16)
    dp = {}
    if spec.get("shard"):
        dp["shard_state"] = True
    if spec.get("cap"):
        dp["bucket_cap_mb"] = spec["cap"]
    opt = cls(model.groups(), strategy=spec["strategy"], seed=3, steps_per_group=spec["k"],
              offload=spec.get("offload", False), **kw, **dp, **extra)
    return model, opt


def local_batch(t, rank, world, per_rank=PER_RANK, dtype=torch.float32):
    x, y = batch(t, n=PER_RANK * 2)  # the global batch of two ranks (the reference takes all of it)
    lo = rank * per_rank
    return x[lo: lo + per_rank].to(dtype), y[lo: lo + per_rank].to(dtype)


def train(model, opt, steps, rank=0, world=1, start=0):
    """``world`` ranks take PER_RANK examples each of the same global batch; world=1 takes all."""
    per_rank = PER_RANK * 2 // world
    dtype = next(model.parameters()).dtype
    seen = []
    for t in range(start, start + steps):
        x, y = local_batch(t, rank, world, per_rank, dtype)
        opt.zero_grad()
        seen.append(opt.active_group)
        loss_fn(model, x, y).backward()
        opt.step()
    return seen


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


# ---------------------------------------------------------------------------------------- cases
def case_equiv(rank, world, out, phase):
    res = {}
    for name, spec in CONFIGS.items():
        model, opt = build(spec)
        seen = train(model, opt, STEPS, rank, world)
        res[name] = {"params": params_of(model), "seen": torch.tensor(seen),
                     "grad_bytes": torch.tensor(opt.comm_stats().get("grad_all_reduce_bytes", 0)
                                                + opt.comm_stats().get("grad_reduce_scatter_bytes", 0))}
    return res


def case_accum(rank, world, out, phase):
    """Gradient accumulation over two micro-batches of PER_RANK // 2 examples per rank."""
    res = {}
    half = PER_RANK // 2

    def run(mode, shard=False):
        extra = {"accumulation_steps": 2} if mode == "accumulation_steps" else {}
        model = MLP(seed=0)
        opt = FusedHiFTAdamW(model.groups(), lr=1e-2, strategy="random", seed=3, shard_state=shard, **extra)
        for t in range(5):
            x, y = local_batch(t, rank, world)
            opt.zero_grad()
            parts = [(x[:half], y[:half]), (x[half:], y[half:])]
            for i, (xm, ym) in enumerate(parts):
                last = i == len(parts) - 1
                if mode == "no_sync" and not last or mode == "sync_in_step":
                    with opt.no_sync():
                        (loss_fn(model, xm, ym) / 2).backward()
                else:
                    (loss_fn(model, xm, ym) / 2).backward()
                if t == 0 and i == 0:
                    res[f"{mode}-{shard}-bytes_after_first"] = torch.tensor(opt.comm_stats().get("grad_all_reduce_bytes", 0)
                                                                   + opt.comm_stats().get("grad_reduce_scatter_bytes", 0))
            if mode == "explicit":
                opt.sync_grads()
            opt.step()
        res[f"{mode}-{shard}"] = params_of(model)

    for mode in ("no_sync", "accumulation_steps", "sync_in_step"):
        run(mode)
    run("accumulation_steps", shard=True)
    # sharded: a second backward after a synchronizing one (no no_sync) is refused, on every rank
    model = MLP(seed=0)
    opt = FusedHiFTAdamW(model.groups(), lr=1e-2, shard_state=True)
    x, y = local_batch(0, rank, world)
    loss_fn(model, x[:half], y[:half]).backward()
    try:
        loss_fn(model, x[half:], y[half:]).backward()
        res["twice"] = ""
    except RuntimeError as exc:
        res["twice"] = str(exc)
    opt.zero_grad()
    loss_fn(model, x, y).backward()  # and the optimizer still works afterwards
    opt.step()
    res["after_twice"] = params_of(model)
    return res


def case_amp(rank, world, out, phase):
    res = {}
    # a mismatched configuration is refused on every rank
    try:
        FusedHiFTAdamW(MLP(seed=0).groups(), strategy="random", seed=rank)
        res["mismatch"] = ""
    except ValueError as exc:
        res["mismatch"] = str(exc)
    for shard in (False, True):
        model = MLP(seed=0)
        opt = FusedHiFTAdamW(model.groups(), lr=1e-2, strategy="down2up", shard_state=shard)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        trace = []
        for t in range(4):
            x, y = local_batch(t, rank, world)
            opt.zero_grad()
            handle = None
            if t == 1 and rank == 1:
                w = model.layers[opt.active_group].weight
                lo, hi = opt.data_parallel.owned(w)
                idx = hi if lo == 0 and hi < w.numel() else 0  # an element another rank owns when sharded

                def poison(g, idx=idx):
                    g = g.clone()
                    g.view(-1)[idx] = float("inf")
                    return g

                handle = w.register_hook(poison)
            scaler.scale(loss_fn(model, x, y)).backward()
            if handle is not None:
                handle.remove()
            scaler.step(opt)
            scaler.update()
            trace.append([opt.hift_position, scaler.get_scale()])
        # a found_inf passed by hand on one rank only skips the step on every rank
        x, y = local_batch(9, rank, world)
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step(found_inf=torch.tensor(1.0 if rank == 1 else 0.0))
        trace.append([opt.hift_position, 0.0])
        res[f"trace-{shard}"] = torch.tensor(trace)
        res[f"params-{shard}"] = params_of(model)
    # ranks at different schedule positions (one group: the same collectives) are refused
    model = MLP(seed=0)
    opt = FusedHiFTAdamW([list(model.parameters())], lr=1e-2)
    if rank == 1:
        opt.schedule.advance()
    x, y = local_batch(0, rank, world)
    loss_fn(model, x, y).backward()
    try:
        opt.step()
        res["desync"] = ""
    except RuntimeError as exc:
        res["desync"] = f"{type(exc).__name__}: {exc}"
    return res


CKPT_SPEC = {"kind": "adamw", "strategy": "random", "k": 2, "dtype": "fp32", "cap": TINY_BUCKETS}
CKPT_AT = 3


def case_ckpt(rank, world, out, phase):
    res = {}
    variants = {"shard-off": dict(shard=True, offload=True), "shard": dict(shard=True), "rep": dict(shard=False)}
    if phase == "save":
        for name, v in variants.items():
            model, opt = build({**CKPT_SPEC, **v})
            train(model, opt, CKPT_AT, rank, world)
            sd = opt.state_dict()
            if rank == 0:
                torch.save({"model": model.state_dict(), "optimizer": sd}, os.path.join(out, f"ckpt-{name}.pt"))
            else:
                try:
                    opt.load_state_dict(sd)
                    res[f"partial-refused-{name}"] = ""
                except ValueError as exc:
                    res[f"partial-refused-{name}"] = str(exc)
            train(model, opt, CKPT_AT, rank, world, start=CKPT_AT)
            res[f"final-{name}"] = params_of(model)
    else:  # resume the sharded + offloaded checkpoint in every variant
        ck = torch.load(os.path.join(out, "ckpt-shard-off.pt"), map_location="cpu", weights_only=True)
        for name, v in variants.items():
            model, opt = build({**CKPT_SPEC, **v})
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            train(model, opt, CKPT_AT, rank, world, start=CKPT_AT)
            res[f"resumed-{name}"] = params_of(model)
    return res


def case_raise(rank, world, out, phase):
    model = MLP(seed=0)
    opt = FusedHiFTAdamW(model.groups(), lr=1e-2, shard_state=phase == "shard", comm_timeout=60)
    for t in range(5):
        x, y = local_batch(t, rank, world)
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        if t == 2 and rank == 1:
            raise RuntimeError("injected failure on rank 1 in the middle of step 2")
        opt.step()
    return {}


CASES = {"equiv": case_equiv, "accum": case_accum, "amp": case_amp, "ckpt": case_ckpt, "raise": case_raise}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", required=True)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--init", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--phase", default="")
    a = ap.parse_args()
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=a.init, rank=a.rank, world_size=a.world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        res = CASES[a.case](a.rank, a.world, a.out, a.phase)
        torch.save(res, os.path.join(a.out, f"{a.case}{'-' + a.phase if a.phase else ''}-rank{a.rank}.pt"))
    except BaseException as exc:  # noqa: BLE001 - the test reads the message
        traceback.print_exc()
        print(f"WORKER-ERROR {type(exc).__name__}: {exc}", flush=True)
        os._exit(1)  # no process-group teardown: the peers must notice on their own
    import gc

    gc.collect()  # optimizers (and their engines and process-group references) go first
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the results are saved; skip interpreter teardown (C++ threads of torch and gloo)


if __name__ == "__main__":
    sys.exit(main())
