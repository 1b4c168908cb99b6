"""Data parallelism, mixed precision and gradient bookkeeping across the (pp, dp, tp) mesh.

:func:`apply_data_parallel` wraps each transformer block and the stage root in torch's FSDP2 family,
so the gradients of a block are reduced as soon as its backward is done (one bucket per block,
overlapped with the backward of the blocks before it):
- replicate (default): ``replicate`` (FSDP2's replication) - every dp rank holds all parameters of
  its (pp, tp) slice; gradients are all-reduced (averaged) over dp on the last micro-batch of a step
  only (:func:`set_micro_batch`);
- shard: ``fully_shard`` - parameters, gradients and optimizer state sharded over dp (with TP, the
  2-D (dp, tp) layout); without pipeline stages the parameters are gathered for each micro-batch's forward and
  backward and gradients reduce-scattered after each micro-batch; on a pipeline stage they are gathered once per
  step (the first forward) and stay gathered until the step's last backward, which reduce-scatters the gradients
  accumulated unsharded (torch's pipelining schedules keep them so between backwards; ``reshard_after_forward``
  off keeps them between a forward and its backward too: one gather per step instead of one per micro-batch).

bf16 (``training.bf16``), as Megatron-LM's distributed optimizer and FSDP2 do it: the parameters the
optimizer owns stay fp32 (master weights, fp32 optimizer state), a ``MixedPrecisionPolicy`` casts them
to bf16 for compute - in replicate mode once per optimizer step, kept across the micro-batches -
and gradients are accumulated over micro-batches and reduced in fp32. Activations, and so the TP and
PP collectives, are bf16; the router and the loss compute in fp32 (they cast).

:func:`global_grad_norm` is the L2 norm over every parameter element of the whole model exactly
once, whatever the layout, and :func:`clip_gradients` clips with it (torch's ``clip_grads_with_norm_``);
:func:`global_params_norm` is the same norm of the parameters themselves.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: a DTensor's local tensor, a plain tensor itself."""
    return t._local_tensor if isinstance(t, DTensor) else t


def apply_data_parallel(part: nn.Module, dp_mesh: DeviceMesh, shard: bool, bf16: bool,
                        reduce_in_bf16: bool = False, pipelined: bool = False) -> nn.Module:
    """Wrap ``part`` (a model or pipeline stage) for data parallelism over ``dp_mesh``, one unit per block.

    ``shard``: FSDP2 ``fully_shard`` (else FSDP2's ``replicate``); ``bf16``: bf16 compute copies of
    the fp32 parameters, fp32 gradient reduction (module docstring), or with ``reduce_in_bf16`` bf16
    gradient accumulation and reduction (Megatron-LM's --grad-reduce-in-bf16: half the bytes, gradients
    rounded to bf16). ``pipelined``: ``part`` is a pipeline stage; sharded parameters then stay gathered from the
    step's first forward to its last backward (module docstring). Works for a 1-rank ``dp_mesh`` too (the bf16
    mechanism of a single process).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if shard:
        wrap = functools.partial(fully_shard, reshard_after_forward=not pipelined)
    else:
        try:
            from torch.distributed._composable.replicate_with_fsdp import replicate
        except ImportError:  # pragma: no cover - depends on the installed torch
            raise RuntimeError("data-parallel replication needs torch.distributed._composable.replicate_with_fsdp "
                               f"(torch >= 2.11); this torch is {torch.__version__}") from None
        wrap = replicate
    reduce_dtype = torch.bfloat16 if reduce_in_bf16 else torch.float32
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce_dtype) if bf16 else None
    kwargs = {"mesh": dp_mesh} if policy is None else {"mesh": dp_mesh, "mp_policy": policy}
    for block in part.layers.values():
        wrap(block, **kwargs)
    wrap(part, **kwargs)
    return part


def set_micro_batch(parts: list[nn.Module], last: bool, shard: bool) -> None:
    """Before each micro-batch's backward: replicate mode reduces gradients (and drops the bf16
    compute copies) only after the last micro-batch of the step; shard mode after every one."""
    from torch.distributed.fsdp import FSDPModule

    for part in parts:
        if isinstance(part, FSDPModule) and not shard:
            part.set_requires_gradient_sync(last)
            part.set_reshard_after_backward(last)


def materialize_partial_grads(params: list[nn.Parameter]) -> None:
    """Give every DTensor gradient its parameter's placements (DTensor may leave e.g. sequence-parallel
    norm weight gradients as ``Partial`` sums, pending a reduction over TP)."""
    for p in params:
        g = p.grad
        if isinstance(g, DTensor) and tuple(g.placements) != tuple(p.placements):
            p.grad = g.redistribute(p.device_mesh, p.placements)


def split_param_groups_by_mesh(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Split every param group of a fresh optimizer by device mesh (plain tensors apart from DTensors).

    Multi-tensor (foreach) optimizer kernels refuse lists mixing plain tensors and DTensors (the
    replicated router gates stay plain under TP) or DTensors of different meshes. Hyperparameters
    are copied, so the optimizer behaves exactly as before. Call before the first step.
    """
    if optimizer.state:
        raise ValueError("split_param_groups_by_mesh must run before the optimizer has state")
    groups = []
    for group in optimizer.param_groups:
        by_mesh: dict = {}
        for p in group["params"]:
            key = p.device_mesh if isinstance(p, DTensor) else None
            by_mesh.setdefault(key, []).append(p)
        for params in by_mesh.values():
            groups.append({**group, "params": params})
    optimizer.param_groups = groups
    return optimizer


