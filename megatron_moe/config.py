"""Typed run configuration: dataclasses grouped by concern, TOML files, command-line overrides.

A run's configuration is a :class:`Config`. It is built from defaults, then a TOML file
(``--config path.toml``, tables named after the groups), then command-line overrides, either
dotted (``--model.hidden_size 256``) or the common Megatron-LM flag names
(``--tensor-model-parallel-size 2``, ``--num-experts 8``, ...; see :data:`MEGATRON_FLAGS`).
Unknown keys, wrong types and inconsistent values raise :class:`ConfigError` naming the setting.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """An invalid configuration; the message names the offending setting."""


@dataclass
class ModelConfig:
    """Decoder-only transformer shape. Sizes in elements; ``vocab_size`` 0 = from the tokenizer."""

    vocab_size: int = 0
    make_vocab_size_divisible_by: int = 128
    hidden_size: int = 256
    num_layers: int = 4
    num_attention_heads: int = 4
    num_query_groups: int = 0  # KV heads (grouped-query attention); 0 = num_attention_heads
    ffn_hidden_size: int = 0  # dense SwiGLU width; 0 = round(8/3 * hidden) to a multiple of 64
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02


@dataclass
class MoEConfig:
    """Mixture-of-experts layers, routing and load balancing (see shared/ROUTING_SPEC.md)."""

    num_experts: int = 8  # 0 = dense model
    topk: int = 2
    expert_ffn_hidden_size: int = 0  # 0 = model.ffn_hidden_size
    layer_freq: int = 1  # an MoE layer every `layer_freq` layers
    first_k_dense: int = 0  # the first k layers stay dense
    router: str = "topk"  # "topk" | "sparsemixer"
    renormalize: bool = True  # top-K: renormalise the K picked weights to sum 1
    logit_norm: bool = False  # Skywork gating logit normalisation (spec 2)
    logit_norm_scale: float = 1.0  # lambda
    jitter_eps: float = 0.01  # SparseMixer-v2 threshold epsilon
    input_jitter_eps: float = 0.0  # multiplicative input jitter on the MoE input (training only)
    balance_loss: str = "switch"  # "switch" | "skywork" | "none"
    balance_scope: str = "local"  # "local" | "global"
    aux_loss_coeff: float = 0.01  # constant alpha
    z_loss_coeff: float = 0.0
    capacity_factor: float = 1.0  # for the drop rate (and drops in capacity mode)
    dropless: bool = True  # False = capacity mode: really drop over-capacity assignments
    adaptive_aux: bool = False  # Skywork adaptive per-layer coefficients (spec 5)
    adaptive_xi: float = 0.2
    adaptive_alpha_max: float = 0.01
    adaptive_beta: float = 0.99
    adaptive_alpha_0: float = -1.0  # < 0 means alpha_max


@dataclass
class DataConfig:
    """Megatron .bin/.idx data and the sentencepiece tokenizer."""

    data_path: list[str] = field(default_factory=list)  # ["prefix"] or ["w1", "p1", "w2", "p2", ...]
    split: str = "969,30,1"
    eval_data_path: list[str] = field(default_factory=list)
    tokenizer_model: str = ""
    seq_length: int = 256
    cache_dir: str = ""  # where megatron-core writes its index caches; "" = next to the run


@dataclass
class OptimizerConfig:
    """AdamW with linear warmup and cosine (or constant/linear) decay."""

    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # 0 = no clipping
    lr_warmup_iters: int = 0
    lr_decay_iters: int = 0  # 0 = training.train_iters
    lr_decay_style: str = "cosine"  # "cosine" | "linear" | "constant"


@dataclass
class TrainingConfig:
    """Batch sizes (in sequences), iterations, precision, evaluation cadence."""

    micro_batch_size: int = 4
    global_batch_size: int = 8
    train_iters: int = 100
    eval_interval: int = 50
    eval_iters: int = 10
    seed: int = 1234
    bf16: bool = False  # bf16 autocast; parameters and optimizer state stay fp32
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    num_threads: int = 0  # CPU intra-op threads; 0 = torch default
    exit_interval: int = 0  # save a checkpoint and exit after this many steps (0 = run to train_iters)
    nonfinite_loss: str = "stop"  # "stop" (raise, no checkpoint) | "skip" (drop that optimizer step)
    # Build on the meta device and allocate only this rank's pipeline stages (models too large for
    # host memory); each stage is initialised from seed + stage index, not the single-process stream.
    meta_init: bool = False


@dataclass
class ParallelConfig:
    """Parallel layout; data parallel size = world size / (tp * pp)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    pipeline_schedule: str = "1f1b"  # "1f1b" | "interleaved_1f1b" | "gpipe"
    virtual_pipeline_stages: int = 1  # model chunks per pipeline rank (interleaved 1F1B)
    pipeline_first_last_fewer_layers: bool = False  # embedding / output head count as one layer each
    data_parallel_shard: bool = False  # FSDP2 over the data-parallel group instead of replication
    activation_checkpointing: bool = False  # recompute every transformer block in backward


