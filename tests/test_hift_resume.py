"""HiFT: bitwise resume in a new process, and end-to-end training of a tiny random LLaMA."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import _hift_resume_worker as worker
from _optim_testutil import needs_kernels
from hift_ext.hift_optim import FusedHiFTAdamW, FusedHiFTSGD

pytestmark = needs_kernels

ROOT = Path(__file__).resolve().parents[1]


# KIND,STRATEGY,STEPS_PER_GROUP,OFFLOAD,HOLD: with steps_per_group=3 step 7 is in the middle of a
# block (its second step), with offload the active group's state is on the device when saved.
RESUME_JOBS = ["adamw,random,1,0,cycle", "adagrad,up2down,1,0,cycle", "sgd,down2up,1,0,cycle",
               "adamw,random,3,1,cycle", "sgd,up2down,3,1,visit", "adagrad,down2up,3,0,visit"]


def test_bitwise_resume_in_a_new_process(tmp_path):
    """For each optimizer: train 7 steps (mid-cycle; with steps_per_group=3 mid-block, with offload
    the block's group resident), save model + optimizer + scheduler, continue 9 steps here; a new
    python process loads the checkpoint into fresh objects (other random init) and runs the same 9
    steps: parameters, optimizer state and LRs are bitwise equal."""
    args, expected = [], {}
    for i, spec in enumerate(RESUME_JOBS):
        model, opt, sched = worker.build(init_seed=0, **worker.parse_job(spec))
        worker.train(model, opt, sched, 0, 7)
        if opt.steps_per_group > 1:
            assert opt.schedule.step_in_block == 1
            if opt.offload_engine is not None:
                assert opt.offload_engine.residency(opt.active_group) == "device"
        ckpt = tmp_path / f"{i}.ckpt.pt"
        torch.save(worker.checkpoint(model, opt, sched), ckpt)
        worker.train(model, opt, sched, 7, 9)
        expected[spec] = worker.result(model, opt)
        args += [spec, str(ckpt), str(tmp_path / f"{i}.out.pt"), "7", "9"]

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(ROOT / "tests")] + [p for p in [env.get("PYTHONPATH")] if p]
    )
    proc = subprocess.run(
        [sys.executable, worker.__file__, *args], env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for i, kind in enumerate(RESUME_JOBS):
        exp = expected[kind]
        got = torch.load(tmp_path / f"{i}.out.pt", weights_only=True)
        assert got["active"] == exp["active"], kind
        assert got["lrs"] == exp["lrs"], kind
        for i, (a, b) in enumerate(zip(exp["params"], got["params"])):
            assert torch.equal(a, b), f"{kind}: param {i} differs after resume"
        assert got["opt"]["hift"] == exp["opt"]["hift"], kind
        for i, st in exp["opt"]["state"].items():
            for k, v in st.items():
                assert torch.equal(v, got["opt"]["state"][i][k]), (kind, i, k)


# ------------------------------------------------------------------------------ tiny LLaMA
def tiny_llama(layers=3, tie=False, seed=0):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def _lm_batch(step, vocab=96):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, vocab, (2, 16), generator=g)


def test_tiny_llama_end_to_end_matches_per_group_torch_adamw():
    model = tiny_llama()
    ref = copy.deepcopy(model)
    opt = FusedHiFTAdamW(model, lr=2e-3, weight_decay=0.01, strategy="down2up")
    k = opt.num_groups
    assert k == 6  # embeddings, 3 blocks, final norm, lm_head
    assert any("embed_tokens" in n for n in opt.groups[0].param_names)
    assert any("lm_head" in n for n in opt.groups[-1].param_names)
    # reference: one torch.optim.AdamW per group, on the same parameters of the copy
    ref_params = dict(ref.named_parameters())
    ref_opts = [torch.optim.AdamW([ref_params[n] for n in g.param_names], lr=2e-3, weight_decay=0.01)
                for g in opt.groups]
    fixed = _lm_batch(0)
    with torch.no_grad():
        first = model(input_ids=fixed, labels=fixed).loss.item()
    for t in range(3 * k):
        ids = fixed
        opt.zero_grad()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        active = opt.active_group
        for i, g in enumerate(opt.groups):
            for p in g.params:
                assert (p.grad is not None) == (i == active)
        opt.step()
        ref.zero_grad(set_to_none=True)
        ref(input_ids=ids, labels=ids).loss.backward()
        ref_opts[t % k].step()
    with torch.no_grad():
        last = model(input_ids=fixed, labels=fixed).loss.item()
    assert last < first - 0.05
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")
    rep = opt.memory_report()
    assert rep["total_state_bytes"] == sum(2 * p.numel() * 4 + 4 for p in model.parameters())


def test_tiny_llama_tied_embeddings_and_group_size():
    model = tiny_llama(layers=4, tie=True)
    opt = FusedHiFTSGD(model, group_size=2, lr=0.05, momentum=0.9, strategy="random", seed=5)
    params = [p for g in opt.groups for p in g.params]
    assert len(params) == len({id(p) for p in params}) == len(list(model.parameters()))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert opt.num_groups == 3  # (embed, block0), (block1, block2), (block3, norm)
    for t in range(2 * opt.num_groups):
        ids = _lm_batch(t)
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    assert all(len(opt.state[p]) == 1 for p in params)  # every group trained (momentum buffers)
