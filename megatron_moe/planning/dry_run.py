"""``pretrain_moe.py --dry-run``: plan a cluster run on one machine, before any real job starts.

For each distinct rank role - the first, a middle and the last pipeline stage (a rank holds all
its virtual stages when interleaved), or the ranks given with ``--dry-run-rank`` - the rank is
built in a simulated world of ``--world-size`` ranks (:mod:`.simulate`), and its memory,
communication, FLOPs and pipeline bubble are reported (:mod:`.estimate`, :mod:`.report`). Needs no
data, no tokenizer (given ``model.vocab_size``) and no GPU. A rank whose peak exceeds the device
memory is named with what would make it fit, and the run ends with :class:`LayoutDoesNotFit`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from megatron_moe.config import DRY_RUN_FLAGS, Config, ConfigError
from megatron_moe.parallel.mesh import check_grouped_gemm_shapes, parallel_sizes
from megatron_moe.planning import report
from megatron_moe.planning.errors import LayoutDoesNotFit
from megatron_moe.planning.estimate import GB, plan_rank, step_figures
from megatron_moe.planning.flops import matmul_active_params
from megatron_moe.planning.simulate import meta_model, simulate_rank


@dataclass
class DryRunOptions:
    """The ``--dry-run*`` switches: world size, ranks to show (default: one per role), JSON path,
    device memory in GB (10^9 bytes), the MFU and per-GPU peak TFLOP/s the step time assumes."""

    world_size: int
    ranks: list[int] = dataclasses.field(default_factory=list)
    output: str = ""
    device_memory_gb: float = 80.0
    mfu: float = 0.4
    peak_tflops: float = 989.0  # H100 SXM dense bf16

    def validate(self) -> None:
        if self.world_size < 1:
            raise ConfigError("--dry-run needs --world-size N: the number of ranks of the planned job")
        bad = [r for r in self.ranks if not 0 <= r < self.world_size]
        if bad:
            raise ConfigError(f"--dry-run-rank {bad}: ranks are 0 .. {self.world_size - 1}")
        if not 0 < self.mfu <= 1:
            raise ConfigError(f"--dry-run-mfu {self.mfu}: a fraction in (0, 1]")
        if not self.device_memory_gb > 0 or not self.peak_tflops > 0:
            raise ConfigError("--dry-run-device-memory and --dry-run-peak-tflops must be positive")


def options_from_extras(extras: dict) -> DryRunOptions:
    """The :class:`DryRunOptions` of parsed command-line extras (:func:`megatron_moe.config.parse_args`;
    :data:`~megatron_moe.config.DRY_RUN_FLAGS` gives the defaults of switches not given)."""
    value = {key: extras.get(key, default) for key, _, default in DRY_RUN_FLAGS.values()}
    return DryRunOptions(value["world_size"], list(value["dry_run_ranks"]), value["dry_run_output"],
                         value["dry_run_device_memory"], value["dry_run_mfu"], value["dry_run_peak_tflops"])


def role_ranks(pp: int, dp: int, tp: int) -> list[int]:
    """Global ranks of the first, a middle and the last pipeline stage (dp and tp index 0)."""
    stages = sorted({0, pp // 2, pp - 1}) if pp > 2 else sorted({0, pp - 1})
    return [s * dp * tp for s in stages]


def resolve_vocab(cfg: Config) -> Config:
    """``model.vocab_size``, from the tokenizer (padded as training pads it) when not set."""
    if cfg.model.vocab_size:
        return cfg
    if not cfg.data.tokenizer_model or not Path(cfg.data.tokenizer_model).is_file():
        raise ConfigError("a dry run needs the vocabulary size: set --vocab-size (model.vocab_size) or give an "
                          "existing --tokenizer-model")
    from megatron_moe.data.tokenizer import SentencePieceTokenizer
    from megatron_moe.model.transformer import padded_vocab_size

    m = cfg.model
    vocab = padded_vocab_size(SentencePieceTokenizer(cfg.data.tokenizer_model).vocab_size,
                              m.make_vocab_size_divisible_by, cfg.parallel.tensor_model_parallel_size)
    return cfg.with_vocab_size(vocab)


def plan(cfg: Config, options: DryRunOptions) -> dict:
    """Simulate the ranks and return the whole plan as a JSON-ready dict (see :mod:`.report`)."""
    options.validate()
    cfg = resolve_vocab(cfg)
    cfg.parallel.validate()
    sizes = parallel_sizes(cfg, options.world_size)
    if cfg.training.device == "cuda":
        check_grouped_gemm_shapes(cfg, sizes.tp, "cuda")
    ranks = options.ranks or role_ranks(sizes.pp, sizes.dp, sizes.tp)
    sims = [simulate_rank(cfg, sizes, r) for r in ranks]
    plans = [plan_rank(cfg, sizes, s) for s in sims]
    step = step_figures(cfg, sizes, matmul_active_params(meta_model(cfg), cfg), options.mfu, options.peak_tflops)
    capacity = options.device_memory_gb * GB
    problems = [report.does_not_fit(cfg, sizes, p, capacity) for p in plans if p.memory["peak"] > capacity]
    return {
        "layout": dataclasses.asdict(sizes),
        "settings": {"vocab_size": cfg.model.vocab_size, "schedule": cfg.parallel.pipeline_schedule,
                     "micro_batch_size": cfg.training.micro_batch_size,
                     "global_batch_size": cfg.training.global_batch_size, "seq_length": cfg.data.seq_length,
                     "bf16": cfg.training.bf16, "recompute": cfg.parallel.recompute_granularity,
                     "fsdp2": cfg.parallel.data_parallel_shard, "device_memory_gb": options.device_memory_gb},
        "parameters": sims[0].model_params,
        "ranks": [dataclasses.asdict(p) for p in plans],
        "step": dataclasses.asdict(step),
        "does_not_fit": problems,
    }


def run(cfg: Config, options: DryRunOptions, source: str = "") -> dict:
    """Plan, print the table, write the JSON if asked; raise :class:`LayoutDoesNotFit` if a rank does not fit."""
    result = plan(cfg, options)
    print(report.table(result, source))
    if options.output:
        path = Path(options.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
    if result["does_not_fit"]:
        n = len(result["does_not_fit"])
        raise LayoutDoesNotFit(f"{n} of {len(result['ranks'])} ranks shown need more than "
                               f"{options.device_memory_gb:g} GB (DOES NOT FIT lines above)")
    return result