@dataclass
class CheckpointConfig:
    save: str = ""  # run directory: metrics.jsonl, checkpoints
    load: str = ""  # a save directory (its latest checkpoint) or one checkpoint directory
    save_interval: int = 0  # 0 = save only at the end of training and on SIGTERM/SIGINT
    keep_last: int = 3  # checkpoints kept in the save directory (0 = all)
    async_save: bool = False  # stage to CPU memory, write in the background, publish before the next save
    allow_tokenizer_change: bool = False  # resume with a tokenizer other than the checkpoint's


@dataclass
class LoggingConfig:
    log_interval: int = 10
    wandb_project: str = ""
    wandb_mode: str = "offline"  # "offline" | "online" | "disabled"
    tensorboard_dir: str = ""  # "" = no TensorBoard
    run_name: str = ""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Megatron-LM flag name -> dotted setting.
MEGATRON_FLAGS: dict[str, str] = {
    "tensor-model-parallel-size": "parallel.tensor_model_parallel_size",
    "pipeline-model-parallel-size": "parallel.pipeline_model_parallel_size",
    "num-experts": "moe.num_experts",
    "moe-router-topk": "moe.topk",
    "moe-ffn-hidden-size": "moe.expert_ffn_hidden_size",
    "moe-aux-loss-coeff": "moe.aux_loss_coeff",
    "moe-z-loss-coeff": "moe.z_loss_coeff",
    "moe-expert-capacity-factor": "moe.capacity_factor",
    "micro-batch-size": "training.micro_batch_size",
    "global-batch-size": "training.global_batch_size",
    "train-iters": "training.train_iters",
    "eval-interval": "training.eval_interval",
    "eval-iters": "training.eval_iters",
    "seed": "training.seed",
    "bf16": "training.bf16",
    "seq-length": "data.seq_length",
    "data-path": "data.data_path",
    "eval-data-path": "data.eval_data_path",
    "split": "data.split",
    "tokenizer-model": "data.tokenizer_model",
    "lr": "optimizer.lr",
    "min-lr": "optimizer.min_lr",
    "weight-decay": "optimizer.weight_decay",
    "clip-grad": "optimizer.clip_grad",
    "adam-beta1": "optimizer.adam_beta1",
    "adam-beta2": "optimizer.adam_beta2",
    "adam-eps": "optimizer.adam_eps",
    "lr-warmup-iters": "optimizer.lr_warmup_iters",
    "lr-decay-iters": "optimizer.lr_decay_iters",
    "lr-decay-style": "optimizer.lr_decay_style",
    "hidden-size": "model.hidden_size",
    "num-layers": "model.num_layers",
    "num-attention-heads": "model.num_attention_heads",
    "num-query-groups": "model.num_query_groups",
    "ffn-hidden-size": "model.ffn_hidden_size",
    "rotary-base": "model.rope_theta",
    "norm-epsilon": "model.norm_eps",
    "init-method-std": "model.init_std",
    "vocab-size": "model.vocab_size",
    "make-vocab-size-divisible-by": "model.make_vocab_size_divisible_by",
    "save": "checkpoint.save",
    "load": "checkpoint.load",
    "save-interval": "checkpoint.save_interval",
    "async-save": "checkpoint.async_save",
    "exit-interval": "training.exit_interval",
    "virtual-pipeline-model-parallel-size": "parallel.virtual_pipeline_stages",
    "recompute-activations": "parallel.activation_checkpointing",
    "use-torch-fsdp2": "parallel.data_parallel_shard",
    "log-interval": "logging.log_interval",
    "wandb-project": "logging.wandb_project",
    "tensorboard-dir": "logging.tensorboard_dir",
}

