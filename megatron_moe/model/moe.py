"""Dropless mixture-of-experts feed-forward layer. Single-device code only.

route -> sort the (token, slot) assignments by expert -> one grouped GEMM over stacked expert
weights (SwiGLU) -> unsort and combine with the gate weights. Balancing losses enter the backward
pass through :class:`_AttachAuxLoss` (their gradient rides the layer's output gradient, so they
work on any pipeline stage). Statistics are accumulated as device tensors; nothing here forces a
host sync.

Set from outside (never read from globals):
- ``balance_group``: process group over which token counts are summed for the global-scope
  balancing loss (GRIN section 3.3); None = this process only.
- ``aux_loss_scale``: multiplier of the aux-loss gradient (1 / number of micro-batches).
- ``aux_coeff``: the layer's current auxiliary-loss coefficient (constant or adaptive).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_moe.config import MoEConfig
from megatron_moe.routing.balance import (
    AsyncAllReduce,
    capacity_keep_mask,
    expert_capacity,
    expert_counts,
    router_entropy,
    router_z_loss,
    skywork_balance_loss,
    switch_balance_loss,
    token_drop_rate,
)
from megatron_moe.routing.router import Router
from megatron_moe.routing.sparsemixer import apply_input_jitter


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (torch._grouped_mm's CPU backward needs it)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_swiglu(
    x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """SwiGLU experts over expert-sorted rows with one grouped GEMM per projection.

    x: [N, hidden], rows sorted by expert; w1, w3: [E, hidden, ffn]; w2: [E, ffn, hidden];
    offsets: int32 [E], cumulative row counts (offsets[-1] == N). Returns [N, hidden].
    Weights are cast to the compute dtype (bf16 under autocast).
    """
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    x = x.to(dtype)
    w1, w3, w2 = (w.to(dtype) for w in (w1, w3, w2))
    h = F.silu(torch._grouped_mm(x, w1, offs=offsets)) * torch._grouped_mm(x, w3, offs=offsets)
    return _ContiguousGrad.apply(torch._grouped_mm(h, w2, offs=offsets))


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored stacked: w1, w3 [E, hidden, ffn], w2 [E, ffn, hidden].

    Tensor parallelism shards the ffn dimension (w1/w3 dim 2, w2 dim 1) of every expert.
    """

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size))

    def forward(self, x_sorted: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """x_sorted [N, hidden] grouped by expert, offsets int32 [E] -> [N, hidden] (partial sums under TP)."""
        return grouped_swiglu(x_sorted, _local(self.w1), _local(self.w3), _local(self.w2), offsets)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor parameter (the grouped GEMM runs on plain tensors)."""
    return t.to_local() if hasattr(t, "to_local") else t


class _AttachAuxLoss(torch.autograd.Function):
    """Returns ``y`` unchanged; in backward also sends gradient 1 into ``aux_loss`` (Megatron's auto-scaler)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, aux_loss: torch.Tensor):
        ctx.save_for_backward(aux_loss)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        (aux_loss,) = ctx.saved_tensors
        return grad, torch.ones_like(aux_loss)


class MoEStats:
    """Per-layer statistics summed over the micro-batches since the last reset (device tensors)."""

    def __init__(self, num_experts: int, device: torch.device | None = None):
        self.counts = torch.zeros(num_experts, device=device)  # assignments per expert (before drops)
        self.aux_loss = torch.zeros((), device=device)  # coefficient * balance loss (+ z-loss)
        self.drop_rate = torch.zeros((), device=device)
        self.entropy = torch.zeros((), device=device)
        self.num_micro_batches = 0

    def add(self, counts, aux_loss, drop_rate, entropy) -> None:
        if self.counts.device != counts.device:
            self.__init__(counts.numel(), counts.device)
        self.counts += counts
        self.aux_loss += aux_loss
        self.drop_rate += drop_rate
        self.entropy += entropy
        self.num_micro_batches += 1


class MoELayer(nn.Module):
    """Router + grouped experts. Input/output [B, S, hidden] (or [T, hidden])."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.num_experts, self.topk = cfg.num_experts, cfg.topk
        self.router = Router(
            hidden_size,
            cfg.num_experts,
            cfg.topk,
            kind=cfg.router,
            renormalize=cfg.renormalize,
            logit_norm=cfg.logit_norm,
            logit_norm_scale=cfg.logit_norm_scale,
            jitter_eps=cfg.jitter_eps,
        )
        self.experts = GroupedExperts(cfg.num_experts, hidden_size, ffn_hidden_size)
        self.register_buffer("aux_coeff", torch.tensor(float(cfg.aux_loss_coeff)), persistent=False)
        self.balance_group = None
        self.aux_loss_scale = 1.0
        self.stats = MoEStats(cfg.num_experts)
        # Optional callback(event: str) used by tests to observe the order of communication and compute.
        self.trace = None

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Buffers are not parameters: after ``to_empty`` (meta-device build) they must be set again."""
        self.aux_coeff.fill_(float(self.cfg.aux_loss_coeff))
        self.stats = MoEStats(self.num_experts, self.aux_coeff.device)

    def _event(self, name: str) -> None:
        if self.trace is not None:
            self.trace(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if self.training:
            # GRIN: multiplicative input jitter before the gate; the experts see the same jittered input.
            x = apply_input_jitter(x, self.cfg.input_jitter_eps)
        num_tokens = x.shape[0]
        route = self.router(x)
        counts = expert_counts(route.indices, self.num_experts)
        capacity = expert_capacity(num_tokens, self.topk, self.num_experts, self.cfg.capacity_factor)
        drop_rate = token_drop_rate(counts, capacity, num_tokens * self.topk)

        use_global = self.cfg.balance_loss == "switch" and self.cfg.balance_scope == "global"
        if use_global:
            # Launched as soon as routing exists; waited on after the experts ran (overlap).
            pending = AsyncAllReduce.start(counts, self.balance_group)
            self._event("counts_allreduce_start")

        weights = route.weights
        if not self.cfg.dropless:
            gate_probs = route.probs.gather(1, route.indices)
            keep = capacity_keep_mask(route.indices, gate_probs, self.num_experts, capacity)
            weights = weights * keep.to(weights.dtype)

        flat_experts = route.indices.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)
        token_of_row = order // self.topk
        offsets = torch.cumsum(counts.to(torch.int64), 0).to(torch.int32)
        self._event("experts_start")
        rows = self.experts(x[token_of_row], offsets)
        self._event("experts_end")
        row_weights = weights.reshape(-1)[order].unsqueeze(-1)
        out = torch.zeros(num_tokens, shape[-1], dtype=torch.promote_types(rows.dtype, row_weights.dtype),
                          device=x.device)
        out = out.index_add(0, token_of_row, rows * row_weights).to(x.dtype)

        aux = torch.zeros((), device=x.device)
        if self.cfg.balance_loss != "none":
            if self.cfg.balance_loss == "skywork":
                balance = skywork_balance_loss(route.probs)
            else:
                balance_counts = pending.wait() if use_global else counts
                if use_global:
                    self._event("counts_allreduce_wait")
                balance = switch_balance_loss(route.probs, balance_counts)
            aux = self.aux_coeff * balance
        if self.cfg.z_loss_coeff > 0:
            aux = aux + self.cfg.z_loss_coeff * router_z_loss(route.logits)
        if aux.requires_grad and torch.is_grad_enabled():
            out = _AttachAuxLoss.apply(out, aux * self.aux_loss_scale)
        self.stats.add(counts, aux.detach(), drop_rate.detach(), router_entropy(route.probs))
        return out.reshape(shape)

    def reset_stats(self) -> MoEStats:
        """Return the accumulated statistics and start new ones."""
        stats, self.stats = self.stats, MoEStats(self.num_experts, self.stats.counts.device)
        return stats


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """The MoE layers of ``model`` in forward order."""
    return [m for m in model.modules() if isinstance(m, MoELayer)]
