"""Export to Hugging Face: SparseMixer-v2 -> PhiMoE, top-K -> Mixtral / Qwen3-MoE / Qwen2-MoE, latent attention ->
DeepSeek-V2/V3, sigmoid routing with grouped-query attention -> GLM-4-MoE, dense -> Llama / Qwen2 / Qwen3 / Phi-3,
loaded by transformers with the same logits; bf16, shards, tokenizer and generation config."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from megatron_moe.convert import export_hf
from megatron_moe.convert.export_hf import ExportError, export, parse_size
from megatron_moe.convert.hf import read_hf
from megatron_moe.convert.native import load_model, save_model_checkpoint
from megatron_moe.convert.source import ConversionError
from megatron_moe.convert.upcycle import UpcycleOptions, upcycle
from tests.convert.helpers import GLM_EXPORT, make_hf, save_native, tiny_config, tokens

ATOL = 1e-5  # float32 on both sides


def test_upcycled_moe_exports_to_mixtral_with_the_same_logits(tmp_path):
    from transformers import MixtralForCausalLM

    make_hf(tmp_path / "hf")
    # Noise makes the experts differ, so the routing decisions (top-2 of 4) matter for the logits.
    cfg, state = upcycle(read_hf(tmp_path / "hf"), UpcycleOptions(4, 2, expert_noise=0.5, router_init_std=0.5))
    save_model_checkpoint(tmp_path / "moe", cfg, state, "test")
    rc = export_hf.main(["--load", str(tmp_path / "moe"), "--output", str(tmp_path / "mixtral")])
    assert rc == 0
    config = json.loads((tmp_path / "mixtral" / "config.json").read_text())
    assert (config["model_type"], config["num_local_experts"], config["num_experts_per_tok"]) == ("mixtral", 4, 2)
    hf = MixtralForCausalLM.from_pretrained(tmp_path / "mixtral").eval()
    ours, _ = load_model(tmp_path / "moe")
    x = tokens(seq=24)
    with torch.no_grad():
        ref, got = hf(x).logits, ours(x)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    # The experts really differ: the same model with the expert order reversed gives other logits.
    for layer in ours.layers.values():
        for w in (layer.feed_forward.experts.w1, layer.feed_forward.experts.w3, layer.feed_forward.experts.w2):
            w.data = w.data.flip(0)
    with torch.no_grad():
        assert (ours(x) - ref).abs().max() > 1e-3


def test_sharded_export_with_tied_embeddings(tmp_path):
    from transformers import MixtralForCausalLM

    cfg = tiny_config(num_experts=4, topk=2)
    cfg.model.tie_embeddings = True
    ours = save_native(tmp_path / "moe", cfg, seed=1)
    export(tmp_path / "moe", tmp_path / "out", max_shard_bytes=30_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    hf = MixtralForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=ATOL, rtol=0)


def _exports_to_llama_with_the_same_logits(tmp_path, cfg, seed: int) -> torch.nn.Module:
    """Save a random native model of ``cfg``, export it, check transformers' Llama computes its logits."""
    from transformers import LlamaForCausalLM

    ours = save_native(tmp_path / "dense", cfg, seed=seed)
    export(tmp_path / "dense", tmp_path / "llama")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=ATOL, rtol=0)
    return ours


def test_dense_exports_to_llama(tmp_path):
    ours = _exports_to_llama_with_the_same_logits(tmp_path, tiny_config(num_experts=0), seed=2)
    # ... and the exported Llama round-trips through the HF reader.
    source = read_hf(tmp_path / "llama")
    for name, t in ours.state_dict().items():
        assert torch.equal(source.get(name), t), name


def test_zero_centred_norms_export_as_plain_weights(tmp_path):
    """A model trained with --apply-layernorm-1p stores w and scales by 1 + w; Hugging Face's Llama gets
    1 + w and computes the same logits."""
    cfg = tiny_config(num_experts=0)
    cfg.model.apply_layernorm_1p = True
    _exports_to_llama_with_the_same_logits(tmp_path, cfg, seed=5)


