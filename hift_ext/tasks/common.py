"""Helpers the tasks share: quieter transformers loading and the token-id check."""
from __future__ import annotations

import contextlib
from typing import Iterator

from hift_ext.errors import UsageError

__all__ = ["quiet_transformers", "check_token_ids"]


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' info/warning logging and its progress bars off (our own bar is the one that
    matters; "newly initialized head" and GGUF conversion bars are expected)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # the GGUF loader draws its "de-quantizing" bar with tqdm directly, not through the switch above
    gguf_mod, gguf_tqdm = None, None
    try:
        import functools

        from transformers import modeling_gguf_pytorch_utils as gguf_mod

        gguf_tqdm = getattr(gguf_mod, "tqdm", None)
        if gguf_tqdm is not None:
            gguf_mod.tqdm = functools.partial(gguf_tqdm, disable=True)
    except Exception:  # noqa: BLE001 - cosmetic only
        gguf_mod = None
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if gguf_mod is not None and gguf_tqdm is not None:
            gguf_mod.tqdm = gguf_tqdm


def check_token_ids(ds, model, tokenizer_flag: str) -> None:
    """A token id beyond the embedding table would crash mid-run (an index error on the CPU, a
    device-side assert on the GPU): say so before training."""
    emb = model.get_input_embeddings()
    rows = getattr(emb, "num_embeddings", None)
    top = max((max(seq) for seq in ds.input_ids if seq), default=-1)
    if rows is not None and top >= rows:
        raise UsageError(f"{tokenizer_flag}: the tokenizer produces token id {top}, but the model's embedding "
                         f"has only {rows} rows: the tokenizer does not belong to this model")
