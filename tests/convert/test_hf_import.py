"""Hugging Face checkpoints imported as they are (no upcycling): every supported architecture gives
transformers' own logits; the config records the architecture and the router; bad inputs are named.

Tolerance: 1e-6 relative to the largest logit (float32 on both sides; the sums run in different
orders, observed ~2e-7).
"""

from __future__ import annotations

import json

import pytest
import torch

import upcycle_checkpoint
from megatron_moe.convert.hf import read_hf
from megatron_moe.convert.native import load_model
from megatron_moe.convert.source import ConversionError
from megatron_moe.training.checkpoint import read_meta, resolve_checkpoint
from tests.convert.helpers import make_hf, tokens

REL = 1e-6
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 500000.0}


def import_cli(capsys, src, out, *extra) -> tuple[int, str, str]:
    rc = upcycle_checkpoint.main(["--input", str(src), "--input-format", "hf", "--output", str(out), *map(str, extra)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def verified_relative_difference(out: str) -> float:
    line = next(line for line in out.splitlines() if line.startswith("verify:"))
    return float(line.split("(relative ")[1].split(")")[0])


@pytest.mark.parametrize("model_type,overrides,expect", [
    ("llama", {"rope_parameters": LLAMA3_ROPE},
     {"rope_scaling": "llama3", "rope_theta": 500000.0, "rope_original_max_position": 16, "num_experts": 0}),
    ("llama", {"attention_bias": True, "mlp_bias": True}, {"add_qkv_bias": True, "add_bias_linear": True}),
    ("qwen2", {}, {"add_qkv_bias": True, "add_bias_linear": False, "num_experts": 0}),
    ("phi3", {"bos_token_id": 1, "eos_token_id": 2}, {"add_qkv_bias": False, "num_experts": 0}),
    pytest.param("mixtral", {"router_jitter_noise": 0.1},
                 {"router": "topk", "topk": 2, "renormalize": True, "input_jitter_eps": 0.1, "num_experts": 4},
                 marks=pytest.mark.slow),
    pytest.param("phimoe", {"router_jitter_noise": 0.03, "input_jitter_noise": 0.02},
                 {"router": "sparsemixer", "jitter_eps": 0.03, "input_jitter_eps": 0.02, "normalization": "LayerNorm",
                  "add_qkv_bias": True, "add_bias_linear": True, "lm_head_bias": True, "num_experts": 4},
                 marks=pytest.mark.slow),
    ("qwen3", {}, {"qk_layernorm": True, "kv_channels": 12, "normalization": "RMSNorm", "num_experts": 0}),
    ("mistral", {"head_dim": 12}, {"kv_channels": 12, "qk_layernorm": False}),  # Mistral-Nemo's head_dim
    pytest.param("qwen3_moe", {}, {"router": "topk", "renormalize": True, "num_experts": 4, "topk": 2,
                                   "expert_ffn_hidden_size": 24, "ffn_hidden_size": 64, "qk_layernorm": True,
                                   "kv_channels": 12, "first_k_dense": 0, "layer_freq": 1}, marks=pytest.mark.slow),
    pytest.param("qwen3_moe", {"norm_topk_prob": False, "num_hidden_layers": 4, "decoder_sparse_step": 2},
                 {"renormalize": False, "first_k_dense": 1, "layer_freq": 2}, marks=pytest.mark.slow),
    pytest.param("qwen3_moe", {"mlp_only_layers": [0], "num_hidden_layers": 3}, {"first_k_dense": 1, "layer_freq": 1},
                 marks=pytest.mark.slow),
    pytest.param("qwen2_moe", {}, {"router": "topk", "renormalize": False, "num_experts": 4,
                                   "expert_ffn_hidden_size": 24, "shared_expert_ffn_hidden_size": 40,
                                   "shared_expert_gate": True, "add_qkv_bias": True, "add_bias_linear": False,
                                   "qk_layernorm": False},
                 marks=pytest.mark.slow),
    pytest.param("qwen2_moe", {"qkv_bias": False, "norm_topk_prob": True, "num_hidden_layers": 4,
                               "decoder_sparse_step": 2},
                 {"add_qkv_bias": False, "renormalize": True, "first_k_dense": 1, "layer_freq": 2},
                 marks=pytest.mark.slow),
    ("deepseek_v3", {}, {"multi_latent_attention": True, "q_lora_rank": 16, "kv_lora_rank": 12, "qk_head_dim": 6,
                         "qk_pos_emb_head_dim": 4, "v_head_dim": 5, "qk_layernorm": True, "num_experts": 16, "topk": 4,
                         "score_function": "sigmoid", "expert_bias": True, "topk_scaling_factor": 2.5,
                         "router_num_groups": 4, "router_group_topk": 2, "shared_expert_ffn_hidden_size": 48,
                         "first_k_dense": 1, "renormalize": True}),
    # DeepSeek-V3's and Kimi-K2's YaRN (mscales 1: cos/sin as they are, the softmax scaled by m(40, 1)^2 = 1.87), an
    # original context of 16 so that the 24 positions compared reach beyond it; Qwen2.5's YaRN on a GQA model
    pytest.param("deepseek_v3", {"rope_parameters": {"rope_type": "yarn", "factor": 40.0, "rope_theta": 1e4,
                                                     "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32,
                                                     "beta_slow": 1, "original_max_position_embeddings": 16}},
                 {"rope_scaling": "yarn", "rope_scaling_factor": 40.0, "rope_yarn_original_max_position": 16,
                  "rope_yarn_mscale": 1.0, "rope_yarn_mscale_all_dim": 1.0}, marks=pytest.mark.slow),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                   "original_max_position_embeddings": 16}},
     {"rope_scaling": "yarn", "rope_scaling_factor": 4.0, "rope_yarn_mscale": 1.0, "rope_yarn_mscale_all_dim": 0.0}),
    # DeepSeek-V2-Lite's layout and YaRN; DeepSeek-V2's group-limited routing (groups scored by their best expert)
    ("deepseek_v2", {}, {"multi_latent_attention": True, "q_lora_rank": 0, "score_function": "softmax",
                         "renormalize": False, "expert_bias": False, "topk_scaling_factor": 1.5, "first_k_dense": 1,
                         "shared_expert_ffn_hidden_size": 48, "rope_scaling": "yarn", "rope_yarn_mscale": 0.707,
                         "rope_yarn_mscale_all_dim": 0.707}),
    pytest.param("deepseek_v2", {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
                                 "q_lora_rank": 16, "norm_topk_prob": True},
                 {"router_num_groups": 4, "router_group_topk": 2, "q_lora_rank": 16, "renormalize": False},
                 marks=pytest.mark.slow),
    # Moonlight's layout: no query latent, one group; here also weights as picked and rotary channels in halves
    # (and its rms_norm_eps 1e-5, which transformers does not apply to the latents: they keep 1e-6)
    pytest.param("deepseek_v3", {"q_lora_rank": None, "n_group": 1, "topk_group": 1, "norm_topk_prob": False,
                                 "first_k_dense_replace": 0, "rope_interleave": False, "rms_norm_eps": 1e-5},
                 {"q_lora_rank": 0, "router_group_topk": 0, "renormalize": False, "first_k_dense": 0,
                  "norm_eps": 1e-5, "latent_norm_eps": 1e-6},
                 marks=pytest.mark.slow),
    # GLM-4.5's layout: q/k/v biases, query/key norms, 12-wide heads of which the first 6 channels rotate, DeepSeek-V3's
    # MoE layer (groups, expert bias, scaling, shared experts, a dense layer first)
    ("glm4_moe", {}, {"rotary_percent": 0.5, "kv_channels": 12, "qk_layernorm": True, "add_qkv_bias": True,
                      "add_bias_linear": False, "multi_latent_attention": False, "num_query_groups": 2,
                      "num_experts": 16, "topk": 4, "score_function": "sigmoid", "expert_bias": True,
                      "topk_scaling_factor": 2.5, "router_num_groups": 4, "router_group_topk": 2,
                      "shared_expert_ffn_hidden_size": 48, "first_k_dense": 1, "renormalize": True}),
    # GLM-4.5-Air's: no query/key norms; here also no biases, one group, weights as picked, a quarter of 16 channels
    pytest.param("glm4_moe", {"use_qk_norm": False, "attention_bias": False, "head_dim": 16,
                              "partial_rotary_factor": 0.25, "n_group": 1, "topk_group": 1, "norm_topk_prob": False,
                              "num_experts_per_tok": 2, "routed_scaling_factor": 1.0},
                 {"rotary_percent": 0.25, "kv_channels": 16, "qk_layernorm": False, "add_qkv_bias": False,
                  "router_group_topk": 0, "renormalize": False, "topk": 2, "topk_scaling_factor": 1.0},
                 marks=pytest.mark.slow),
    # Phi-4-mini's partial rotary: the first 6 of 8 channels
    ("phi3", {"partial_rotary_factor": 0.75}, {"rotary_percent": 0.75}),
    # YaRN over the rotated half (transformers' correction range over those channels, as here)
    pytest.param("glm4_moe", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                                  "original_max_position_embeddings": 16,
                                                  "partial_rotary_factor": 0.5}},
                 {"rope_scaling": "yarn", "rope_scaling_factor": 4.0, "rotary_percent": 0.5},
                 marks=pytest.mark.slow),
])
def test_import_gives_transformers_logits(tmp_path, capsys, model_type, overrides, expect):
    hf = make_hf(tmp_path / "hf", model_type, **overrides)
    rc, out, err = import_cli(capsys, tmp_path / "hf", tmp_path / "ours", "--verify")
    assert rc == 0, err
    assert verified_relative_difference(out) < REL, out
    ours, meta = load_model(tmp_path / "ours")
    settings = {**vars(ours.cfg.model), **vars(ours.cfg.moe)}
    assert {k: settings[k] for k in expect} == expect
    assert meta["hf_import"]["model_type"] == model_type and "upcycling" not in meta and meta["step"] == 0
    x = tokens(seq=24)
    with torch.no_grad():
        ref, got = hf(x).logits, ours(x)
    torch.testing.assert_close(got, ref, atol=REL * ref.abs().max().item(), rtol=0)
    if ours.cfg.moe.num_experts:  # the experts differ: routing decides the logits (reversed experts differ)
        for layer in ours.layers.values():
            if not hasattr(layer.feed_forward, "experts"):
                continue  # a dense layer (qwen3_moe's mlp_only_layers / decoder_sparse_step)
            experts = layer.feed_forward.experts
            for w in (experts.w1, experts.w3, experts.w2):
                w.data = w.data.flip(0)
        with torch.no_grad():
            assert (ours(x) - ref).abs().max() > 1e-4


