"""Greedy generation on dev prompts and exact match of the final answer (GSM8K's ``#### <number>``).

The predicted answer is the number after the last ``####`` of the generated text; a text without
``####`` counts with its last number (so an untrained model is scored on its arithmetic, not only on
the format). Both sides are normalized (``1,000`` = ``1000``, ``$5`` = ``5``, ``7.0`` = ``7``).
Prompts are generated in batches of similar length, left-padded; generation stops at the
tokenizer's end-of-sequence token or after ``max_new_tokens``.
"""
from __future__ import annotations

import json
from typing import Dict, List, Optional, Sequence

import torch

from hift_ext.chat_data import ChatDataset, _NUM, gold_answer, normalize_number

__all__ = ["predicted_answer", "generate", "exact_match", "samples_jsonl", "generation_batch_size"]

# Prompts a generation batch on the CPU: 32 answers GSM8K dev prompts 1.7x faster per answer than 8
# with SmolLM2-135M on the 2-core CPU (small matmuls there are overhead-bound); on an accelerator the
# KV cache of a 7B model limits the batch, so it stays near the training batch.
CPU_GENERATION_BATCH = 32


def generation_batch_size(train_batch_size: int, device) -> int:
    if str(device).startswith("cpu"):
        return max(train_batch_size, CPU_GENERATION_BATCH)
    return max(train_batch_size, 8)


def predicted_answer(text: str) -> Optional[str]:
    """The number after the last ``####``, else the last number in ``text``; normalized."""
    got = gold_answer(text)
    if got is not None:
        return got
    nums = _NUM.findall(text)
    return normalize_number(nums[-1]) if nums else None


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[List[int]], *, max_new_tokens: int, batch_size: int,
             device, autocast_ctx) -> List[str]:
    """Greedy continuations of token-id ``prompts`` (decoded, special tokens dropped), in input order."""
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts: List[Optional[str]] = [None] * len(prompts)
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s: s + batch_size]
            L = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), L), pad if pad is not None else 0, dtype=torch.long)
            mask = torch.zeros((len(idx), L), dtype=torch.long)
            for r, i in enumerate(idx):  # left padding: every prompt ends where generation starts
                ids[r, L - len(prompts[i]):] = torch.tensor(prompts[i], dtype=torch.long)
                mask[r, L - len(prompts[i]):] = 1
            with autocast_ctx():
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                     max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos,
                                     use_cache=True, temperature=None, top_p=None, top_k=None)
            for r, i in enumerate(idx):
                texts[i] = tokenizer.decode(out[r, L:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return texts  # type: ignore[return-value]


def exact_match(model, tokenizer, ds: ChatDataset, n: int, *, max_new_tokens: int, batch_size: int, device,
                autocast_ctx, ranks=None) -> Dict:
    """Greedy generation on the first ``n`` examples of ``ds``: {"exact_match", "generated",
    "samples"} where samples are dicts for samples.jsonl. Examples without a gold answer are left
    out of the accuracy (``generated`` counts those scored). With ``ranks`` (torchrun) each rank
    generates every N-th prompt; the counts are summed and the samples gathered, in order, on
    every rank."""
    n = min(n, len(ds))
    mine = list(range(n)) if ranks is None or not ranks.distributed else ranks.strided(list(range(n)))
    texts = generate(model, tokenizer, [ds.prompt_ids(i) for i in mine], max_new_tokens=max_new_tokens,
                     batch_size=batch_size, device=device, autocast_ctx=autocast_ctx)
    samples, correct, scored = [], 0, 0
    for i, text in zip(mine, texts):
        ex = ds.examples[i]
        gold, pred = ex.answer, predicted_answer(text)
        ok = gold is not None and pred == gold
        if gold is not None:
            scored += 1
            correct += int(ok)
        samples.append({"line": ex.line, "prompt": ex.prompt_text, "reference": ex.response, "generated": text,
                        "gold_answer": gold, "predicted_answer": pred, "correct": ok if gold is not None else None})
    if ranks is not None and ranks.distributed:
        correct, scored = (int(v) for v in ranks.sum([correct, scored]))
        samples = sorted((s for part in ranks.gather_json(samples) for s in part), key=lambda s: s["line"])
    return {"exact_match": correct / scored if scored else None, "generated": scored, "correct": correct,
            "samples": samples}


def samples_jsonl(samples: Sequence[Dict]) -> str:
    return "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
