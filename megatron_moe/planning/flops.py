"""Model FLOPs of a training step.

Per token (backward = 2 x forward): ``6 N + 6 L S A``. N = parameters of the matmuls one token goes
through (attention projections, router gate, the K routed experts or the dense FFN, output layer;
not the embedding lookup; multi-token prediction's depths add their blocks, projections and the output
layer once more each), L layers (and multi-token prediction's blocks), S sequence length, A = heads x
(q/k head width + value head width) / 2: causal attention scores (``2 (S/2)`` multiply-adds per q/k
channel) and the weighted sum of values (the same per value channel) cost ``2 * 2 * (S/2) * A`` per token
and layer in the forward. Both widths are the head dimension (the hidden size / heads unless
``model.kv_channels`` sets it apart); multi-latent attention has q/k heads of ``qk_head_dim +
qk_pos_emb_head_dim`` and value heads of ``v_head_dim``.
"""

from __future__ import annotations

import torch

from megatron_moe.config import Config


def model_flops_per_token(cfg: Config, matmul_params: int) -> float:
    """Training FLOPs per token: 6 N + 6 L S A (module docstring)."""
    m = cfg.model
    layers = m.num_layers + m.mtp_num_layers  # multi-token prediction: a block per depth
    return 6.0 * matmul_params + 6.0 * layers * cfg.data.seq_length * attention_width(cfg)


def attention_width(cfg: Config) -> float:
    """A of the module docstring: heads x (q/k head width + value head width) / 2."""
    m = cfg.model
    if m.multi_latent_attention:
        return m.num_attention_heads * (m.qk_head_dim + m.qk_pos_emb_head_dim + m.v_head_dim) / 2
    return m.num_attention_heads * m.head_dim


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
    # multi-token prediction runs the output layer once more per depth (its blocks and projections are counted)
    total += cfg.model.mtp_num_layers * cfg.model.vocab_size * cfg.model.hidden_size
    return total