def test_grin_moe_released_config_imports_as_phimoe(tmp_path, capsys):
    """GRIN-MoE's config.json says model_type grinmoe (remote code); its format is PhiMoE's."""
    make_hf(tmp_path / "hf", "phimoe", sliding_window=32)
    path = tmp_path / "hf" / "config.json"
    config = json.loads(path.read_text())
    config.update(model_type="grinmoe", architectures=["GRIN-MoE"], rope_parameters=None, rope_theta=10000.0,
                  auto_map={"AutoConfig": "configuration_grinmoe.GRINMoEConfig"})
    path.write_text(json.dumps(config))
    rc, out, err = import_cli(capsys, tmp_path / "hf", tmp_path / "ours", "--verify")
    assert rc == 0, err
    assert verified_relative_difference(out) < REL
    assert "sliding_window = 32" in out  # the window became the sequence length, with a note
    ours, _ = load_model(tmp_path / "ours")
    assert (ours.cfg.data.seq_length, ours.cfg.model.rope_theta, ours.cfg.moe.router) == (32, 1e4, "sparsemixer")


# DeepSeek-V3's released config.json (deepseek-ai/DeepSeek-V3), as its fields are, without the quantization.
DEEPSEEK_V3_RELEASED = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "aux_loss_alpha": 0.001, "ep_size": 1,
    "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "moe_intermediate_size": 2048, "moe_layer_freq": 1,
    "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "v_head_dim": 128, "vocab_size": 129280,
}


