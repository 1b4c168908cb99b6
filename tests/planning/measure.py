"""The measured side of the dry-run accuracy tests: one real training step per rank (gloo, CPU).

:func:`measure_rank` builds the engine and the project's AdamW exactly as training does, runs one
warm-up step (the optimizer state and the pipeline's shape inference exist afterwards, as in every
later step), then measures the second step:
- ``local_params``: elements of this rank's parameters (local shards);
- ``peak_bytes``: the peak of tensor memory during the step: the bytes held when it starts
  (parameter, buffer and optimizer-state storages) plus the largest running sum of the CPU
  allocator's allocation and free events that torch's profiler records (``profile_memory=True``;
  every tensor allocation of the process: activations, gradients, temporaries, communication
  buffers). torch's MemTracker refuses a module that runs forward more than once per step, as a
  pipeline stage does for its micro-batches;
- ``comm``: bytes per mesh dimension (``tp``, ``pp``, ``dp``) and ``world`` counted by
  :class:`~megatron_moe.planning.comm.CommCounter` on the real process groups.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_moe.config import Config
from megatron_moe.planning.comm import CommCounter


def _batches(cfg: Config, num: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    b, s = cfg.training.micro_batch_size, cfg.data.seq_length
    out = []
    for _ in range(num):
        t = torch.randint(0, cfg.model.vocab_size, (b, s + 1), generator=g)
        out.append({"tokens": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous(), "loss_mask": torch.ones(b, s)})
    return out


def held_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the distinct storages of the parameters, buffers and optimizer state."""
    tensors = [*module.parameters(), *module.buffers()]
    tensors += [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    storages = {}
    for t in tensors:
        t = t._local_tensor if hasattr(t, "_local_tensor") else t
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def peak_allocated(prof) -> int:
    """Largest running sum of the CPU allocator's events (bytes above what was held at the start)."""
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def group_dims(mesh, names_seen) -> dict[str, str]:
    """Process-group name -> mesh dimension ("pp", "dp", "tp"; the default group is "world") for the group
    names in ``names_seen``, told by their ranks: a process measuring several layouts has several groups of
    the same ranks, and DTensor may reuse one made for an earlier mesh of the same shape."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    by_ranks = {tuple(dist.get_process_group_ranks(dist.group.WORLD)): "world"}
    for dim in ("pp", "dp", "tp"):
        if mesh.size(mesh.mesh_dim_names.index(dim)) > 1:
            by_ranks[tuple(dist.get_process_group_ranks(mesh[dim].get_group()))] = dim
    return {name: by_ranks.get(tuple(dist.get_process_group_ranks(_resolve_process_group(name))), name)
            for name in names_seen}


def measure_rank(rank: int, world: int, cfg: Config) -> dict:
    from megatron_moe.parallel.engine import ParallelEngine
    from megatron_moe.training.optim import build_optimizer

    engine = ParallelEngine(cfg)
    module = engine.build_model()
    module.train()
    optimizer = build_optimizer(module, cfg.optimizer)
    n = engine.sizes.num_microbatches
    engine.train_step(_batches(cfg, n, seed=engine.dp_rank), optimizer, 1.0)
    batches = _batches(cfg, n, seed=100 + engine.dp_rank)
    counter = CommCounter()
    base = held_bytes(module, optimizer)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        with counter:
            engine.train_step(batches, optimizer, 1.0)
    dims = group_dims(engine.mesh, counter.bytes)
    if engine.shared_embedding is not None and engine.shared_embedding.group is not None:
        dims[engine.shared_embedding.group.group_name] = "pp"  # the first and last stage's: pipeline traffic
    comm: dict[str, int] = {}
    for group, total in counter.by_group().items():
        comm[dims.get(group, group)] = comm.get(dims.get(group, group), 0) + total
    local = sum((p._local_tensor if hasattr(p, "_local_tensor") else p).numel() for p in module.parameters())
    return {"rank": rank, "local_params": local, "base_bytes": base,
            "peak_bytes": base + peak_allocated(prof), "comm": comm,
            "calls": {dims.get(g, g): dict(ops) for g, ops in counter.calls.items()},
            "op_bytes": {dims.get(g, g): dict(ops) for g, ops in counter.bytes.items()}}
