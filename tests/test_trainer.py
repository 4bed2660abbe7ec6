"""HiFT inside transformers.Trainer: tiny random BERT (classification) and LLaMA (causal LM), CPU.

Checks what create_hift_optimizer_and_scheduler promises: the TrainingArguments LR/decay/betas and
the delayed schedule with warmup, one group per optimizer step (also with gradient accumulation),
clipping, bf16 autocast, and save_steps + resume_from_checkpoint ending with the same weights as an
uninterrupted run.
"""
import math
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hift_ext._ext import has_extension  # noqa: E402

pytestmark = pytest.mark.skipif(not has_extension(), reason="hift_ext._C (fused kernels) is not built")

from transformers import Trainer, TrainingArguments  # noqa: E402


class RandomData(torch.utils.data.Dataset):
    def __init__(self, n, seq, vocab, kind, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, vocab, (n, seq), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)
        self.kind = kind

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        d = {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i])}
        d["labels"] = self.labels[i] if self.kind == "cls" else self.ids[i].clone()
        return d


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=2))


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False))


def make_args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, num_train_epochs=1, learning_rate=1e-2,
                weight_decay=0.01, lr_scheduler_type="linear", warmup_steps=2, logging_steps=1,
                save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True, seed=0,
                dataloader_num_workers=0, max_grad_norm=1.0)
    base.update(kw)
    return TrainingArguments(**base)


def build(model_fn, data, out, optimizer="adamw", callbacks=(), hift_kw=None, **kw):
    from hift_ext.integrations.transformers import (HiFTCallback, create_hift_optimizer_and_scheduler,
                                                    num_training_steps)

    model = model_fn()
    args = make_args(out, **kw)
    steps = num_training_steps(args, len(data))
    opt, sched = create_hift_optimizer_and_scheduler(model, args, steps, optimizer=optimizer, **(hift_kw or {}))
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched),
                      callbacks=[HiFTCallback(), *callbacks])
    return model, opt, sched, trainer, steps


