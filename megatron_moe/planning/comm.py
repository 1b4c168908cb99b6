"""Counting the bytes of every collective and point-to-point transfer a rank issues.

:class:`CommCounter` is a ``TorchDispatchMode``: it sees the dispatcher ops of torch.distributed -
the c10d ops behind ``dist.all_reduce``/``all_gather``/``send``/... (FSDP2, pipelining, this
project's TP autograd functions) and the functional collectives behind DTensor - and adds their
payload to the process group that carries them. The same counter runs on a real step (tests) and on
the dry run's simulated micro-batch (fake process group, fake tensors), so both count alike.

Payload of one op, in bytes (the size of the whole tensor the collective produces or reduces, as
Megatron-LM's communication tables count it; a ring moves ``(g-1)/g`` of it per rank for an
all-gather or reduce-scatter and twice that for an all-reduce):
- all-reduce: the tensor; all-gather: the gathered output (input x group size);
- reduce-scatter: the input (unreduced, whole); send: the tensor (receives are not counted, so
  summing over ranks counts each transfer once); broadcast: the tensor.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(tensors) if isinstance(t, torch.Tensor))


def _group_name(arg) -> str:
    """The name of the process group an op argument denotes (a group name string or a boxed ProcessGroup)."""
    if isinstance(arg, str):
        return arg
    return dist.ProcessGroup.unbox(arg).group_name


# op name -> (index of the group argument, payload in bytes from the args); ops not listed are not traffic.
_C10D_OPS = {
    "allreduce_": (1, lambda a: _nbytes(a[0])),
    "allreduce_coalesced_": (1, lambda a: _nbytes(a[0])),
    "allgather_": (2, lambda a: _nbytes(a[0])),  # output lists
    "_allgather_base_": (2, lambda a: _nbytes(a[0])),
    "allgather_into_tensor_coalesced_": (2, lambda a: _nbytes(a[0])),
    "reduce_scatter_": (2, lambda a: _nbytes(a[1])),  # input lists
    "_reduce_scatter_base_": (2, lambda a: _nbytes(a[1])),
    "reduce_scatter_tensor_coalesced_": (2, lambda a: _nbytes(a[1])),
    "broadcast_": (1, lambda a: _nbytes(a[0])),
    "send": (1, lambda a: _nbytes(a[0])),
}
_FUNCOL_OPS = {
    "all_reduce": (2, lambda a: _nbytes(a[0])),
    "all_reduce_coalesced": (2, lambda a: _nbytes(a[0])),
    "all_gather_into_tensor": (2, lambda a: _nbytes(a[0]) * a[1]),
    "all_gather_into_tensor_coalesced": (2, lambda a: _nbytes(a[0]) * a[1]),
    "reduce_scatter_tensor": (3, lambda a: _nbytes(a[0])),
    "reduce_scatter_tensor_coalesced": (3, lambda a: _nbytes(a[0])),
    "broadcast": (2, lambda a: _nbytes(a[0])),
}


class CommCounter(TorchDispatchMode):
    """Bytes and op counts per process-group name while active: ``bytes[group_name][op_name]``.

    Use as a context manager around the work to count; :meth:`by_group` sums the ops of a group.
    """

    def __init__(self):
        super().__init__()
        self.supports_higher_order_operators = True
        self.bytes: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.calls: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t is DTensor for t in types):
            # Let DTensor desugar the op first, so the collectives it issues inside (implicit
            # redistributions) reach this mode as plain ops (as torch's CommDebugMode does).
            return NotImplemented
        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **(kwargs or {}))
        namespace, name = func.namespace, func._opname
        table = _C10D_OPS if namespace == "c10d" else _FUNCOL_OPS if namespace == "_c10d_functional" else None
        if table is not None and name in table:
            index, payload = table[name]
            group = _group_name(args[index])
            self.bytes[group][name] += payload(args)
            self.calls[group][name] += 1
        return func(*args, **(kwargs or {}))

    def by_group(self) -> dict[str, int]:
        """Total bytes per process-group name."""
        return {group: sum(ops.values()) for group, ops in self.bytes.items()}
