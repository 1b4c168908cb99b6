"""SparseMixer-v2 top-2 routing (GRIN MoE, arXiv 2409.12136 appendix A), docs/routing.md §3.

Follows GRIN's released code (the ``sparsemixer`` function of the Phi-3.5-MoE / GRIN-MoE modelling
code) where it differs from the paper:

- the forward weight is ``g_r * c_r`` (not renormalised), and the experts' parameters see
  gradients scaled by it (the paper's Algorithm 1 would use ``p_D`` only);
- the custom backward scales the upstream gradient by ``g_r`` only (``c_r`` is ignored):
  ``dz = G * g_r * (onehot(D_r) - p_r)``;
- round 2 starts from the original logits with only the round-1 expert set to -inf (not from the
  round-1 masked logits), and its relative threshold compares the original ``z`` with the new max;
- eval picks argmax / second argmax with the unnormalised masked-softmax gathers as weights.

One deliberate deviation: the released code writes ``c`` as ``0.3333 + 0.6667 * mask``; we use the
exact values 1/3 and 1 of Heun's rule (docs/routing.md §3 step 4; ``E[c | D != argmax] = 1/2`` exactly).
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_moe.config import SPARSEMIXER_TOPK, check_sparsemixer_topk

# Heun's third-order rule: f(x) - f(0) ~ 1/4 f'(x) + 3/4 f'(x/3)  (GRIN appendix A).
_HEUN_PROB_ONE = 0.25
_HEUN_MIDPOINT = 1.0 / 3.0


class _SparseMixerGate(torch.autograd.Function):
    """Forward ``w = p[D] * c``; backward ``dz = G * p[D] * (onehot(D) - p)`` (docs/routing.md §3 step 6).

    ``probs`` is the masked softmax p_r [T, E] (computed without autograd), ``index`` D_r [T, 1],
    ``multiplier`` c_r [T, 1]. Only ``logits`` receives a gradient; masked columns have p = 0 and
    are not D, so they get exactly zero.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, probs: Tensor, index: Tensor, multiplier: Tensor) -> Tensor:
        gate = probs.gather(-1, index)  # g_r = p_r[D_r], [T, 1]
        ctx.save_for_backward(probs, index, gate)
        return gate * multiplier

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        probs, index, gate = ctx.saved_tensors
        scaled = grad_out * gate  # G * g_r, [T, 1]
        grad_logits = probs * (-scaled)
        grad_logits.scatter_add_(-1, index, scaled)
        return grad_logits, None, None, None


def _relative_threshold_mask(z: Tensor, zmax: Tensor, jitter_eps: float) -> Tensor:
    """True where an expert is masked: (zmax - z_i) / max(|z_i|, zmax) > 2 * eps (docs/routing.md §3 step 1).

    As in GRIN's code the comparison is ``>`` on the ratio, so a 0/0 ratio (z_i = zmax = 0) is kept.
    """
    factor = z.abs().clamp(min=zmax)
    return ((zmax - z) / factor) > (2.0 * jitter_eps)


def _gumbel_argmax(masked: Tensor, generator: torch.Generator | None) -> Tensor:
    """Sample from softmax(masked) by Gumbel-max: argmax(masked - log(Exp(1))) (docs/routing.md §3 step 2).

    The Exp(1) noise is drawn in fp32. It is clamped to the smallest normal fp32 so that a draw of
    exactly 0 cannot turn a masked -inf into NaN (-inf + inf); otherwise identical to GRIN's code.
    Returns [T, 1] int64.
    """
    noise = torch.empty(masked.shape, dtype=torch.float32, device=masked.device)
    noise.exponential_(generator=generator)
    noise = noise.clamp_(min=torch.finfo(torch.float32).tiny).log_()
    return (masked - noise.to(masked.dtype)).argmax(dim=-1, keepdim=True)


