"""Routers and load balancing: pure functions plus small modules (numerics: docs/routing.md)."""

from megatron_moe.routing.adaptive import AdaptiveAuxLossCoefficients, ConstantAuxLossCoefficients
from megatron_moe.routing.balance import (
    AsyncAllReduce,
    capacity_keep_mask,
    expert_capacity,
    expert_counts,
    router_entropy,
    router_z_loss,
    sequence_balance_loss,
    skywork_balance_loss,
    switch_balance_loss,
    token_drop_rate,
)
from megatron_moe.routing.normalization import normalize_gate_logits
from megatron_moe.routing.router import Router, RouterOutput
from megatron_moe.routing.sparsemixer import apply_input_jitter, sparsemixer_v2_routing
from megatron_moe.routing.topk import topk_softmax_routing

__all__ = [
    "AdaptiveAuxLossCoefficients",
    "AsyncAllReduce",
    "ConstantAuxLossCoefficients",
    "Router",
    "RouterOutput",
    "apply_input_jitter",
    "capacity_keep_mask",
    "expert_capacity",
    "expert_counts",
    "normalize_gate_logits",
    "router_entropy",
    "router_z_loss",
    "sequence_balance_loss",
    "skywork_balance_loss",
    "sparsemixer_v2_routing",
    "switch_balance_loss",
    "token_drop_rate",
    "topk_softmax_routing",
]
