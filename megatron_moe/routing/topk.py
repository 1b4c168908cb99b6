"""Top-K routers: softmax scores (GShard / Switch / Mixtral, docs/routing.md §1) and sigmoid scores with an
optional expert bias for choosing (DeepSeek-V3's auxiliary-loss-free balancing, docs/routing.md §1b)."""

from __future__ import annotations

import torch
from torch import Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32 and lower precisions (bf16/fp16); fp64 stays fp64 (used by gradient checks)."""
    return torch.promote_types(dtype, torch.float32)


def group_limited_choice(scores: Tensor, topk: int, groups: tuple[int, int]) -> Tensor:
    """[T, K] experts chosen within the best groups (DeepSeek-V2/V3's device- and node-limited routing;
    megatron-core's ``group_limited_topk``, docs/routing.md §1b): the E experts form ``groups[0]`` equal groups
    in order; each group scores the sum of its top-(K / ``groups[1]``) ``scores``; the ``groups[1]`` best groups
    are kept and the K largest ``scores`` among their experts are chosen, by decreasing score."""
    num_groups, group_topk = groups
    t, e = scores.shape
    group_scores = scores.view(t, num_groups, e // num_groups).topk(topk // group_topk, dim=-1).values.sum(-1)
    kept = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_scores.topk(group_topk, dim=-1).indices,
                                                                      True)
    masked = scores.masked_fill(~kept.repeat_interleave(e // num_groups, dim=1), float("-inf"))
    return masked.topk(topk, dim=-1).indices


def topk_softmax_routing(logits: Tensor, topk: int, renormalize: bool = True,
                         groups: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
    """Pick the ``topk`` largest softmax probabilities per token.

    docs/routing.md §1: g = softmax(z); weights = the K picked g, renormalised to sum 1 per token unless
    ``renormalize`` is False. Gradients flow through the picked g (and the renormalisation).
    The softmax runs in fp32 (fp64 inputs stay fp64). Eval and training are identical.

    Args:
        logits: router logits z, shape [T, E].
        topk: K, 1 <= K <= E.
        renormalize: divide the K picked probabilities by their sum.
        groups: (number of groups, groups kept) for group-limited routing (:func:`group_limited_choice`),
            chosen by the logits when ``renormalize`` and by the probabilities otherwise (megatron-core's
            top-K-then-softmax and pre-softmax orders, which group sums tell apart), or None.

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
    if groups is None:
        weights, indices = torch.topk(probs, topk, dim=-1)
    else:
        indices = group_limited_choice(logits.detach() if renormalize else probs.detach(), topk, groups)
        weights = probs.gather(1, indices)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, indices


def sigmoid_topk_routing(logits: Tensor, topk: int, renormalize: bool = True, expert_bias: Tensor | None = None,
                         groups: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
    """Pick ``topk`` experts per token by sigmoid scores (DeepSeek-V3 eqs. 15-16, docs/routing.md §1b).

    s = sigmoid(z); the K experts with the largest ``s + expert_bias`` are chosen (the bias only chooses);
    their weights are the K picked s, divided by their sum (+ 1e-20, as Megatron-LM) when ``renormalize``
    and K > 1. Computed in fp32 (fp64 stays fp64).

    Args:
        logits: [T, E] router logits z.
        topk: K, 1 <= K <= E.
        renormalize: normalise the K picked scores to sum 1 (K > 1).
        expert_bias: [E] float32 bias b_i for choosing, or None.
        groups: (number of groups, groups kept): choose within the best groups of ``s + b``
            (:func:`group_limited_choice`), or None.

    Returns:
        weights: [T, K], differentiable w.r.t. ``logits``; indices: [T, K] int64, by decreasing s + b.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape [T, E], got {tuple(logits.shape)}")
    if not 1 <= topk <= logits.shape[-1]:
        raise ValueError(f"moe.topk must be in [1, num_experts={logits.shape[-1]}], got {topk}")
    scores = torch.sigmoid(logits.to(_compute_dtype(logits.dtype)))
    choose = scores.detach() if expert_bias is None else scores.detach() + expert_bias.to(scores.dtype)
    indices = torch.topk(choose, topk, dim=-1).indices if groups is None else group_limited_choice(choose, topk, groups)
    weights = scores.gather(1, indices)
    if renormalize and topk > 1:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights, indices


def sigmoid_balance_probs(logits: Tensor) -> Tensor:
    """[T, E] sigmoid scores normalised over the E experts, s / (sum s + 1e-20): what the balance losses take
    as probabilities with sigmoid scores (DeepSeek-V3 eq. 19; megatron-core's scores for its aux losses)."""
    scores = torch.sigmoid(logits.to(_compute_dtype(logits.dtype)))
    return scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)


@torch.no_grad()
def updated_expert_bias(expert_bias: Tensor, counts: Tensor, rate: float) -> Tensor:
    """One step of DeepSeek-V3's bias update (§2.1.2, docs/routing.md §1b): b_i + rate * sign(mean(c) - c_i),
    i.e. overloaded experts down, underloaded up by ``rate``; ``counts`` [E] are the step's assignments per
    expert (the sign is the same for counts of one rank or summed over ranks in proportion)."""
    counts = counts.to(expert_bias.dtype)
    return expert_bias + rate * torch.sign(counts.mean() - counts)
