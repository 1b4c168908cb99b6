"""From a simulated rank (:mod:`.simulate`) to the figures of one step: memory, communication, FLOPs, time.

Memory of a rank at its peak (bytes; ``P`` = its parameter elements, local shards):

- weights: ``4 P`` (fp32 parameters; with bf16 they are the master weights) + buffers;
- gradients: ``4 P`` (fp32: accumulated and reduced in fp32 in every mode); with FSDP2's
  ``fully_shard`` under a pipeline schedule unsharded until the step's last backward (``4 P dp``);
- optimizer: AdamW's two moments ``8 P`` + one fp32 step counter per parameter tensor;
- compute copies, when FSDP2 wraps the model (dp > 1 or bf16): its unsharded parameters in the
  compute dtype (2 bytes bf16, 4 fp32), :func:`fsdp_buffers`;
- activations: per chunk, the bytes saved for backward per micro-batch (traced) plus, except on the last
  stage, the stage output the schedule keeps for backward, times the micro-batches in flight
  (:mod:`.schedule`); plus what one block adds in its backward: the gradients of its activations (at
  most what it saves without recompute) and, under recompute, those activations again.

Communication per step (payload bytes, :mod:`.comm` counts the same way on real runs):

- tp: the collectives of one traced micro-batch (forward, backward, recompute) x micro-batches, plus
  the once-per-step reductions of partial gradients (sequence-parallel norm weights);
- pp: each micro-batch sends the stage output forward and the input gradient backward: ``B S/tp H``
  elements in the activation dtype per direction and chunk boundary;
- dp: replication all-reduces the fp32 gradients once per step (``4 P``; ``2 P`` in bf16 with
  ``--grad-reduce-in-bf16``, as are FSDP2's reduce-scatters); FSDP2 all-gathers each
  unit's parameters (compute dtype, dim 0 padded to a multiple of dp) for each micro-batch's forward and
  backward without a pipeline, once per step on a pipeline stage (they stay gathered from its first forward to
  its last backward: :mod:`megatron_moe.parallel.data`), and reduce-scatters the fp32 gradients, per micro-batch
  without a pipeline and once per step with one;
- balance: the global load-balancing all-reduce of E fp32 token counts per MoE layer and micro-batch
  over dp (twice with full recompute or the MoE layers' selective recompute, which rerun the router);
- world: LM loss (4 bytes; 4 more for the multi-token prediction loss), the gradient norm's float64 sum
  of squares (8 bytes; 16 with ``--log-num-zeros-in-grad``; 8 more with ``--log-params-norm``) and the
  per-layer MoE statistics (E + 4 floats).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_moe.config import Config
from megatron_moe.model.transformer import is_moe_block
from megatron_moe.parallel.mesh import ParallelSizes
from megatron_moe.planning.flops import model_flops_per_token
from megatron_moe.planning.schedule import bubble_fraction, in_flight
from megatron_moe.planning.simulate import RankSim

GB = 1e9


@dataclass
class RankPlan:
    """Every figure of one rank (a role) for one optimizer step; bytes unless named otherwise."""

    rank: int
    pp_rank: int
    stages: list[int]
    layers: list[list[int]]
    params_local: int
    memory: dict[str, int]  # weights, gradients, optimizer, compute_copies, activations, backward_transient, peak
    activations_by_recompute: dict[str, int]  # granularity -> activation bytes in flight at the peak
    peak_by_recompute: dict[str, int]
    activations_per_micro_batch: dict[str, int]  # granularity -> one micro-batch of all this rank's chunks
    in_flight: list[int]
    comm: dict[str, int]  # tp, pp, dp, balance, world
    notes: list[str] = field(default_factory=list)


def fsdp_buffers(p: int, dp: int, compute_bytes: int, shard: bool, pipelined: bool, largest_block: int) -> dict:
    """Unsharded parameter copies and gradients that FSDP2 holds beside ``p`` local parameter elements.

    Replication: one unsharded copy in the compute dtype (``p`` elements), gradients ``4 p``.
    ``fully_shard`` under a pipeline schedule: after a backward other than the last the units stay
    gathered, and gradients accumulate unsharded until the last one, so ``p dp`` elements of each;
    without a pipeline, two blocks gathered at a time and sharded gradients (``4 p``).
    """
    if not shard:
        return {"compute_copies": compute_bytes * p, "gradients": 4 * p}
    if pipelined:
        return {"compute_copies": compute_bytes * p * dp, "gradients": 4 * p * dp}
    return {"compute_copies": compute_bytes * 2 * largest_block * dp, "gradients": 4 * p}


def _memory(cfg: Config, sizes: ParallelSizes, sim: RankSim, granularity: str) -> dict[str, int]:
    p = sim.local_params
    compute_bytes = 2 if cfg.training.bf16 else 4
    if sizes.dp > 1 or cfg.training.bf16:  # wrapped by FSDP2 (engine.build_model)
        fsdp = fsdp_buffers(p, sizes.dp, compute_bytes, cfg.parallel.data_parallel_shard, sizes.pp > 1,
                            sim.largest_block_params)
    else:
        fsdp = {"compute_copies": 0, "gradients": 4 * p}
    counts = in_flight(cfg.parallel.pipeline_schedule, sizes.pp, sim.pp_rank, sizes.num_microbatches,
                       sizes.virtual_stages)
    activations = sum(
        n * (c.activations[granularity] + (0 if c.is_last else c.boundary_bytes))
        for n, c in zip(counts, sim.chunks, strict=True)
    )
    transient = max(c.backward_transient[granularity] for c in sim.chunks)
    memory = {
        "weights": 4 * p + sim.buffer_bytes,
        "gradients": fsdp["gradients"],
        "optimizer": 8 * p + 4 * sim.param_tensors,
        "compute_copies": fsdp["compute_copies"],
        "activations": activations,
        "backward_transient": transient,
    }
    memory["peak"] = sum(memory.values())
    return memory


def _comm(cfg: Config, sizes: ParallelSizes, sim: RankSim) -> dict[str, int]:
    g = cfg.parallel.recompute_granularity
    m, e = sizes.num_microbatches, cfg.moe
    act = 2 if cfg.training.bf16 else 4
    tp = sum(c.tp_bytes[g] * m + c.tp_step_bytes for c in sim.chunks)
    pp = sum(m * c.boundary_bytes * ((not c.is_last) + (not c.is_first)) for c in sim.chunks) if sizes.pp > 1 else 0
    # The first and last stage sum their gradients of the embedding they share (fp32 master gradients),
    # on their own group: pipeline traffic (the pipeline group itself when pp = 2)
    pp += 4 * sim.shared_embedding_params
    dp = 0
    grad_bytes = 2 if cfg.parallel.grad_reduce_in_bf16 else 4
    if sizes.dp > 1:
        if cfg.parallel.data_parallel_shard:
            units = sum(sim.fsdp_units)
            gathers, reductions = (1, 1) if sizes.pp > 1 else (2 * m, m)
            dp = gathers * units * act + reductions * units * grad_bytes
        else:
            dp = grad_bytes * sim.local_params
    balance = 0
    if sizes.dp > 1 and e.num_experts and e.balance_loss == "switch" and e.balance_scope == "global":
        moe_layers = sum(c.moe_layers for c in sim.chunks)
        rerouted = g == "full" or (g == "selective" and "moe" in cfg.parallel.recompute_modules)
        balance = moe_layers * e.num_experts * 4 * m * (2 if rerouted else 1)
    world = 0
    if sizes.world > 1:
        # The gradient norm's float64 sum of squares (with the zero count beside it when it is logged),
        # the parameter norm's when it is logged (parallel/data.py).
        norms = 8 * (1 + cfg.logging.log_num_zeros_in_grad) + 8 * cfg.logging.log_params_norm
        mtp = 4 if cfg.model.mtp_num_layers else 0  # the multi-token prediction loss
        world = 4 + mtp + norms + _num_moe_layers(cfg) * (e.num_experts + 4) * 4
    return {"tp": tp, "pp": pp, "dp": dp, "balance": balance, "world": world}


def _num_moe_layers(cfg: Config) -> int:
    """MoE layers of the model, multi-token prediction's blocks included."""
    return sum(1 for i in range(cfg.model.num_layers + cfg.model.mtp_num_layers) if is_moe_block(cfg, i))