@pytest.mark.parametrize("moe,reason", [
    ({"router": "sparsemixer"}, "moe.router = 'sparsemixer'"),
    ({"logit_norm": True}, "moe.logit_norm"),
    ({"renormalize": False}, "moe.renormalize = false"),
    ({"first_k_dense": 1}, "moe.first_k_dense = 1"),
    ({"layer_freq": 2}, "moe.layer_freq = 2"),
    ({"normalization": "LayerNorm"}, "model.normalization = 'LayerNorm': Mixtral uses RMSNorm"),
    ({"add_qkv_bias": True}, "Mixtral has no attention or MLP biases"),
    ({"qk_layernorm": True}, "model.qk_layernorm = true: mixtral has no query/key norms (export as qwen3 or"),
])
def test_inexpressible_moe_is_explained_and_nothing_written(tmp_path, capsys, moe, reason):
    cfg = tiny_config(num_experts=4, topk=2, **moe)
    save_native(tmp_path / "moe", cfg)
    with pytest.raises(ExportError, match="cannot be exported as mixtral"):
        export(tmp_path / "moe", tmp_path / "out", architecture="mixtral")
    assert not (tmp_path / "out").exists()
    rc = export_hf.main(["--load", str(tmp_path / "moe"), "--output", str(tmp_path / "out"), "--architecture",
                         "mixtral"])
    assert rc == 2 and reason in capsys.readouterr().err


def test_all_reasons_are_listed(tmp_path):
    cfg = tiny_config(num_experts=4, topk=2, router="sparsemixer", logit_norm=True, first_k_dense=1)
    save_native(tmp_path / "moe", cfg)
    with pytest.raises(ExportError) as err:  # auto: SparseMixer-v2 -> phimoe, which needs LayerNorm
        export(tmp_path / "moe", tmp_path / "out")
    assert all(s in str(err.value) for s in ("cannot be exported as phimoe", "logit_norm", "first_k_dense",
                                             "PhiMoE uses LayerNorm"))
    cfg = tiny_config(num_experts=0, normalization="LayerNorm", lm_head_bias=True, add_bias_linear=True)
    save_native(tmp_path / "dense", cfg)
    with pytest.raises(ExportError) as err:
        export(tmp_path / "dense", tmp_path / "out")
    assert all(s in str(err.value) for s in ("Llama uses RMSNorm", "LM-head bias", "attention_bias covers"))


# The fields of GRIN-MoE's released config.json (besides auto_map, torch_dtype and the token ids).
GRIN_FIELDS = ("attention_bias", "attention_dropout", "hidden_act", "hidden_dropout", "hidden_size",
               "initializer_range", "input_jitter_noise", "intermediate_size", "lm_head_bias",
               "max_position_embeddings", "num_attention_heads", "num_experts_per_tok", "num_hidden_layers",
               "num_key_value_heads",
               "num_local_experts", "output_router_logits", "rms_norm_eps", "rope_theta", "router_aux_loss_coef",
               "router_jitter_noise", "sliding_window", "tie_word_embeddings", "use_cache", "vocab_size")


@pytest.mark.slow
def test_sparsemixer_model_exports_to_phimoe_with_grin_fields(tmp_path):
    from transformers import PhimoeForCausalLM

    cfg = tiny_config(num_experts=4, topk=2, router="sparsemixer", jitter_eps=0.03, input_jitter_eps=0.02,
                      normalization="LayerNorm", add_qkv_bias=True, add_bias_linear=True, lm_head_bias=True)
    ours = save_native(tmp_path / "moe", cfg, seed=3)
    with torch.no_grad():  # a sharper router, so that the relative window keeps fewer experts than all
        for layer in ours.layers.values():
            layer.feed_forward.router.gate.weight.mul_(20)
    save_model_checkpoint(tmp_path / "moe", cfg, ours.state_dict(), "test")
    config = export(tmp_path / "moe", tmp_path / "phimoe")
    assert config["model_type"] == "phimoe" and set(GRIN_FIELDS) <= set(config)
    assert (config["router_jitter_noise"], config["input_jitter_noise"]) == (0.03, 0.02)
    assert config["attention_bias"] and config["lm_head_bias"] and config["sliding_window"] is None
    hf = PhimoeForCausalLM.from_pretrained(tmp_path / "phimoe").eval()
    x = tokens(seq=24)
    with torch.no_grad():
        ref = hf(x).logits
        torch.testing.assert_close(ours(x), ref, atol=ATOL, rtol=0)
        for layer in ours.layers.values():  # routing matters: reversed experts give other logits
            layer.feed_forward.experts.w1.data = layer.feed_forward.experts.w1.data.flip(0)
        assert (ours(x) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("settings,arch,cls", [
    ({"add_qkv_bias": True}, "auto", "Qwen2ForCausalLM"),
    ({"add_qkv_bias": True, "add_bias_linear": True}, "auto", "LlamaForCausalLM"),
    ({"rope_scaling": "llama3", "rope_original_max_position": 16, "rope_theta": 5e5}, "auto", "LlamaForCausalLM"),
    ({"rope_scaling": "yarn", "rope_scaling_factor": 4.0, "rope_yarn_original_max_position": 16}, "auto",
     "LlamaForCausalLM"),
    ({}, "phi3", "Phi3ForCausalLM"),
    ({"rotary_percent": 0.75}, "auto", "Phi3ForCausalLM"),  # Phi-4-mini's partial rotary: the dense format for it
    ({"qk_layernorm": True, "kv_channels": 12}, "auto", "Qwen3ForCausalLM"),
    ({"qk_layernorm": True, "tie_embeddings": True, "apply_layernorm_1p": True}, "qwen3", "Qwen3ForCausalLM"),
    ({"kv_channels": 12}, "auto", "LlamaForCausalLM"),  # head_dim apart from hidden / heads
])
def test_dense_architectures(tmp_path, settings, arch, cls):
    import transformers

    cfg = tiny_config(num_experts=0, **settings)
    ours = save_native(tmp_path / "dense", cfg, seed=4)
    config = export(tmp_path / "dense", tmp_path / "out", architecture=arch)
    assert config["architectures"] == [cls]
    hf = getattr(transformers, cls).from_pretrained(tmp_path / "out").eval()
    x = tokens(seq=24)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=ATOL, rtol=0)
    if cfg.model.apply_layernorm_1p:
        return  # exported as 1 + w (the query/key norms too: the logits above), so read back as such
    source = read_hf(tmp_path / "out")  # ... and the export reads back into the same weights
    for name, t in ours.state_dict().items():
        assert torch.equal(source.get(name), t), name


