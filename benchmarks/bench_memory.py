"""Peak memory of full fine-tuning vs HiFT vs HiFT with optimizer-state offload.

LLaMA-shaped models built from transformers configs with random weights, AdamW, in fp32 or in
bf16/fp16 with fp32 master weights (``--dtypes``):

    full          fp32: torch.optim.AdamW(fused=True) on every parameter (torch's default on CUDA,
                  foreach, holds sqrt(v) for every parameter during the step: the 125.6 GiB full FT
                  measured with it at 7B on the H200 is 5 x 25.1 GiB); bf16/fp16:
                  hift_ext.FusedAdamW with fp32 master weights (2 B weight + 2 B grad + 12 B
                  master/m/v per parameter, the usual mixed-precision full fine-tuning)
    hift          hift_ext.FusedHiFTAdamW(offload=False): every group's state (and masters) on the device
    hift_offload  hift_ext.FusedHiFTAdamW(offload=True): state and masters in the host store; the device
                  holds the engine's arena: ``offload_device_bytes`` (``--budget-gib``) or, by default,
                  two halves each the largest group's state

CUDA: peak = torch.cuda.max_memory_allocated over a full HiFT cycle (every group active once: the
bottom group keeps the most activations, the top ones the least), after warm-up.
CPU (small models): peak = parameters + max over the cycle of (saved activations + gradients +
optimizer state on the "device"), counted from tensor bytes (saved_tensors_hooks for activations).

An analytical predictor (params, gradients of the active group, optimizer state of the resident
groups, activation estimate of the LLaMA decoder) is printed next to every measurement and used for
the models that do not fit (7B/13B/70B), with and without gradient checkpointing.

    python benchmarks/bench_memory.py                   # CPU: tiny model; CUDA: 1b (+3b, 7b if they fit)
    python benchmarks/bench_memory.py --models 1b 3b --gc both

Writes benchmarks/results/memory-<device>.json (rows {model, params, mode, dtype, optimizer, batch,
seq, gradient_checkpointing, peak_gib, predicted_gib}) and memory-<device>.png.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

GIB = float(1 << 30)

# LLaMA-shaped configs (vocab 32000, untied head, MHA unless kv heads given).
CONFIGS = {
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=8, vocab_size=1000),
    "small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=4000),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),  # TinyLlama-1.1B
    "3b": dict(hidden_size=3200, intermediate_size=8640, num_hidden_layers=26, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),  # OpenLLaMA-3B
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),  # LLaMA-7B
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40, vocab_size=32000),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=32000),
    # Llama-3-8B: GQA, a 128,256-token vocabulary and an untied head (525M parameters each)
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("full", "hift", "hift_offload")


# ------------------------------------------------------------------------------------ predictor
def unit_params(cfg: dict) -> list[int]:
    """Parameter count of each HiFT unit, bottom to top: embeddings, blocks, final norm, head."""
    h, i, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    block = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return [V * h] + [block] * cfg["num_hidden_layers"] + [h, V * h]


def layer_activation_bytes(cfg: dict, batch: int, seq: int, dtype_bytes: int, attn: str) -> float:
    """Tensors one LLaMA decoder layer saves for backward (HF implementation): RMSNorm x2 (input,
    normalized, scaled: 3 x bsh each), q/k/v after RoPE + attention output + its reshaped copy
    (5 x bsh; k/v shrink with GQA), SwiGLU gate, silu(gate), up, product (4 x bsi); eager/math
    attention also keeps the softmax probabilities (b a s^2)."""
    h, i, a = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"]
    kv_frac = cfg["num_key_value_heads"] / a
    elems = batch * seq * ((6 + 3 + 2 * kv_frac) * h + 4 * i)
    if attn == "eager":
        elems += 2 * batch * a * seq * seq  # scores + probabilities
    return elems * dtype_bytes


def head_activation_bytes(cfg: dict, batch: int, seq: int, dtype_bytes: int) -> float:
    """Final norm (3 x bsh) + the logits in the model's dtype and the loss's fp32 copy and
    log-softmax (transformers upcasts the logits for the loss: 8 B per logit)."""
    return batch * seq * (3 * cfg["hidden_size"] * dtype_bytes + cfg["vocab_size"] * (dtype_bytes + 8))


def state_bytes_per_param(dtype_bytes: int) -> int:
    """AdamW's m and v, plus an fp32 master for bf16/fp16 weights: 8 B (fp32) or 12 B."""
    return 8 if dtype_bytes == 4 else 12