def _heun_multiplier(index: Tensor, probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """c_r = 1 if D_r == argmax(p_r) or with probability 1/4, else 1/3 (docs/routing.md §3 step 4). [T, 1]."""
    top = probs.argmax(dim=-1, keepdim=True)
    uniform = torch.rand(index.shape, dtype=torch.float32, device=index.device, generator=generator)
    is_one = (index == top) | (uniform > 1.0 - _HEUN_PROB_ONE)
    one = torch.ones((), dtype=probs.dtype, device=probs.device)
    return torch.where(is_one, one, one * _HEUN_MIDPOINT)


def sparsemixer_v2_routing(
    logits: Tensor,
    jitter_eps: float,
    training: bool,
    generator: torch.Generator | None = None,
    topk: int = SPARSEMIXER_TOPK,
) -> tuple[Tensor, Tensor]:
    """SparseMixer-v2 top-2 routing (GRIN).

    Training: per round r = 1, 2, mask experts outside the relative window 2*eps of the max, sample
    D_r ~ softmax(masked z) by Gumbel-max, forward weight ``w_r = p_r[D_r] * c_r`` with the custom
    backward of :class:`_SparseMixerGate`. Round 2 works on z with D_1 set to -inf. Random draws, in
    this order: Exp(1) noise [T, E] (fp32), uniforms [T, 1] for c_1, the same for round 2; taken from
    ``generator`` if given, else the default generator of ``logits.device`` (ranks seeded alike draw
    alike).

    Eval (``training=False``): deterministic, no draws, no c; D_1 = argmax z, D_2 = argmax of z
    without D_1; weights are the unnormalised masked-softmax gathers (plain autograd).

    Args:
        logits: router logits z [T, E], E >= 2; computed in fp32 (fp64 stays fp64).
        jitter_eps: GRIN's router jitter eps (0.01), sets the relative masking window.
        training: sample (True) or take the argmax (False).
        generator: optional torch.Generator on ``logits.device``.
        topk: must be 2 (SparseMixer-v2 as released is top-2 only).

    Returns:
        weights: [T, 2] (fp32, or fp64 for fp64 input), not renormalised.
        indices: [T, 2] int64, the round-1 and round-2 experts (always distinct).
    """
    check_sparsemixer_topk(topk)
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape [T, E], got {tuple(logits.shape)}")
    if logits.shape[-1] < 2:
        raise ValueError(f"the sparsemixer router needs num_experts >= 2, got {logits.shape[-1]}")
    if jitter_eps < 0:
        raise ValueError(f"moe.jitter_eps must be >= 0, got {jitter_eps}")

    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    neg_inf = float("-inf")
    weights: list[Tensor] = []
    indices: list[Tensor] = []
    # Round 1 works on z; round 2 on z with D_1 scattered to -inf, thresholded against the ORIGINAL z.
    remaining = z.detach() if training else z
    for round_ in range(2):
        with torch.no_grad():
            zmax, argmax = remaining.max(dim=-1, keepdim=True)
            mask = _relative_threshold_mask(z.detach(), zmax, jitter_eps)
        if training:
            with torch.no_grad():
                masked = remaining.masked_fill(mask, neg_inf)
                index = _gumbel_argmax(masked, generator)
                probs = torch.softmax(masked, dim=-1)
                multiplier = _heun_multiplier(index, probs, generator)
            weight = _SparseMixerGate.apply(z, probs, index, multiplier)
        else:
            index = argmax
            weight = torch.softmax(remaining.masked_fill(mask, neg_inf), dim=-1).gather(-1, index)
        weights.append(weight)
        indices.append(index)
        if round_ == 0:
            remaining = remaining.scatter(-1, index, neg_inf)
    return torch.cat(weights, dim=-1), torch.cat(indices, dim=-1)


def apply_input_jitter(x: Tensor, eps: float, generator: torch.Generator | None = None) -> Tensor:
    """Multiplicative input jitter x * U(1 - eps, 1 + eps) (GRIN, training only; docs/routing.md §3).

    Applied once to the MoE input before the gate. Returns a new tensor (the input is not modified);
    ``eps == 0`` returns ``x`` unchanged. The uniforms are drawn in fp32 from ``generator`` (or the
    default generator of ``x.device``) and cast to ``x.dtype``.
    """
    if eps < 0:
        raise ValueError(f"moe.input_jitter_eps must be >= 0, got {eps}")
    if eps == 0:
        return x
    noise = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    noise.uniform_(1.0 - eps, 1.0 + eps, generator=generator)
    return x * noise.to(x.dtype)
