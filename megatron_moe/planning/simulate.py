"""Build one rank of a real layout in a simulated world and measure its pieces on fake tensors.

Two simulations per rank (both through :class:`~megatron_moe.parallel.engine.ParallelEngine`'s
normal build, on the meta device, with torch's fake process group):

1. the whole world (``world`` ranks, this rank's global index): the model is cut into this rank's
   pipeline stages and sharded over TP and data parallelism exactly as in training, so its
   parameters are this rank's (exact counts), and the FSDP2 units give the data-parallel traffic;
2. its (pp, tp) slice alone (data-parallel size 1, fp32 parameters cast to the compute dtype: what
   FSDP2's mixed precision computes with): one micro-batch of each distinct piece - the embedding,
   one transformer block of each kind (dense, MoE), the output
   layer with the loss - runs forward and backward on fake tensors (:mod:`.trace`): the bytes
   saved for backward and the tensor-parallel collectives, counted op by op; blocks once per
   recompute granularity (the engine's wrappers applied in place).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from megatron_moe.config import RECOMPUTE_GRANULARITIES, Config
from megatron_moe.model.moe import MoELayer
from megatron_moe.model.transformer import MoETransformer, is_moe_layer
from megatron_moe.parallel.data import local_tensor
from megatron_moe.parallel.engine import ParallelEngine, apply_activation_checkpointing
from megatron_moe.parallel.loss import lm_loss_from_target
from megatron_moe.parallel.mesh import ParallelSizes
from megatron_moe.parallel.pipeline import pipeline_layers, stage_indices
from megatron_moe.planning.trace import PieceTrace, to_fake, trace_piece
from megatron_moe.planning.world import fake_world


@dataclass
class ChunkSim:
    """One model chunk (pipeline stage) of a rank, per micro-batch.

    ``activations[g]``: bytes saved for backward with recompute granularity ``g``;
    ``backward_transient[g]``: bytes one block adds during its backward (activation gradients, and the
    activations it rematerialises under recompute);
    ``tp_bytes[g]``: tensor-parallel payload of forward + backward; ``tp_step_bytes``: once per step.
    """

    stage: int
    layers: list[int]
    is_first: bool
    is_last: bool
    moe_layers: int
    boundary_bytes: int  # one hidden-state tensor [B, S/tp, H] between stages
    activations: dict[str, int] = field(default_factory=dict)
    backward_transient: dict[str, int] = field(default_factory=dict)
    tp_bytes: dict[str, int] = field(default_factory=dict)
    tp_step_bytes: int = 0


@dataclass
class RankSim:
    """A rank's parameters (exact, local shards), state and the per-chunk simulations."""

    rank: int
    pp_rank: int
    dp_rank: int
    tp_rank: int
    local_params: int
    param_tensors: int
    buffer_bytes: int
    fsdp_units: list[int]  # padded elements of each FSDP2 unit's local parameters, unsharded over dp
    largest_block_params: int  # elements of the largest transformer block on this rank (local)
    chunks: list[ChunkSim]
    model_params: dict[str, int]
    shared_embedding_params: int = 0  # local elements of the embedding shared by the first and last stage


