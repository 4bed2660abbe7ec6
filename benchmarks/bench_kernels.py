"""Kernel benchmark: hift_ext's fused AdamW / AdaGrad / SGD vs torch's fused, foreach and for-loop.

For each optimizer and device, parameter counts from 1M to 64M (CPU) or 256M (CUDA), as ONE big
tensor and as MANY 4K-element tensors (incl. the 2,000 x 4K case), all in the same run. Reports time
per step, GB/s (bytes each update must move: AdamW fp32 reads p, g, m, v and writes p, m, v = 28 B
per parameter; AdaGrad and momentum SGD 20 B) and the fraction of a bandwidth ceiling measured in
the same run: CPU, an in-place streaming a.add_(b) (no write-allocate traffic, 12 B/elem); CUDA,
a device-to-device copy (8 B/elem). On CUDA, AdamW is also timed as a step captured in a CUDA
graph and replayed (capturable=True, lr a device tensor), ours against torch's fused. Prints a
table, writes benchmarks/results/kernels-<device>.json and a PNG chart.

    python benchmarks/bench_kernels.py                  # CPU (and CUDA when a GPU is present)
    python benchmarks/bench_kernels.py --quick          # short run
    python benchmarks/bench_kernels.py --device cuda --optimizers adamw
"""
from __future__ import annotations

import argparse
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

from hift_ext import FusedAdaGrad, FusedAdamW, FusedSGD  # noqa: E402

M = 1 << 20
SMALL = 4096
BYTES_PER_PARAM = {"adamw": 28, "adagrad": 20, "sgd": 20}
HP = {
    "adamw": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01),
    "adagrad": dict(lr=1e-2, lr_decay=0.0, weight_decay=0.0, eps=1e-10),
    "sgd": dict(lr=1e-2, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0),
}
TORCH_CLS = {"adamw": torch.optim.AdamW, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}
HIFT_CLS = {"adamw": FusedAdamW, "adagrad": FusedAdaGrad, "sgd": FusedSGD}
# torch.optim.Adagrad(fused=True) has no CUDA kernel.
# Every timing (ceiling included) is the fastest of >= 5 calls: the least contention-sensitive
# statistic on a shared machine (--stat median to change it).
STAT = "min"
FORLOOP_MAX_TENSORS_CUDA = 4096
TORCH_IMPLS = {"fused": dict(fused=True), "foreach": dict(foreach=True), "forloop": dict(foreach=False)}


