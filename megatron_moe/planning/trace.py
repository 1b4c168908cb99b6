"""One micro-batch of one model piece, run on fake tensors: the bytes saved for backward and the collectives.

The dry run cannot run the real model, but it can run it on ``FakeTensor``s (torch's tensors that carry
shape, dtype and device but no data): every op of forward and backward executes its shape logic,
the process group is fake, so nothing is computed or sent and no memory is used. While a piece runs,
:func:`trace_piece` records

- the activations: the distinct storages autograd saves for backward (``saved_tensors_hooks``), plus the
  inputs that activation checkpointing keeps for its recompute (forward pre-hooks on torch's
  ``CheckpointWrapper``), without parameters and buffers;
- the communication of forward + backward (per process group, :class:`~.comm.CommCounter`) and,
  separately, that of making partial gradients whole (:func:`~megatron_moe.parallel.data.materialize_partial_grads`,
  done once per optimizer step).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from megatron_moe.parallel.data import local_tensor, materialize_partial_grads
from megatron_moe.planning.comm import CommCounter


def _storage_key(t: torch.Tensor) -> int:
    return local_tensor(t).untyped_storage()._cdata


@dataclass
class PieceTrace:
    """What one micro-batch of a piece costs: ``saved_bytes`` kept for backward, ``comm`` bytes per process
    group of forward + backward (``forward_comm`` of forward alone), ``step_comm`` once per optimizer step."""

    saved_bytes: int
    comm: dict[str, int]
    forward_comm: dict[str, int]
    step_comm: dict[str, int]


def to_fake(module: nn.Module, mode: FakeTensorMode, dtype: torch.dtype | None) -> nn.Module:
    """Give a meta-device module fake CPU parameters and buffers (in ``dtype`` if given), in place."""
    if dtype is not None:
        module.to(dtype)
    with mode:
        module.to_empty(device="cpu")
    return module


class _ShapeOnlyGroupedMM(torch.autograd.Function):
    """``torch._grouped_mm`` (2-D rows x 3-D expert weights) for fake fp32 tensors: torch's shape function
    admits bf16 only, though the CPU kernel computes fp32. Saves what the real op saves for backward
    (both operands) and produces tensors of the real shapes; no values."""

    @staticmethod
    def forward(ctx, a, b, offs):
        ctx.save_for_backward(a, b)
        return a.new_empty(a.shape[0], b.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        return torch.empty_like(a), torch.empty_like(b), None


def _grouped_mm_any_dtype(a, b, offs=None, **kwargs):
    if a.dtype == torch.bfloat16 or a.ndim != 2 or b.ndim != 3:
        return _REAL_GROUPED_MM(a, b, offs=offs, **kwargs)
    return _ShapeOnlyGroupedMM.apply(a, b, offs)


_REAL_GROUPED_MM = torch._grouped_mm


@contextlib.contextmanager
def _any_dtype_grouped_mm() -> Iterator[None]:
    torch._grouped_mm = _grouped_mm_any_dtype
    try:
        yield
    finally:
        torch._grouped_mm = _REAL_GROUPED_MM


def trace_piece(mode: FakeTensorMode, module: nn.Module, run: Callable[[], torch.Tensor]) -> PieceTrace:
    """Run ``run()`` (the forward of a piece of ``module``, returning a tensor) and its backward under ``mode``.

    Backward starts from a gradient of ones (a scalar loss gets 1). Parameters and buffers of
    ``module`` are not activations.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    held = {_storage_key(t) for t in [*module.parameters(), *module.buffers()]}
    saved: dict[int, int] = {}

    def keep(t: torch.Tensor) -> None:
        key = _storage_key(t)
        if key not in held:
            saved[key] = local_tensor(t).untyped_storage().nbytes()

    def pack(t: torch.Tensor) -> torch.Tensor:
        keep(t)
        return t

    def keep_inputs(_module, args, kwargs):
        for a in [*args, *kwargs.values()]:
            if isinstance(a, torch.Tensor):
                keep(a)

    handles = [m.register_forward_pre_hook(keep_inputs, with_kwargs=True)
               for m in module.modules() if isinstance(m, CheckpointWrapper)]
    forward, backward, step_counter = CommCounter(), CommCounter(), CommCounter()
    try:
        with mode, _any_dtype_grouped_mm(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with forward:
                out = run()
            with backward:
                out.backward(None if out.ndim == 0 else torch.ones_like(out))
            with step_counter:
                materialize_partial_grads([p for p in module.parameters() if p.grad is not None])
    finally:
        for h in handles:
            h.remove()
        for p in module.parameters():
            p.grad = None
    fwd, bwd = forward.by_group(), backward.by_group()
    both = {g: fwd.get(g, 0) + bwd.get(g, 0) for g in {*fwd, *bwd}}
    return PieceTrace(sum(saved.values()), both, fwd, step_counter.by_group())
