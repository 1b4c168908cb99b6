"""Helpers of the conversion tests: tiny random Hugging Face models and native checkpoints built offline."""

from __future__ import annotations

import zlib
from pathlib import Path

import torch

from megatron_moe.config import Config
from megatron_moe.convert.native import save_model_checkpoint
from megatron_moe.model.transformer import build_model
from tests import builders

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)


# Per architecture: transformers' config class name and the settings the tiny model adds.
HF_CLASSES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "phi3": "Phi3", "mixtral": "Mixtral",
              "phimoe": "Phimoe", "qwen3": "Qwen3", "qwen3_moe": "Qwen3Moe", "qwen2_moe": "Qwen2Moe",
              "deepseek_v2": "DeepseekV2", "deepseek_v3": "DeepseekV3", "glm4_moe": "Glm4Moe"}
HF_DEFAULTS = {
    "mistral": {"sliding_window": None},
    "phi3": {"pad_token_id": None},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    # GRIN-MoE's released settings (attention and LM-head biases, both jitters 0.01), tiny shapes.
    "phimoe": {"num_local_experts": 4, "num_experts_per_tok": 2, "attention_bias": True, "lm_head_bias": True,
               "router_jitter_noise": 0.01, "input_jitter_noise": 0.01, "rope_theta": 10000.0},
    # Qwen3's heads are wider than hidden / heads (128 on 2048 / 32 for Qwen3-30B-A3B): 12 on 32 / 4 here.
    "qwen3": {"head_dim": 12},
    "qwen3_moe": {"head_dim": 12, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
                  "norm_topk_prob": True},
    # Qwen1.5-MoE's layout: q/k/v biases, a shared expert gated by a sigmoid, top-K weights not renormalised.
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
                  "shared_expert_intermediate_size": 40, "norm_topk_prob": False},
    # DeepSeek-V3's layout: latent attention (query latent 16, kv latent 12, heads of 6 + 4 rotary channels, values
    # 5 wide, rotary channels interleaved), 16 experts in 4 groups of which 2 are kept, top-4, weights normalised and
    # scaled by 2.5, two shared experts' width, one dense layer first.
    # DeepSeek-V2-Lite's layout: no query latent, 8 experts top-2 by softmax probabilities as they are, scaled,
    # two shared experts' width, one dense layer first, DeepSeek-V2-Lite's YaRN (mscales 0.707).
    "deepseek_v2": {"num_key_value_heads": 4, "q_lora_rank": None, "kv_lora_rank": 12, "qk_nope_head_dim": 6,
                    "qk_rope_head_dim": 4, "v_head_dim": 5, "n_routed_experts": 8, "num_experts_per_tok": 2,
                    "moe_intermediate_size": 24, "n_shared_experts": 2, "first_k_dense_replace": 1,
                    "routed_scaling_factor": 1.5, "topk_method": "greedy",
                    "rope_parameters": {"rope_type": "yarn", "factor": 40.0, "rope_theta": 1e4, "mscale": 0.707,
                                        "mscale_all_dim": 0.707, "original_max_position_embeddings": 16}},
    "deepseek_v3": {"num_key_value_heads": 4, "q_lora_rank": 16, "kv_lora_rank": 12, "qk_nope_head_dim": 6,
                    "qk_rope_head_dim": 4, "v_head_dim": 5, "n_routed_experts": 16, "num_experts_per_tok": 4,
                    "moe_intermediate_size": 24, "n_shared_experts": 2, "first_k_dense_replace": 1, "n_group": 4,
                    "topk_group": 2, "routed_scaling_factor": 2.5, "norm_topk_prob": True},
    # GLM-4.5's layout: q/k/v biases, query/key norms, heads 12 wide on hidden 32 of which the first half rotates,
    # DeepSeek-V3's MoE layer (16 experts in 4 groups of which 2 are kept, top-4, normalised, scaled by 2.5, two
    # shared experts' width, one dense layer first)
    "glm4_moe": {"head_dim": 12, "attention_bias": True, "use_qk_norm": True, "partial_rotary_factor": 0.5,
                 "n_routed_experts": 16, "num_experts_per_tok": 4, "moe_intermediate_size": 24, "n_shared_experts": 2,
                 "first_k_dense_replace": 1, "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5,
                 "norm_topk_prob": True},
}