_CHOICES: dict[str, tuple[str, ...]] = {
    "moe.router": ("topk", "sparsemixer"),
    "moe.balance_loss": ("switch", "skywork", "none"),
    "moe.balance_scope": ("local", "global"),
    "optimizer.lr_decay_style": ("cosine", "linear", "constant"),
    "training.device": ("auto", "cpu", "cuda"),
    "training.nonfinite_loss": ("stop", "skip"),
    "parallel.pipeline_schedule": ("1f1b", "interleaved_1f1b", "gpipe"),
    "logging.wandb_mode": ("offline", "online", "disabled"),
}


def _group_fields(obj: Any) -> dict[str, tuple[Any, Any]]:
    hints = typing.get_type_hints(type(obj))
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(obj)}


def _convert(value: Any, annotation: Any, name: str) -> Any:
    """Convert a TOML value or a command-line string to ``annotation``; raise ConfigError if impossible."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        return _convert(value, args[0], name)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, str):
            value = value.split()
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [_convert(v, item_type, name) for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            return int(str(value), 0)
        except ValueError:
            raise ConfigError(f"{name}: expected an integer, got {value!r}") from None
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{name}: unsupported setting type {annotation!r}")


def set_value(cfg: Config, dotted: str, value: Any) -> None:
    """Set ``group.field`` on ``cfg`` from a TOML value or string, converting to the field's type."""
    parts = dotted.split(".")
    if len(parts) != 2:
        raise ConfigError(f"unknown setting {dotted!r}: expected 'group.field' (groups: {_group_names()})")
    group_name, key = parts
    if group_name not in _group_names():
        raise ConfigError(f"unknown setting {dotted!r}: no group {group_name!r} (groups: {_group_names()})")
    group = getattr(cfg, group_name)
    fields = _group_fields(group)
    if key not in fields:
        raise ConfigError(f"unknown setting {dotted!r}; {group_name} has: {', '.join(sorted(fields))}")
    setattr(group, key, _convert(value, fields[key][0], dotted))


def _group_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


def load_toml(path: str | Path, cfg: Config | None = None) -> Config:
    """Apply a TOML file (tables named after the groups) on top of ``cfg`` (defaults if None)."""
    cfg = cfg or Config()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {e}") from None
    return apply_settings(cfg, data, str(path))