def cases(device: str, quick: bool) -> list[tuple[str, int, int]]:
    """(layout, number of tensors, elements per tensor)."""
    if device == "cuda":
        big = [16 * M, 64 * M] if quick else [1 * M, 4 * M, 16 * M, 64 * M, 256 * M]
    else:
        big = [16 * M] if quick else [1 * M, 4 * M, 16 * M, 64 * M]
    # one 4K tensor: the cost of a step call itself (python, dispatch, launch), which decides small groups
    out = [("one", 1, SMALL)] + [("one", 1, n) for n in big]
    out.append(("many", 2000, SMALL))
    if not quick:
        # 64M as 16K tensors makes torch's for-loop step take seconds on a small CPU: stop at 16M.
        # On CUDA stop at 64M (16K tensors): 256M as 64K tensors adds minutes of launch-bound
        # foreach/for-loop steps and tells nothing the 16K case does not.
        cap = 64 * M if device == "cuda" else 16 * M
        out += [("many", n // SMALL, SMALL) for n in big if 16 * M <= n <= cap]
    return out


def bandwidth_ceiling(device: str, n: int) -> tuple[str, float]:
    """GB/s of the reference streaming op on n fp32 elements."""
    a = torch.randn(n, device=device)
    b = torch.randn(n, device=device)
    if device == "cuda":
        t = C.time_fn(lambda: a.copy_(b), device, min_time=0.5, stat=STAT)
        res = ("device-to-device copy", 8 * n / t / 1e9)
    else:
        t = C.time_fn(lambda: a.add_(b), device, min_time=1.0, stat=STAT)
        res = ("in-place a.add_(b)", 12 * n / t / 1e9)
    del a, b
    return res


def make_lists(n_tensors, numel, device, k):
    return [[torch.randn(numel, device=device) for _ in range(n_tensors)] for _ in range(k)]


def _params_with_grads(params, grads):
    """Parameters sharing the storage of ``params``, with ``grads`` as their gradients."""
    ps = [torch.nn.Parameter(p, requires_grad=True) for p in params]
    for p, g in zip(ps, grads):
        p.grad = g
    return ps


def hift_step_fn(opt, params, grads, device):
    """hift_ext's drop-in optimizer step on the group, measured exactly like torch's .step()
    (kernel + step-counter bump + list building), so the ratio is what a user gets."""
    ps = _params_with_grads(params, grads)
    o = HIFT_CLS[opt](ps, **HP[opt])
    o.step()  # creates the state outside the timed region
    return o.step


def torch_step_fn(opt, impl, params, grads):
    ps = _params_with_grads(params, grads)
    try:
        o = TORCH_CLS[opt](ps, **HP[opt], **TORCH_IMPLS[impl])
        o.step()  # creates the state outside the timed region
    except (RuntimeError, ValueError, TypeError) as exc:  # e.g. no fused kernel for this device
        return None, str(exc).splitlines()[0][:80]
    return o.step, None


def graph_step_fn(opt, impl, params, grads):
    """AdamW with capturable=True and a device lr, one step captured in a CUDA graph: the replay
    is what a user who captures the step pays (no host work per step at all)."""
    ps = _params_with_grads(params, grads)
    hp = dict(HP[opt], lr=torch.tensor(HP[opt]["lr"], device="cuda"))
    try:
        if impl == "hift_ext":
            o = HIFT_CLS[opt](ps, **hp, capturable=True)
        else:
            o = TORCH_CLS[opt](ps, **hp, fused=True, capturable=True)
        o.step()  # warm-up: the state exists before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            o.step()
    except (RuntimeError, ValueError, TypeError) as exc:
        return None, str(exc).splitlines()[0][:80]
    # the replays write the optimizer's state tensors: keep the optimizer (and so them) alive
    return (lambda g=graph, keep=o: g.replay()), None


def run(device: str, optimizers: list[str], quick: bool, max_params: int | None = None) -> dict:
    torch.manual_seed(0)
    rows = []
    ceiling_n = 64 * M if device == "cuda" else 32 * M
    ceiling_name, ceiling = bandwidth_ceiling(device, ceiling_n)
    print(f"\n[{C.device_name(device)}] bandwidth ceiling ({ceiling_name}, {ceiling_n // M}M fp32): "
          f"{ceiling:.1f} GB/s", flush=True)
    for layout, n_tensors, numel in cases(device, quick):
        total = n_tensors * numel
        if max_params is not None and total > max_params:
            continue
        params, grads = make_lists(n_tensors, numel, device, 2)
        for opt in optimizers:
            impls = [("hift_ext", hift_step_fn(opt, params, grads, device), None)]
            for impl in TORCH_IMPLS:
                if impl == "forloop" and device == "cuda" and n_tensors > FORLOOP_MAX_TENSORS_CUDA:
                    impls.append((f"torch {impl}", None, f"{n_tensors} tensors: ~10 launches each, seconds per step"))
                    continue
                fn, err = torch_step_fn(opt, impl, params, grads)
                impls.append((f"torch {impl}", fn, err))
            if device == "cuda" and opt == "adamw":  # CUDA graph capture (capturable=True), issue 17
                for impl in ("hift_ext", "torch fused"):
                    fn, err = graph_step_fn(opt, impl, params, grads)
                    impls.append((f"{impl} graph", fn, err))
            results = {}
            for name, fn, err in impls:
                if fn is None:
                    results[name] = None
                    print(f"  skip {opt} {name}: {err}", flush=True)
                    continue
                if quick:
                    iters = dict(min_iters=3, min_time=0.2)
                else:  # GPU event timings are steady: shorter runs keep the lent GPU's minutes
                    iters = dict(min_iters=8, min_time=0.3 if device == "cuda" else 0.8)
                t = C.time_fn(fn, device, stat=STAT, **iters)
                results[name] = t
                gbs = BYTES_PER_PARAM[opt] * total / t / 1e9
                rows.append({
                    "optimizer": opt, "layout": layout, "tensors": n_tensors, "numel_per_tensor": numel,
                    "params": total, "case": f"{layout} {n_tensors}x{_h(numel)}", "impl": name,
                    "time_ms": t * 1e3, "gb_s": gbs, "frac_ceiling": gbs / ceiling,
                })
                print(f"  {opt:8s} {rows[-1]['case']:>14s} {name:14s} {t * 1e3:9.3f} ms {gbs:7.1f} GB/s "
                      f"{gbs / ceiling:6.1%}", flush=True)
                gc.collect()
            hift = results.get("hift_ext")
            for r in rows:
                if r["optimizer"] == opt and r["case"] == rows[-1]["case"] and r["impl"] == "hift_ext":
                    for ref in ("fused", "foreach", "forloop"):
                        t_ref = results.get(f"torch {ref}")
                        r[f"speedup_vs_{ref}"] = t_ref / hift if (t_ref and hift) else None
                    t_g, t_tg = results.get("hift_ext graph"), results.get("torch fused graph")
                    if t_g and t_tg:  # both steps replayed from a CUDA graph
                        r["graph_speedup_vs_fused_graph"] = t_tg / t_g
        del params, grads
        gc.collect()
    return {"ceiling": {"op": ceiling_name, "numel": ceiling_n, "gb_s": ceiling}, "stat": STAT,
            "bytes_per_param": BYTES_PER_PARAM, "quick": quick, "rows": rows}


def _h(n: int) -> str:
    return f"{n // M}M" if n % M == 0 else (f"{n // 1024}K" if n % 1024 == 0 else str(n))


def plot(result: dict, device: str, name: str = "kernels") -> str | None:
    if not C.have_matplotlib():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    opts = list(dict.fromkeys(r["optimizer"] for r in rows))
    fig, axes = plt.subplots(len(opts), 1, figsize=(11, 3.6 * len(opts)), squeeze=False)
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    for ax, opt in zip(axes[:, 0], opts):
        rs = [r for r in rows if r["optimizer"] == opt]
        cases_ = list(dict.fromkeys(r["case"] for r in rs))
        width = 0.8 / len(impls)
        for k, impl in enumerate(impls):
            ys = [next((r["gb_s"] for r in rs if r["case"] == c and r["impl"] == impl), 0.0) for c in cases_]
            ax.bar([i + k * width for i in range(len(cases_))], ys, width, label=impl)
        ax.axhline(result["ceiling"]["gb_s"], color="k", ls="--", lw=1, label=f"ceiling: {result['ceiling']['op']}")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases_))], cases_, fontsize=8)
        ax.set_ylabel("GB/s")
        ax.set_title(f"{opt} fp32 ({result['bytes_per_param'][opt]} B/param)")
        ax.legend(fontsize=7, ncol=3)
    fig.suptitle(f"hift_ext kernels on {C.device_name(device)}", fontsize=10)
    fig.tight_layout()
    path = C.results_path(name, device, "png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                    help="all = cpu, plus cuda when a GPU is present (default)")
    ap.add_argument("--optimizers", default="adamw,adagrad,sgd")
    ap.add_argument("--quick", action="store_true", help="few sizes, short timing: a smoke run")
    ap.add_argument("--max-params", type=int, default=None,
                    help="only the cases with at most this many parameters (e.g. 1048576: the launch-bound ones)")
    ap.add_argument("--name", default="kernels", help="results file stem: benchmarks/results/<name>-<device>.*")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--stat", choices=["min", "median"], default="min",
                    help="statistic over the timed calls (default min: robust on a shared machine)")
    args = ap.parse_args(argv)
    global STAT
    STAT = args.stat
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.device == "cuda":
            print("no CUDA device available", file=sys.stderr)
            return 2
        devices.remove("cuda")
    optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    for device in devices:
        res = run(device, optimizers, args.quick, args.max_params)
        print()
        C.print_table(res["rows"], [
            ("optimizer", "opt", ""), ("case", "case", ""), ("impl", "impl", ""), ("time_ms", "ms", ".3f"),
            ("gb_s", "GB/s", ".1f"), ("frac_ceiling", "of ceiling", ".1%"),
            ("speedup_vs_fused", "x fused", ".2f"), ("speedup_vs_foreach", "x foreach", ".2f"),
            ("speedup_vs_forloop", "x forloop", ".2f"),
            ("graph_speedup_vs_fused_graph", "graph: x fused", ".2f"),
        ])
        print(f"ceiling: {res['ceiling']['op']} {res['ceiling']['gb_s']:.1f} GB/s")
        path = C.write_results(args.name, device, res)
        print(f"wrote {path}")
        if not args.no_plot:
            png = plot(res, device, args.name)
            if png:
                print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
