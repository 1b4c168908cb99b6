"""The (pp, dp, tp) device mesh and the validation of a parallel layout against the model.

:func:`parallel_sizes` checks a layout BEFORE any process group or model exists and raises
:class:`~megatron_moe.config.ConfigError` naming the size that does not fit and why;
:func:`build_mesh` then creates the :class:`~torch.distributed.device_mesh.DeviceMesh` with
dimensions ``("pp", "dp", "tp")`` (tp innermost, so a TP group sits on adjacent ranks = one node's
fast links, as in Megatron-LM). Works with gloo on CPU and NCCL on GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from megatron_moe.config import Config, ConfigError


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
    if tp > 1 and m.tie_embeddings:
        raise ConfigError("model.tie_embeddings is not supported with tensor_model_parallel_size > 1")
    stages = pp * virtual_stages
    if stages > m.num_layers:
        raise ConfigError(
            f"pipeline_model_parallel_size ({pp}) x virtual stages ({virtual_stages}) = {stages} pipeline "
            f"stages exceed model.num_layers = {m.num_layers}: every stage needs at least one layer"
        )
    if pp > 1 and m.tie_embeddings:
        raise ConfigError("model.tie_embeddings is not supported with pipeline_model_parallel_size > 1")
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

