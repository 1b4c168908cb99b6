"""Load-balancing losses, capacity and token-drop accounting (docs/routing.md §4 and §5).

Loss functions return the bare loss: the caller multiplies by its coefficient (constant or the
adaptive per-layer coefficient of :mod:`megatron_moe.routing.adaptive`).

Global scope (GRIN 3.3, docs/routing.md §4): counts are summed over the data-parallel group with
:class:`AsyncAllReduce` and passed to :func:`switch_balance_loss` together with the LOCAL probs.
Since data-parallel gradients are averaged over ranks, ``mean_r d/dW [E * sum_i f_i * P_i^(r)]``
equals the gradient of the global-batch loss exactly (equal micro-batch sizes), with no extra factor.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor


def expert_counts(indices: Tensor, num_experts: int) -> Tensor:
    """Number of routed assignments per expert, all K slots counted.

    Args:
        indices: [T, K] int64 chosen experts (the sampled ones for SparseMixer).
        num_experts: E.

    Returns:
        counts: [E] float32, no grad. Uses ``scatter_add_`` (no host sync, unlike ``bincount`` on GPU).
    """
    flat = indices.detach().reshape(-1)
    counts = torch.zeros(num_experts, dtype=torch.float32, device=indices.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))


def switch_balance_loss(probs: Tensor, counts: Tensor) -> Tensor:
    """Switch/GShard balance loss ``E * sum_i f_i * P_i`` without its coefficient (docs/routing.md §4).

    Args:
        probs: [T, E] full, unmasked softmax(z) of this rank's tokens (differentiable).
        counts: [E] assignment counts, local or summed over the data-parallel group (global scope);
            treated as constants. f = counts / counts.sum(), so the value is 1 at perfect balance.

    Returns:
        scalar fp32 loss; the gradient flows through ``probs`` only.
    """
    num_experts = probs.shape[-1]
    p_mean = probs.to(torch.promote_types(probs.dtype, torch.float32)).mean(dim=0)
    counts = counts.detach().to(p_mean.dtype)
    f = counts / counts.sum().clamp(min=1.0)
    return num_experts * (f * p_mean).sum()


def sequence_balance_loss(probs: Tensor, indices: Tensor, num_sequences: int) -> Tensor:
    """Sequence-wise balance loss: the Switch loss of each sequence, averaged over the sequences
    (DeepSeek-V3 §2.1.2's complementary sequence-wise loss; Megatron-LM's ``seq_aux_loss``), without its
    coefficient (docs/routing.md §4).

    Args:
        probs: [B * S, E] full softmax of the tokens, sequence by sequence (b-major), differentiable.
        indices: [B * S, K] chosen experts (constants).
        num_sequences: B.

    Returns:
        scalar fp32 ``mean_b E * sum_i f_bi * P_bi`` with ``f_bi`` the fraction of sequence b's S * K
        assignments sent to expert i and ``P_bi`` its mean probability over the sequence; 1 at balance.
    """
    num_experts = probs.shape[-1]
    p_mean = probs.to(torch.promote_types(probs.dtype, torch.float32)).reshape(num_sequences, -1, num_experts).mean(1)
    per_sequence = indices.reshape(num_sequences, -1)
    counts = torch.zeros(num_sequences, num_experts, dtype=p_mean.dtype, device=probs.device)
    counts.scatter_add_(1, per_sequence, torch.ones_like(per_sequence, dtype=p_mean.dtype))
    f = counts / per_sequence.shape[1]
    return num_experts * (f * p_mean).sum(1).mean()


def skywork_balance_loss(probs: Tensor) -> Tensor:
    """Skywork-MoE eq. 4 balance loss ``sum_j (1/E - mean_t g_tj)^2`` without its coefficient.

    Args:
        probs: [T, E] full softmax(z).

    Returns:
        scalar fp32 loss (0 at perfect balance).
    """
    num_experts = probs.shape[-1]
    p_mean = probs.to(torch.promote_types(probs.dtype, torch.float32)).mean(dim=0)
    return ((1.0 / num_experts) - p_mean).square().sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """Router z-loss ``mean_t (logsumexp_E z_t)^2`` without its coefficient (docs/routing.md §4; ST-MoE).

    Args:
        logits: [T, E] router logits (after logit normalisation if enabled).

    Returns:
        scalar fp32 loss.
    """
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.logsumexp(z, dim=-1).square().mean()


def expert_capacity(num_tokens: int, topk: int, num_experts: int, capacity_factor: float) -> int:
    """Per-expert capacity ``C = ceil(capacity_factor * T * K / E)`` (docs/routing.md §5).

    The product is rounded to 9 decimals before the ceiling so that e.g. 1.1 * 200 / 4 =
    55.00000000000001 gives 55, not 56.
    """
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    if topk < 1:
        raise ValueError(f"moe.topk must be >= 1, got {topk}")
    if num_experts < 1:
        raise ValueError(f"moe.num_experts must be >= 1, got {num_experts}")
    if not capacity_factor > 0:
        raise ValueError(f"moe.capacity_factor must be > 0, got {capacity_factor}")
    return math.ceil(round(capacity_factor * num_tokens * topk / num_experts, 9))


def token_drop_rate(counts: Tensor, capacity: int, num_assignments: int) -> Tensor:
    """Drop rate ``d = sum_i max(0, count_i - C) / (T * K)`` (Skywork-MoE 4.2, docs/routing.md §5).

    In dropless mode this is the counterfactual rate at the configured capacity factor.

    Args:
        counts: [E] assignment counts of the micro-batch.
        capacity: C from :func:`expert_capacity`.
        num_assignments: T * K of the same micro-batch.

    Returns:
        scalar fp32 tensor (no host sync); 0 when ``num_assignments`` is 0.
    """
    excess = (counts.detach().to(torch.float32) - capacity).clamp(min=0.0).sum()
    return excess / max(num_assignments, 1)


def capacity_keep_mask(indices: Tensor, gate_probs: Tensor, num_experts: int, capacity: int) -> Tensor:
    """Which assignments survive a per-expert capacity (capacity mode, docs/routing.md §5).

    Each expert keeps at most ``capacity`` of its assignments, those with the highest gate
    probability; ties go to the earlier token (flat order t * K + k). Vectorised: one stable sort by
    descending probability, one stable sort by expert, a rank within each expert's segment.

    Args:
        indices: [T, K] int64 chosen experts.
        gate_probs: [T, K] gate probabilities of those assignments (priority; not differentiated).
        num_experts: E.
        capacity: C >= 0.

    Returns:
        keep: [T, K] bool.
    """
    if indices.shape != gate_probs.shape:
        raise ValueError(f"indices {tuple(indices.shape)} and gate_probs {tuple(gate_probs.shape)} differ")
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0, got {capacity}")
    flat_idx = indices.reshape(-1)
    flat_prob = gate_probs.detach().reshape(-1)
    n = flat_idx.numel()
    # Stable sorts: by probability (descending; ties keep flat order), then by expert (stable).
    by_prob = torch.sort(flat_prob, descending=True, stable=True).indices
    by_expert = torch.sort(flat_idx[by_prob], stable=True).indices
    order = by_prob[by_expert]  # flat positions grouped by expert, best first within each expert
    counts = torch.zeros(num_experts, dtype=torch.int64, device=indices.device)
    counts.scatter_add_(0, flat_idx, torch.ones_like(flat_idx))
    starts = torch.cumsum(counts, dim=0) - counts
    rank_in_expert = torch.arange(n, device=indices.device) - starts[flat_idx[order]]
    keep = torch.empty(n, dtype=torch.bool, device=indices.device)
    keep[order] = rank_in_expert < capacity
    return keep.view(indices.shape)


def router_entropy(probs: Tensor) -> Tensor:
    """Mean over tokens of the routing entropy ``-sum_E p log p`` in nats (a metric; detached).

    Args:
        probs: [T, E] softmax probabilities.

    Returns:
        scalar fp32 tensor.
    """
    p = probs.detach().to(torch.promote_types(probs.dtype, torch.float32))
    return -torch.special.xlogy(p, p).sum(dim=-1).mean()


class AsyncAllReduce:
    """Launch a SUM all-reduce now, wait for it later (docs/routing.md §4: overlap counts with expert compute).

    ``AsyncAllReduce.start(counts, group)`` right after routing; ``.wait()`` when forming the loss.
    The input tensor is not modified (a copy is reduced). With ``group=None``, torch.distributed not
    initialised, or a group of size 1, nothing is communicated and ``wait`` returns the copy.
    """

    __slots__ = ("_tensor", "_work")

    def __init__(self, tensor: Tensor, work: dist.Work | None) -> None:
        self._tensor = tensor
        self._work = work

    @classmethod
    def start(cls, tensor: Tensor, group: dist.ProcessGroup | None) -> AsyncAllReduce:
        """Start ``dist.all_reduce(copy, SUM, group=group, async_op=True)``; see the class docstring."""
        buf = tensor.detach().clone()
        if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
            return cls(buf, None)
        return cls(buf, dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group, async_op=True))

    def wait(self) -> Tensor:
        """Block until the reduction is done; return the summed tensor (idempotent)."""
        if self._work is not None:
            self._work.wait()
            self._work = None
        return self._tensor