def test_deepseek_v3_released_config_maps_onto_the_model():
    """Every field of DeepSeek-V3's released config.json that shapes the model (latent attention, YaRN with its
    old ``type`` key, groups, scaling, shared expert, three dense layers) maps onto the settings; its fp8
    checkpoint (quantization_config) is refused naming it."""
    from megatron_moe.convert.hf_config import config_from_hf

    cfg = config_from_hf(DEEPSEEK_V3_RELEASED)
    m, e = cfg.model, cfg.moe
    assert (m.multi_latent_attention, m.q_lora_rank, m.kv_lora_rank, m.qk_head_dim, m.qk_pos_emb_head_dim,
            m.v_head_dim, m.qk_layernorm, m.latent_norm_eps) == (True, 1536, 512, 128, 64, 128, True, 1e-6)
    assert (m.rope_scaling, m.rope_scaling_factor, m.rope_yarn_original_max_position, m.rope_yarn_mscale,
            m.rope_yarn_mscale_all_dim, m.rope_theta) == ("yarn", 40.0, 4096, 1.0, 1.0, 10000.0)
    assert (e.num_experts, e.topk, e.expert_ffn_hidden_size, e.shared_expert_ffn_hidden_size, e.first_k_dense,
            e.router_num_groups, e.router_group_topk, e.topk_scaling_factor, e.score_function, e.expert_bias,
            e.renormalize) == (256, 8, 2048, 2048, 3, 8, 4, 2.5, "sigmoid", True, True)
    assert (m.num_layers, m.dense_ffn_size, m.vocab_size, m.num_attention_heads) == (61, 18432, 129280, 128)
    quantized = {**DEEPSEEK_V3_RELEASED, "quantization_config": {"quant_method": "fp8", "fmt": "e4m3"}}
    with pytest.raises(ConversionError, match="quantization_config .quant_method 'fp8'.: quantized weights"):
        config_from_hf(quantized)


