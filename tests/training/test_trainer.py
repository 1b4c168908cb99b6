"""The trainer's start-up summary (the loop itself: tests/training/test_resume.py, tests/test_pretrain_cli.py)."""

from __future__ import annotations

from megatron_moe.config import parse_args
from megatron_moe.model.transformer import is_moe_layer
from megatron_moe.training.trainer import architecture_summary


def test_architecture_summary_says_what_megatron_defaults_would_have_made_otherwise():
    """A Megatron-LM command line that leaves the architecture to defaults (its GPT-3 example gives no --swiglu,
    --position-embedding-type, --normalization or bias flags) is told what it trains here: SwiGLU, RoPE, RMSNorm,
    no biases, untied embeddings (Megatron-LM would train GeLU, learned positions, LayerNorm with biases, tied)."""
    cfg, _ = parse_args(["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "8"])
    assert architecture_summary(cfg) == ("RMSNorm, SwiGLU, RoPE theta 10000, no biases, untied embeddings, "
                                         "8 heads / 8 KV heads of 8")
    cfg, _ = parse_args(["--normalization", "LayerNorm", "--apply-layernorm-1p", "--add-qkv-bias", "--add-bias-linear",
                         "--use-rope-scaling", "--rotary-base", "500000", "--num-query-groups", "2", "--qk-layernorm"])
    assert architecture_summary(cfg).startswith("LayerNorm (1p), SwiGLU, RoPE theta 500000 + llama3 scaling, "
                                                "biases: qkv, linear, QK norm, untied embeddings, "
                                                "4 heads / 2 KV heads of 64")


def test_architecture_summary_places_the_moe_layers_as_the_model_does():
    cfg, _ = parse_args(["--num-layers", "7", "--num-experts", "4", "--moe-layer-freq", "[0]+[1,0]*3"])
    summary = architecture_summary(cfg)
    assert summary.endswith("4 experts top-2 (topk router) every 2 layers from layer 1")
    assert [i for i in range(7) if is_moe_layer(cfg, i)] == [1, 3, 5]
    cfg, _ = parse_args(["--num-experts", "4", "--moe-shared-expert-intermediate-size", "96",
                         "--moe-shared-expert-gate"])
    assert architecture_summary(cfg).endswith("every layer, a shared expert of 96 (sigmoid-gated)")
    cfg, _ = parse_args(["--num-experts", "4", "--moe-router-score-function", "sigmoid",
                         "--moe-router-enable-expert-bias"])
    assert "4 experts top-2 (topk router, sigmoid scores, expert bias) every layer" in architecture_summary(cfg)


def test_architecture_summary_of_latent_attention():
    cfg, _ = parse_args(["--multi-latent-attention", "--qk-layernorm", "--q-lora-rank", "96", "--kv-lora-rank", "64"])
    assert architecture_summary(cfg).endswith("latent norms, untied embeddings, latent attention: 4 heads of 128 + 64 "
                                              "rotary (values 128), q latent 96, kv latent 64")
