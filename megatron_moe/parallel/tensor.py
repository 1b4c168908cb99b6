"""Tensor + sequence parallelism for :class:`~megatron_moe.model.transformer.MoETransformer` or a stage.

Applied from outside to an unmodified model with DTensor parallel styles (torchtitan's layout):

- residual stream between blocks: sequence-sharded local tensors ``[B, S/tp, H]``;
- RMSNorms: :class:`SequenceParallel` (replicated weight, sharded sequence);
- attention: all-gather the sequence, q/k/v :class:`ColwiseParallel` (heads split, KV heads too),
  ``wo`` :class:`RowwiseParallel` reduce-scattered back to sequence shards;
- dense SwiGLU: w1/w3 column-, w2 row-parallel, same gather / reduce-scatter;
- embedding: vocabulary-parallel (:class:`RowwiseParallel` on the vocab dim) into sequence shards;
- output: vocabulary-parallel :class:`ColwiseParallel` returning logits as a DTensor sharded on the
  vocab dim, for :func:`torch.distributed.tensor.parallel.loss_parallel` (no full-logit gather);
- MoE (no expert parallelism): every TP rank holds a 1/tp slice of EVERY expert's ffn dimension
  (w1/w3 ``Shard(2)``, w2 ``Shard(1)``; :class:`GroupedExperts` calls ``to_local``). The sequence is
  all-gathered before routing (:class:`_GatherSequence`), so every TP rank routes the same tokens
  with the replicated router; the experts' partial sums are reduce-scattered back to the sequence
  shards (:class:`_ReduceScatterSequence`).

Gradients of the replicated router: each TP rank's gate gradient through the combine weights is a
partial sum (its expert outputs are partial), while the aux-loss path is computed identically on
every TP rank. The engine therefore scales the aux-loss gradient by ``1/tp`` (``aux_loss_scale``)
and SUMs the gate gradients over TP (:func:`tp_partial_sum_params`): both paths then count once.

SparseMixer-v2 sampling / input jitter: TP ranks route the same tokens and must draw the same
samples. They use the default generator, which the engine seeds identically on the TP ranks of a
data-parallel replica (seed + dp_rank; see :func:`megatron_moe.parallel.engine.seed_runtime_rng`);
since TP ranks execute the same sequence of random ops, their draws coincide.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from megatron_moe.model.moe import MoELayer
from megatron_moe.model.transformer import FeedForward


def _all_gather(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    size = dist.get_world_size(group)
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    x = x.contiguous()
    if "nccl" in dist.get_backend(group):
        chunks = [c.contiguous() for c in x.chunk(size, dim=dim)]
        out = torch.empty_like(chunks[rank])
        dist.reduce_scatter(out, chunks, group=group)
        return out
    # gloo has no reduce-scatter: all-reduce, then keep this rank's chunk.
    dist.all_reduce(x, group=group)
    return x.chunk(size, dim=dim)[rank].contiguous()


class _GatherSequence(torch.autograd.Function):
    """Forward: all-gather sequence shards along ``dim``. Backward: reduce-scatter (sum) the partial grads."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.dim, ctx.group), None, None


class _ReduceScatterSequence(torch.autograd.Function):
    """Forward: reduce-scatter (sum) partial results to sequence shards. Backward: all-gather the grads."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.dim, ctx.group), None, None


def _moe_pre_hook(group: dist.ProcessGroup):
    def hook(module, args):
        (x,) = args
        if isinstance(x, DTensor):  # from the sequence-parallel ffn_norm: Shard(1)
            x = x.to_local()
        return (_GatherSequence.apply(x, 1, group),)

    return hook


def _moe_post_hook(group: dist.ProcessGroup):
    def hook(module, args, output):
        return _ReduceScatterSequence.apply(output, 1, group)

    return hook


def _shard_experts(layer: MoELayer, tp_mesh: DeviceMesh) -> None:
    experts = layer.experts
    for name, dim in (("w1", 2), ("w3", 2), ("w2", 1)):
        full = getattr(experts, name)
        sharded = distribute_tensor(full.detach(), tp_mesh, [Shard(dim)], src_data_rank=None)
        setattr(experts, name, nn.Parameter(sharded, requires_grad=full.requires_grad))


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
    """Shard ``model`` (a full model or a pipeline stage) in place over ``tp_mesh`` (1-D, "tp").

    Every rank must hold the same full weights before the call (each keeps its own slice).
    After it, stage inputs/outputs between blocks are sequence shards [B, S/tp, H]; the last stage
    returns logits as a DTensor [B, S, V] sharded on V (compute the loss under ``loss_parallel``).
    """
    if tp_mesh.size() == 1:
        return model
    group = tp_mesh.get_group()
    root_plan = {}
    if model.tok_embeddings is not None:
        root_plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if model.norm is not None:
        root_plan["norm"] = SequenceParallel()
    if model.output is not None:
        root_plan["output"] = ColwiseParallel(
            input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False
        )
    if root_plan:
        parallelize_module(model, tp_mesh, root_plan, src_data_rank=None)
    for block in model.layers.values():
        plan = {
            "attention_norm": SequenceParallel(),
            "attention": PrepareModuleInput(
                input_layouts=(Shard(1), None, None), desired_input_layouts=(Replicate(), None, None)
            ),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
        }
        if isinstance(block.feed_forward, FeedForward):
            plan.update(
                {
                    "feed_forward": PrepareModuleInput(
                        input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
                    ),
                    "feed_forward.w1": ColwiseParallel(),
                    "feed_forward.w3": ColwiseParallel(),
                    "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
                }
            )
        parallelize_module(block, tp_mesh, plan, src_data_rank=None)
        if isinstance(block.feed_forward, MoELayer):
            moe = block.feed_forward
            _shard_experts(moe, tp_mesh)
            moe.register_forward_pre_hook(_moe_pre_hook(group))
            moe.register_forward_hook(_moe_post_hook(group))
    return model


def tp_partial_sum_params(model: nn.Module) -> list[nn.Parameter]:
    """Replicated parameters whose gradients are partial sums over TP (the MoE router gates)."""
    return [m.router.gate.weight for m in model.modules() if isinstance(m, MoELayer)]
