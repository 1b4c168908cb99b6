"""Top-K softmax router (GShard / Switch / Mixtral baseline), docs/routing.md §1."""

from __future__ import annotations

import torch
from torch import Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32 and lower precisions (bf16/fp16); fp64 stays fp64 (used by gradient checks)."""
    return torch.promote_types(dtype, torch.float32)


def topk_softmax_routing(logits: Tensor, topk: int, renormalize: bool = True) -> tuple[Tensor, Tensor]:
    """Pick the ``topk`` largest softmax probabilities per token.

    docs/routing.md §1: g = softmax(z); weights = the K picked g, renormalised to sum 1 per token unless
    ``renormalize`` is False. Gradients flow through the picked g (and the renormalisation).
    The softmax runs in fp32 (fp64 inputs stay fp64). Eval and training are identical.

    Args:
        logits: router logits z, shape [T, E].
        topk: K, 1 <= K <= E.
        renormalize: divide the K picked probabilities by their sum.

    Returns:
        weights: [T, K] in fp32 (fp64 for fp64 input), differentiable w.r.t. ``logits``,
            ordered by decreasing probability.
        indices: [T, K] int64 expert ids.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape [T, E], got {tuple(logits.shape)}")
    num_experts = logits.shape[-1]
    if not 1 <= topk <= num_experts:
        raise ValueError(f"moe.topk must be in [1, num_experts={num_experts}], got {topk}")
    probs = torch.softmax(logits.to(_compute_dtype(logits.dtype)), dim=-1)
    weights, indices = torch.topk(probs, topk, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, indices
