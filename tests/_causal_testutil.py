"""Shared by the causal-LM tests: a tiny random LLaMA (2 layers, hidden 16) with a small byte-level
BPE tokenizer trained on the fly from the shipped GSM8K rows and a ChatML chat template, the same
pair without a chat template, and a few GSM8K examples."""
import json
import os
import shutil

import pytest
import torch

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _gsm8k_rows(split, n):
    from hift_ext.tasks.causal_lm import shipped_gsm8k

    with open(shipped_gsm8k(split), encoding="utf-8") as fh:
        return [json.loads(next(fh)) for _ in range(n)]


def make_tokenizer(chat_template=True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [r["question"] + "\n" + r["answer"] for r in _gsm8k_rows("train", 200)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                   bos_token="<|im_start|>", unk_token="<|endoftext|>")
    if chat_template:
        fast.chat_template = CHATML
    return fast


def make_tiny_llama(vocab_size, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2, pad_token_id=2))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny LLaMA causal LM saved with a ChatML tokenizer (tied embeddings, like SmolLM2)."""
    d = tmp_path_factory.mktemp("tiny_llama")
    tok = make_tokenizer()
    make_tiny_llama(len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def tiny_llama_plain_dir(tiny_llama_dir, tmp_path_factory):
    """The same model with a tokenizer that has no chat template."""
    d = tmp_path_factory.mktemp("tiny_llama_plain")
    for f in os.listdir(tiny_llama_dir):
        if f not in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
            shutil.copy(os.path.join(tiny_llama_dir, f), d)
    make_tokenizer(chat_template=False).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def gsm8k_small(tmp_path_factory):
    """12 training and 6 dev GSM8K rows (the shipped splits' first rows)."""
    d = tmp_path_factory.mktemp("gsm8k")
    for split, n in (("train", 12), ("dev", 6)):
        with open(d / f"{split}.jsonl", "w", encoding="utf-8") as fh:
            for r in _gsm8k_rows(split, n):
                fh.write(json.dumps(r) + "\n")
    return str(d / "train.jsonl"), str(d / "dev.jsonl")


def lm_args(model, data, *extra):
    tr, dev = data
    return ["finetune", "--model", model, "--train", tr, "--eval", dev, "--batch-size", "4", "--max-length", "1000",
            "--no-progress", "--logging-steps", "1", "--eval-generate", "0", *extra]