@pytest.mark.slow
def test_bf16_shards_tokenizer_and_generation_config(tmp_path, loop_corpus):
    from safetensors import safe_open
    from transformers import AutoTokenizer, MixtralForCausalLM

    from megatron_moe.data.tokenizer import SentencePieceTokenizer

    cfg = tiny_config(num_experts=4, topk=2, vocab_size=320)
    cfg.data.tokenizer_model = loop_corpus["tokenizer"]
    ours = save_native(tmp_path / "moe", cfg, seed=5)
    rc = export_hf.main(["--load", str(tmp_path / "moe"), "--output", str(tmp_path / "out"), "--dtype", "bf16",
                         "--max-shard-size", "100KB"])
    assert rc == 0
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / f).stat().st_size <= 100_000 + 10_000 for f in shards)
    with safe_open(str(out / shards[0]), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    hf = MixtralForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():  # our model with its weights rounded to bf16 is transformers' fp32 model
        for p in ours.parameters():
            p.copy_(p.to(torch.bfloat16).float())
        x = tokens(vocab=320)
        torch.testing.assert_close(ours(x), hf(x).logits, atol=ATOL, rtol=0)
    sp = SentencePieceTokenizer(loop_corpus["tokenizer"])
    tok = AutoTokenizer.from_pretrained(out)
    for text in ("alpha beta,  gamma.\nthe expert", " leading and trailing  ", "unicode é ü 日本 42"):
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text), text
        assert tok.decode(sp.encode(text)) == text
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 3)


def test_imported_model_without_tokenizer_keeps_its_special_ids(tmp_path, capsys):
    import upcycle_checkpoint

    make_hf(tmp_path / "hf", "mixtral", bos_token_id=5, eos_token_id=7)
    assert upcycle_checkpoint.main(["--input", str(tmp_path / "hf"), "--input-format", "hf",
                                    "--output", str(tmp_path / "ours")]) == 0
    assert export_hf.main(["--load", str(tmp_path / "ours"), "--output", str(tmp_path / "out")]) == 0
    assert "without tokenizer" in capsys.readouterr().out
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (5, 7)
    assert not (tmp_path / "out" / "tokenizer.model").exists()


def test_parse_size():
    assert (parse_size("5GB"), parse_size("2GiB"), parse_size("500kb"), parse_size("1000")) == (
        5 * 10**9, 2 * 2**30, 500_000, 1000)
    for bad in ("5XB", "-1GB", "0", "GB"):
        with pytest.raises(ConversionError, match="--max-shard-size"):
            parse_size(bad)


def test_export_refuses_a_non_empty_output_unless_overwrite(tmp_path, capsys):
    save_native(tmp_path / "dense", tiny_config(num_experts=0), seed=2)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep me")
    argv = ["--load", str(tmp_path / "dense"), "--output", str(tmp_path / "out")]
    assert export_hf.main(argv) == 2
    assert "is not empty" in capsys.readouterr().err and sorted(os.listdir(tmp_path / "out")) == ["notes.txt"]
    assert export_hf.main(argv + ["--overwrite"]) == 0
    assert (tmp_path / "out" / "config.json").is_file() and (tmp_path / "out" / "notes.txt").read_text() == "keep me"


