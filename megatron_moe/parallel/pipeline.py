"""Pipeline parallelism: cut :class:`MoETransformer` into stages, run them with torch.distributed.pipelining.

A stage is a copy of the model with the layers of other stages deleted from its ``ModuleDict`` and
``tok_embeddings`` (first stage only) / ``norm`` + ``output`` (last stage only) set to ``None``;
the model class runs such a stage unchanged. With ``v`` virtual stages per rank (interleaved 1F1B)
there are ``pp * v`` stages and rank ``r`` holds stages ``r, r + pp, r + 2 pp, ...`` (Megatron-LM's
interleaving). Stage inputs/outputs are hidden states [B, S(/tp), H] between stages, token ids into
the first and logits out of the last.

Loss scaling: schedules are built with ``scale_grads=False`` and the loss function returns the
micro-batch's mean LM loss divided by the number of micro-batches, exactly as the single-process
loop; the engine sets the MoE layers' aux-loss gradient scale to ``1 / num_microbatches``, so the
aux losses of every stage enter backward with the same weight as in the single-process run.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)

from megatron_moe.config import PIPELINE_SCHEDULES, ConfigError
from megatron_moe.model.moe import MoELayerSet


def split_layers(num_layers: int, num_stages: int, first_last_fewer: bool = False) -> list[list[int]]:
    """Layer indices of each stage, balanced by layer count.

    With ``first_last_fewer`` the embedding (first stage) and the output + loss (last stage) each
    count as one layer's worth of work, so those stages get one layer fewer when the count allows
    (e.g. 8 layers on 4 stages -> 1, 3, 3, 1); falls back to the even split otherwise.
    Raises ConfigError when there are more stages than layers.
    """
    if num_stages < 1 or num_stages > num_layers:
        raise ConfigError(f"{num_stages} pipeline stages for {num_layers} layers: each stage needs a layer")

    def even(units: int, bonus_order: list[int]) -> list[int]:
        base, rem = divmod(units, num_stages)
        counts = [base] * num_stages
        for s in bonus_order[:rem]:
            counts[s] += 1
        return counts

    counts = even(num_layers, list(range(num_stages)))
    if first_last_fewer and num_stages > 1:
        middle = list(range(1, num_stages - 1))
        weighted = even(num_layers + 2, middle + [0, num_stages - 1])
        weighted[0] -= 1
        weighted[-1] -= 1
        if min(weighted) >= 1:
            counts = weighted
    stages, start = [], 0
    for c in counts:
        stages.append(list(range(start, start + c)))
        start += c
    return stages


def stage_indices(pp_rank: int, pp_size: int, virtual_stages: int) -> list[int]:
    """Global stage indices held by ``pp_rank``: ``pp_rank + i * pp_size`` for each virtual stage i."""
    return [pp_rank + i * pp_size for i in range(virtual_stages)]


def build_stage_module(model: nn.Module, layer_ids: list[int], is_first: bool, is_last: bool) -> nn.Module:
    """A deep copy of ``model`` keeping only ``layer_ids`` (and the embedding / head on the ends)."""
    stage = copy.deepcopy(model)
    keep = {str(i) for i in layer_ids}
    for name in list(stage.layers.keys()):
        if name not in keep:
            del stage.layers[name]
    if not is_first:
        stage.tok_embeddings = None
    if not is_last:
        stage.norm = None
        stage.output = None
    return stage


def build_schedule(stages: list[PipelineStage], schedule: str, num_microbatches: int, loss_fn: Callable):
    """The pipelining schedule object for this rank's ``stages`` (one, or ``v`` for interleaved)."""
    if schedule not in PIPELINE_SCHEDULES:
        raise ConfigError(f"pipeline schedule {schedule!r}; expected one of {PIPELINE_SCHEDULES}")
    if schedule == "interleaved_1f1b":
        return ScheduleInterleaved1F1B(stages, num_microbatches, loss_fn=loss_fn, scale_grads=False)
    if len(stages) != 1:
        raise ConfigError(
            f"schedule {schedule!r} takes one stage per rank; virtual stages need 'interleaved_1f1b'"
        )
    cls = Schedule1F1B if schedule == "1f1b" else ScheduleGPipe
    return cls(stages[0], num_microbatches, loss_fn=loss_fn, scale_grads=False)