@pytest.mark.parametrize("arch", ["deepseek_v3", "glm4_moe"])
def test_multi_token_prediction_depths_read_back_and_transformers_leaves_them(tmp_path, arch):
    """DeepSeek-V3's (and GLM-4-MoE's) multi-token prediction module is the layer after the last
    (num_nextn_predict_layers): an export of a model with a depth writes it there (its block, enorm, hnorm, eh_proj,
    shared_head.norm and copies of the embedding and output layer), transformers loads the main model and ignores it,
    and the import reads every tensor back bit-exactly into the depth; a transformers-saved checkpoint (config says 1
    depth, no tensors) imports without one, and an MTP tensor the config does not declare is refused."""
    import transformers

    from megatron_moe.convert.export_hf import export
    from tests.convert.helpers import GLM_EXPORT, save_native, tiny_config
    from tests.convert.test_export_hf import MLA_EXPORT

    hf_class = getattr(transformers, {"deepseek_v3": "DeepseekV3ForCausalLM", "glm4_moe": "Glm4MoeForCausalLM"}[arch])
    settings = MLA_EXPORT if arch == "deepseek_v3" else GLM_EXPORT
    ours = save_native(tmp_path / "m", tiny_config(**settings, mtp_num_layers=1), seed=3)
    config = export(tmp_path / "m", tmp_path / "hf")
    assert (config["model_type"], config["num_nextn_predict_layers"]) == (arch, 1)
    x = tokens(seq=24)
    with torch.no_grad():
        torch.testing.assert_close(hf_class.from_pretrained(tmp_path / "hf").eval()(x).logits,
                                   ours(x)[0], atol=1e-5, rtol=0)
    source = read_hf(tmp_path / "hf")
    assert source.cfg.model.mtp_num_layers == 1
    got = source.state_dict()
    assert set(got) == set(ours.state_dict()) and any(name.startswith("mtp.0.") for name in got)
    for name, t in ours.state_dict().items():
        assert torch.equal(got[name], t), name
    # what the depth computes, from the exported tensors as vLLM's DeepSeek (and GLM-4-MoE) MTP reads them
    # (transformers' decoder layer for the block, loaded as a third layer), with h the main model's final-norm output:
    # logits(shared_head.norm(block(eh_proj [enorm(emb(t_{i+1})); hnorm(h_i)])))
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "hf" / "model.safetensors"))
    big_config = {**json.loads((tmp_path / "hf" / "config.json").read_text()), "num_hidden_layers": 3}
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "config.json").write_text(json.dumps(big_config))
    (tmp_path / "big" / "model.safetensors").symlink_to(tmp_path / "hf" / "model.safetensors")
    big = hf_class.from_pretrained(tmp_path / "big").eval()

    def rms(t, name):
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * weights[f"model.layers.2.{name}.weight"]

    with torch.no_grad():
        main = hf_class.from_pretrained(tmp_path / "hf").eval()
        h = main(x, output_hidden_states=True).hidden_states[-1]
        s = x.shape[1] - 1
        y = torch.cat([rms(big.model.embed_tokens(x[:, 1:]), "enorm"), rms(h[:, :s], "hnorm")], -1)
        y = y @ weights["model.layers.2.eh_proj.weight"].t()
        positions = torch.arange(s)[None]
        y = big.model.layers[2](y, position_ids=positions, position_embeddings=big.model.rotary_emb(y, positions))
        y = y[0] if isinstance(y, tuple) else y
        reference = rms(y, "shared_head.norm") @ weights["model.layers.2.shared_head.head.weight"].t()
        torch.testing.assert_close(ours(x)[1][:, :s], reference, atol=1e-5, rtol=0)
    make_hf(tmp_path / "saved", arch, num_nextn_predict_layers=1)
    assert read_hf(tmp_path / "saved").cfg.model.mtp_num_layers == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 0}))
    with pytest.raises(ConversionError, match="model.layers.2.* has no counterpart"):
        read_hf(tmp_path / "hf")