def _auto_export_logits(tmp_path, cfg, hf_class):
    """Save a random model of ``cfg``, export it (``--architecture auto``) to ``tmp_path / "out"``, load it as
    ``hf_class`` and check its logits equal ours; returns (our model, config.json dict, tokens, HF logits)."""
    ours = save_native(tmp_path / "moe", cfg, seed=3)
    config = export(tmp_path / "moe", tmp_path / "out")
    hf = hf_class.from_pretrained(tmp_path / "out").eval()
    x = tokens(seq=24)
    with torch.no_grad():
        ref = hf(x).logits
        torch.testing.assert_close(ours(x), ref, atol=ATOL, rtol=0)
    return ours, config, x, ref


@pytest.mark.parametrize("settings", [
    {"qk_layernorm": True, "kv_channels": 12},  # Qwen3-MoE's attention
    {"qk_layernorm": True, "first_k_dense": 1, "renormalize": False},  # a dense layer first, weights as picked
    {"qk_layernorm": True, "layer_freq": 2, "num_layers": 4},
])
def test_top_k_moe_exports_to_qwen3_moe_with_the_same_logits(tmp_path, settings):
    """Top-K MoE models with query/key norms (which Mixtral has not), also with dense layers between MoE
    ones or weights not renormalised, export as Qwen3-MoE (auto): transformers computes the same logits,
    the routing matters, and the export reads back into the same weights."""
    from transformers import Qwen3MoeForCausalLM

    cfg = tiny_config(num_experts=4, topk=2, **settings)
    ours, config, x, ref = _auto_export_logits(tmp_path, cfg, Qwen3MoeForCausalLM)
    assert config["model_type"] == "qwen3_moe" and config["norm_topk_prob"] == cfg.moe.renormalize
    dense_layers = [i for i, layer in ours.layers.items() if not hasattr(layer.feed_forward, "experts")]
    assert config["mlp_only_layers"] == [int(i) for i in dense_layers]
    source = read_hf(tmp_path / "out")
    read_back = {**vars(source.cfg.model), **vars(source.cfg.moe)}
    for key in ("kv_channels", "qk_layernorm", "num_layers", "first_k_dense", "layer_freq", "renormalize", "topk"):
        assert read_back[key] == {**vars(cfg.model), **vars(cfg.moe)}[key], key
    for name, t in ours.state_dict().items():
        assert torch.equal(source.get(name), t), name
    with torch.no_grad():  # routing matters: reversed experts give other logits
        for layer in ours.layers.values():
            if hasattr(layer.feed_forward, "experts"):
                layer.feed_forward.experts.w1.data = layer.feed_forward.experts.w1.data.flip(0)
        assert (ours(x) - ref).abs().max() > 1e-3