def make_hf(path: Path, model_type: str = "llama", seed: int = 0, save_kwargs: dict | None = None,
            save_dtype: torch.dtype = torch.float32, **overrides):
    """Save a random tiny HF model of ``model_type`` to ``path`` in ``save_dtype``; returns the model (eval,
    float32, its weights rounded to ``save_dtype``).

    Built with ``from_config`` offline. Norm weights and all biases are randomised (transformers
    initialises them to 1 and 0, which would let a dropped or misplaced one go unnoticed).
    """
    import transformers

    name = HF_CLASSES[model_type]
    config = getattr(transformers, f"{name}Config")(**{**TINY, **HF_DEFAULTS.get(model_type, {}), **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, f"{name}ForCausalLM")._from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname and pname.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif pname.endswith("bias"):
                p.uniform_(-0.2, 0.2)
            p.copy_(p.to(save_dtype).float())
        for bname, b in model.named_buffers():
            if bname.endswith("e_score_correction_bias"):  # DeepSeek-V3's expert bias: zeros would hide it
                b.uniform_(-0.1, 0.1)
    model.to(save_dtype).save_pretrained(path, **(save_kwargs or {}))
    return model.float()


# This directory's model: vocab 96, 2 layers, dense ffn 64, sequence 64, Config's MoE and batch defaults.
CONVERT_MODEL = dict(vocab_size=96, num_layers=2, ffn_hidden_size=64, seq_length=64, num_experts=8,
                     expert_ffn_hidden_size=0, aux_loss_coeff=0.01, z_loss_coeff=0.0, micro=4, global_batch=8)

# GLM-4.5's architecture as this project's settings: grouped-query attention with q/k/v biases, query/key norms, heads
# 12 wide of which the first half rotates; 8 experts top-4 by sigmoid scores with the expert bias in 4 groups of which
# 2 are kept, weights normalised and scaled by 2.5, two experts' width of ungated shared expert, a dense layer first.
GLM_EXPORT = dict(num_attention_heads=4, num_query_groups=2, kv_channels=12, rotary_percent=0.5, qk_layernorm=True,
                  add_qkv_bias=True, norm_eps=1e-6, num_experts=8, topk=4, expert_ffn_hidden_size=16,
                  score_function="sigmoid", expert_bias=True, router_num_groups=4, router_group_topk=2,
                  topk_scaling_factor=2.5, shared_expert_ffn_hidden_size=32, first_k_dense=1)


def tiny_config(**settings) -> Config:
    """The shared tiny-config builder (tests/builders.py) at this directory's model size."""
    return builders.tiny_config(**{**CONVERT_MODEL, **settings})


def save_native(path: Path, cfg: Config, seed: int = 0) -> torch.nn.Module:
    """Build a random model for ``cfg`` and save it as a model-only native checkpoint under ``path``."""
    model = build_model(cfg, "cpu", seed=seed).eval()
    with torch.no_grad():  # norm weights start at 1 and biases at 0: randomise them so their copy is checked
        for name, p in model.named_parameters():
            generator = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))  # q_norm != k_norm
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5, generator=generator)
            elif name.endswith(".bias"):
                p.uniform_(-0.2, 0.2, generator=generator)
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):  # DeepSeek-V3's: chooses experts, zero would hide a lost one
                b.uniform_(-0.1, 0.1, generator=torch.Generator().manual_seed(seed + zlib.crc32(name.encode())))
    save_model_checkpoint(path, cfg, {k: v.detach() for k, v in model.state_dict().items()}, "test")
    return model


def tokens(batch: int = 2, seq: int = 16, vocab: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
