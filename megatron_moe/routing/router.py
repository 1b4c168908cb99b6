"""The router module: fp32 gate, optional logit normalisation, top-K (softmax or sigmoid scores, optional
expert bias) or SparseMixer-v2 routing."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron_moe.config import ROUTERS, SCORE_FUNCTIONS, check_sparsemixer_topk, group_limited_routing_fits
from megatron_moe.routing.normalization import normalize_gate_logits
from megatron_moe.routing.sparsemixer import sparsemixer_v2_routing
from megatron_moe.routing.topk import (
    sigmoid_balance_probs,
    sigmoid_topk_routing,
    topk_softmax_routing,
    updated_expert_bias,
)


@dataclass
class RouterOutput:
    """What a router returns for T tokens.

    Attributes:
        indices: [T, K] int64 chosen experts (sampled ones for SparseMixer in training).
        weights: [T, K] float32 combine weights (differentiable w.r.t. the gate).
        logits: [T, E] float32 logits after normalisation if enabled (z-loss input).
        probs: [T, E] float32 full, unmasked softmax(logits), or with sigmoid scores the sigmoids normalised
            over the experts (balance-loss input).
        balance_indices: [T, K] the top-K of ``probs`` when an expert bias or group-limited routing made
            ``indices`` differ from it (the choice the balance losses count, as megatron-core and DeepSeek-V3
            eq. 18); None: ``indices``.
    """

    indices: Tensor
    weights: Tensor
    logits: Tensor
    probs: Tensor
    balance_indices: Tensor | None = None


class Router(nn.Module):
    """Bias-free linear gate computed in fp32, then top-K softmax (docs/routing.md §1), top-K sigmoid with an
    optional expert bias for choosing (§1b) or SparseMixer-v2 (§3).

    Args:
        hidden_size: H.
        num_experts: E.
        topk: K (must be 2 for ``kind="sparsemixer"``).
        kind: ``"topk"`` or ``"sparsemixer"``.
        renormalize: top-K only: renormalise the K weights to sum 1.
        logit_norm: apply Skywork's gating logit normalisation (docs/routing.md §2) before routing.
        logit_norm_scale: its lambda.
        jitter_eps: SparseMixer's relative masking window eps (GRIN: 0.01).
        score_function: top-K only: ``"softmax"`` or ``"sigmoid"``.
        expert_bias: keep an fp32 buffer ``expert_bias`` [E] (zeros) added to the sigmoid scores for choosing;
            moved by :meth:`update_expert_bias` (a persistent buffer: checkpoints hold it).
        topk_scaling_factor: top-K only: the combine weights are multiplied by it.
        groups: top-K only: (number of groups, groups kept) for group-limited routing, or None.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        topk: int,
        kind: str = "topk",
        renormalize: bool = True,
        logit_norm: bool = False,
        logit_norm_scale: float = 1.0,
        jitter_eps: float = 0.01,
        score_function: str = "softmax",
        expert_bias: bool = False,
        topk_scaling_factor: float = 1.0,
        groups: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if kind not in ROUTERS:
            raise ValueError(f"moe.router must be one of {ROUTERS}, got {kind!r}")
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
        if num_experts < 1:
            raise ValueError(f"moe.num_experts must be >= 1, got {num_experts}")
        if not 1 <= topk <= num_experts:
            raise ValueError(f"moe.topk must be in [1, moe.num_experts={num_experts}], got {topk}")
        if kind == "sparsemixer":
            check_sparsemixer_topk(topk)
        if logit_norm and num_experts < 2:
            raise ValueError("moe.logit_norm needs moe.num_experts >= 2")
        if not jitter_eps >= 0:
            raise ValueError(f"moe.jitter_eps must be >= 0, got {jitter_eps}")
        if score_function not in SCORE_FUNCTIONS or (kind == "sparsemixer" and score_function != "softmax"):
            raise ValueError(f"moe.score_function = {score_function!r} with moe.router = {kind!r}")
        if expert_bias and score_function != "sigmoid":
            raise ValueError("moe.expert_bias needs moe.score_function = 'sigmoid'")
        if groups is not None and (kind != "topk" or not group_limited_routing_fits(num_experts, topk, *groups)):
            raise ValueError(f"group-limited routing {groups} with {num_experts} experts, top-{topk}, {kind!r}")
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.topk = topk
        self.kind = kind
        self.renormalize = renormalize
        self.logit_norm = logit_norm
        self.logit_norm_scale = float(logit_norm_scale)
        self.jitter_eps = float(jitter_eps)
        self.score_function = score_function
        self.topk_scaling_factor = float(topk_scaling_factor)
        self.groups = groups
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.expert_bias: Tensor | None
        self.register_buffer("expert_bias", torch.zeros(num_experts) if expert_bias else None)

    @torch.no_grad()
    def update_expert_bias(self, counts: Tensor, rate: float, apply: Tensor | bool = True) -> None:
        """Move the expert bias one step against the load imbalance of ``counts`` [E] (docs/routing.md §1b),
        where ``apply`` (a bool or a device bool tensor: no host sync) holds."""
        if self.expert_bias is not None:
            new = updated_expert_bias(self.expert_bias, counts.to(self.expert_bias.device), rate)
            self.expert_bias.copy_(torch.where(torch.as_tensor(apply, device=new.device), new, self.expert_bias))

    def reset_parameters(self, std: float, generator: torch.Generator | None = None) -> None:
        """Initialise the gate weight [E, H] from N(0, std^2)."""
        with torch.no_grad():
            self.gate.weight.normal_(0.0, std, generator=generator)

    def gate_logits(self, x: Tensor) -> Tensor:
        """fp32 logits [T, E] of x [T, H], autocast disabled; normalised if ``logit_norm``."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.to(torch.float32), self.gate.weight.to(torch.float32))
            if self.logit_norm:
                logits = normalize_gate_logits(logits, scale=self.logit_norm_scale)
        return logits

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> RouterOutput:
        """Route T tokens.

        Args:
            x: [T, H] hidden states (any float dtype).
            generator: SparseMixer's sampling generator (training only); default generator if None.

        Returns:
            :class:`RouterOutput` with indices/weights [T, K] and logits/probs [T, E], all fp32.
        """
        if x.dim() != 2 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"router input must have shape [T, {self.hidden_size}], got {tuple(x.shape)}")
        logits = self.gate_logits(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            if self.score_function == "sigmoid":
                probs = sigmoid_balance_probs(logits)
                weights, indices = sigmoid_topk_routing(logits, self.topk, self.renormalize, self.expert_bias,
                                                        self.groups)
            elif self.kind == "topk":
                probs = torch.softmax(logits, dim=-1)
                weights, indices = topk_softmax_routing(logits, self.topk, self.renormalize, self.groups)
            else:
                probs = torch.softmax(logits, dim=-1)
                weights, indices = sparsemixer_v2_routing(
                    logits, self.jitter_eps, self.training, generator=generator
                )
            if self.topk_scaling_factor != 1.0:
                weights = weights * self.topk_scaling_factor
            limited = self.expert_bias is not None or self.groups is not None
            unbiased = torch.topk(probs, self.topk, dim=-1).indices if limited else None
        return RouterOutput(indices=indices, weights=weights, logits=logits, probs=probs, balance_indices=unbiased)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, topk={self.topk}, "
            f"kind={self.kind}, renormalize={self.renormalize}, logit_norm={self.logit_norm}, "
            f"score_function={self.score_function}, expert_bias={self.expert_bias is not None}"
        )