def test_qwen3_upcycled_to_moe_exports_as_qwen3_moe_computing_the_dense_models_function(tmp_path):
    """The path Qwen3 users take: a dense Qwen3 (query/key norms, 12-wide heads on hidden 32) upcycled to 4
    experts top-2, exported: transformers' Qwen3-MoE gives the dense Qwen3's logits."""
    from transformers import Qwen3MoeForCausalLM

    dense = make_hf(tmp_path / "hf", "qwen3")
    cfg, state = upcycle(read_hf(tmp_path / "hf"), UpcycleOptions(4, 2, router_init_std=0.5))
    save_model_checkpoint(tmp_path / "moe", cfg, state, "test")
    assert export(tmp_path / "moe", tmp_path / "out")["model_type"] == "qwen3_moe"
    hf = Qwen3MoeForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = tokens(seq=24)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, dense(x).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("settings,arch,reason", [
    ({"num_experts": 4, "router": "sparsemixer"}, "qwen3_moe", "moe.router = 'sparsemixer': Qwen3-MoE routes by top-K"),
    ({"num_experts": 4, "logit_norm": True}, "qwen3_moe", "Qwen3-MoE has no gating logit normalisation"),
    ({"num_experts": 0}, "qwen3", "model.qk_layernorm = false: Qwen3 always normalises"),
    ({"num_experts": 0, "qk_layernorm": True, "add_qkv_bias": True}, "qwen3", "Qwen3 has no attention or MLP biases"),
    ({"num_experts": 0, "qk_layernorm": True}, "qwen3_moe", "qwen3_moe is an MoE format"),
    # token dropping applies in evaluation too (as Megatron-LM's capacity); transformers' MoE models never drop
    ({"num_experts": 4, "dropless": False, "capacity_factor": 1.0}, "mixtral", "moe.dropless = false"),
    ({"num_experts": 4, "dropless": False, "capacity_factor": 1.0, "score_function": "sigmoid", "expert_bias": True,
      "shared_expert_ffn_hidden_size": 32}, "glm4_moe", "in transformers never does"),
])
def test_inexpressible_qwen3_exports_are_explained(tmp_path, settings, arch, reason):
    save_native(tmp_path / "m", tiny_config(**settings))
    with pytest.raises(ExportError, match=re.escape(reason)):
        export(tmp_path / "m", tmp_path / "out", architecture=arch)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("settings", [
    {"add_qkv_bias": True},  # Qwen1.5-MoE: q/k/v biases, top-K weights as picked
    {"renormalize": True, "first_k_dense": 1},
])
def test_shared_expert_moe_exports_to_qwen2_moe_with_the_same_logits(tmp_path, settings):
    """A top-K MoE with a sigmoid-gated shared expert exports as Qwen2-MoE (auto): transformers computes the
    same logits (the shared expert and its gate matter: zeroing the gate's weights changes them), and the
    export reads back into the same weights."""
    from transformers import Qwen2MoeForCausalLM

    cfg = tiny_config(**{"num_experts": 4, "topk": 2, "renormalize": False, "shared_expert_ffn_hidden_size": 40,
                         "shared_expert_gate": True, **settings})
    ours, config, x, ref = _auto_export_logits(tmp_path, cfg, Qwen2MoeForCausalLM)
    assert config["model_type"] == "qwen2_moe" and config["shared_expert_intermediate_size"] == 40
    assert config["qkv_bias"] == cfg.model.add_qkv_bias and config["norm_topk_prob"] == cfg.moe.renormalize
    source = read_hf(tmp_path / "out")
    assert (source.cfg.moe.shared_expert_ffn_hidden_size, source.cfg.moe.shared_expert_gate) == (40, True)
    for name, t in ours.state_dict().items():
        assert torch.equal(source.get(name), t), name
    with torch.no_grad():
        for layer in ours.layers.values():
            if hasattr(layer.feed_forward, "shared_gate"):
                layer.feed_forward.shared_gate.weight.zero_()  # sigmoid(0) = 1/2 instead of the learned scale
        assert (ours(x) - ref).abs().max() > 1e-4


@pytest.mark.parametrize("settings,arch,reason", [
    ({"shared_expert_ffn_hidden_size": 40}, "qwen2_moe", "Qwen2-MoE always has a shared expert with a sigmoid gate"),
    ({}, "qwen2_moe", "Qwen2-MoE always has a shared expert"),
    ({"shared_expert_ffn_hidden_size": 40}, "mixtral", "mixtral has no shared expert (export as qwen2_moe)"),
    ({"shared_expert_ffn_hidden_size": 40, "shared_expert_gate": True, "qk_layernorm": True}, "qwen2_moe",
     "Qwen2-MoE has no query/key norms"),
])
def test_inexpressible_shared_expert_exports_are_explained(tmp_path, settings, arch, reason):
    save_native(tmp_path / "m", tiny_config(num_experts=4, topk=2, **settings))
    with pytest.raises(ExportError, match=re.escape(reason)):
        export(tmp_path / "m", tmp_path / "out", architecture=arch)
    assert not (tmp_path / "out").exists()


MLA_EXPORT = dict(num_attention_heads=4, num_query_groups=0, multi_latent_attention=True, kv_lora_rank=12,
                  qk_head_dim=6, qk_pos_emb_head_dim=4, v_head_dim=5, qk_layernorm=True, norm_eps=1e-6,
                  num_experts=8, topk=2, expert_ffn_hidden_size=16, score_function="sigmoid", expert_bias=True,
                  shared_expert_ffn_hidden_size=32, first_k_dense=1)


