"""A simulated world: torch's fake process group (every collective a no-op) for one rank at a time."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from megatron_moe.parallel.mesh import ParallelSizes


def _clear_dtensor_caches() -> None:
    """DTensor caches sharding decisions by mesh; a mesh of the next simulated rank compares equal to
    this one's but has other process groups, so the caches must not outlive the fake world."""
    from torch.distributed.tensor import DTensor, _redistribute

    DTensor._op_dispatcher.sharding_propagator.propagate_op_sharding.cache_clear()
    _redistribute._gen_transform_infos.cache_clear()
    _redistribute.clear_redistribute_planner_cache()
    clear_native_cache = getattr(torch._C, "_clear_DTensor_sharding_propagator_cache", None)  # torch >= 2.12
    if clear_native_cache is not None:
        clear_native_cache()


@contextlib.contextmanager
def fake_world(sizes: ParallelSizes, rank: int) -> Iterator[DeviceMesh]:
    """Be global ``rank`` of a ``sizes.world``-rank job: a fake process group (torch's ``fake`` backend,
    ``FakeStore``) and the (pp, dp, tp) CPU mesh over it. Nothing is communicated, no memory is used.

    Raises RuntimeError if a process group is already initialised (a dry run is its own process).
    """
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a dry run simulates its own world; torch.distributed is already initialised")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=sizes.world)
    try:
        yield init_device_mesh("cpu", (sizes.pp, sizes.dp, sizes.tp), mesh_dim_names=("pp", "dp", "tp"))
    finally:
        dist.destroy_process_group()
        _clear_dtensor_caches()
