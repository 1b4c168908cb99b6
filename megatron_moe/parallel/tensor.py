"""Tensor + sequence parallelism for :class:`~megatron_moe.model.transformer.MoETransformer` or a stage.

Applied from outside to an unmodified model with DTensor parallel styles (torchtitan's layout):

- residual stream between blocks: sequence-sharded local tensors ``[B, S/tp, H]``;
- norms (RMSNorm or LayerNorm): :class:`SequenceParallel` (replicated weight and bias, sharded
  sequence; their gradients come out as ``Partial`` sums over TP, made whole after backward by
  :func:`megatron_moe.parallel.data.materialize_partial_grads`); the query/key norms (``model.qk_layernorm``)
  the same way over the heads dimension, each rank holding its heads;
- attention: all-gather the sequence, q/k/v :class:`ColwiseParallel` (heads split, KV heads too),
  ``wo`` :class:`RowwiseParallel` reduce-scattered back to sequence shards;
- dense SwiGLU: w1/w3 column-, w2 row-parallel, same gather / reduce-scatter;
- embedding: vocabulary-parallel (:class:`RowwiseParallel` on the vocab dim) into sequence shards;
- output: vocabulary-parallel :class:`ColwiseParallel` returning logits as a DTensor sharded on the
  vocab dim, for :func:`megatron_moe.parallel.loss.vocab_parallel_cross_entropy` (no full-logit gather);
- multi-token prediction (``model.mtp_num_layers``): each depth's norms and ``[2H -> H]`` projection run on the
  sequence shards with replicated weights (``Partial`` weight gradients, as the norms'); its block is sharded
  as every block, its predictions go through the same output layer;
- biases (``model.add_qkv_bias``, ``add_bias_linear``, ``lm_head_bias``), placed by the same styles:
  a column-parallel layer's bias is sharded with its output rows (q/k/v biases with their heads,
  w1/w3 with the ffn slice, the LM-head bias with the vocabulary slice, padded rows included); a
  row-parallel layer's bias (``wo``, ``w2``) is replicated and DTensor adds it once to the partial
  sums before the reduce-scatter; its gradient comes out ``Replicate``, the whole gradient on every
  TP rank (computed from the all-gathered output gradient). The norms' biases are treated as their
  weights. tests/parallel/test_parity.py checks all of it against one process;
- MoE (no expert parallelism): :class:`MoETensorParallel`, the whole tensor-parallel contract of
  an :class:`MoELayer` in one place. Every TP rank holds a 1/tp slice of EVERY expert's ffn
  dimension (w1/w3 ``Shard(2)``, w2 ``Shard(1)``; :class:`GroupedExperts` calls ``to_local``), and
  of the shared expert's (its nn.Linear w1/w3 ``Shard(0)``, w2 ``Shard(1)``), whose partial sums
  join the experts' before the reduce-scatter. The
  sequence is all-gathered before routing (:class:`_GatherSequence`), so every TP rank routes the
  same tokens with the replicated router; the experts' partial sums are reduce-scattered back to
  the sequence shards (:class:`_ReduceScatterSequence`).

Gradients of the replicated router. The gather's backward SUMS the input gradients of the TP
ranks, so each rank's gradient into the gathered sequence must be its share of the total. The
expert path is (partial expert outputs). The router path is made so as well: the gradient of the
combine weights, a partial sum (it multiplies partial expert outputs), is all-reduced over TP
(``[T, K]`` values, :class:`_SumGradOverGroup`), so every rank's router - gate weight, balance
and z losses included - sees the whole gradient and computes the same gate-weight gradient
(nothing to reduce after backward); the router's input gradient is then scaled by ``1/tp``
(:class:`_ScaleGrad`) so that the gather's sum counts it once. The shared expert's gate (Qwen2-MoE's
sigmoid scale, replicated) is treated the same way: its ``[T, 1]`` output multiplies partial sums, so
its gradient is all-reduced and its input gradient scaled by ``1/tp``.

SparseMixer-v2 sampling / input jitter: TP ranks route the same tokens and must draw the same
samples. They use the default generator, which the engine seeds identically on the TP ranks of a
data-parallel replica (seed + dp_rank; see :func:`megatron_moe.parallel.engine.seed_runtime_rng`);
since TP ranks execute the same sequence of random ops, their draws coincide.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from megatron_moe.model.moe import MoELayer
from megatron_moe.model.transformer import FeedForward, LatentAttention, TiedOutput


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


class _SumGradOverGroup(torch.autograd.Function):
    """Forward: identity. Backward: all-reduce (sum) the gradient over ``group``."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)  # [T, K]: a copy, never autograd's buffer
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ScaleGrad(torch.autograd.Function):
    """Forward: identity. Backward: multiply the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class MoETensorParallel(ParallelStyle):
    """Tensor (and sequence) parallelism of an :class:`MoELayer` without expert parallelism.

    Applied with ``parallelize_module(block, tp_mesh, {"feed_forward": MoETensorParallel()})``:
    shards every expert's ffn dimension, gathers the sequence shards before routing and
    reduce-scatters the combined output back, and keeps the router's gradients whole (module
    docstring). The layer's input and output are sequence shards ``[B, S/tp, H]`` (a DTensor input
    from the sequence-parallel norm is accepted).
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, MoELayer):
            raise TypeError(f"MoETensorParallel applies to an MoELayer, got {type(module).__name__}")
        group, tp = device_mesh.get_group(), device_mesh.size()
        shards = [(module.experts, name, dim) for name, dim in (("w1", 2), ("w3", 2), ("w2", 1))]
        if module.shared_expert is not None:  # nn.Linear [out, in]: w1/w3 by rows, w2 by columns
            shards += [(getattr(module.shared_expert, name), "weight", dim) for name, dim in
                       (("w1", 0), ("w3", 0), ("w2", 1))]
        for owner, name, dim in shards:
            full = getattr(owner, name)
            sharded = distribute_tensor(full.detach(), device_mesh, [Shard(dim)], src_data_rank=None)
            owner.register_parameter(name, nn.Parameter(sharded, requires_grad=full.requires_grad))

        def gather_sequence(_module, args):
            (x,) = args
            if isinstance(x, DTensor):  # from the sequence-parallel ffn_norm: Shard(1)
                x = x.to_local()
            return (_GatherSequence.apply(x, 1, group),)

        def reduce_scatter_sequence(_module, _args, output):
            return _ReduceScatterSequence.apply(output, 1, group)

        def scale_router_input_grad(_router, args):
            return (_ScaleGrad.apply(args[0], 1.0 / tp), *args[1:])

        def sum_combine_weight_grads(_router, _args, route):
            return dataclasses.replace(route, weights=_SumGradOverGroup.apply(route.weights, group))

        # Under torch.compile the hooks run eagerly (graph breaks): collectives inside the backward of
        # custom autograd functions are not traced correctly (torch 2.13 gives wrong gradients).
        module.register_forward_pre_hook(torch.compiler.disable(gather_sequence))
        module.register_forward_hook(torch.compiler.disable(reduce_scatter_sequence))
        module.router.register_forward_pre_hook(torch.compiler.disable(scale_router_input_grad))
        module.router.register_forward_hook(torch.compiler.disable(sum_combine_weight_grads))
        if module.shared_gate is not None:  # replicated like the router; its [T, 1] output scales partial sums
            module.shared_gate.register_forward_pre_hook(torch.compiler.disable(scale_router_input_grad))
            module.shared_gate.register_forward_hook(torch.compiler.disable(
                lambda _gate, _args, out: _SumGradOverGroup.apply(out, group)))
        return module


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous (a transposed one must not reach a pipeline stage's
    input gradient: torch's pipelining receives into buffers of the inferred strides, which must be contiguous)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _sequence_first(x: torch.Tensor) -> torch.Tensor:
    """[B, S, ...] -> contiguous [S, B, ...] whose gradient comes back contiguous [B, S, ...]."""
    return _ContiguousGrad.apply(x).transpose(0, 1).contiguous()


class SequenceParallelLinear(SequenceParallel):
    """``SequenceParallel`` for an ``nn.Linear`` on the sequence shards [B, S/tp, in] (latent attention's
    down-projections, multi-token prediction's projection): the replicated weight multiplies this rank's tokens, its
    gradient coming out ``Partial``. The tokens are laid sequence-first around the matmul, [S/tp, B], so that the
    linear's flattening of the leading dimensions keeps the shard on the first one: torch 2.11's DTensor cannot
    flatten [B, S] sharded on S (2.13 can)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        module = super()._apply(module, device_mesh)
        module.register_forward_pre_hook(lambda _module, args: (_sequence_first(args[0]), *args[1:]))
        module.register_forward_hook(lambda _module, _args, out: _sequence_first(out))
        return module


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
    """Shard ``model`` (a full model or a pipeline stage) in place over ``tp_mesh`` (1-D, "tp").

    Every rank must hold the same full weights before the call (each keeps its own slice).
    After it, stage inputs/outputs between blocks are sequence shards [B, S/tp, H]; the last stage
    returns logits as a DTensor [B, S, V] sharded on V
    (the loss: :func:`megatron_moe.parallel.loss.vocab_parallel_cross_entropy`).
    """
    if tp_mesh.size() == 1:
        return model
    root_plan = {}
    if model.tok_embeddings is not None:
        root_plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if model.norm is not None:
        root_plan["norm"] = SequenceParallel()
    if isinstance(model.output, TiedOutput):  # the vocabulary-parallel embedding's weight shards: Shard(0)
        root_plan["output"] = PrepareModuleInputOutput(
            input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None),
            output_layouts=Shard(-1), desired_output_layouts=Shard(-1), use_local_input=False,
            use_local_output=False)
    elif model.output is not None:
        root_plan["output"] = ColwiseParallel(
            input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False
        )
    for k in model.mtp:  # multi-token prediction's own parts: on the sequence shards, replicated weights
        root_plan |= {f"mtp.{k}.embedding_norm": SequenceParallel(use_local_output=True),
                      f"mtp.{k}.hidden_norm": SequenceParallel(use_local_output=True),
                      f"mtp.{k}.proj": SequenceParallelLinear(use_local_output=True),
                      f"mtp.{k}.norm": SequenceParallel()}
    if root_plan:
        parallelize_module(model, tp_mesh, root_plan, src_data_rank=None)
    group = tp_mesh.get_group()
    for block in model.layers.values():
        plan = {"attention_norm": SequenceParallel(), "ffn_norm": SequenceParallel()}
        if isinstance(block.attention, LatentAttention):
            plan |= _latent_attention_plan(block.attention)
        else:
            plan |= {
                "attention": PrepareModuleInput(
                    input_layouts=(Shard(1), None, None), desired_input_layouts=(Replicate(), None, None)
                ),
                "attention.wq": ColwiseParallel(),
                "attention.wk": ColwiseParallel(),
                "attention.wv": ColwiseParallel(),
                "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            }
            if block.attention.q_norm is not None:  # over this rank's heads (dim 2): Partial weight gradients
                for name in ("attention.q_norm", "attention.k_norm"):
                    plan[name] = SequenceParallel(sequence_dim=2, use_local_output=True)
        if isinstance(block.feed_forward, MoELayer):
            plan["feed_forward"] = MoETensorParallel()
        elif isinstance(block.feed_forward, FeedForward):
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
        if isinstance(block.attention, LatentAttention):
            block.attention.wk_rope.register_forward_hook(torch.compiler.disable(
                lambda _module, _args, out: _GatherSequence.apply(out, 1, group)))
    return model


def _latent_attention_plan(attention: LatentAttention) -> dict[str, ParallelStyle]:
    """Multi-head latent attention under TP, as Megatron-LM runs it with sequence parallelism: the
    down-projections and latent norms are replicated and run on this rank's sequence shard (their weight
    gradients come out ``Partial``, as the norms'); the up-projections ``wq`` / ``wkv`` are column-parallel
    over heads and all-gather the (narrow) latents; ``wo`` is row-parallel, reduce-scattered. The rotary
    key ``wk_rope`` is computed on the shard and all-gathered after the plan (a hook), since every head of
    every rank uses it: its backward reduce-scatter sums the ranks' partial gradients."""
    plan: dict[str, ParallelStyle] = {
        "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                        desired_input_layouts=(Shard(1), None, None)),
        "attention.wkv_down": SequenceParallelLinear(),
        "attention.wkv": ColwiseParallel(input_layouts=Shard(1)),
        "attention.wk_rope": SequenceParallelLinear(use_local_output=True),
        "attention.wq": ColwiseParallel(input_layouts=Shard(1)),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
    }
    for name in ("q_latent_norm", "kv_latent_norm"):
        if getattr(attention, name) is not None:
            plan[f"attention.{name}"] = SequenceParallel()
    if attention.wq_down is not None:
        plan["attention.wq_down"] = SequenceParallelLinear()
    return plan