@pytest.mark.parametrize("settings", [
    {"q_lora_rank": 16, "topk": 4, "router_num_groups": 4, "router_group_topk": 2, "topk_scaling_factor": 2.5},
    {"renormalize": False, "first_k_dense": 0, "num_layers": 3},  # queries straight from the hidden state
    {"norm_eps": 1e-5, "latent_norm_eps": 1e-6},  # Moonlight's eps, the latents' as transformers has them
    # DeepSeek-V3's YaRN (its softmax scaled by m(40, 1)^2), positions beyond an original context of 16
    {"rope_scaling": "yarn", "rope_scaling_factor": 40.0, "rope_yarn_mscale_all_dim": 1.0,
     "rope_yarn_original_max_position": 16},
])
def test_latent_attention_moe_exports_to_deepseek_v3_with_the_same_logits(tmp_path, settings):
    """DeepSeek-V3's architecture (latent attention, sigmoid routing with expert biases, groups, scaled weights, a
    shared expert, a dense layer first) exports as deepseek_v3 (auto): transformers computes the same logits, the
    rotary channels' interleaving matters (writing them in halves changes the logits), and the export reads back
    into the same weights."""
    from transformers import DeepseekV3ForCausalLM

    cfg = tiny_config(**{**MLA_EXPORT, **settings})
    ours, config, x, ref = _auto_export_logits(tmp_path, cfg, DeepseekV3ForCausalLM)
    assert config["model_type"] == "deepseek_v3" and config["n_shared_experts"] == 2 and config["rope_interleave"]
    assert config["q_lora_rank"] == (cfg.model.q_lora_rank or None)
    source = read_hf(tmp_path / "out")
    for name, t in ours.state_dict().items():
        assert torch.equal(source.get(name), t), name
    config["rope_interleave"] = False  # the same tensors read with the rotary channels in halves
    (tmp_path / "out" / "config.json").write_text(json.dumps(config))
    with torch.no_grad():
        assert (DeepseekV3ForCausalLM.from_pretrained(tmp_path / "out").eval()(x).logits - ref).abs().max() > 1e-4


def test_latent_attention_with_softmax_routing_exports_to_deepseek_v2(tmp_path):
    """DeepSeek-V2's architecture (latent attention, top-K softmax probabilities as they are, scaled, groups
    scored by their best expert, shared experts, a dense layer first, V2-Lite's YaRN) exports as deepseek_v2 (auto):
    transformers computes the same logits and the export reads back into the same weights."""
    from transformers import DeepseekV2ForCausalLM

    cfg = tiny_config(**{**MLA_EXPORT, "score_function": "softmax", "expert_bias": False, "renormalize": False,
                         "topk_scaling_factor": 1.5, "router_num_groups": 4, "router_group_topk": 2,
                         "rope_scaling": "yarn", "rope_scaling_factor": 40.0, "rope_yarn_mscale": 0.707,
                         "rope_yarn_mscale_all_dim": 0.707, "rope_yarn_original_max_position": 16})
    ours, config, x, ref = _auto_export_logits(tmp_path, cfg, DeepseekV2ForCausalLM)
    assert config["model_type"] == "deepseek_v2" and config["topk_method"] == "group_limited_greedy"
    source = read_hf(tmp_path / "out")
    for name, t in ours.state_dict().items():
        assert torch.equal(source.get(name), t), name
    for settings, reason in (({"renormalize": True}, "takes the top-K probabilities as they are"),
                             ({"router_group_topk": 1}, "scores groups by their best expert")):
        save_native(tmp_path / "bad", tiny_config(**{**MLA_EXPORT, "score_function": "softmax", "expert_bias": False,
                                                     "renormalize": False, "router_num_groups": 4,
                                                     "router_group_topk": 2, **settings}))
        with pytest.raises(ExportError, match=reason):
            export(tmp_path / "bad", tmp_path / "bad_out", architecture="deepseek_v2")


def test_multi_token_prediction_is_left_out_of_formats_without_it(tmp_path):
    """Multi-token prediction is training only: a Qwen3-MoE export of a model with a depth leaves the depth out, and
    transformers computes the main model's logits (DeepSeek-V3's format holds it: tests/convert/test_hf_import.py)."""
    from transformers import Qwen3MoeForCausalLM

    ours = save_native(tmp_path / "m", tiny_config(num_experts=4, topk=2, qk_layernorm=True, mtp_num_layers=1), seed=3)
    assert export(tmp_path / "m", tmp_path / "out")["model_type"] == "qwen3_moe"
    hf = Qwen3MoeForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = tokens(seq=24)
    with torch.no_grad():
        logits, *predictions = ours(x)
        torch.testing.assert_close(logits, hf(x).logits, atol=ATOL, rtol=0)
    assert len(predictions) == 1 and read_hf(tmp_path / "out").cfg.model.mtp_num_layers == 0


@pytest.mark.parametrize("arch,settings", [("deepseek_v3", MLA_EXPORT), ("glm4_moe", GLM_EXPORT)])
def test_deepseek_v3_bf16_export_keeps_the_router_and_expert_bias_in_float32(tmp_path, arch, settings):
    """transformers keeps DeepSeek-V3's (and GLM-4-MoE's) router weight and e_score_correction_bias in float32 (a bf16
    bias would choose other experts for some tokens): a bf16 export writes them so, everything else in bf16."""
    from safetensors import safe_open

    save_native(tmp_path / "m", tiny_config(**settings))
    assert export(tmp_path / "m", tmp_path / "out", dtype="bf16")["model_type"] == arch
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as f:
        dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}
    kept = {k for k in dtypes if k.endswith(("mlp.gate.weight", "e_score_correction_bias"))}
    assert len(kept) == 2 and all(dtypes[k] == torch.float32 for k in kept), kept  # the one MoE layer's
    assert all(dtypes[k] == torch.bfloat16 for k in set(dtypes) - kept)


