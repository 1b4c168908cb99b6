"""Gating logit normalisation (Skywork-MoE section 4.1, eq. 6), docs/routing.md §2."""

from __future__ import annotations

from torch import Tensor


def normalize_gate_logits(
    logits: Tensor, scale: float = 1.0, eps: float = 1e-6, center: bool = True
) -> Tensor:
    """Normalise router logits per token over the experts: ``scale * (z - mean) / (std + eps)``.

    Skywork-MoE eq. 6: z~ = lambda * (z - mean_E(z)) / std_E(z) with lambda = ``scale``. The std
    is unbiased (N - 1), as in Skywork's released code; ``eps`` is our addition so that all-equal
    logits (std = 0) give zeros instead of NaN. Skywork's released code divides by the std only;
    ``center=False`` reproduces that (the mean shift does not change a softmax, but it does change
    the z-loss and SparseMixer's relative threshold, so the paper's centred form is the default).

    Args:
        logits: z, shape [T, E] with E >= 2.
        scale: lambda (Skywork uses 1; ablated 0.5, 1, 2).
        eps: added to the std.
        center: subtract the per-token mean.

    Returns:
        normalised logits, shape [T, E], same dtype as ``logits``.
    """
    num_experts = logits.shape[-1]
    if num_experts < 2:
        raise ValueError(
            f"gating logit normalisation needs num_experts >= 2 (unbiased std over {num_experts} expert)"
        )
    if eps < 0:
        raise ValueError(f"moe.logit_norm_eps must be >= 0, got {eps}")
    std = logits.std(dim=-1, keepdim=True, correction=1)
    z = logits - logits.mean(dim=-1, keepdim=True) if center else logits
    return z * (scale / (std + eps))