def apply_settings(cfg: Config, data: dict[str, Any], source: str) -> Config:
    """Apply ``{group: {field: value}}`` (a TOML file, a checkpoint's config) to ``cfg`` in place.

    Raises ConfigError naming ``source`` and the setting for unknown groups/fields and wrong types.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of setting groups, got {type(data).__name__}")
    groups = _group_names()
    for group_name, table in data.items():
        if group_name not in groups:
            raise ConfigError(f"{source}: unknown group {group_name!r} (groups: {groups})")
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: {group_name!r} must be a table of settings like [{group_name}]")
        for key, value in table.items():
            set_value(cfg, f"{group_name}.{key}", value)
    return cfg


def parse_args(argv: list[str], cfg: Config | None = None) -> tuple[Config, dict[str, Any]]:
    """Build a Config from ``--config FILE`` plus overrides in ``argv``.

    Returns (config, extras) where extras holds run-level switches that are not settings
    (currently ``eval_only``). Boolean settings may be given without a value (``--bf16``).
    List settings take all following values up to the next ``--flag``.
    """
    cfg = cfg or Config()
    extras: dict[str, Any] = {"eval_only": False}
    args = list(argv)
    if "--config" in args:
        i = args.index("--config")
        if i + 1 >= len(args):
            raise ConfigError("--config needs a path to a TOML file")
        cfg = load_toml(args[i + 1], cfg)
        del args[i : i + 2]
    i = 0
    while i < len(args):
        flag = args[i]
        if not flag.startswith("--"):
            raise ConfigError(f"unexpected argument {flag!r}: settings look like --group.field VALUE")
        name = flag[2:]
        if "=" in name:
            name, inline = name.split("=", 1)
            values = [inline]
            i += 1
        else:
            j = i + 1
            while j < len(args) and not args[j].startswith("--"):
                j += 1
            values = args[i + 1 : j]
            i = j
        if name in ("eval-only", "eval_only"):
            extras["eval_only"] = True if not values else _convert(values[0], bool, name)
            continue
        dotted = MEGATRON_FLAGS.get(name, name if "." in name else None)
        if dotted is None:
            raise ConfigError(f"unknown flag --{name}: use --group.field or a Megatron-LM flag name")
        group_name, key = dotted.split(".", 1)
        group = getattr(cfg, group_name, None)
        annotation = _group_fields(group)[key][0] if group is not None and key in _group_fields(group) else None
        if annotation is bool and not values:
            values = ["true"]
        if not values:
            raise ConfigError(f"--{name} needs a value")
        is_list = typing.get_origin(annotation) is list
        if len(values) > 1 and not is_list:
            raise ConfigError(f"--{name} takes one value, got {values}")
        set_value(cfg, dotted, values if is_list else values[0])
    validate(cfg)
    return cfg, extras


def default_ffn_hidden_size(hidden_size: int) -> int:
    """SwiGLU width 8/3 * hidden rounded up to a multiple of 64 (LLaMA convention)."""
    return int(math.ceil(8 * hidden_size / 3 / 64) * 64)


def validate(cfg: Config) -> None:
    """Check types of choices and the consistency of sizes; raise ConfigError naming the setting."""
    for dotted, choices in _CHOICES.items():
        group, key = dotted.split(".")
        value = getattr(getattr(cfg, group), key)
        if value not in choices:
            raise ConfigError(f"{dotted} = {value!r}; expected one of {choices}")
    m, e, t, o, d = cfg.model, cfg.moe, cfg.training, cfg.optimizer, cfg.data
    positive = {
        "model.hidden_size": m.hidden_size,
        "model.num_layers": m.num_layers,
        "model.num_attention_heads": m.num_attention_heads,
        "model.make_vocab_size_divisible_by": m.make_vocab_size_divisible_by,
        "training.micro_batch_size": t.micro_batch_size,
        "training.global_batch_size": t.global_batch_size,
        "training.train_iters": t.train_iters,
        "data.seq_length": d.seq_length,
        "parallel.tensor_model_parallel_size": cfg.parallel.tensor_model_parallel_size,
        "parallel.pipeline_model_parallel_size": cfg.parallel.pipeline_model_parallel_size,
        "logging.log_interval": cfg.logging.log_interval,
        "parallel.virtual_pipeline_stages": cfg.parallel.virtual_pipeline_stages,
    }
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{name} = {value}; must be positive")
    for name, value in {
        "model.vocab_size": m.vocab_size,
        "model.num_query_groups": m.num_query_groups,
        "model.ffn_hidden_size": m.ffn_hidden_size,
        "moe.num_experts": e.num_experts,
        "moe.expert_ffn_hidden_size": e.expert_ffn_hidden_size,
        "moe.first_k_dense": e.first_k_dense,
        "moe.aux_loss_coeff": e.aux_loss_coeff,
        "moe.z_loss_coeff": e.z_loss_coeff,
        "moe.jitter_eps": e.jitter_eps,
        "moe.input_jitter_eps": e.input_jitter_eps,
        "optimizer.lr": o.lr,
        "optimizer.min_lr": o.min_lr,
        "optimizer.weight_decay": o.weight_decay,
        "optimizer.clip_grad": o.clip_grad,
        "optimizer.lr_warmup_iters": o.lr_warmup_iters,
        "optimizer.lr_decay_iters": o.lr_decay_iters,
        "training.eval_interval": t.eval_interval,
        "training.eval_iters": t.eval_iters,
        "training.num_threads": t.num_threads,
        "checkpoint.save_interval": cfg.checkpoint.save_interval,
        "checkpoint.keep_last": cfg.checkpoint.keep_last,
        "training.exit_interval": t.exit_interval,
    }.items():
        if value < 0:
            raise ConfigError(f"{name} = {value}; must not be negative")
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            f"model.num_attention_heads = {m.num_attention_heads} does not divide "
            f"model.hidden_size = {m.hidden_size}"
        )
    if (m.hidden_size // m.num_attention_heads) % 2:
        raise ConfigError(
            f"head dimension model.hidden_size / model.num_attention_heads = "
            f"{m.hidden_size // m.num_attention_heads} must be even for rotary embeddings"
        )
    kv = m.num_query_groups or m.num_attention_heads
    if m.num_attention_heads % kv:
        raise ConfigError(
            f"model.num_query_groups = {kv} does not divide model.num_attention_heads = {m.num_attention_heads}"
        )
    if e.num_experts:
        if e.topk <= 0:
            raise ConfigError(f"moe.topk = {e.topk}; must be positive")
        if e.topk > e.num_experts:
            raise ConfigError(f"moe.topk = {e.topk} exceeds moe.num_experts = {e.num_experts}")
        if e.router == "sparsemixer" and e.topk != 2:
            raise ConfigError(f"moe.router = 'sparsemixer' supports moe.topk = 2 only, got {e.topk}")
        if e.layer_freq <= 0:
            raise ConfigError(f"moe.layer_freq = {e.layer_freq}; must be positive")
        if e.first_k_dense >= m.num_layers:
            raise ConfigError(
                f"moe.first_k_dense = {e.first_k_dense} leaves no MoE layer among model.num_layers = "
                f"{m.num_layers}; set moe.num_experts = 0 for a dense model"
            )
        if e.capacity_factor <= 0:
            raise ConfigError(f"moe.capacity_factor = {e.capacity_factor}; must be positive")
        if e.balance_scope == "global" and e.balance_loss != "switch":
            raise ConfigError(
                f"moe.balance_scope = 'global' sums token counts, which only the Switch loss uses; "
                f"moe.balance_loss = {e.balance_loss!r} is computed from local probabilities (use 'switch')"
            )
        if e.adaptive_aux and e.balance_loss == "none":
            raise ConfigError("moe.adaptive_aux needs a balance loss; moe.balance_loss is 'none'")
        if not 0 <= e.adaptive_beta < 1:
            raise ConfigError(f"moe.adaptive_beta = {e.adaptive_beta}; must be in [0, 1)")
        if e.adaptive_xi < 0 or e.adaptive_alpha_max < 0:
            raise ConfigError("moe.adaptive_xi and moe.adaptive_alpha_max must not be negative")
    if o.min_lr > o.lr:
        raise ConfigError(f"optimizer.min_lr = {o.min_lr} exceeds optimizer.lr = {o.lr}")
    if not 0 <= o.adam_beta1 < 1 or not 0 <= o.adam_beta2 < 1:
        raise ConfigError("optimizer.adam_beta1 and optimizer.adam_beta2 must be in [0, 1)")
    if o.lr_warmup_iters > t.train_iters:
        raise ConfigError(
            f"optimizer.lr_warmup_iters = {o.lr_warmup_iters} exceeds training.train_iters = {t.train_iters}"
        )
    if len(d.data_path) > 1 and len(d.data_path) % 2:
        raise ConfigError(
            f"data.data_path = {d.data_path}: a blend is a list of weight, prefix pairs (odd length given)"
        )
    split = d.split.replace("/", ",").split(",")
    try:
        parts = [float(s) for s in split]
    except ValueError:
        raise ConfigError(f"data.split = {d.split!r}; expected comma-separated numbers like '969,30,1'") from None
    if len(parts) > 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ConfigError(f"data.split = {d.split!r}; expected up to 3 non-negative weights with a positive sum")


def check_batch_sizes(cfg: Config, data_parallel_size: int) -> int:
    """Number of micro-batches per optimizer step (Megatron-LM rule); raise if sizes do not divide."""
    t = cfg.training
    per_step = t.micro_batch_size * data_parallel_size
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"training.global_batch_size = {t.global_batch_size} is not divisible by "
            f"training.micro_batch_size ({t.micro_batch_size}) x data-parallel size ({data_parallel_size})"
        )
    return t.global_batch_size // per_step
