"""Dropless mixture-of-experts feed-forward layer. Single-device code only.

route -> sort the (token, slot) assignments by expert -> one grouped GEMM over stacked expert
weights (SwiGLU) -> unsort and combine with the gate weights. Balancing losses enter the backward
pass through :class:`_AttachAuxLoss` (their gradient rides the layer's output gradient, so they
work on any pipeline stage). Statistics are accumulated as device tensors; nothing here forces a
host sync.

The layer owns its control values and statistics; callers use its methods, never its attributes:
- :meth:`MoELayer.set_balance_group`: process group over which token counts are summed for the
  global-scope balancing loss (docs/routing.md §4, GRIN section 3.3); None = this process only.
- :meth:`MoELayer.set_aux_loss_scale`: multiplier of the aux-loss gradient (1 / micro-batches per step).
- :meth:`MoELayer.set_aux_coefficient`: the current auxiliary-loss coefficient (constant or adaptive).
- :meth:`MoELayer.pop_stats` / :meth:`MoELayer.muted_stats`: the statistics of the forwards since
  the last pop, and a context in which forwards are not counted.
:class:`MoELayerSet` does the same for all MoE layers of a rank, by their index in the whole model.
Tensor parallelism is applied from outside by :class:`megatron_moe.parallel.tensor.MoETensorParallel`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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
    sequence_balance_loss,
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
    Weights may be DTensors (their local shards are used) and are cast to the compute dtype (bf16
    under autocast).
    """
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    x = x.to(dtype)
    w1, w3, w2 = (_local(w).to(dtype) for w in (w1, w3, w2))
    h = F.silu(torch._grouped_mm(x, w1, offs=offsets)) * torch._grouped_mm(x, w3, offs=offsets)
    return _ContiguousGrad.apply(torch._grouped_mm(h, w2, offs=offsets))


# torch._grouped_mm's shape function (what torch.compile traces with) admits bf16 only, though the
# CPU kernel also runs fp32: in other dtypes the experts run eagerly (one graph break per MoE layer).
_grouped_swiglu_eager = torch.compiler.disable(grouped_swiglu)


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
        experts = grouped_swiglu if x_sorted.dtype == torch.bfloat16 else _grouped_swiglu_eager
        return experts(x_sorted, self.w1, self.w3, self.w2, offsets)


class SharedExpert(nn.Module):
    """The shared expert (Qwen2-MoE, DeepSeek; Megatron-LM's ``--moe-shared-expert-intermediate-size``): a
    bias-free SwiGLU w2(silu(w1 x) * w3 x) that every token passes, as nn.Linear weights ``[out, in]``.

    Tensor parallelism shards its ffn dimension like the routed experts' (w1/w3 rows, w2 columns) and
    this module computes on the local shards, so its output is a partial sum under TP like theirs.
    """

    def __init__(self, hidden_size: int, ffn_hidden_size: int):
        super().__init__()
        self.w1 = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.w3 = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.w2 = nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]."""
        w1, w3, w2 = (_local(lin.weight) for lin in (self.w1, self.w3, self.w2))
        return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor parameter (the grouped GEMM runs on plain tensors)."""
    return t.to_local() if hasattr(t, "to_local") else t