def test_sliding_window_sets_the_sequence_length(tmp_path):
    make_hf(tmp_path / "m", "mistral", sliding_window=16)
    source = read_hf(tmp_path / "m")
    assert source.cfg.data.seq_length == 16 and "sliding_window = 16" in source.notes[0]
    make_hf(tmp_path / "q", "qwen2", sliding_window=16)  # stored but unused without use_sliding_window
    assert read_hf(tmp_path / "q").cfg.data.seq_length == 64


@pytest.mark.parametrize("model_type,overrides,message", [
    ("llama", {"attention_bias": True}, "attention_bias = true with mlp_bias = false"),
    ("llama", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 4,
                                   "long_factor": [1.0] * 4, "original_max_position_embeddings": 16}}, "'longrope'"),
    ("phimoe", {"num_experts_per_tok": 1}, "SparseMixer-v2 routes exactly 2"),
    ("deepseek_v3", {"rope_parameters": {"rope_type": "yarn", "factor": 40.0, "rope_theta": 1e4, "mscale": 1.0,
                                         "mscale_all_dim": 1.0, "original_max_position_embeddings": 16,
                                         "attention_factor": 1.2}}, "explicit YaRN attention factor"),
    ("deepseek_v3", {"num_experts_per_tok": 2}, "scores each group by its 2 best experts"),
    ("deepseek_v2", {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 1, "num_experts_per_tok": 2},
     "scores each group by its best expert"),
    ("deepseek_v2", {"topk_method": "noaux_tc"}, "topk_method = 'noaux_tc'"),
    ("deepseek_v3", {"num_key_value_heads": 2}, "latent attention has a key and value per head"),
    ("deepseek_v3", {"attention_bias": True}, "attention_bias/mlp_bias = true is not part of the deepseek_v3"),
    ("qwen3", {"partial_rotary_factor": 0.5}, "transformers' qwen3 rotates every channel of a head"),
    ("glm4_moe", {"partial_rotary_factor": 0.25}, "partial_rotary_factor = 0.25 of head_dim 12 gives 3 rotary"),
    ("glm4_moe", {"num_experts_per_tok": 2}, "scores each group by its 2 best experts"),
    ("glm4_moe", {"mlp_bias": True}, "mlp_bias = true is not part of the glm4_moe format"),
])
def test_unrepresentable_inputs_name_the_field(tmp_path, model_type, overrides, message):
    make_hf(tmp_path / "hf", model_type, **overrides)
    with pytest.raises(ConversionError, match=message):
        read_hf(tmp_path / "hf")


