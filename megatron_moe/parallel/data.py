"""Data parallelism and gradient bookkeeping across the (pp, dp, tp) mesh.

Two data-parallel modes:
- replicate (default): every dp rank holds all parameters of its (pp, tp) slice; after backward the
  gradients are averaged over dp with one bucketed all-reduce (:func:`allreduce_gradients`);
- shard: FSDP2 :func:`fully_shard` per transformer block and on the root over the dp mesh (with TP,
  the 2-D (dp, tp) layout); parameters, gradients and optimizer state are sharded over dp and FSDP
  reduce-scatters the (averaged) gradients itself.

:func:`global_grad_norm` is the L2 norm over every parameter element of the whole model exactly
once, whatever the layout, and :func:`clip_gradients` clips with it (torch's ``clip_grads_with_norm_``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


def apply_fsdp(part: nn.Module, dp_mesh: DeviceMesh, reshard_after_forward: bool = True) -> nn.Module:
    """Shard ``part`` (a model or pipeline stage) over ``dp_mesh`` with FSDP2, one unit per block."""
    from torch.distributed.fsdp import fully_shard

    for block in part.layers.values():
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(part, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
    return part


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


def allreduce_gradients(
    params: list[nn.Parameter], group: dist.ProcessGroup | None, average: bool = True
) -> None:
    """All-reduce the (local shards of the) gradients of ``params`` over ``group`` in one flat bucket."""
    if group is None or dist.get_world_size(group) == 1:
        return
    grads = [_local(p.grad) for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    if average:
        flat /= dist.get_world_size(group)
    for g, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
        g.copy_(reduced)


def _copies(p: torch.Tensor, world: int, pp: int) -> int:
    """On how many ranks each element of ``p``'s local data also lives (pipeline stages are disjoint)."""
    shards = 1
    if isinstance(p, DTensor):
        for dim, placement in enumerate(p.placements):
            if not placement.is_replicate():  # Shard or FSDP's _StridedShard (params are never Partial)
                shards *= p.device_mesh.size(dim)
    return max(1, world // (pp * shards))


def global_grad_norm(params: list[nn.Parameter], pp_size: int, device: torch.device) -> torch.Tensor:
    """L2 norm of all gradients of the whole model (every element once), identical on every rank.

    Each rank sums the squares of its local gradient data, weighted by 1 / (ranks holding a copy),
    and one all-reduce over the world adds them up.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    total = torch.zeros((), dtype=torch.float32, device=device)
    for p in params:
        if p.grad is None:
            continue
        g = _local(p.grad).float()
        total += g.pow(2).sum() / _copies(p, world, pp_size)
    if world > 1:
        dist.all_reduce(total)
    return total.sqrt()


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
