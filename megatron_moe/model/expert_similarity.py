"""Expert similarity (Skywork-MoE figure 2): mean pairwise cosine similarity of expert weights per layer
(docs/routing.md §6).

Each expert is the flattened concatenation of its w1, w3 and w2. Sharded (DTensor) expert weights
are gathered first, so every rank that holds a layer computes the same value. Upcycled experts
start at similarity 1 (identical copies) and drift apart during training.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_moe.model.moe import GroupedExperts, moe_layers


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@torch.no_grad()
def expert_gram(experts: GroupedExperts) -> torch.Tensor:
    """Dot products between experts' flattened weights [E, E] (float32 products summed in float64;
    DTensor weights are gathered one at a time)."""
    gram = None
    for weight in (experts.w1, experts.w3, experts.w2):  # one gathered weight at a time bounds the memory
        flat = _full(weight).detach().flatten(1).float()
        part = (flat @ flat.T).double()
        gram = part if gram is None else gram + part
    return gram


def mean_pairwise_cosine(gram: torch.Tensor) -> float:
    """Mean over expert pairs i < j of gram_ij / sqrt(gram_ii gram_jj)."""
    num_experts = gram.shape[0]
    if num_experts < 2:
        raise ValueError("expert similarity needs at least 2 experts")
    norms = gram.diagonal().clamp_min(1e-300).sqrt()
    cos = gram / torch.outer(norms, norms)
    i, j = torch.triu_indices(num_experts, num_experts, offset=1)
    return cos[i, j].mean().item()


def expert_similarity(model: nn.Module) -> list[float]:
    """Mean pairwise expert cosine similarity of every MoE layer of ``model`` (in forward order)."""
    return [mean_pairwise_cosine(expert_gram(layer.experts)) for layer in moe_layers(model)]
