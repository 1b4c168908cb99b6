"""Parallelism applied from outside to the single-device model: (pp, dp, tp) mesh, TP + sequence
parallelism (DTensor styles), pipeline stages and schedules (torch.distributed.pipelining), data
parallelism (replication or FSDP2), and the engine the training loop drives.

Modules: :mod:`.mesh` (layout validation, DeviceMesh), :mod:`.tensor` (TP/SP), :mod:`.pipeline`
(stages, schedules), :mod:`.data` (dp, gradient reductions and norm), :mod:`.loss` (vocab-parallel
LM loss), :mod:`.engine` (:class:`ParallelEngine`).
"""

from megatron_moe.parallel.engine import (
    ParallelEngine,
    StepResult,
    init_distributed_from_env,
)
from megatron_moe.parallel.mesh import ParallelSizes, parallel_sizes

__all__ = [
    "ParallelEngine",
    "ParallelSizes",
    "StepResult",
    "init_distributed_from_env",
    "parallel_sizes",
]
