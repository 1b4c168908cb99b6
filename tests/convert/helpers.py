"""Helpers of the conversion tests: tiny random Hugging Face models and native checkpoints built offline."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_moe.config import Config
from megatron_moe.convert.native import save_model_checkpoint
from megatron_moe.model.transformer import build_model
from tests import builders

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)


def make_hf(path: Path, model_type: str = "llama", seed: int = 0, save_kwargs: dict | None = None, **overrides):
    """Save a random tiny HF model of ``model_type`` to ``path``; returns the model (eval, float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    kwargs = {**TINY, **overrides}
    if model_type == "mistral":
        kwargs.setdefault("sliding_window", None)
        config, cls = MistralConfig(**kwargs), MistralForCausalLM
    else:
        config, cls = LlamaConfig(**kwargs), LlamaForCausalLM
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():  # default init leaves norms at 1: randomise them so the copy is really checked
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path, **(save_kwargs or {}))
    return model


# This directory's model: vocab 96, 2 layers, dense ffn 64, sequence 64, Config's MoE and batch defaults.
CONVERT_MODEL = dict(vocab_size=96, num_layers=2, ffn_hidden_size=64, seq_length=64, num_experts=8,
                     expert_ffn_hidden_size=0, aux_loss_coeff=0.01, z_loss_coeff=0.0, micro=4, global_batch=8)


def tiny_config(**settings) -> Config:
    """The shared tiny-config builder (tests/builders.py) at this directory's model size."""
    return builders.tiny_config(**{**CONVERT_MODEL, **settings})


def save_native(path: Path, cfg: Config, seed: int = 0) -> torch.nn.Module:
    """Build a random model for ``cfg`` and save it as a model-only native checkpoint under ``path``."""
    model = build_model(cfg, "cpu", seed=seed).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(seed + len(name)))
    save_model_checkpoint(path, cfg, {k: v.detach() for k, v in model.state_dict().items()}, "test")
    return model


def tokens(batch: int = 2, seq: int = 16, vocab: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