def predict_gib(cfg: dict, mode: str, *, batch: int = 1, seq: int = 512, dtype_bytes: int = 4,
                state_per_param: int | None = None, group_size: int = 1, gc_on: bool = False,
                attn: str = "sdpa", prefetch: bool = True, budget_bytes: float | None = None) -> float:
    """Predicted peak device memory (GiB) of one training step, worst group of the cycle.

    full:          P + G(all) + S(all) + activations(all layers)
    hift:          P + S(all) + max_g [G(g) + activations(layers from g up)]
    hift_offload:  P + arena + max_g [G(g) + activations(layers from g up)]
                   arena = budget_bytes, or two halves each holding the largest group's state
                   (allocated once: the active group is updated in one half while the next one is
                   prefetched into the other; a group larger than half a budget streams through it)
    P, G and activations are in the weights' dtype; S (state_per_param, default
    state_bytes_per_param) is fp32. With gradient checkpointing a layer keeps only its input (bsh)
    and one layer is recomputed.
    """
    if state_per_param is None:
        state_per_param = state_bytes_per_param(dtype_bytes)
    units = unit_params(cfg)
    n_layers = cfg["num_hidden_layers"]
    P = sum(units) * dtype_bytes
    layer_act = layer_activation_bytes(cfg, batch, seq, dtype_bytes, attn)
    ckpt_act = batch * seq * cfg["hidden_size"] * dtype_bytes
    head_act = head_activation_bytes(cfg, batch, seq, dtype_bytes)
    groups = [units[j:j + group_size] for j in range(0, len(units), group_size)]
    first_unit = [j for j in range(0, len(units), group_size)]

    def act_from(unit_index: int) -> float:
        # layers at or above the active unit keep activations (lower layers build no graph)
        layers = sum(1 for u in range(1, n_layers + 1) if u >= unit_index)
        if gc_on:
            return layers * ckpt_act + (layer_act if layers else 0) + head_act
        return layers * layer_act + head_act

    if mode == "full":
        total = P + sum(units) * (dtype_bytes + state_per_param) + act_from(0)
        return total / GIB
    worst = 0.0
    for gi, g in enumerate(groups):
        worst = max(worst, sum(g) * dtype_bytes + act_from(first_unit[gi]))
    if mode == "hift":
        return (P + sum(units) * state_per_param + worst) / GIB
    largest_state = max(sum(g) for g in groups) * state_per_param
    arena = budget_bytes if budget_bytes is not None else (2 if prefetch else 1) * largest_state
    return (P + arena + worst) / GIB