class Recorder(transformers.TrainerCallback):
    """Sees the logs after HiFTCallback added the group (Trainer's log_history is a copy made before)."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "learning_rate" in logs:
            self.logs.append(dict(logs))


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_bert_delayed_lr_groups_and_accumulation(tmp_path):
    data = RandomData(48, 8, 100, "cls")
    # 48 / 4 = 12 micro-batches, grad accumulation 2 -> 6 optimizer steps
    rec = Recorder()
    model, opt, sched, trainer, steps = build(tiny_bert, data, tmp_path, gradient_accumulation_steps=2,
                                              callbacks=[rec])
    assert steps == 6
    k = opt.num_groups
    assert k >= 4  # embeddings, 2 layers, head (at least)
    assert opt.defaults["lr"] == 1e-2 and opt.defaults["weight_decay"] == 0.01
    assert opt.defaults["betas"] == (0.9, 0.999)
    before = snapshot(model)
    trainer.train()
    assert opt.hift_position == 6  # one optimizer step per accumulation, each a HiFT step
    logs = rec.logs
    assert len(logs) == 6
    # delayed linear schedule with 2 warmup steps on the horizon of 6 steps, held per cycle of k >= 4
    # steps: the first cycle starts within the warmup, so it takes the warmup's end, f(2) = 1 (it used
    # to take f(0) = 0: a wasted cycle); later cycles f(k * (t // k))
    def f(s):
        return s / 2 if s < 2 else max(0.0, (6 - s) / (6 - 2))

    def held(t):
        return k * (t // k) if k * (t // k) >= 2 else min(k * (t // k) + k - 1, 2)
    for t, rec in enumerate(logs):
        assert rec["learning_rate"] == pytest.approx(1e-2 * f(held(t)), rel=1e-6)
    assert all(rec["learning_rate"] > 0 for rec in logs[:k])
    # HiFTCallback: the group the next step updates, after step t (0-based) that is (t + 1) % k
    assert [l["hift_group"] for l in logs] == [(t + 1) % k for t in range(6)]
    assert [l["hift_position"] for l in logs] == list(range(1, 7))
    after = snapshot(model)
    changed = [g.index for g in opt.groups
               if any(not torch.equal(before[n], after[n]) for n in g.param_names if n in before)]
    # step t updated group t % k, every one with lr > 0
    assert set(changed) == {t % k for t in range(6) if f(held(t)) > 0} == set(range(min(k, 6)))


@pytest.mark.parametrize("optimizer,steps_per_group", [("adamw", 1), ("sgd", 1), ("adamw", 3)])
def test_resume_from_checkpoint_equals_uninterrupted(tmp_path, optimizer, steps_per_group):
    data = RandomData(40, 8, 100, "cls", seed=1)
    kw = dict(save_strategy="steps", save_steps=4, num_train_epochs=2, gradient_accumulation_steps=1,
              warmup_steps=0.1, hift_kw={"steps_per_group": steps_per_group})
    model_a, opt_a, _, trainer_a, steps = build(tiny_bert, data, tmp_path / "a", optimizer=optimizer, **kw)
    assert steps == 20
    trainer_a.train()
    final_a = snapshot(model_a)
    ckpt = tmp_path / "a" / "checkpoint-8"  # mid-epoch 1 (10 steps per epoch), mid-cycle (K = 3: mid-block)
    assert (ckpt / "optimizer.pt").exists() and (ckpt / "scheduler.pt").exists()
    # the optimizer state round-trips through Trainer's safe loader
    sd = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert sd["hift"]["schedule"]["position"] == 8
    assert sd["hift"]["steps_per_group"] == steps_per_group
    model_b, opt_b, _, trainer_b, _ = build(tiny_bert, data, tmp_path / "b", optimizer=optimizer, **kw)
    trainer_b.train(resume_from_checkpoint=str(ckpt))
    assert opt_b.hift_position == opt_a.hift_position == 20
    final_b = snapshot(model_b)
    for name in final_a:
        torch.testing.assert_close(final_b[name], final_a[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("hold", ["cycle", "visit"])
def test_steps_per_group_with_accumulation_and_hold(tmp_path, hold):
    """create_hift_optimizer_and_scheduler(..., steps_per_group=2): two optimizer steps per group
    (each of two micro-batches), the LR held per cycle of k * 2 or per visit of 2 steps, warming up
    from the first step on."""
    data = RandomData(48, 8, 100, "cls")
    rec = Recorder()
    model, opt, sched, trainer, steps = build(tiny_bert, data, tmp_path, gradient_accumulation_steps=2,
                                              callbacks=[rec], hift_kw={"steps_per_group": 2, "lr_hold": hold})
    assert steps == 6 and opt.steps_per_group == 2 and sched.hold == hold
    k = opt.num_groups
    before = snapshot(model)
    trainer.train()
    assert opt.hift_position == 6
    logs = rec.logs
    assert [l["hift_group"] for l in logs] == [opt.schedule.group_at(t + 1) for t in range(6)] == \
        [0, 1, 1, 2, 2, 3]
    assert all(l["hift_steps_per_group"] == 2 for l in logs)

    def f(s):
        return s / 2 if s < 2 else max(0.0, (6 - s) / (6 - 2))
    H = 2 * k if hold == "cycle" else 2
    for t, r in enumerate(logs):
        a = H * (t // H)
        assert r["learning_rate"] == pytest.approx(1e-2 * f(a if a >= 2 else min(a + H - 1, 2)), rel=1e-6)
        assert r["learning_rate"] > 0
    after = snapshot(model)
    changed = {g.index for g in opt.groups
               if any(not torch.equal(before[n], after[n]) for n in g.param_names if n in before)}
    assert changed == {0, 1, 2}


def test_llama_causal_lm_bf16(tmp_path):
    data = RandomData(24, 8, 100, "lm")
    model, opt, _, trainer, steps = build(tiny_llama, data, tmp_path, bf16=True, max_steps=5,
                                          lr_scheduler_type="constant")
    assert steps == 5
    names = [u for g in opt.groups for u in g.unit_names]
    assert any("embed" in n for n in names[:1]) and any("lm_head" in n for n in names[-1:])
    before = snapshot(model)
    out = trainer.train()
    assert math.isfinite(out.training_loss)
    assert opt.hift_position == 5
    after = snapshot(model)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast, fp32 master weights
    changed = {g.index for g in opt.groups
               if any(not torch.equal(before[n], after[n]) for n in g.param_names if n in before)}
    assert changed == {t % opt.num_groups for t in range(5)}


def test_options_and_errors(tmp_path):
    from hift_ext.integrations.transformers import create_hift_optimizer_and_scheduler

    args = make_args(tmp_path, lr_scheduler_type="cosine", adam_beta1=0.8, adam_epsilon=1e-6)
    m = tiny_bert()
    opt, sched = create_hift_optimizer_and_scheduler(m, args, 10, group_size=2, strategy="up2down",
                                                     amsgrad=True)
    assert opt.defaults["betas"] == (0.8, 0.999) and opt.defaults["eps"] == 1e-6 and opt.defaults["amsgrad"]
    assert opt.order[0] == opt.num_groups - 1
    opt, _ = create_hift_optimizer_and_scheduler(tiny_bert(), args, 10, optimizer="sgd")
    assert opt.defaults["momentum"] == 0.9
    opt, _ = create_hift_optimizer_and_scheduler(tiny_bert(), args, 10, group_size=[3, 1])  # an unequal split
    assert opt.group_size == (3, 1) and [len(g.unit_names) for g in opt.groups] == [3, 1]
    opt, _ = create_hift_optimizer_and_scheduler(tiny_bert(), args, 10, optimizer="adagrad")
    assert type(opt).__name__ == "FusedHiFTAdaGrad"
    with pytest.raises(ValueError, match="unknown HiFT optimizer"):
        create_hift_optimizer_and_scheduler(tiny_bert(), args, 10, optimizer="lion")
    for bad, exc in ((0, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(exc, match=r"steps_per_group must be .*>= 1.*steps_per_group=1"):
            create_hift_optimizer_and_scheduler(tiny_bert(), args, 10, steps_per_group=bad)
    m = tiny_bert()
    with pytest.raises(ValueError, match="hold must be one of 'cycle', 'visit'"):
        create_hift_optimizer_and_scheduler(m, args, 10, lr_hold="epoch")
    assert all(p.requires_grad for p in m.parameters())  # refused before the optimizer froze anything


@pytest.mark.parametrize("kw,name", [
    (dict(learning_rate=float("inf")), "args.learning_rate"),
    (dict(weight_decay=float("nan")), "args.weight_decay"),
    (dict(adam_beta1=float("nan")), "args.adam_beta1"),
    (dict(adam_epsilon=float("inf")), "args.adam_epsilon"),
    (dict(max_grad_norm=float("nan")), "args.max_grad_norm"),
])
def test_non_finite_hyperparameters_are_refused(tmp_path, kw, name):
    """The same rules as `hift-ext finetune` (hift_ext.hparams), named as TrainingArguments names them."""
    from hift_ext.integrations.transformers import create_hift_optimizer_and_scheduler

    with pytest.raises(ValueError, match=name.replace(".", r"\.") + " must be"):
        create_hift_optimizer_and_scheduler(tiny_bert(), make_args(tmp_path, **kw), 10)
    with pytest.raises(ValueError, match=r"momentum \(keyword argument\) must be"):
        create_hift_optimizer_and_scheduler(tiny_bert(), make_args(tmp_path), 10, optimizer="sgd",
                                            momentum=float("nan"))


def test_llama_instruction_tuning_with_seq2seq_collator(tmp_path):
    """The README's Trainer recipe for causal LMs: chat-rendered examples from hift_ext.chat_data,
    prompt tokens masked with -100, DataCollatorForSeq2Seq padding the labels with -100 too; HiFT
    trains one group per step and the loss is the response tokens' only."""
    from transformers import DataCollatorForSeq2Seq

    from _causal_testutil import make_tiny_llama, make_tokenizer
    from hift_ext.chat_data import ChatExample, ChatExamples, encode_chat
    from hift_ext.integrations.transformers import (HiFTCallback, create_hift_optimizer_and_scheduler,
                                                    num_training_steps)

    tok = make_tokenizer()
    rows = [ChatExample(i + 1, f"{i} + {i} = {2 * i}\n#### {2 * i}", prompt=f"What is {i} + {i}?" + " Think." * (i % 4))
            for i in range(16)]
    ds = encode_chat(tok, ChatExamples("mem", rows), max_length=128)
    feats = ds.features()
    collator = DataCollatorForSeq2Seq(tok, label_pad_token_id=-100, padding=True)
    batch = collator(feats[:4])
    for r in range(4):  # labels: -100 over the prompt and the padding, the tokens over the response
        n, p = len(ds.input_ids[r]), ds.n_prompt[r]
        assert (batch["labels"][r, :p] == -100).all() and (batch["labels"][r, n:] == -100).all()
        assert torch.equal(batch["labels"][r, p:n], batch["input_ids"][r, p:n])
    model = make_tiny_llama(len(tok))
    args = make_args(tmp_path, max_steps=6, lr_scheduler_type="constant", warmup_steps=0, remove_unused_columns=False)
    opt, sched = create_hift_optimizer_and_scheduler(model, args, num_training_steps(args, len(feats)),
                                                     group_size=1, strategy="up2down")
    before = snapshot(model)
    out = Trainer(model=model, args=args, train_dataset=feats, data_collator=collator, optimizers=(opt, sched),
                  callbacks=[HiFTCallback()]).train()
    assert math.isfinite(out.training_loss) and opt.hift_position == 6
    after = snapshot(model)
    changed = {g.index for g in opt.groups
               if any(not torch.equal(before[n], after[n]) for n in g.param_names if n in before)}
    assert changed == set(range(opt.num_groups))  # up2down over 4 groups, 6 steps: every group


