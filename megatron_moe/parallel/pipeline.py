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
from contextlib import AbstractContextManager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)

from megatron_moe.config import PIPELINE_SCHEDULES, Config, ConfigError, ModelConfig, parse_pipeline_layout
from megatron_moe.parallel.data import local_tensor


def split_layers(num_layers: int, num_stages: int) -> list[list[int]]:
    """Layer indices of each stage, balanced by layer count (the first ``num_layers % num_stages`` stages one more).

    Raises ConfigError when there are more stages than layers.
    """
    if num_stages < 1 or num_stages > num_layers:
        raise ConfigError(f"{num_stages} pipeline stages for {num_layers} layers: each stage needs a layer")
    base, rem = divmod(num_layers, num_stages)
    return _contiguous([base + (s < rem) for s in range(num_stages)])


def _contiguous(counts: list[int]) -> list[list[int]]:
    """Consecutive layer indices in blocks of ``counts``."""
    stages, start = [], 0
    for count in counts:
        stages.append(list(range(start, start + count)))
        start += count
    return stages


def pipeline_layers(cfg: Config) -> list[list[int]]:
    """Layer indices of each of the pp x v pipeline stages (stage s is virtual stage s // pp of rank s % pp).

    Even (:func:`split_layers`), as ``parallel.pipeline_layout`` says (:func:`_layout_split`), with the embedding
    and loss counted as layers (:func:`_accounted_split`), or Megatron-LM's uneven pipeline: the first / last
    pipeline rank holds ``parallel.pipeline_first_stage_layers`` /
    ``pipeline_last_stage_layers`` layers (its virtual stages an equal share each), the ranks between share the
    rest evenly, and the stages take the layers in order, as megatron-core's ``get_transformer_layer_offset``.
    Raises ConfigError, as megatron-core's checks, when the counts do not divide or leave a stage without a layer.
    """
    p, n = cfg.parallel, cfg.model.num_layers
    pp, v = p.pipeline_model_parallel_size, p.virtual_pipeline_stages
    embedding, loss = p.account_for_embedding_in_pipeline_split, p.account_for_loss_in_pipeline_split
    if p.pipeline_layout:
        return _layout_split(cfg)
    if embedding or loss:
        return _accounted_split(n, pp, v, embedding, loss)
    if not p.uneven_pipeline:
        return split_layers(n, pp * v)
    first, last = p.pipeline_first_stage_layers, p.pipeline_last_stage_layers
    middle_ranks = pp - bool(first) - bool(last)
    middle = n - first - last
    given = (f"num_layers = {n}, parallel.pipeline_first_stage_layers = {first}, parallel.pipeline_last_stage_layers "
             f"= {last} (--decoder-first/last-pipeline-num-layers), pipeline_model_parallel_size = {pp}")
    if middle < 0:
        raise ConfigError(f"{given}: the first and last stage's {first + last} layers exceed the model's {n}")
    if (middle > 0) != (middle_ranks > 0) or (middle_ranks and middle % middle_ranks):
        raise ConfigError(f"{given}: the {middle} other layers must split evenly over the {middle_ranks} other "
                          "pipeline ranks")
    share = middle // middle_ranks if middle_ranks else 0  # each rank between the first and the last
    per_rank = [first or share] + [share] * (pp - 2) + [last or share]
    if any(count % v or count < v for count in per_rank):
        raise ConfigError(f"{given}: each pipeline rank's layers {per_rank} must split evenly over its "
                          f"{v} virtual stages, at least one layer each")
    return _contiguous([per_rank[stage % pp] // v for stage in range(pp * v)])


def _layout_split(cfg: Config) -> list[list[int]]:
    """The decoder layers of each stage of ``parallel.pipeline_layout`` (:func:`parse_pipeline_layout`). As here the
    embedding is the first stage's and the output layer, loss and multi-token prediction depths the last one's,
    the layout must put E first, m and L in the last stage, and every decoder layer in order before them. A stage
    may hold no decoder layer (Megatron-LM's DeepSeek-V3 layouts end in a stage of the depths and the loss alone)."""
    p, m = cfg.parallel, cfg.model
    layout = p.pipeline_layout
    stages = parse_pipeline_layout(layout)
    where = f"parallel.pipeline_layout (--pipeline-model-parallel-layout) = {layout!r}"
    expected = p.pipeline_model_parallel_size * p.virtual_pipeline_stages
    if len(stages) != expected:
        raise ConfigError(f"{where}: {len(stages)} stages; pipeline_model_parallel_size x virtual stages = {expected}")
    flat = "".join(stages)
    if flat.count("t") != m.num_layers or flat.count("m") != m.mtp_num_layers:
        raise ConfigError(f"{where}: {flat.count('t')} decoder layers (t) and {flat.count('m')} multi-token "
                          f"prediction depths (m); the model has model.num_layers = {m.num_layers} and "
                          f"model.mtp_num_layers = {m.mtp_num_layers}")
    if not (flat.count("E") == 1 and stages[0].startswith("E") and flat.count("L") == 1 and flat.endswith("L")):
        raise ConfigError(f"{where}: the embedding (E) must open the first stage and the loss (L) close the last, "
                          "once each")
    last = stages[-1]
    if any("m" in stage for stage in stages[:-1]) or ("m" in last and "t" in last[last.index("m"):]):
        raise ConfigError(f"{where}: the multi-token prediction depths (m) run in the last stage after its decoder "
                          "layers here (beside the output layer and the embedding's copy)")
    if "" in stages:
        raise ConfigError(f"{where}: stage {stages.index('')} holds nothing")
    return _contiguous([stage.count("t") for stage in stages])


def _accounted_split(n: int, pp: int, v: int, embedding: bool, loss: bool) -> list[list[int]]:
    """Megatron-LM's split with the embedding (``embedding``) and the loss (``loss``) counted as layers: the
    ``n + embedding + loss`` layers split evenly over the pp x v stages, the first stage holding one decoder layer
    fewer for the embedding, the last one fewer for the loss."""
    total = n + embedding + loss
    given = (f"num_layers = {n} + {int(embedding) + int(loss)} (parallel.account_for_embedding/loss_in_pipeline_"
             f"split) over pipeline_model_parallel_size = {pp} x {v} virtual stages")
    if total % (pp * v):
        raise ConfigError(f"{given}: {total} layers must split evenly over the {pp * v} stages")
    counts = [total // (pp * v)] * (pp * v)
    counts[0] -= embedding
    counts[-1] -= loss  # at least 1: there are no more stages than layers (parallel_sizes)
    return _contiguous(counts)


def stage_indices(pp_rank: int, pp_size: int, virtual_stages: int) -> list[int]:
    """Global stage indices held by ``pp_rank``: ``pp_rank + i * pp_size`` for each virtual stage i."""
    return [pp_rank + i * pp_size for i in range(virtual_stages)]


def last_stage_needs_embedding(m: ModelConfig) -> bool:
    """Whether the last pipeline stage holds a copy of the embedding: the tied output layer reads its weight,
    multi-token prediction embeds the shifted tokens (Megatron-LM's shared embedding of the last stage)."""
    return m.tie_embeddings or m.mtp_num_layers > 0


def build_stage_module(model: nn.Module, layer_ids: list[int], is_first: bool, is_last: bool) -> nn.Module:
    """A deep copy of ``model`` keeping only ``layer_ids`` (and the embedding / head on the ends).

    The last stage also keeps the multi-token prediction depths (their blocks and parts) and, where
    :func:`last_stage_needs_embedding`, the embedding; on a stage after the first it does not embed the
    stage input (``embeds_tokens = False``).
    """
    stage = copy.deepcopy(model)
    m = model.cfg.model
    keep = {str(i) for i in layer_ids}
    if is_last:
        keep |= {str(i) for i in range(m.num_layers, m.num_layers + m.mtp_num_layers)}
    for name in list(stage.layers.keys()):
        if name not in keep:
            del stage.layers[name]
    stage.embeds_tokens = is_first
    if not is_first and not (is_last and last_stage_needs_embedding(m)):
        stage.tok_embeddings = None
    if not is_last:
        stage.norm = None
        stage.output = None
        stage.mtp = nn.ModuleDict()
    return stage


class SharedEmbedding:
    """The embedding the first and the last pipeline stage both hold (:func:`last_stage_needs_embedding`),
    kept equal as Megatron-LM keeps its "embedding group": the last stage's copy starts as the first stage's
    weights and, every step, both take the sum of their gradients, so the identical optimizer updates keep
    them equal. The copy is left out of the gradient and parameter norms (each element once).

    Args:
        weight: this rank's embedding weight (first stage) or its copy (last stage); None on other ranks.
        is_copy: ``weight`` is the last stage's copy.
        group: the two ranks of this (dp, tp) position holding the first and the last stage
            (:func:`embedding_group`).
    """

    def __init__(self, weight: torch.Tensor | None, is_copy: bool, group):
        self.weight, self.is_copy, self.group = weight, is_copy, group

    @torch.no_grad()
    def sync_weights(self) -> None:
        """Give the copy the first stage's weights (a sum with the copy zeroed: one all-reduce)."""
        if self.weight is None:
            return
        local = local_tensor(self.weight)
        if self.is_copy:
            local.zero_()
        dist.all_reduce(local, group=self.group)

    @torch.no_grad()
    def reduce_grads(self) -> None:
        """Sum the two stages' gradients of the embedding (after the data-parallel reduction)."""
        if self.weight is not None and self.weight.grad is not None:
            dist.all_reduce(local_tensor(self.weight.grad), group=self.group)

    def norm_parameters(self, params: list[nn.Parameter]) -> list[nn.Parameter]:
        """``params`` without the copy."""
        if not self.is_copy:
            return params
        return [p for p in params if p is not self.weight]


def embedding_group(mesh: DeviceMesh):
    """The process group of the first and the last pipeline rank at this rank's (dp, tp) position, or None on a
    rank between them. Every rank takes part in creating every such group (torch's ``new_group`` rule); with two
    pipeline ranks it is the pipeline group."""
    pp = mesh["pp"].size()
    if pp == 2:
        return mesh["pp"].get_group()
    ranks = mesh.mesh
    me = dist.get_rank()
    mine = None
    for d in range(ranks.shape[1]):
        for t in range(ranks.shape[2]):
            pair = [int(ranks[0, d, t]), int(ranks[pp - 1, d, t])]
            group = dist.new_group(pair)
            if me in pair:
                mine = group
    return mine


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


def _wrap_stage_infrastructure(stage: PipelineStage, muted: Callable[[], AbstractContextManager]) -> None:
    """Hooks around the stage's one-time set-up (private methods of torch.distributed.pipelining.PipelineStage,
    checked to exist here):

    - On its first step a schedule runs each stage once forward (and backward) on placeholder tensors to
      infer shapes (under ``fork_rng``, so random draws are not consumed). Those passes must not enter the
      per-layer MoE statistics nor the step's losses: ``_prepare_forward_infra`` / ``_prepare_backward_infra``
      run inside ``muted()``.
    - After ``_prepare_backward_infra`` (the first training call) the receive buffers require grad
      (:func:`_receive_buffers_require_grad`).
    """
    for name in ("_prepare_forward_infra", "_prepare_backward_infra"):
        original = getattr(stage, name, None)
        if original is None:
            raise RuntimeError(f"torch.distributed.pipelining.PipelineStage has no {name}; update the engine")

        def wrapped(*args, _original=original, _name=name, **kwargs):
            with muted():
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
        loss_fn: ``loss_fn(output, target) -> scalar``: the last stage's output (logits, or with multi-token
            prediction ``(logits, depth 1 logits, ..)``) -> the micro-batch's objective (already divided by
            ``num_microbatches``).
        muted: a context in which the step's statistics (MoE layers', losses) are not counted: the shape
            inference of the schedule's first call runs in it.
    """

    def __init__(self, parts, indices, num_stages, group, device, schedule, num_microbatches, loss_fn,
                 muted: Callable[[], AbstractContextManager]):
        self.parts = parts
        self.stages = [
            PipelineStage(part, idx, num_stages, device, group=group)
            for part, idx in zip(parts, indices, strict=True)
        ]
        for stage in self.stages:
            _wrap_stage_infrastructure(stage, muted)
        self.has_first = any(s.is_first for s in self.stages)
        self.has_last = any(s.is_last for s in self.stages)
        self.embeds_for_mtp = any(len(part.mtp) for part in parts)
        self.schedule = build_schedule(self.stages, schedule, num_microbatches, loss_fn)
        self.group = group

    def run(self, tokens: torch.Tensor, target: torch.Tensor, train: bool) -> None:
        """Run one global step over the micro-batches stacked in ``tokens``/``target`` [n_micro * B, S].

        The loss function sees each micro-batch's last-stage output (what it reports is its own business).
        With multi-token prediction the last stage also receives the micro-batch's token ids.
        """
        args = (tokens,) if self.has_first else ()
        kwargs = {"target": target, "losses": []} if self.has_last else {}
        if self.has_last and self.embeds_for_mtp:
            kwargs["mtp_tokens"] = tokens
        if train:
            self.schedule.step(*args, return_outputs=False, **kwargs)
        else:
            self.schedule.eval(*args, return_outputs=False, **kwargs)