def test_deepseek_v3_routing_fields_left_out_take_transformers_defaults():
    """No tensor depends on routed_scaling_factor, n_group or topk_group: a config.json without them means
    transformers' DeepseekV3Config defaults (2.5, 8 groups, 4 kept), not unscaled ungrouped routing."""
    from transformers import DeepseekV3Config

    from megatron_moe.convert.hf_config import config_from_hf

    hf = {"model_type": "deepseek_v3", "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 4,
          "intermediate_size": 64, "num_hidden_layers": 2, "vocab_size": 96, "q_lora_rank": None, "kv_lora_rank": 12,
          "qk_nope_head_dim": 6, "qk_rope_head_dim": 4, "v_head_dim": 5, "n_routed_experts": 16,
          "num_experts_per_tok": 8, "moe_intermediate_size": 24, "n_shared_experts": 1}
    e = config_from_hf(hf).moe
    defaults = DeepseekV3Config()
    assert (e.topk_scaling_factor, e.router_num_groups, e.router_group_topk) == (
        defaults.routed_scaling_factor, defaults.n_group, defaults.topk_group) == (2.5, 8, 4)


def test_glm4_moe_config_without_partial_rotary_factor_rotates_half(tmp_path, capsys):
    """transformers' Glm4MoeConfig sets partial_rotary_factor 0.5 when a config.json has none (GLM's released configs
    write it): a config.json without it imports with model.rotary_percent 0.5 and transformers' logits."""
    hf = make_hf(tmp_path / "hf", "glm4_moe")
    path = tmp_path / "hf" / "config.json"
    config = json.loads(path.read_text())
    config.pop("partial_rotary_factor", None)
    del config["rope_parameters"]["partial_rotary_factor"]
    path.write_text(json.dumps(config))
    rc, out, err = import_cli(capsys, tmp_path / "hf", tmp_path / "ours", "--verify")
    assert rc == 0 and verified_relative_difference(out) < REL, err
    ours, _ = load_model(tmp_path / "ours")
    assert ours.cfg.model.rotary_percent == 0.5
    x = tokens(seq=24)
    with torch.no_grad():
        ref = hf(x).logits
        torch.testing.assert_close(ours(x), ref, atol=REL * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("fields", [
    {"rope_theta": 1e6},  # transformers 4.x's fields, GLM-4.5's rope_theta, no factor
    {"rope_theta": 1e6, "partial_rotary_factor": 0.25, "rope_scaling": None},  # GLM's released configs' layout
    {"partial_rotary_factor": 1.0},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}, "partial_rotary_factor": 0.25},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 1.0},
     "partial_rotary_factor": 0.25},
])
def test_glm4_moe_rotary_fraction_is_read_where_transformers_reads_it(fields):
    """partial_rotary_factor in rope_parameters, else at the top level, else Glm4MoeConfig's 0.5: the same fraction
    (and rope theta) as transformers' own reading of the config."""
    from transformers import Glm4MoeConfig

    from megatron_moe.convert.hf_config import config_from_hf

    hf = {"model_type": "glm4_moe", "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
          "head_dim": 16, "intermediate_size": 64, "num_hidden_layers": 2, "vocab_size": 96, "n_routed_experts": 8,
          "num_experts_per_tok": 2, "moe_intermediate_size": 24, "n_shared_experts": 1, **fields}
    m = config_from_hf(hf).model
    theirs = Glm4MoeConfig.from_dict(hf).rope_parameters
    assert (m.rotary_percent, m.rope_theta) == (theirs["partial_rotary_factor"], theirs["rope_theta"])