@pytest.mark.parametrize("settings,arch,reason", [
    ({"score_function": "sigmoid", "topk_scaling_factor": 2.5}, "mixtral",
     "moe.score_function = 'sigmoid': mixtral routes by softmax (sigmoid routing exports as glm4_moe, or deepseek_v3"),
    ({"score_function": "sigmoid"}, "deepseek_v3", "DeepSeek-V3 always has latent attention with normalised latents"),
    ({**MLA_EXPORT, "shared_expert_ffn_hidden_size": 24}, "deepseek_v3", "n_shared_experts x 16"),
    ({**MLA_EXPORT, "topk": 2, "router_num_groups": 4, "router_group_topk": 2}, "deepseek_v3",
     "groups by their top 2 experts"),
    ({**MLA_EXPORT, "norm_eps": 1e-5}, "deepseek_v3", "model.latent_norm_eps = 1e-05 (0: model.norm_eps)"),
    ({**MLA_EXPORT, "score_function": "softmax", "expert_bias": False}, "deepseek_v3", "top-K sigmoid scores"),
    (MLA_EXPORT, "qwen3_moe", "model.multi_latent_attention = true: qwen3_moe has grouped-query attention"),
    ({**MLA_EXPORT, "rope_scaling": "yarn", "rope_scaling_factor": 4.0, "rope_yarn_mscale": 0.7}, "deepseek_v3",
     "model.rope_yarn_mscale = 0.7 with model.rope_yarn_mscale_all_dim = 0: transformers scales"),
    ({"rope_scaling": "yarn", "rope_scaling_factor": 4.0, "rope_yarn_mscale": 0.0, "rope_yarn_mscale_all_dim": 1.0,
      "num_experts": 0}, "llama", "model.rope_yarn_mscale = 0 with model.rope_yarn_mscale_all_dim = 1"),
    ({"rope_scaling": "yarn", "rope_scaling_factor": 4.0}, "mixtral",
     "exported for llama, deepseek_v3 and glm4_moe only"),
])
def test_inexpressible_deepseek_exports_are_explained(tmp_path, settings, arch, reason):
    save_native(tmp_path / "m", tiny_config(**{"num_experts": 4, "topk": 2, **settings}))
    with pytest.raises(ExportError, match=re.escape(reason)):
        export(tmp_path / "m", tmp_path / "out", architecture=arch)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("settings", [
    {},  # GLM-4.5's attention: q/k/v biases, query/key norms, half the channels rotated
    # GLM-4.5-Air's: no query/key norms; here also all channels rotated, one group, weights as picked, no dense layer
    {"qk_layernorm": False, "rotary_percent": 1.0, "router_num_groups": 0, "router_group_topk": 0, "topk": 2,
     "renormalize": False, "first_k_dense": 0, "num_layers": 3, "topk_scaling_factor": 1.0},
    {"add_qkv_bias": False, "kv_channels": 0, "rotary_percent": 0.25, "expert_bias": False},  # 2 of 8 channels
    # YaRN with partial rotary (transformers' correction range over the rotated channels, as here)
    {"rope_scaling": "yarn", "rope_scaling_factor": 4.0, "rope_yarn_original_max_position": 16},
])
def test_sigmoid_routing_with_grouped_query_attention_exports_to_glm4_moe(tmp_path, settings):
    """GLM-4-MoE's architecture (grouped-query attention with q/k/v biases, query/key norms and partial rotary,
    DeepSeek-V3's MoE layer) exports as glm4_moe (auto): partial_rotary_factor is written (transformers' default is
    0.5), transformers computes the same logits, the rotary fraction and the routing matter, and the export reads back
    into the same weights and settings."""
    from transformers import Glm4MoeForCausalLM

    cfg = tiny_config(**{**GLM_EXPORT, **settings})
    ours, config, x, ref = _auto_export_logits(tmp_path, cfg, Glm4MoeForCausalLM)
    m = cfg.model
    assert (config["model_type"], config["partial_rotary_factor"], config["rope_parameters"]["partial_rotary_factor"],
            config["attention_bias"], config["use_qk_norm"], config["head_dim"]) == (
        "glm4_moe", m.rotary_percent, m.rotary_percent, m.add_qkv_bias, m.qk_layernorm, m.head_dim)
    source = read_hf(tmp_path / "out")
    read_back = {**vars(source.cfg.model), **vars(source.cfg.moe)}
    for key in ("rotary_percent", "kv_channels", "qk_layernorm", "add_qkv_bias", "rope_scaling", "topk",
                "router_group_topk", "renormalize", "topk_scaling_factor", "first_k_dense",
                "shared_expert_ffn_hidden_size"):
        assert read_back[key] == {**vars(cfg.model), **vars(cfg.moe)}[key], key
    for name, t in ours.state_dict().items():
        assert torch.equal(source.get(name), t), name
    other = 1.0 if m.rotary_percent != 1 else 0.5  # the same tensors with another rotary fraction
    config["rope_parameters"]["partial_rotary_factor"] = config["partial_rotary_factor"] = other
    (tmp_path / "out" / "config.json").write_text(json.dumps(config))
    with torch.no_grad():
        assert (Glm4MoeForCausalLM.from_pretrained(tmp_path / "out").eval()(x).logits - ref).abs().max() > 1e-4
        for layer in ours.layers.values():  # routing matters: reversed experts give other logits
            if hasattr(layer.feed_forward, "experts"):
                layer.feed_forward.experts.w1.data = layer.feed_forward.experts.w1.data.flip(0)
        assert (ours(x) - ref).abs().max() > 1e-4


