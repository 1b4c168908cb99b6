"""Expert similarity (Skywork-MoE figure 2): mean pairwise cosine similarity of expert weights per layer.

Each expert is the flattened concatenation of its w1, w3 and w2. Under tensor parallelism every
rank holds a slice of every expert, so the Gram matrix of dot products is summed over the
tensor-parallel group before the cosines are formed. Upcycled experts start at similarity 1
(identical copies) and drift apart during training.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megatron_moe.model.moe import GroupedExperts, moe_layers


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def expert_gram(experts: GroupedExperts) -> torch.Tensor:
    """Dot products between experts' flattened weights, float64 [E, E] (this rank's shard only)."""
    flat = torch.cat([_local(w).detach().flatten(1).double() for w in (experts.w1, experts.w3, experts.w2)], dim=1)
    return flat @ flat.T


def mean_pairwise_cosine(gram: torch.Tensor) -> float:
    """Mean over expert pairs i < j of gram_ij / sqrt(gram_ii gram_jj)."""
    num_experts = gram.shape[0]
    if num_experts < 2:
        raise ValueError("expert similarity needs at least 2 experts")
    norms = gram.diagonal().clamp_min(1e-300).sqrt()
    cos = gram / torch.outer(norms, norms)
    i, j = torch.triu_indices(num_experts, num_experts, offset=1)
    return cos[i, j].mean().item()


def expert_similarity(model: nn.Module, tp_group=None) -> list[float]:
    """Mean pairwise expert cosine similarity of every MoE layer of ``model`` (in forward order).

    ``tp_group``: the tensor-parallel group whose ranks hold the other slices of the experts.
    """
    result = []
    for layer in moe_layers(model):
        gram = expert_gram(layer.experts)
        if tp_group is not None and dist.is_initialized() and dist.get_world_size(tp_group) > 1:
            dist.all_reduce(gram, group=tp_group)
        result.append(mean_pairwise_cosine(gram))
    return result