def test_glm4_moe_routing_fields_left_out_take_transformers_defaults():
    """A glm4_moe config.json without routed_scaling_factor, n_group, topk_group, first_k_dense_replace or
    rms_norm_eps means transformers' Glm4MoeConfig defaults (1.0, one group, one dense layer, 1e-5), not
    DeepSeek-V3's or the other formats'."""
    from transformers import Glm4MoeConfig

    from megatron_moe.convert.hf_config import config_from_hf

    hf = {"model_type": "glm4_moe", "hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64,
          "num_hidden_layers": 2, "vocab_size": 96, "n_routed_experts": 8, "num_experts_per_tok": 2,
          "moe_intermediate_size": 24, "n_shared_experts": 1}
    e = config_from_hf(hf).moe
    defaults = Glm4MoeConfig()
    assert (e.topk_scaling_factor, e.router_group_topk, e.first_k_dense, e.renormalize) == (
        defaults.routed_scaling_factor, 0, defaults.first_k_dense_replace, defaults.norm_topk_prob) == (
        1.0, 0, 1, True)
    assert (defaults.n_group, defaults.topk_group) == (1, 1)
    assert config_from_hf(hf).model.norm_eps == defaults.rms_norm_eps == 1e-5  # not the generic 1e-6


def test_undeclared_bias_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    make_hf(tmp_path / "hf", "llama")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    save_file(tensors, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(ConversionError, match="q_proj.bias has a bias the config does not declare"):
        read_hf(tmp_path / "hf")


def test_upcycling_an_moe_or_importing_a_non_hf_input_is_refused(tmp_path, capsys):
    make_hf(tmp_path / "hf", "mixtral")
    rc, _, err = import_cli(capsys, tmp_path / "hf", tmp_path / "o", "--num-experts", 8)
    assert rc == 2 and "already an MoE model (4 experts)" in err and not (tmp_path / "o").exists()
    rc = upcycle_checkpoint.main(["--input", str(tmp_path / "hf"), "--input-format", "native",
                                  "--output", str(tmp_path / "o")])
    assert rc == 2 and "--input-format hf" in capsys.readouterr().err


def test_dense_upcycling_from_qwen2_keeps_biases_and_is_exact(tmp_path, capsys):
    hf = make_hf(tmp_path / "hf", "qwen2")
    rc = upcycle_checkpoint.main(["--input", str(tmp_path / "hf"), "--input-format", "hf", "--num-experts", "4",
                                  "--output", str(tmp_path / "moe")])
    assert rc == 0, capsys.readouterr().err
    moe, meta = load_model(tmp_path / "moe")
    assert moe.cfg.model.add_qkv_bias and meta["hf_import"]["model_type"] == "qwen2"
    assert read_meta(resolve_checkpoint(tmp_path / "moe"))["upcycling"]["num_experts"] == 4
    x = tokens(seq=24)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), hf(x).logits, atol=1e-5, rtol=0)


def test_dense_ffn_biases_cannot_be_upcycled(tmp_path, capsys):
    make_hf(tmp_path / "hf", "llama", attention_bias=True, mlp_bias=True)
    rc = upcycle_checkpoint.main(["--input", str(tmp_path / "hf"), "--input-format", "hf", "--num-experts", "4",
                                  "--output", str(tmp_path / "moe")])
    assert rc == 2 and "the dense FFN has biases" in capsys.readouterr().err