@pytest.mark.parametrize("settings,arch,reason", [
    ({"score_function": "softmax", "expert_bias": False, "topk_scaling_factor": 1.0}, "glm4_moe",
     "GLM-4-MoE routes by top-K sigmoid scores (softmax exports as qwen3_moe, qwen2_moe or mixtral)"),
    ({"add_bias_linear": True}, "glm4_moe", "GLM-4-MoE's only biases are on q, k and v"),
    ({"lm_head_bias": True}, "glm4_moe", "GLM-4-MoE's only biases are on q, k and v"),
    ({"normalization": "LayerNorm"}, "glm4_moe", "model.normalization = 'LayerNorm': GLM-4-MoE uses RMSNorm"),
    ({"shared_expert_gate": True}, "glm4_moe", "GLM-4-MoE has an ungated shared expert of n_shared_experts x 16"),
    ({"shared_expert_ffn_hidden_size": 0}, "auto", "GLM-4-MoE has an ungated shared expert"),
    ({"shared_expert_ffn_hidden_size": 24}, "glm4_moe", "moe.shared_expert_ffn_hidden_size = 24"),
    ({"first_k_dense": 0, "layer_freq": 2}, "glm4_moe", "moe.layer_freq = 2: GLM-4-MoE's dense layers are the first"),
    ({"logit_norm": True}, "glm4_moe", "moe.logit_norm = true: GLM-4-MoE has no gating logit normalisation"),
    ({"topk": 2}, "glm4_moe", "GLM-4-MoE scores groups by their top 2 experts"),
    ({"rope_scaling": "llama3", "rope_original_max_position": 16}, "glm4_moe",
     "model.rope_scaling = 'llama3': GLM-4-MoE's configs carry default RoPE or YaRN"),
    ({"num_experts": 0}, "glm4_moe", "glm4_moe is an MoE format"),
    ({**MLA_EXPORT, "rotary_percent": 1.0, "kv_channels": 0, "add_qkv_bias": False}, "glm4_moe",
     "model.multi_latent_attention = true: GLM-4-MoE has grouped-query attention (export as deepseek_v3)"),
    # partial rotary: every other format rotates whole heads
    ({}, "deepseek_v3", "model.rotary_percent = 0.5: deepseek_v3 rotates every channel of a head (partial rotary "
                        "exports as glm4_moe, or phi3 for dense models)"),
    ({"score_function": "softmax", "expert_bias": False, "topk_scaling_factor": 1.0, "router_group_topk": 0,
      "router_num_groups": 0, "shared_expert_ffn_hidden_size": 0, "first_k_dense": 0}, "auto",
     "model.rotary_percent = 0.5: qwen3_moe rotates every channel of a head"),
    ({"num_experts": 0, "qk_layernorm": False, "add_qkv_bias": False}, "llama",
     "model.rotary_percent = 0.5: llama rotates every channel"),
])
def test_inexpressible_glm4_moe_and_partial_rotary_exports_are_explained(tmp_path, settings, arch, reason):
    save_native(tmp_path / "m", tiny_config(**{**GLM_EXPORT, **settings}))
    with pytest.raises(ExportError, match=re.escape(reason)):
        export(tmp_path / "m", tmp_path / "out", architecture=arch)
    assert not (tmp_path / "out").exists()