def _fsdp_units(module: nn.Module, dp: int) -> list[int]:
    """Elements each FSDP2 unit gathers / reduces over dp: its parameters' local (TP) shapes with dim 0
    padded to a multiple of dp, as FSDP2 shards. Reads FSDP2's parameter groups (private attributes of
    torch 2.13's ``FSDPModule``; the accuracy tests count the real traffic against this)."""
    from torch.distributed.fsdp import FSDPModule

    units = []
    for m in module.modules():
        if not isinstance(m, FSDPModule):
            continue
        state = m._get_fsdp_state()
        group = state._fsdp_param_group
        if group is None:
            continue
        total = 0
        for fp in group.fsdp_params:
            shape = fp._orig_size  # the TP-local shape before dp sharding
            rows = -(-shape[0] // dp) * dp if len(shape) else 1
            total += rows * (shape[1:].numel() if len(shape) > 1 else 1)
        units.append(total)
    return units


def meta_model(cfg: Config) -> MoETransformer:
    """The whole model on the meta device (shapes only)."""
    with torch.device("meta"):
        return MoETransformer(cfg)


def _whole_world(cfg: Config, sizes: ParallelSizes, rank: int) -> dict:
    with fake_world(sizes, rank) as mesh:
        engine = ParallelEngine(cfg, device=torch.device("meta"), mesh=mesh)
        full = meta_model(cfg)
        module = engine.build_model(model=full, seed_rng=False)
        params = list(module.parameters())
        blocks = [b for part in engine.parts for b in part.layers.values()]
        return {
            "pp_rank": engine.pp_rank,
            "dp_rank": engine.dp_rank,
            "tp_rank": mesh["tp"].get_local_rank(),
            "local_params": sum(local_tensor(p).numel() for p in params),
            "param_tensors": len(params),
            "buffer_bytes": sum(local_tensor(b).numel() * local_tensor(b).element_size() for b in module.buffers()),
            "fsdp_units": _fsdp_units(module, sizes.dp) if sizes.dp > 1 or cfg.training.bf16 else [],
            "largest_block_params": max((sum(local_tensor(p).numel() for p in b.parameters()) for b in blocks),
                                        default=0),
            "model_params": dict(engine.param_counts),
            "shared_embedding_params": (local_tensor(engine.shared_embedding.weight).numel()
                                        if engine.shared_embedding is not None
                                        and engine.shared_embedding.weight is not None else 0),
        }


def _slice_config(cfg: Config) -> Config:
    """The (pp, tp) slice alone: no data parallelism, fp32 (no FSDP2 wrap), no recompute, one round of
    micro-batches."""
    t = cfg.training
    pp = cfg.parallel.pipeline_model_parallel_size
    return dataclasses.replace(
        cfg,
        parallel=dataclasses.replace(cfg.parallel, recompute_granularity="none", recompute_modules=["core_attn"]),
        training=dataclasses.replace(t, bf16=False, compile=False, global_batch_size=t.micro_batch_size * pp),
    )


def _block_kind(block: nn.Module) -> str:
    return "moe" if isinstance(block.feed_forward, MoELayer) else "dense"


def _trace_chunk(cfg: Config, part: nn.Module, tp: int, mode: FakeTensorMode, act_dtype: torch.dtype,
                 recompute_modules: list[str]) -> dict:
    """Per-micro-batch traces of a chunk's pieces; blocks once per recompute granularity (selective: of
    ``recompute_modules``).

    Returns ``{"embedding": PieceTrace, "head": PieceTrace, "blocks": {kind: (count, {granularity: PieceTrace})}}``
    (the ends only where the chunk has them).
    """
    b, s, h = cfg.training.micro_batch_size, cfg.data.seq_length, cfg.model.hidden_size
    out: dict = {"blocks": {}}
    with mode:
        tokens = torch.zeros(b, s, dtype=torch.long)

    def hidden() -> torch.Tensor:
        with mode:
            return torch.zeros(b, s // tp, h, dtype=act_dtype, requires_grad=True)

    if part.embeds_tokens:
        out["embedding"] = trace_piece(mode, part, lambda: part.tok_embeddings(tokens))
    first_of_kind: dict[str, str] = {}  # kind -> name of its first block
    counts: dict[str, int] = {}
    for name, block in part.layers.items():
        kind = _block_kind(block)
        counts[kind] = counts.get(kind, 0) + 1
        first_of_kind.setdefault(kind, name)

    def run_block(block: nn.Module) -> PieceTrace:
        x = hidden()
        return trace_piece(mode, part, lambda: block(x, part.rope_cos, part.rope_sin))

    # The engine's recompute wrappers, applied in place: full (then removed again), selective (of the
    # configured recompute modules).
    none = {kind: run_block(part.layers[name]) for kind, name in first_of_kind.items()}
    plain = dict(part.layers.items())
    apply_activation_checkpointing(part, "full")
    full = {kind: run_block(part.layers[name]) for kind, name in first_of_kind.items()}
    for name, block in plain.items():
        part.layers[name] = block
    apply_activation_checkpointing(part, "selective", recompute_modules)
    for kind, name in first_of_kind.items():
        traces = {"none": none[kind], "full": full[kind], "selective": run_block(part.layers[name])}
        out["blocks"][kind] = (counts[kind], traces)
    if part.norm is not None:
        x = hidden()
        out["head"] = trace_piece(mode, part, lambda: _head_loss(part, x, tokens))
    return out


def _head_loss(part: nn.Module, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The last stage's head: the final norm, output layer and loss; with multi-token prediction also each
    depth's embedding, norms, projection, output layer and loss (its block is traced with the others)."""
    x = part.norm(x)
    loss = lm_loss_from_target(part._head(x), tokens)
    for depth in part.mtp.values():
        x = depth.norm(depth.combine(x, part.tok_embeddings(tokens)))
        loss = loss + lm_loss_from_target(part._head(x), tokens)
    return loss


def _total(trace: PieceTrace | None, attr: str) -> int:
    if trace is None:
        return 0
    value = getattr(trace, attr)
    return value if isinstance(value, int) else sum(value.values())


def _fill_chunk(chunk: ChunkSim, traces: dict) -> None:
    """Activations, recompute transients and TP bytes of a chunk, for every recompute granularity."""
    ends = [traces.get("embedding"), traces.get("head")]
    blocks = list(traces["blocks"].values())
    for g in RECOMPUTE_GRANULARITIES:
        chunk.activations[g] = (sum(_total(t, "saved_bytes") for t in ends)
                                + sum(n * _total(by[g], "saved_bytes") for n, by in blocks))
        chunk.tp_bytes[g] = sum(_total(t, "comm") for t in ends) + sum(n * _total(by[g], "comm") for n, by in blocks)
        # A block in backward holds the gradients of its activations (at most what it saved without
        # recompute) and, recomputed, those activations again: briefly, one block at a time.
        chunk.backward_transient[g] = max(
            (2 * _total(by["none"], "saved_bytes") - _total(by[g], "saved_bytes") for _, by in blocks), default=0)
    chunk.tp_step_bytes = (sum(_total(t, "step_comm") for t in ends)
                           + sum(n * _total(by["none"], "step_comm") for n, by in blocks))


def _slice(cfg: Config, sizes: ParallelSizes, pp_rank: int, tp_rank: int) -> list[ChunkSim]:
    """Per-chunk activation and TP-traffic figures of (pp_rank, tp_rank), every recompute granularity."""
    slice_sizes = ParallelSizes(sizes.pp * sizes.tp, sizes.pp, 1, sizes.tp, sizes.virtual_stages, sizes.pp)
    act_dtype = torch.bfloat16 if cfg.training.bf16 else torch.float32
    num_stages = sizes.pp * sizes.virtual_stages
    split = pipeline_layers(cfg)
    b, s, h = cfg.training.micro_batch_size, cfg.data.seq_length, cfg.model.hidden_size
    boundary = b * (s // sizes.tp) * h * torch.finfo(act_dtype).bits // 8
    slice_cfg = _slice_config(cfg)
    chunks = []
    with fake_world(slice_sizes, pp_rank * sizes.tp + tp_rank) as mesh:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        engine = ParallelEngine(slice_cfg, device=torch.device("meta"), mesh=mesh)
        engine.build_model(model=meta_model(slice_cfg), seed_rng=False)
        for index, part in zip(stage_indices(pp_rank, sizes.pp, sizes.virtual_stages), engine.parts, strict=True):
            layers = split[index]
            chunk = ChunkSim(index, layers, index == 0, index == num_stages - 1,
                             sum(1 for i in layers if is_moe_layer(cfg, i)), boundary)
            to_fake(part, mode, act_dtype if cfg.training.bf16 else None)
            _fill_chunk(chunk, _trace_chunk(slice_cfg, part, sizes.tp, mode, act_dtype, cfg.parallel.recompute_modules))
            chunks.append(chunk)
    return chunks


def simulate_rank(cfg: Config, sizes: ParallelSizes, rank: int) -> RankSim:
    """Both simulations of global ``rank`` (module docstring)."""
    whole = _whole_world(cfg, sizes, rank)
    chunks = _slice(cfg, sizes, whole["pp_rank"], whole["tp_rank"])
    return RankSim(rank=rank, chunks=chunks, **whole)