# ------------------------------------------------------------------------------------ measurement
def build_model(cfg: dict, device, dtype=torch.float32, attn: str = "sdpa", seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig(**cfg, max_position_embeddings=4096, tie_word_embeddings=False,
                       attn_implementation=attn)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(conf).to(dtype)
    model.train()
    model.config.use_cache = False
    return model


def _bytes(tensors) -> int:
    seen, n = set(), 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        n += t.untyped_storage().nbytes()
    return n


class _SavedBytes:
    """Counts the distinct storages autograd saves during forward (CPU activation estimate)."""

    def __init__(self):
        self.seen: dict = {}

    def pack(self, t):
        if t.device.type == "cpu" and not isinstance(t, torch.nn.Parameter):
            st = t.untyped_storage()
            self.seen[st.data_ptr()] = st.nbytes()
        return t

    @property
    def total(self):
        return sum(self.seen.values())


def _optimizer_name(mode: str, dtype: str) -> str:
    if mode != "full":
        return "FusedHiFTAdamW" + ("" if dtype == "fp32" else " (fp32 masters)")
    return "torch.optim.AdamW (fused)" if dtype == "fp32" else "FusedAdamW (fp32 masters)"


def measure(cfg_name: str, cfg: dict, mode: str, device: torch.device, *, batch: int, seq: int,
            gc_on: bool, attn: str, steps: int | None = None, num_slots: int = 2, dtype: str = "fp32",
            budget_bytes: int | None = None) -> dict:
    from hift_ext import hift_optim, optim as hopt
    from hift_ext.train import torch_full_optimizer

    model = build_model(cfg, device, dtype=DTYPES[dtype], attn=attn)
    if gc_on:
        from hift_ext.train import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    params = sum(p.numel() for p in model.parameters())
    if mode == "full":
        opt = (torch_full_optimizer("adamw", model.parameters(), lr=1e-5) if dtype == "fp32"
               else hopt.FusedAdamW(model.parameters(), lr=1e-5, master_weights=True))
        n_steps = steps or 2
    else:
        kw = {"offload_slots": num_slots, "offload_device_bytes": budget_bytes} if mode == "hift_offload" else {}
        opt = hift_optim.FusedHiFTAdamW(model, lr=1e-5, group_size=1, offload=(mode == "hift_offload"), **kw)
        n_steps = steps or (opt.num_groups + 1)  # a full cycle (+1: every group's state exists)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq), generator=gen).to(device)
    cuda = device.type == "cuda"
    param_bytes = _bytes(model.parameters())
    peak = 0
    t0 = time.perf_counter()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(n_steps):
        if cuda:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            counter = _SavedBytes()
            with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
                loss = model(input_ids=ids, labels=ids).loss
            state_dev = _state_device_bytes(opt, device)
            fwd = counter.total + state_dev  # end of forward: activations + resident state
            loss.backward()
            del loss
            grads = _bytes(p.grad for p in model.parameters())
            state_dev = _state_device_bytes(opt, device)
            peak = max(peak, fwd + grads, grads + state_dev)
            opt.step()
            peak = max(peak, grads + _state_device_bytes(opt, device))
            opt.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
        peak_bytes = torch.cuda.max_memory_allocated()
    else:
        peak_bytes = param_bytes + peak
    elapsed = time.perf_counter() - t0
    extra = {}
    if mode == "hift_offload":
        rep = opt.memory_report()
        extra = {k: rep.get(k) for k in ("pinned_bytes", "host_store_bytes", "device_budget_bytes",
                                         "pieces_per_group")}
        extra["overflow_allocs"] = opt.offload_engine.stats()["overflow_allocs"]
    del opt, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    pred = predict_gib(cfg, mode, batch=batch, seq=seq, gc_on=gc_on, dtype_bytes=DTYPES[dtype].itemsize,
                       attn="eager" if (not cuda and attn != "sdpa_cuda") else attn,
                       budget_bytes=budget_bytes if mode == "hift_offload" else None)
    return dict(model=cfg_name, params=params, mode=mode, dtype=dtype, optimizer=_optimizer_name(mode, dtype),
                batch=batch, seq=seq, gradient_checkpointing=gc_on, peak_gib=peak_bytes / GIB,
                predicted_gib=pred, steps=n_steps, seconds=elapsed, measured=True,
                budget_gib=None if budget_bytes is None else budget_bytes / GIB, **extra)


def _state_device_bytes(opt, device) -> int:
    ts = []
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.device.type == device.type:
                ts.append(v)
    n = _bytes(ts)
    eng = getattr(opt, "offload_engine", None)
    if eng is not None and device.type == "cpu":
        # on the host-only engine "device" and host are both CPU memory: count the engine's arena
        # (its device memory), not the host store that the views in opt.state alias
        host = _bytes(t for g in eng.groups() for t in eng.host_views(g))
        n = n - host + eng.memory_report()["device_bytes"]
    return n


# ------------------------------------------------------------------------------------ output
def write_results(rows: list[dict], device: torch.device, out_dir: str, name: str = "memory") -> str:
    import json

    import _common  # benchmarks/_common.py: device tag, environment stamp (torch, git commit)

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}-{_common.device_tag(device)}.json")
    _common.write_json(path, {"benchmark": name, "environment": _common.environment(device), "rows": rows}, indent=1)
    return path


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({(r["model"], r.get("dtype", "fp32"), r["gradient_checkpointing"]) for r in rows},
                    key=lambda x: (CONFIG_ORDER.get(x[0], 99), x[1], x[2]))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels) + 2), 4.6))
    width = 0.26
    colors = {"full": "#c44e52", "hift": "#dd8452", "hift_offload": "#4c72b0"}
    for mi, mode in enumerate(MODES):
        xs, ys, hatch = [], [], []
        for li, lab in enumerate(labels):
            r = [r for r in rows
                 if (r["model"], r.get("dtype", "fp32"), r["gradient_checkpointing"]) == lab and r["mode"] == mode]
            if not r:
                continue
            r = r[0]
            xs.append(li + (mi - 1) * width)
            ys.append(r["peak_gib"] if r.get("measured") else r["predicted_gib"])
            hatch.append(not r.get("measured"))
        bars = ax.bar(xs, ys, width, label=mode, color=colors[mode])
        for b, h in zip(bars, hatch):
            if h:
                b.set_hatch("//")
                b.set_alpha(0.6)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels([f"{m} {d}{' +gc' if g else ''}" for m, d, g in labels], rotation=30, ha="right",
                       fontsize=8)
    ax.set_ylabel("peak memory (GiB)")
    ax.set_yscale("log")
    ax.set_title(title + "  (hatched: predicted)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


CONFIG_ORDER = {k: i for i, k in enumerate(CONFIGS)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--modes", nargs="*", default=list(MODES))
    ap.add_argument("--dtypes", nargs="*", default=["fp32", "bf16"], choices=list(DTYPES))
    ap.add_argument("--budget-gib", type=float, default=None,
                    help="offload_device_bytes of hift_offload in GiB [default: bf16/fp16 2 GiB on CUDA "
                         "(1/1000 of the state on CPU), fp32 the engine's default of two largest groups]")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--gc", choices=["off", "on", "both"], default="both")
    ap.add_argument("--steps", type=int, default=None, help="default: a full HiFT cycle")
    ap.add_argument("--predict", nargs="*", default=["7b", "llama3-8b", "13b", "70b"])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--name", default="memory", help="results file stem: <out>/<name>-<device>.json")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    seq = args.seq or (512 if cuda else 128)
    if args.models is None:
        if cuda:
            total = torch.cuda.get_device_properties(device).total_memory / GIB
            args.models = ["1b", "3b"] + (["7b"] if total > 120 else [])
        else:
            args.models = ["tiny"]
    gcs = {"off": [False], "on": [True], "both": [False, True]}[args.gc]
    attn = "sdpa" if cuda else "eager"

    def budget_for(cfg, dtype, mode):
        if mode != "hift_offload":
            return None
        if args.budget_gib is not None:
            return int(args.budget_gib * GIB)
        if dtype == "fp32":
            return None  # the engine's default: two halves of the largest group's state
        if cuda:
            return int(2 * GIB)
        return int(sum(unit_params(cfg)) * state_bytes_per_param(DTYPES[dtype].itemsize) / 8)  # streams

    def row(name, cfg, mode, dtype, gc_on, pred, note, batch, seq_):
        budget = budget_for(cfg, dtype, mode)
        return dict(model=name, params=sum(unit_params(cfg)), mode=mode, dtype=dtype,
                    optimizer=_optimizer_name(mode, dtype), batch=batch, seq=seq_, gradient_checkpointing=gc_on,
                    peak_gib=None, predicted_gib=pred, measured=False, note=note,
                    budget_gib=None if budget is None else budget / GIB)

    rows = []
    print(f"{'model':>9} {'dtype':>5} {'params':>8} {'mode':>13} {'gc':>3} {'peak GiB':>9} {'pred GiB':>9} "
          f"{'pred/meas':>9}")
    for name in args.models:
        cfg = CONFIGS[name]
        for dtype in args.dtypes:
            db = DTYPES[dtype].itemsize
            for gc_on in gcs:
                for mode in args.modes:
                    cap = torch.cuda.get_device_properties(device).total_memory / GIB if cuda else 1e9
                    budget = budget_for(cfg, dtype, mode)
                    pred = predict_gib(cfg, mode, batch=args.batch, seq=seq, gc_on=gc_on, attn=attn,
                                       dtype_bytes=db, budget_bytes=budget)
                    if pred > 0.97 * cap:
                        print(f"{name:>9} {dtype:>5} {'':>8} {mode:>13} {int(gc_on):>3} {'skip':>9} {pred:9.2f}"
                              "  (predicted > card)")
                        rows.append(row(name, cfg, mode, dtype, gc_on, pred, "does not fit this device (predicted)",
                                        args.batch, seq))
                        continue
                    try:
                        r = measure(name, cfg, mode, device, batch=args.batch, seq=seq, gc_on=gc_on, attn=attn,
                                    steps=args.steps, dtype=dtype, budget_bytes=budget)
                    except torch.cuda.OutOfMemoryError:
                        gc.collect()
                        torch.cuda.empty_cache()
                        print(f"{name:>9} {dtype:>5} {'':>8} {mode:>13} {int(gc_on):>3} {'OOM':>9} {pred:9.2f}")
                        rows.append(row(name, cfg, mode, dtype, gc_on, pred, "out of memory", args.batch, seq))
                        continue
                    rows.append(r)
                    print(f"{name:>9} {dtype:>5} {r['params'] / 1e6:7.1f}M {mode:>13} {int(gc_on):>3} "
                          f"{r['peak_gib']:9.3f} {r['predicted_gib']:9.3f} {r['predicted_gib'] / r['peak_gib']:9.2f}")
    # predictions at the paper's scale (batch 1, seq 512, AdamW, group_size 1, sdpa on a GPU)
    cuda_budget = {"fp32": None, "bf16": int(2 * GIB), "fp16": int(2 * GIB)}
    for name in args.predict:
        cfg = CONFIGS[name]
        for dtype in args.dtypes:
            for gc_on in (False, True):
                for mode in MODES:
                    budget = cuda_budget[dtype] if mode == "hift_offload" else None
                    pred = predict_gib(cfg, mode, batch=1, seq=512, gc_on=gc_on, attn="sdpa",
                                       dtype_bytes=DTYPES[dtype].itemsize, budget_bytes=budget)
                    r = row(name, cfg, mode, dtype, gc_on, pred, "predicted", 1, 512)
                    r["budget_gib"] = None if budget is None else budget / GIB
                    rows.append(r)
                    print(f"{name:>9} {dtype:>5} {sum(unit_params(cfg)) / 1e9:7.2f}B {mode:>13} {int(gc_on):>3} "
                          f"{'-':>9} {pred:9.2f}  (predicted, seq 512"
                          + (f", budget {budget / GIB:g} GiB)" if budget else ")"))
    path = write_results(rows, device, args.out, args.name)
    png = path[:-5] + ".png"
    plot(rows, png, f"AdamW ({'/'.join(args.dtypes)}), batch {args.batch}, {device.type}")
    print(f"wrote {path} and {png}")
    return rows


if __name__ == "__main__":
    main()
