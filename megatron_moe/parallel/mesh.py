"""The (pp, dp, tp) device mesh and the validation of a parallel layout against the model.

:func:`parallel_sizes` checks a layout BEFORE any process group or model exists and raises
:class:`~megatron_moe.config.ConfigError` naming the size that does not fit and why;
:func:`build_mesh` then creates the :class:`~torch.distributed.device_mesh.DeviceMesh` with
dimensions ``("pp", "dp", "tp")`` (tp innermost, so a TP group sits on adjacent ranks = one node's
fast links, as in Megatron-LM). Works with gloo on CPU and NCCL on GPUs.

:func:`launch_environment` reads where this process sits in the job, from torchrun's variables or
from slurm's (one task per GPU, Megatron-LM's ``srun python pretrain_moe.py``), and refuses a
multi-process launch that would give every process a world of its own;
:func:`export_launch_environment` writes the result as torchrun's variables for ``env://``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from megatron_moe.config import Config, ConfigError
from megatron_moe.parallel.pipeline import pipeline_layers

DEFAULT_MASTER_PORT = 29500  # torchrun's default; MASTER_PORT overrides it


@dataclass(frozen=True)
class ParallelSizes:
    """A validated layout. ``world == pp * dp * tp``; ``num_microbatches`` per rank and step."""

    world: int
    pp: int
    dp: int
    tp: int
    virtual_stages: int
    num_microbatches: int


def parallel_sizes(cfg: Config, world_size: int) -> ParallelSizes:
    """Validate the layout of ``cfg.parallel`` for ``world_size`` ranks; raise ConfigError if it does not fit.

    Checks, in order: world size divisible by tp * pp; attention heads, KV heads, dense ffn, expert
    ffn and the (padded) vocabulary divisible by tp; the sequence length divisible by tp (sequence
    parallelism); pipeline stages x virtual stages not more than the layers; global batch divisible
    by micro batch x dp. Needs ``cfg.model.vocab_size`` resolved (non-zero).
    """
    tp = cfg.parallel.tensor_model_parallel_size
    pp = cfg.parallel.pipeline_model_parallel_size
    virtual_stages = cfg.parallel.virtual_pipeline_stages
    m, e = cfg.model, cfg.moe
    if tp < 1 or pp < 1 or virtual_stages < 1:
        raise ConfigError(
            f"parallel sizes must be positive: tensor_model_parallel_size = {tp}, "
            f"pipeline_model_parallel_size = {pp}, virtual pipeline stages = {virtual_stages}"
        )
    if world_size % (tp * pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by tensor_model_parallel_size ({tp}) x "
            f"pipeline_model_parallel_size ({pp}) = {tp * pp}: the data-parallel size would not be an integer"
        )
    dp = world_size // (tp * pp)
    divisible = [
        ("model.num_attention_heads", m.num_attention_heads, "attention heads are split across TP ranks"),
        ("model.num_query_groups (KV heads)", m.num_kv_heads, "key/value heads are split across TP ranks"),
        ("model.ffn_hidden_size", m.dense_ffn_size, "the dense SwiGLU width is split across TP ranks"),
        ("model.vocab_size (padded)", m.vocab_size, "the embedding and output are vocabulary-parallel"),
        ("data.seq_length", cfg.data.seq_length, "sequence parallelism splits the sequence across TP ranks"),
    ]
    if e.num_experts:
        divisible.append(
            (
                "moe.expert_ffn_hidden_size",
                cfg.expert_ffn_size,
                "every expert's ffn dimension is split across TP ranks (no expert parallelism)",
            )
        )
    for name, value, why in divisible:
        if value % tp:
            raise ConfigError(f"tensor_model_parallel_size = {tp} does not divide {name} = {value}: {why}")
    stages = pp * virtual_stages
    if stages > m.num_layers and not cfg.parallel.pipeline_layout:  # a layout may have stages without a layer
        raise ConfigError(
            f"pipeline_model_parallel_size ({pp}) x virtual stages ({virtual_stages}) = {stages} pipeline "
            f"stages exceed model.num_layers = {m.num_layers}: every stage needs at least one layer"
        )
    if stages > 1:
        pipeline_layers(cfg)  # raises if the layers do not split over the stages
    num_micro = cfg.training.num_microbatches(dp)
    if virtual_stages > 1 and num_micro % pp:
        raise ConfigError(
            f"interleaved 1F1B needs the number of micro-batches ({num_micro} = global batch / "
            f"(micro batch x dp)) to be a multiple of pipeline_model_parallel_size ({pp})"
        )
    return ParallelSizes(world_size, pp, dp, tp, virtual_stages, num_micro)


def check_grouped_gemm_shapes(cfg: Config, tp: int, device_type: str) -> None:
    """On CUDA, torch._grouped_mm needs 16-byte-aligned rows: hidden and per-rank expert FFN sizes
    must be multiples of 8 (bf16). Fail before any work instead of deep inside the first forward."""
    if device_type != "cuda" or not cfg.moe.num_experts:
        return
    ffn = cfg.expert_ffn_size
    for name, size in (("model.hidden_size", cfg.model.hidden_size),
                       (f"moe.expert_ffn_hidden_size / tensor parallel size ({ffn} / {tp})", ffn // tp)):
        if size % 8:
            raise ConfigError(f"{name} = {size}: the grouped expert GEMM on CUDA needs a multiple of 8")


def build_mesh(sizes: ParallelSizes, device_type: str) -> DeviceMesh:
    """DeviceMesh of shape (pp, dp, tp) named ("pp", "dp", "tp") over the initialised default group."""
    return init_device_mesh(device_type, (sizes.pp, sizes.dp, sizes.tp), mesh_dim_names=("pp", "dp", "tp"))



@dataclass(frozen=True)
class LaunchEnvironment:
    """This process's place in the job. ``launcher`` is ``"torchrun"``, ``"slurm"`` or ``"single"``;
    ``master_addr``/``master_port`` are set for slurm (torchrun exports its own)."""

    launcher: str
    rank: int
    world_size: int
    local_rank: int
    master_addr: str = ""
    master_port: int = 0


def launch_environment(env: Mapping[str, str] | None = None) -> LaunchEnvironment:
    """Where this process sits, from ``env`` (default ``os.environ``).

    - torchrun (or any launcher exporting ``RANK`` and ``WORLD_SIZE``): those, and ``LOCAL_RANK``.
    - a slurm job step (``srun``: ``SLURM_STEP_ID`` set): rank ``SLURM_PROCID`` of
      ``SLURM_STEP_NUM_TASKS`` (else ``SLURM_NTASKS``), local rank ``SLURM_LOCALID``; the master is
      ``MASTER_ADDR`` or the first node of ``SLURM_STEP_NODELIST`` / ``SLURM_JOB_NODELIST`` /
      ``SLURM_NODELIST``, on ``MASTER_PORT`` or :data:`DEFAULT_MASTER_PORT`.
    - otherwise a single process.

    Raises ConfigError for a launch that started several processes without telling them about each
    other (they would each train alone into the same ``--save``): a slurm batch script or allocation
    of several tasks running the program directly, MPI's ``OMPI_COMM_WORLD_SIZE`` / ``PMI_SIZE`` > 1
    without torchrun's variables, or only one of ``RANK`` / ``WORLD_SIZE``.
    """
    env = os.environ if env is None else env
    if "RANK" in env or "WORLD_SIZE" in env:
        missing = [k for k in ("RANK", "WORLD_SIZE") if k not in env]
        if missing:
            raise ConfigError(f"the environment sets {'WORLD_SIZE' if 'RANK' in missing else 'RANK'} but not "
                              f"{missing[0]}: launch with torchrun, or with srun and neither set")
        rank, world = _int_var(env, "RANK"), _int_var(env, "WORLD_SIZE")
        local = _int_var(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        _check_rank(rank, world, "RANK", "WORLD_SIZE")
        return LaunchEnvironment("torchrun", rank, world, local)
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        world_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
        rank, world = _int_var(env, "SLURM_PROCID"), _int_var(env, world_var)
        _check_rank(rank, world, "SLURM_PROCID", world_var)
        if world == 1:
            return LaunchEnvironment("single", 0, 1, 0)
        nodes = next((env[k] for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if env.get(k)),
                     "")
        addr = env.get("MASTER_ADDR") or first_host(nodes)
        if not addr:
            raise ConfigError("a slurm step of several tasks without SLURM_JOB_NODELIST: set MASTER_ADDR to the "
                              "first node's address")
        port = _int_var(env, "MASTER_PORT") if env.get("MASTER_PORT") else DEFAULT_MASTER_PORT
        local = _int_var(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        return LaunchEnvironment("slurm", rank, world, local, addr, port)
    for var, how in (("SLURM_NTASKS", "a slurm batch script or allocation of {n} tasks runs this program directly "
                                      "(one process)"),
                     ("OMPI_COMM_WORLD_SIZE", "mpirun started {n} processes"),
                     ("PMI_SIZE", "a PMI launcher started {n} processes")):
        if env.get(var, "1").isdigit() and int(env.get(var, "1")) > 1:
            raise ConfigError(f"{how.format(n=env[var])}, but nothing tells them about each other: each would train "
                              "alone into the same --save. Start one task per GPU with `srun python pretrain_moe.py "
                              "...` or one torchrun per node (scripts/pretrain_slurm.sbatch, "
                              "scripts/launch_torchrun.sh)")
    return LaunchEnvironment("single", 0, 1, 0)


def export_launch_environment(env: MutableMapping[str, str] | None = None) -> LaunchEnvironment:
    """Resolve :func:`launch_environment` and, for slurm, write torchrun's variables (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) into ``env`` for ``env://``
    initialisation. ``LOCAL_RANK`` becomes the CUDA device index: the local rank modulo the GPUs this
    task sees (slurm may bind one GPU per task). Idempotent; returns the environment."""
    env = os.environ if env is None else env
    launch = launch_environment(env)
    if launch.launcher == "slurm":
        local = launch.local_rank
        if torch.cuda.is_available():
            local %= torch.cuda.device_count()
        env.update(RANK=str(launch.rank), WORLD_SIZE=str(launch.world_size), LOCAL_RANK=str(local),
                   MASTER_ADDR=launch.master_addr, MASTER_PORT=str(launch.master_port))
    return launch


def first_host(nodelist: str) -> str:
    """The first host of a slurm host list: ``"gpu[003-010,12],cpu1"`` -> ``"gpu003"`` (zero padding kept).

    The small part of ``scontrol show hostnames`` a launch needs, without calling slurm.
    """
    first = re.match(r"(?:[^,\[]|\[[^\]]*\])+", nodelist.strip())
    if not first:
        return ""
    return re.sub(r"\[([^],-]+)[^]]*\]", lambda m: m.group(1), first.group(0))


def _int_var(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ConfigError(f"environment variable {name} = {env[name]!r} is not an integer") from None


def _check_rank(rank: int, world: int, rank_var: str, world_var: str) -> None:
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"{rank_var} = {rank} is not a rank of a world of {world_var} = {world}")