def test_response_logits_collator_trains_the_same_weights_with_logits_cut_to_the_response(tmp_path):
    """ResponseLogitsCollator: each batch keeps only the logits from its first response position on
    (logits_to_keep) with the labels cut alike; the model's own loss is the same, so Trainer ends
    with the same weights as with the plain collator; a model without logits_to_keep is refused."""
    from transformers import DataCollatorForSeq2Seq

    from _causal_testutil import make_tiny_llama, make_tokenizer
    from hift_ext.chat_data import ChatExample, ChatExamples, encode_chat
    from hift_ext.integrations.transformers import (HiFTCallback, ResponseLogitsCollator,
                                                    create_hift_optimizer_and_scheduler, num_training_steps)

    tok = make_tokenizer()
    rows = [ChatExample(i + 1, f"{i} + {i} = {2 * i}\n#### {2 * i}", prompt=f"What is {i} + {i}?" + " Think." * (i % 4))
            for i in range(16)]
    feats = encode_chat(tok, ChatExamples("mem", rows), max_length=128).features()
    plain = DataCollatorForSeq2Seq(tok, label_pad_token_id=-100, padding=True)
    model = make_tiny_llama(len(tok))
    cut = ResponseLogitsCollator(plain, model)
    assert len(model.get_output_embeddings()._forward_pre_hooks) == 1  # the head takes a contiguous slice
    full_batch, cut_batch = plain(feats[:4]), cut(feats[:4])
    keep = cut_batch["logits_to_keep"]
    length = full_batch["labels"].shape[1]
    assert 0 < keep < length and torch.equal(cut_batch["labels"], full_batch["labels"][:, length - keep:])
    assert (full_batch["labels"][:, :length - keep + 1] == -100).all()  # nothing cut predicts a target
    with torch.no_grad():
        out = model(**cut_batch)
        assert out.logits.shape[1] == keep
        assert torch.allclose(out.loss, model(**full_batch).loss, rtol=1e-5, atol=1e-6)

    def train(collator):
        m = make_tiny_llama(len(tok))
        args = make_args(tmp_path, max_steps=6, lr_scheduler_type="constant", warmup_steps=0,
                         remove_unused_columns=False)
        opt, sched = create_hift_optimizer_and_scheduler(m, args, num_training_steps(args, len(feats)),
                                                         group_size=1, strategy="up2down")
        Trainer(model=m, args=args, train_dataset=feats, data_collator=collator, optimizers=(opt, sched),
                callbacks=[HiFTCallback()]).train()
        return snapshot(m)

    a = train(plain)
    b = train(ResponseLogitsCollator(plain, make_tiny_llama(len(tok))))
    assert a.keys() == b.keys()
    for n in a:
        assert torch.allclose(a[n], b[n], rtol=1e-4, atol=1e-6), n
    with pytest.raises(ValueError, match="takes no logits_to_keep"):
        ResponseLogitsCollator(plain, tiny_bert())
    with pytest.raises(TypeError, match="a data collator"):
        ResponseLogitsCollator(None, model)
