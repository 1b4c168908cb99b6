"""Model FLOPs of a training step.

Per token (backward = 2 x forward): ``6 N + 6 L S A``. N = parameters of the matmuls one token goes
through (attention projections, router gate, the K routed experts or the dense FFN, output layer;
not the embedding lookup), L layers, S sequence length, A = heads x head dimension (the hidden size
unless ``model.kv_channels`` sets the head dimension apart): causal attention scores and the weighted
sum of values cost ``2 * 2 * (S/2) * A`` per token and layer in the forward.
"""

from __future__ import annotations

import torch

from megatron_moe.config import Config


def model_flops_per_token(cfg: Config, matmul_params: int) -> float:
    """Training FLOPs per token: 6 N + 6 L S A (module docstring)."""
    m = cfg.model
    return 6.0 * matmul_params + 6.0 * m.num_layers * cfg.data.seq_length * m.num_attention_heads * m.head_dim


def matmul_active_params(module: torch.nn.Module, cfg: Config) -> int:
    """Parameters a token multiplies with: all but the embedding lookup and vectors, experts counted K/E."""
    total = 0
    for name, p in module.named_parameters():
        if p.ndim < 2 or name.endswith("tok_embeddings.weight"):
            continue
        n = p.numel()
        if ".experts." in name:
            n = n * cfg.moe.topk // cfg.moe.num_experts
        total += n
    if cfg.model.tie_embeddings:
        total += cfg.model.vocab_size * cfg.model.hidden_size
    return total