def _copies(p: torch.Tensor, world: int, pp: int) -> int:
    """On how many ranks each element of ``p``'s local data also lives (pipeline stages are disjoint)."""
    shards = 1
    if isinstance(p, DTensor):
        for dim, placement in enumerate(p.placements):
            if not placement.is_replicate():  # Shard or FSDP's _StridedShard (params are never Partial)
                shards *= p.device_mesh.size(dim)
    return max(1, world // (pp * shards))


def _local_by_copies(tensors: list[tuple[torch.Tensor, torch.Tensor]], world: int, pp: int) -> dict:
    """``(parameter, tensor of its shape)`` pairs -> {copies: [local data]}: the tensors' local data grouped
    by on how many ranks each element lives (:func:`_copies` of the parameter)."""
    by_copies: dict[int, list[torch.Tensor]] = {}
    for p, t in tensors:
        by_copies.setdefault(_copies(p, world, pp), []).append(local_tensor(t))
    return by_copies


def _sum_over_model(by_copies: dict, world: int, device: torch.device, count_zeros: bool) -> torch.Tensor:
    """[sum of squares, number of exact zeros (with ``count_zeros``)] over the whole model, float64,
    identical on every rank: every element once, whatever the layout.

    A group's squared norm (torch's multi-tensor ``get_total_norm``) is divided by its copy count, its
    zero count multiplied by ``world / copies`` (an integer: copies divide the world), so that the
    all-reduced count is ``world`` x the model's, exactly: copies hold identical data (replicated
    parameters; gradients after their reduction). One all-reduce over the world for both.
    """
    total = torch.zeros(2 if count_zeros else 1, dtype=torch.float64, device=device)
    for copies, tensors in sorted(by_copies.items()):
        norm = torch.nn.utils.get_total_norm(tensors, norm_type=2.0, foreach=True)
        total[0] += norm.double().square() / copies
        if count_zeros:
            nonzero = sum(torch.count_nonzero(t) for t in tensors)
            total[1] += (sum(t.numel() for t in tensors) - nonzero) * (world // copies)
    if world > 1:
        dist.all_reduce(total)
    if count_zeros:
        total[1] /= world
    return total


def global_grad_norm(
    params: list[nn.Parameter], pp_size: int, device: torch.device, count_zeros: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """L2 norm of all gradients of the whole model (every element once), identical on every rank, and
    with ``count_zeros`` the number of gradient elements exactly 0 (Megatron-LM's --log-num-zeros-in-grad;
    float64, an integer value), folded into the same all-reduce; else None.

    The squares are summed in float64 (no overflow of the square of a large norm); the norm is float32.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    grads = [(p, p.grad) for p in params if p.grad is not None]
    total = _sum_over_model(_local_by_copies(grads, world, pp_size), world, device, count_zeros)
    return total[0].sqrt().float(), (total[1] if count_zeros else None)


@torch.no_grad()
def global_params_norm(params: list[nn.Parameter], pp_size: int, device: torch.device) -> torch.Tensor:
    """L2 norm of all parameters of the whole model (every element once), identical on every rank:
    Megatron-LM's ``calc_params_l2_norm`` (--log-params-norm). Squares summed in float64; float32 result."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    pairs = [(p, p.detach()) for p in params]
    return _sum_over_model(_local_by_copies(pairs, world, pp_size), world, device, False)[0].sqrt().float()


@torch.no_grad()
def clip_gradients(params: list[nn.Parameter], max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale gradients by ``min(1, max_norm / (total_norm + 1e-6))`` with torch's ``clip_grads_with_norm_``.

    ``total_norm`` is :func:`global_grad_norm` (the whole model's, not this rank's). torch's
    multi-tensor kernel refuses lists mixing plain tensors and DTensors (the replicated router gates
    stay plain under TP), so it is applied per device mesh.
    """
    by_mesh: dict = {}
    for p in params:
        if p.grad is not None:
            by_mesh.setdefault(p.device_mesh if isinstance(p, DTensor) else None, []).append(p)
    for group in by_mesh.values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total_norm)