def plan_rank(cfg: Config, sizes: ParallelSizes, sim: RankSim) -> RankPlan:
    """The figures of one simulated rank (module docstring)."""
    counts = in_flight(cfg.parallel.pipeline_schedule, sizes.pp, sim.pp_rank, sizes.num_microbatches,
                       sizes.virtual_stages)
    by_g = {g: _memory(cfg, sizes, sim, g) for g in sim.chunks[0].activations}
    memory = by_g[cfg.parallel.recompute_granularity]
    return RankPlan(
        rank=sim.rank,
        pp_rank=sim.pp_rank,
        stages=[c.stage for c in sim.chunks],
        layers=[c.layers for c in sim.chunks],
        params_local=sim.local_params,
        memory=memory,
        activations_by_recompute={g: v["activations"] + v["backward_transient"] for g, v in by_g.items()},
        peak_by_recompute={g: v["peak"] for g, v in by_g.items()},
        activations_per_micro_batch={g: sum(c.activations[g] for c in sim.chunks) for g in by_g},
        in_flight=counts,
        comm=_comm(cfg, sizes, sim),
    )


@dataclass
class StepFigures:
    """FLOPs and time of one optimizer step of the whole job."""

    flops_per_token: float
    tokens_per_step: int
    flops_per_step: float
    mfu: float
    peak_tflops: float
    step_seconds: float
    tokens_per_second_per_gpu: float
    bubble_fraction: float


def step_figures(cfg: Config, sizes: ParallelSizes, matmul_params: int, mfu: float, peak_tflops: float) -> StepFigures:
    """Model FLOPs per step (:mod:`.flops`) and the step time at ``mfu`` of ``peak_tflops`` per GPU."""
    per_token = model_flops_per_token(cfg, matmul_params)
    tokens = cfg.training.global_batch_size * cfg.data.seq_length
    flops = per_token * tokens
    seconds = flops / (sizes.world * peak_tflops * 1e12 * mfu)
    return StepFigures(per_token, tokens, flops, mfu, peak_tflops, seconds, tokens / seconds / sizes.world,
                       bubble_fraction(sizes.pp, sizes.num_microbatches, sizes.virtual_stages))