def expert_row_alignment(setting: int, x: torch.Tensor) -> int:
    """Rows per expert group a multiple of this: ``moe.expert_row_alignment``, or when 0, 16 bytes of the
    compute dtype on CUDA (the grouped GEMM's backward groups along the token dimension, whose start
    must be 16-byte aligned) and 1 (no padding) elsewhere."""
    if setting:
        return setting
    if x.device.type != "cuda":
        return 1
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
    return max(1, 16 // (torch.finfo(dtype).bits // 8))


def run_experts(experts: GroupedExperts, x_sorted: torch.Tensor, expert_of_row: torch.Tensor, counts: torch.Tensor,
                alignment: int = 1) -> torch.Tensor:
    """The experts on rows sorted by expert: x_sorted [N, H], expert_of_row [N] (non-decreasing),
    counts [E] rows per expert. Returns [N, H].

    With ``alignment`` > 1 each group is padded with zero rows to a multiple of it, inside a buffer of
    the static size N + E * (alignment - 1) (no host sync); the padding rows are dropped afterwards.
    """
    counts = counts.to(torch.int64)
    if alignment <= 1:
        return experts(x_sorted, torch.cumsum(counts, 0).to(torch.int32))
    num_experts, n = counts.numel(), x_sorted.shape[0]
    padded = (counts + alignment - 1) // alignment * alignment
    start = torch.cumsum(counts, 0) - counts
    padded_start = torch.cumsum(padded, 0) - padded
    rank_in_group = torch.arange(n, device=x_sorted.device) - start[expert_of_row]
    dest = padded_start[expert_of_row] + rank_in_group
    buffer = x_sorted.new_zeros(n + num_experts * (alignment - 1), x_sorted.shape[1]).index_copy(0, dest, x_sorted)
    return experts(buffer, torch.cumsum(padded, 0).to(torch.int32))[dest]


class _GatherRows(torch.autograd.Function):
    """``x.index_select(0, index)`` [N, H] where every input row t appears ``copies`` times and
    ``inverse[t * copies + j]`` is the output row holding its j-th copy. The backward is then a gather and a
    sum over the copies, not autograd's scatter-add for indexing (slower, and accumulated with atomics on CUDA).

    Dispatch: tokens [T, H] -> expert-sorted rows (``index = order // K``, ``copies = K``); combine: sorted rows
    -> (token, slot) order (``index = inverse``, the inverse of ``order``, and ``copies = 1``).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, copies: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.copies = copies
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        grad = grad.index_select(0, inverse)
        if ctx.copies > 1:
            grad = grad.view(-1, ctx.copies, grad.shape[-1]).sum(1)
        return grad, None, None, None


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
    """Per-layer statistics summed over the micro-batches since the last reset (device tensors).

    :meth:`pack` / :meth:`unpack` turn them into one row ``[E + 4]`` so that the statistics of all
    layers travel in one all-reduce; :meth:`mean` gives the per-micro-batch means people read.
    """

    def __init__(self, num_experts: int, device: torch.device | None = None):
        self.counts = torch.zeros(num_experts, device=device)  # assignments per expert (before drops)
        self.aux_loss = torch.zeros((), device=device)  # coefficient * balance loss (+ z-loss)
        self.drop_rate = torch.zeros((), device=device)
        self.entropy = torch.zeros((), device=device)
        self.num_micro_batches: int | torch.Tensor = 0  # a host int while accumulating; a tensor after unpack

    def add(self, counts, aux_loss, drop_rate, entropy) -> None:
        if self.counts.device != counts.device:
            self.__init__(counts.numel(), counts.device)
        self.counts += counts
        self.aux_loss += aux_loss
        self.drop_rate += drop_rate
        self.entropy += entropy
        self.num_micro_batches += 1

    def pack(self) -> torch.Tensor:
        """float32 [E + 4]: counts, aux_loss, drop_rate, entropy, num_micro_batches."""
        scalars = torch.stack([self.aux_loss, self.drop_rate, self.entropy]).to(self.counts)
        micro = torch.full((1,), float(self.num_micro_batches), device=self.counts.device)
        return torch.cat([self.counts, scalars, micro])

    @classmethod
    def unpack(cls, row: torch.Tensor) -> MoEStats:
        """Inverse of :meth:`pack` (also of a sum of packed rows: the statistics add up). The
        micro-batch count stays a device tensor: nothing here waits for the device."""
        stats = cls(row.numel() - 4, row.device)
        stats.counts = row[:-4].clone()
        stats.aux_loss, stats.drop_rate, stats.entropy, stats.num_micro_batches = row[-4:].unbind()
        return stats

    def mean(self, name: str) -> torch.Tensor:
        """Per-micro-batch mean of ``aux_loss``, ``drop_rate`` or ``entropy`` (a device scalar)."""
        value = getattr(self, name)
        return value / torch.as_tensor(self.num_micro_batches, dtype=value.dtype).clamp_min(1)

    def load_fractions(self) -> list[float]:
        """Fraction of routed assignments per expert (host floats)."""
        return (self.counts / self.counts.sum().clamp_min(1.0)).tolist()


class MoELayer(nn.Module):
    """Router + grouped experts (+ an optional shared expert, its output optionally gated). Input/output
    [B, S, hidden] (or [T, hidden])."""

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
            score_function=cfg.score_function,
            expert_bias=cfg.expert_bias,
            topk_scaling_factor=cfg.topk_scaling_factor,
            groups=(cfg.router_num_groups, cfg.router_group_topk) if cfg.router_group_topk else None,
        )
        self.experts = GroupedExperts(cfg.num_experts, hidden_size, ffn_hidden_size)
        shared = cfg.shared_expert_ffn_hidden_size
        self.shared_expert = SharedExpert(hidden_size, shared) if shared else None
        self.shared_gate = nn.Linear(hidden_size, 1, bias=False) if cfg.shared_expert_gate else None
        self.register_buffer("aux_coeff", torch.tensor(float(cfg.aux_loss_coeff)), persistent=False)
        self._balance_group = None
        self._aux_loss_scale = 1.0
        self._stats = MoEStats(cfg.num_experts)
        # Optional callback(event: str) used by tests to observe the order of communication and compute.
        self.trace = None

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Buffers are not parameters: after ``to_empty`` (meta-device build) they must be set again."""
        self.aux_coeff.fill_(float(self.cfg.aux_loss_coeff))
        if self.router.expert_bias is not None:
            self.router.expert_bias.zero_()
        self._stats = MoEStats(self.num_experts, self.aux_coeff.device)

    def set_balance_group(self, group) -> None:
        """Sum the token counts of the global-scope balance loss over ``group`` (the data-parallel group:
        tensor-parallel ranks route the same tokens); None = this process only (docs/routing.md §4)."""
        self._balance_group = group

    def set_aux_loss_scale(self, scale: float) -> None:
        """Weight of the aux-loss gradient, 1 / micro-batches per step (as the LM loss is averaged)."""
        self._aux_loss_scale = float(scale)

    @torch.no_grad()
    def set_aux_coefficient(self, value: torch.Tensor | float) -> None:
        """The balance-loss coefficient alpha for the next forwards (constant or adaptive, docs/routing.md §5)."""
        self.aux_coeff.copy_(torch.as_tensor(value, dtype=self.aux_coeff.dtype))

    def pop_stats(self) -> MoEStats:
        """The statistics accumulated since the last pop; starts new ones."""
        stats, self._stats = self._stats, MoEStats(self.num_experts, self._stats.counts.device)
        return stats

    @contextlib.contextmanager
    def muted_stats(self) -> Iterator[None]:
        """Forwards inside this context are not counted (e.g. a pipeline's shape-inference passes)."""
        saved, self._stats = self._stats, MoEStats(self.num_experts, self._stats.counts.device)
        try:
            yield
        finally:
            self._stats = saved

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

        # The balance losses count the choice without the expert bias (docs/routing.md §1b); the statistics
        # and the bias update count the experts that really run.
        balance_indices = route.indices if route.balance_indices is None else route.balance_indices
        balance_counts = counts if route.balance_indices is None else expert_counts(balance_indices, self.num_experts)
        use_global = self.cfg.balance_loss == "switch" and self.cfg.balance_scope == "global"
        if use_global:
            # Launched as soon as routing exists; waited on after the experts ran (overlap).
            pending = AsyncAllReduce.start(balance_counts, self._balance_group)
            self._event("counts_allreduce_start")

        weights = route.weights
        if not self.cfg.dropless:
            gate_probs = route.probs.gather(1, route.indices)
            keep = capacity_keep_mask(route.indices, gate_probs, self.num_experts, capacity)
            weights = weights * keep.to(weights.dtype)

        flat_experts = route.indices.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)  # row r of the sorted rows is assignment order[r]
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        self._event("experts_start")
        x_sorted = _GatherRows.apply(x, order // self.topk, inverse, self.topk)
        rows = run_experts(self.experts, x_sorted, flat_experts[order], counts,
                           expert_row_alignment(self.cfg.expert_row_alignment, x))
        self._event("experts_end")
        # Combine: back to (token, slot) order, then each token's gate-weighted sum over its K slots, in the
        # promoted dtype (float32 gates x bf16 rows: autograd keeps the bf16 rows, not a float32 copy).
        slots = _GatherRows.apply(rows, inverse, order, 1).view(num_tokens, self.topk, -1)
        out = (slots * weights.unsqueeze(-1)).sum(1).to(x.dtype)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_gate is not None:  # Qwen2-MoE: sigmoid(x . g) per token
                shared = shared * torch.sigmoid(self.shared_gate(x))
            out = out + shared.to(out.dtype)

        aux = torch.zeros((), device=x.device)
        if self.cfg.balance_loss != "none":
            if self.cfg.balance_loss == "skywork":
                balance = skywork_balance_loss(route.probs)
            elif self.cfg.balance_loss == "sequence":  # [B, S, H] input: B sequences; [T, H]: one
                balance = sequence_balance_loss(route.probs, balance_indices, shape[0] if len(shape) == 3 else 1)
            else:
                if use_global:
                    balance_counts = pending.wait()
                    self._event("counts_allreduce_wait")
                balance = switch_balance_loss(route.probs, balance_counts)
            aux = self.aux_coeff * balance
        if self.cfg.z_loss_coeff > 0:
            aux = aux + self.cfg.z_loss_coeff * router_z_loss(route.logits)
        if aux.requires_grad and torch.is_grad_enabled():
            out = _AttachAuxLoss.apply(out, aux * self._aux_loss_scale)
        self._stats.add(counts, aux.detach(), drop_rate.detach(), router_entropy(route.probs))
        return out.reshape(shape)


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """The MoE layers of ``model`` in forward order."""
    return [m for m in model.modules() if isinstance(m, MoELayer)]


class MoELayerSet:
    """One rank's MoE layers, each with its index among ALL MoE layers of the model (pipeline stages
    hold some of them). Per-step control and statistics of every layer go through here.

    Args:
        layers: ``(global MoE index, layer)`` pairs of this rank.
        num_total: MoE layers in the whole model.
        num_experts: E.
    """

    def __init__(self, layers: list[tuple[int, MoELayer]] = (), num_total: int = 0, num_experts: int = 0):
        self.layers = list(layers)
        self.num_total = num_total
        self.num_experts = num_experts

    def __iter__(self) -> Iterator[tuple[int, MoELayer]]:
        return iter(self.layers)

    def set_balance_group(self, group) -> None:
        for _, layer in self.layers:
            layer.set_balance_group(group)

    def set_aux_loss_scale(self, scale: float) -> None:
        for _, layer in self.layers:
            layer.set_aux_loss_scale(scale)

    def set_coefficients(self, coefficients: torch.Tensor) -> None:
        """``coefficients`` [num_total]: each layer takes the entry of its global index."""
        for idx, layer in self.layers:
            layer.set_aux_coefficient(coefficients[idx])

    def reset_stats(self) -> None:
        for _, layer in self.layers:
            layer.pop_stats()

    def update_expert_biases(self, counts: torch.Tensor, rate: float, apply: torch.Tensor | bool = True) -> None:
        """Each layer's router moves its expert bias (if it has one) by the step's loads ``counts``
        [num_total, E] (token assignments per expert, summed over micro-batches and data parallelism)."""
        for idx, layer in self.layers:
            layer.router.update_expert_bias(counts[idx], rate, apply)

    def pop_stats_rows(self, device: torch.device) -> torch.Tensor:
        """[num_total, E + 4] packed statistics (:meth:`MoEStats.pack`); zero rows for other ranks' layers,
        so that summing the rows of all ranks gives every layer's statistics."""
        rows = torch.zeros(self.num_total, self.num_experts + 4, device=device)
        for idx, layer in self.layers:
            rows[idx] = layer.pop_stats().pack()
        return rows

    @contextlib.contextmanager
    def muted_stats(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for _, layer in self.layers:
                stack.enter_context(layer.muted_stats())
            yield