def _receive_buffers_require_grad(stage: PipelineStage) -> None:
    """Make the stage's activation receive buffers leaves that require grad.

    torch 2.11 creates them once, in the first schedule call, with ``requires_grad`` only if that call
    trains: when validation runs first (``schedule.eval``, as at step 0 of a fresh run) the first training
    step then computes no gradient for the stage input and fails ("has gradients None and is expecting to
    send gradients"). Later torch releases set it themselves; setting it again changes nothing there.
    """
    for infos in getattr(stage, "args_recv_info", {}).values():
        for info in infos:
            buffer = getattr(info, "buffer", None)
            if isinstance(buffer, torch.Tensor) and buffer.is_floating_point() and not buffer.requires_grad:
                buffer.requires_grad_(True)


def _wrap_stage_infrastructure(stage: PipelineStage, moe: MoELayerSet) -> None:
    """Hooks around the stage's one-time set-up (private methods of torch.distributed.pipelining.PipelineStage,
    checked to exist here):

    - On its first step a schedule runs each stage once forward (and backward) on placeholder tensors to
      infer shapes (under ``fork_rng``, so random draws are not consumed). Those passes must not enter the
      per-layer MoE statistics: ``_prepare_forward_infra`` / ``_prepare_backward_infra`` run inside
      ``moe.muted_stats()``.
    - After ``_prepare_backward_infra`` (the first training call) the receive buffers require grad
      (:func:`_receive_buffers_require_grad`).
    """
    for name in ("_prepare_forward_infra", "_prepare_backward_infra"):
        original = getattr(stage, name, None)
        if original is None:
            raise RuntimeError(f"torch.distributed.pipelining.PipelineStage has no {name}; update the engine")

        def wrapped(*args, _original=original, _name=name, **kwargs):
            with moe.muted_stats():
                result = _original(*args, **kwargs)
            if _name == "_prepare_backward_infra":
                _receive_buffers_require_grad(stage)
            return result

        setattr(stage, name, wrapped)


class Pipeline:
    """This rank's stage modules and the schedule that runs them over ``pp_group``.

    Args:
        parts: stage modules of this rank, in the order of :func:`stage_indices`.
        indices: their global stage indices.
        num_stages: total stages (pp x virtual).
        group: the pipeline process group.
        device: this rank's device.
        schedule: one of :data:`~megatron_moe.config.PIPELINE_SCHEDULES`.
        num_microbatches: micro-batches per step.
        loss_fn: ``loss_fn(logits, target) -> scalar`` (already divided by ``num_microbatches``).
        moe: this rank's MoE layers (their statistics are muted during shape inference).
    """

    def __init__(self, parts, indices, num_stages, group, device, schedule, num_microbatches, loss_fn,
                 moe: MoELayerSet):
        self.parts = parts
        self.stages = [
            PipelineStage(part, idx, num_stages, device, group=group)
            for part, idx in zip(parts, indices, strict=True)
        ]
        for stage in self.stages:
            _wrap_stage_infrastructure(stage, moe)
        self.has_first = any(s.is_first for s in self.stages)
        self.has_last = any(s.is_last for s in self.stages)
        self.schedule = build_schedule(self.stages, schedule, num_microbatches, loss_fn)
        self.group = group

    def run(self, tokens: torch.Tensor, target: torch.Tensor, train: bool) -> torch.Tensor | None:
        """Run one global step over the micro-batches stacked in ``tokens``/``target`` [n_micro * B, S].

        Returns the sum of the micro-batch losses on the rank holding the last stage, else None.
        """
        args = (tokens,) if self.has_first else ()
        kwargs = {"target": target, "losses": []} if self.has_last else {}
        if train:
            self.schedule.step(*args, return_outputs=False, **kwargs)
        else:
            self.schedule.eval(*args, return_outputs=False, **kwargs)
        if not self.has_last:
            return None
        return torch.stack([loss.detach() for loss in kwargs["losses"]]).sum()
