"""Training-step time and memory: full fine-tuning vs HiFT on a LLaMA-shaped model.

    python benchmarks/bench_step.py                      # CPU defaults (a couple of minutes)
    python benchmarks/bench_step.py --device cuda --hidden 2048 --layers 16 --seq 512

Side by side in one run, on one model built from a transformers LlamaConfig with random weights:

* ``full``       every step: forward, full backward, torch.optim.AdamW (torch's default impl)
* ``full_fused`` the same with hift_ext.FusedAdamW (separates the kernel's effect from HiFT's)
* ``hift``       FusedHiFTAdamW(model, group_size=1): each step trains one group, backward skips
                 the weight gradients of inactive groups and stops below the lowest active layer

Times are averaged over whole HiFT cycles (k steps, every group once) after a warm-up; the modes are
interleaved block by block so that drift of a shared machine hits all of them alike. Memory:
CPU -- bytes of parameters + gradients + optimizer state measured from the tensors (peak over the
measured steps), plus the bytes autograd saved for backward; CUDA -- torch.cuda.max_memory_allocated.
Without offload, HiFT's optimizer state of all groups stays resident (it is created group by group);
``state_bytes_active_group`` is what stays resident with offload (hift_ext offload engine).

Prints a table and writes benchmarks/results/step-<device>.json (+ .png when matplotlib is there).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hift_ext.hift_optim import FusedHiFTAdamW  # noqa: E402
from hift_ext.optim import FusedAdamW  # noqa: E402

from benchmarks import _common  # noqa: E402  (device name/tag, git commit)


# ----------------------------------------------------------------------------------- helpers
def tensor_bytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def state_bytes(opt) -> int:
    return tensor_bytes(v for st in opt.state.values() for v in st.values() if torch.is_tensor(v))


class SavedBytes:
    """Bytes autograd saves for backward during a forward (distinct storages)."""

    def __init__(self):
        self.seen: dict[tuple, int] = {}

    def pack(self, t):
        try:
            key = (t.untyped_storage().data_ptr(), t.device)
            self.seen[key] = max(self.seen.get(key, 0), t.untyped_storage().nbytes())
        except Exception:
            pass
        return t

    @staticmethod
    def unpack(t):
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def build_model(args, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.heads, max_position_embeddings=max(args.seq, 128),
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device)
    model.train()
    return model


# ----------------------------------------------------------------------------------- modes
class Mode:
    def __init__(self, name, model, opt, device, batch, param_names):
        self.name, self.model, self.opt, self.device, self.batch = name, model, opt, device, batch
        self.times: list[float] = []
        self.peak_grad = 0
        self.peak_state = 0
        self.peak_saved = 0
        self.active_state = 0
        self.losses: list[float] = []
        self.param_names = param_names

    def step(self, ids, measure: bool):
        model, opt, dev = self.model, self.opt, self.device
        saved = SavedBytes()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)
        if isinstance(opt, FusedHiFTAdamW):
            g = opt.active_group
            self.active_state = max(
                self.active_state,
                sum(2 * p.numel() * p.element_size() + 4 for p in opt.groups[g].params),
            )
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        dt = time.perf_counter() - t0
        if measure:
            self.times.append(dt)
            self.peak_grad = max(self.peak_grad, grads)
            self.peak_state = max(self.peak_state, state_bytes(opt))
            self.peak_saved = max(self.peak_saved, saved.total)
            self.losses.append(float(loss.detach()))


def make_batch(step: int, args, device):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)


def run(args):
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no GPU is visible")
    if args.threads:
        torch.set_num_threads(args.threads)

    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    modes: list[Mode] = []
    names = [m.strip() for m in args.modes.split(",") if m.strip()]
    for name in names:
        model = build_model(args, device)
        pnames = [n for n, _ in model.named_parameters()]
        if name == "full":
            opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
        elif name == "full_fused":
            opt = FusedAdamW(model.parameters(), lr=args.lr)
        elif name == "hift":
            opt = FusedHiFTAdamW(model, lr=args.lr, group_size=args.group_size,
                                 strategy=args.strategy, offload=args.offload)
        else:
            raise SystemExit(f"unknown mode {name!r} (full, full_fused, hift)")
        modes.append(Mode(name, model, opt, device, args.batch, pnames))
    hift = next((m for m in modes if m.name == "hift"), None)
    k = hift.opt.num_groups if hift else 1
    n_params = sum(p.numel() for p in modes[0].model.parameters())
    print(f"model: LLaMA-shaped, {n_params / 1e6:.1f}M params, hidden {args.hidden}, "
          f"{args.layers} layers, vocab {args.vocab}; batch {args.batch} x seq {args.seq}; "
          f"HiFT k = {k} groups; device {_common.device_name(str(device))}", flush=True)

    # warm-up: a few steps per mode (HiFT: one step of the bottom and one of the top group)
    for m in modes:
        for s in range(args.warmup):
            m.step(make_batch(s, args, device), measure=False)

    # measured: `cycles` HiFT cycles of k steps; full modes run the same number of steps; the
    # modes alternate in blocks of `block` steps
    total = args.cycles * k
    block = max(1, args.block)
    # CUDA: every mode's model and optimizer live side by side, so the device-wide peak is not one
    # mode's. A mode's peak = what it holds when its block starts (parameters, optimizer state,
    # gradients: counted from its tensors) + the peak growth of allocated memory during its block.
    cuda_peak = {m.name: 0 for m in modes}
    done = 0
    while done < total:
        n = min(block, total - done)
        for m in modes:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                held = [*m.model.parameters(), *(p.grad for p in m.model.parameters() if p.grad is not None),
                        *(v for st in m.opt.state.values() for v in st.values() if torch.is_tensor(v))]
                own = tensor_bytes(t for t in held if t.device.type == "cuda")  # offloaded state: host
            for s in range(done, done + n):
                m.step(make_batch(100 + s, args, device), measure=True)
            if device.type == "cuda":
                growth = torch.cuda.max_memory_allocated(device) - base
                cuda_peak[m.name] = max(cuda_peak[m.name], own + growth)
        done += n
        print(f"  {done}/{total} steps per mode", flush=True)

    rows = []
    for m in modes:
        step_s = sum(m.times) / len(m.times)
        params = tensor_bytes(m.model.parameters())
        row = {
            "mode": m.name,
            "optimizer": type(m.opt).__name__,
            "steps": len(m.times),
            "step_s": step_s,
            "examples_per_s": args.batch / step_s,
            "tokens_per_s": args.batch * args.seq / step_s,
            "param_bytes": params,
            "grad_bytes_peak": m.peak_grad,
            "state_bytes_peak": m.peak_state,
            "saved_activation_bytes_peak": m.peak_saved,
            "tensor_bytes_peak": params + m.peak_grad + m.peak_state,
            "loss_first": m.losses[0],
            "loss_last": m.losses[-1],
        }
        if m.name == "hift":
            row["state_bytes_active_group"] = m.active_state
            row["num_groups"] = k
            row["memory_report"] = m.opt.memory_report()
        if device.type == "cuda":
            row["cuda_peak_bytes"] = cuda_peak[m.name]
        rows.append(row)

    by = {r["mode"]: r for r in rows}
    ratios = {}
    if "hift" in by and "full" in by:
        h, f = by["hift"], by["full"]
        ratios = {
            "examples_per_s_hift_over_full": h["examples_per_s"] / f["examples_per_s"],
            "grad_bytes_hift_over_full": h["grad_bytes_peak"] / f["grad_bytes_peak"],
            "state_bytes_resident_hift_over_full": h["state_bytes_peak"] / f["state_bytes_peak"],
            "state_bytes_active_group_over_full": h["state_bytes_active_group"] / f["state_bytes_peak"],
            "saved_activation_bytes_hift_over_full":
                h["saved_activation_bytes_peak"] / max(1, f["saved_activation_bytes_peak"]),
            "tensor_bytes_hift_over_full": h["tensor_bytes_peak"] / f["tensor_bytes_peak"],
            "one_over_k": 1 / k,
            "target_examples_per_s_ratio": 1.5,
        }
        if device.type == "cuda":
            ratios["cuda_peak_hift_over_full"] = (
                h["cuda_peak_bytes"] / f["cuda_peak_bytes"]
            )
        if "full_fused" in by:
            ratios["examples_per_s_hift_over_full_fused"] = (
                h["examples_per_s"] / by["full_fused"]["examples_per_s"]
            )
    result = {
        "benchmark": "step",
        "device": _common.device_name(str(device)),
        "device_type": device.type,
        "torch": torch.__version__,
        "git_commit": _common.git_commit(),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "model": {"kind": "llama", "params": n_params, "hidden": args.hidden, "layers": args.layers,
                  "intermediate": args.intermediate, "heads": args.heads, "vocab": args.vocab},
        "batch": args.batch, "seq": args.seq, "dtype": "float32",
        "group_size": args.group_size, "strategy": args.strategy, "offload": args.offload,
        "cycles": args.cycles, "warmup_steps": args.warmup, "block": args.block,
        # a shared machine: absolute times move with the load, ratios (interleaved) much less
        "load_average_1_5_15_before": load_before,
        "load_average_1_5_15_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "rows": rows,
        "ratios": ratios,
    }
    print_table(result)
    return result


def mib(b):
    return f"{b / 2**20:9.1f}"


def print_table(res):
    print()
    hdr = (f"{'mode':<11} {'step s':>8} {'ex/s':>8} {'params MiB':>10} {'grads MiB':>10} "
           f"{'state MiB':>10} {'saved act MiB':>13} {'loss first->last':>18}")
    print(hdr)
    print("-" * len(hdr))
    for r in res["rows"]:
        print(f"{r['mode']:<11} {r['step_s']:8.3f} {r['examples_per_s']:8.2f} {mib(r['param_bytes']):>10} "
              f"{mib(r['grad_bytes_peak']):>10} {mib(r['state_bytes_peak']):>10} "
              f"{mib(r['saved_activation_bytes_peak']):>13} "
              f"{r['loss_first']:8.3f}->{r['loss_last']:.3f}")
    for k, v in res["ratios"].items():
        print(f"  {k:<42} {v:.3f}")


def write(res, out_dir: Path, png: bool):
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = _common.device_tag(res["device_type"])
    path = out_dir / f"step-{tag}.json"
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    if not png:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return
    rows = res["rows"]
    names = [r["mode"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    a1.bar(names, [r["examples_per_s"] for r in rows], color=["#888", "#aaa", "#2a7"][: len(rows)])
    a1.set_ylabel("examples / s")
    a1.set_title("training throughput")
    comp = [("param_bytes", "params"), ("grad_bytes_peak", "grads"), ("state_bytes_peak", "optimizer state")]
    bottom = [0.0] * len(rows)
    for key, label in comp:
        vals = [r[key] / 2**20 for r in rows]
        a2.bar(names, vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals)]
    hift = next((r for r in rows if r["mode"] == "hift"), None)
    if hift:
        i = names.index("hift")
        a2.plot([i], [(hift["param_bytes"] + hift["grad_bytes_peak"] + hift["state_bytes_active_group"]) / 2**20],
                "k_", markersize=30, label="hift with offload (active state)")
    a2.set_ylabel("MiB")
    a2.set_title("params + grads + optimizer state")
    a2.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    m = res["model"]
    fig.suptitle(f"LLaMA-shaped {m['params'] / 1e6:.0f}M, batch {res['batch']}x{res['seq']}, "
                 f"{res['device']}", fontsize=9)
    fig.tight_layout()
    png_path = path.with_suffix(".png")
    fig.savefig(png_path, dpi=110)
    print(f"wrote {png_path.relative_to(ROOT) if png_path.is_relative_to(ROOT) else png_path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=None, help="default: 11/4 * hidden")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--group-size", type=int, default=1)
    ap.add_argument("--strategy", default="down2up")
    ap.add_argument("--offload", action="store_true")
    ap.add_argument("--cycles", type=int, default=1, help="HiFT cycles measured (k steps each)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--block", type=int, default=1, help="steps per mode before switching mode")
    ap.add_argument("--modes", default="full,full_fused,hift")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--no-png", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    if args.intermediate is None:
        args.intermediate = (args.hidden * 11 // 4 + 63) // 64 * 64
    res = run(args)
    if not args.no_write:
        write(res, Path(args.out), png=not args.no_png)
    return res


if __name__ == "__main__":
    main()