# microsoft/GRIN-MoE's released config.json (the fields that describe the model).
GRIN_RELEASED = {
    "model_type": "grinmoe", "attention_bias": True, "attention_dropout": 0.0, "bos_token_id": 1,
    "eos_token_id": 32000, "hidden_act": "silu", "hidden_dropout": 0.0, "hidden_size": 4096, "initializer_range": 0.02,
    "input_jitter_noise": 0.01, "intermediate_size": 6400, "lm_head_bias": True, "max_position_embeddings": 4096,
    "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "num_local_experts": 16, "output_router_logits": False, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
    "router_aux_loss_coef": 0.0, "router_jitter_noise": 0.01, "sliding_window": 2047, "tie_word_embeddings": False,
    "vocab_size": 32064,
}


# Qwen/Qwen3-30B-A3B's released config.json (the fields that describe the model).
QWEN3_30B_A3B_RELEASED = {
    "model_type": "qwen3_moe", "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
    "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 40960, "max_window_layers": 48,
    "mlp_only_layers": [], "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32,
    "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4,
    "output_router_logits": False, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001, "sliding_window": None, "tie_word_embeddings": False, "use_sliding_window": False,
    "vocab_size": 151936,
}


@pytest.mark.parametrize("example,released,seq_length", [
    ("grin_moe_16x3.8b.toml", GRIN_RELEASED, 2047),  # the released sliding window (see the example's comment)
    ("qwen3_30b_a3b.toml", QWEN3_30B_A3B_RELEASED, 40960),
])
def test_examples_are_the_released_architectures(example, released, seq_length):
    """examples/grin_moe_16x3.8b.toml and examples/qwen3_30b_a3b.toml have every model and router setting of
    GRIN-MoE's and Qwen3-30B-A3B's config.json (both with heads of 128: 4096 / 32 and kv_channels 128)."""
    from pathlib import Path

    from megatron_moe.config import load_toml
    from megatron_moe.convert.hf_config import config_from_hf

    example = load_toml(Path(__file__).parents[2] / "examples" / example)
    imported = config_from_hf(released)
    assert example.model == imported.model
    for key in ("num_experts", "topk", "expert_ffn_hidden_size", "router", "renormalize", "jitter_eps",
                "input_jitter_eps", "layer_freq", "first_k_dense", "logit_norm", "score_function",
                "shared_expert_ffn_hidden_size"):
        assert getattr(example.moe, key) == getattr(imported.moe, key), key
    assert (imported.model.head_dim, imported.data.seq_length) == (128, seq_length)


def test_verify_fails_when_the_import_is_wrong(tmp_path, capsys, monkeypatch):
    """A wrong mapping (here: k and v swapped on import) is caught by --verify, not only printed."""
    from megatron_moe.convert import hf_tensors

    make_hf(tmp_path / "hf", "llama")
    original = hf_tensors._ATTN
    monkeypatch.setattr(hf_tensors, "_ATTN", {**original, "wk": original["wv"], "wv": original["wk"]})
    rc, out, err = import_cli(capsys, tmp_path / "hf", tmp_path / "ours", "--verify")
    assert rc == 2 and "differ from transformers'" in err and verified_relative_difference(out) > 1e-3


def test_bf16_checkpoint_is_imported_in_bf16(tmp_path, capsys):
    """Released checkpoints are bf16: the import keeps them so (half the memory of float32) and the
    model loaded from it in float32 computes transformers' logits."""
    from torch.distributed.checkpoint import FileSystemReader

    hf = make_hf(tmp_path / "hf", "qwen2", save_dtype=torch.bfloat16)
    rc, out, err = import_cli(capsys, tmp_path / "hf", tmp_path / "ours", "--verify")
    assert rc == 0 and verified_relative_difference(out) < REL, err
    stored = FileSystemReader(str(resolve_checkpoint(tmp_path / "ours"))).read_metadata().state_dict_metadata
    assert {m.properties.dtype for m in stored.values() if hasattr(m, "properties")} == {torch.bfloat16}
    ours, _ = load_model(tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens()), hf(tokens()).logits, atol=1e-5, rtol=0)
