"""Pretrain an MoE language model: config -> model -> train/eval.

    python pretrain_moe.py --config examples/tiny_cpu.toml --save runs/demo
    python pretrain_moe.py --config examples/tiny_cpu.toml --num-experts 16 --moe-router-topk 2 --lr 1e-3

Errors a user can cause print one line naming the setting or file and exit with a code per kind
(:data:`EXIT_CODES`); a traceback means a bug in this project.
"""

from __future__ import annotations

import errno
import sys

from megatron_moe.config import ConfigError, parse_args
from megatron_moe.data.errors import DataError
from megatron_moe.planning.errors import LayoutDoesNotFit
from megatron_moe.training.checkpoint import CheckpointError

# Exit code per kind of user error (0 = success, 1 = a bug: Python's code for an uncaught exception).
EXIT_CODES = {
    "configuration": 2,
    "checkpoint": 3,
    "data": 4,
    "non-finite loss": 5,
    "disk full": 6,
    "out of memory": 7,
    "layout does not fit": 8,  # --dry-run: a rank needs more memory than the device has
    "interrupted": 130,
}


def _classify(e: BaseException) -> str | None:
    """The kind of user error ``e`` is (a key of EXIT_CODES), or None for a bug."""
    if isinstance(e, LayoutDoesNotFit):
        return "layout does not fit"
    if isinstance(e, ConfigError):
        return "configuration"
    if isinstance(e, CheckpointError):
        return "checkpoint"
    if isinstance(e, DataError | FileNotFoundError):
        return "data"
    if isinstance(e, FloatingPointError):
        return "non-finite loss"
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return "disk full"
    if isinstance(e, MemoryError) or "out of memory" in str(e).lower():
        return "out of memory"
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    return None


def main(argv: list[str] | None = None) -> int:
    from megatron_moe.parallel.mesh import export_launch_environment
    from megatron_moe.training.trainer import train

    try:
        cfg, extras = parse_args(sys.argv[1:] if argv is None else argv)
        if export_launch_environment().rank == 0:  # torchrun's or slurm's rank (bad launches refused here)
            for note in extras["notes"]:
                print(f"note: {note}", file=sys.stderr)
        if extras.get("dry_run"):
            from megatron_moe.planning.dry_run import options_from_extras, run

            run(cfg, options_from_extras(extras))
            return 0
        train(cfg, eval_only=extras["eval_only"], given=extras["given"])
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - user errors become one line; bugs re-raise
        kind = _classify(e)
        if kind is None:
            raise
        message = str(e).strip() or type(e).__name__
        if kind == "out of memory":
            message += (" (the model, --micro-batch-size or --seq-length does not fit in memory: split it over more "
                        "devices with --tensor/--pipeline-model-parallel-size, or make them smaller)")
        print(f"{kind} error: {message}", file=sys.stderr)
        return EXIT_CODES[kind]
    return 0


if __name__ == "__main__":
    sys.exit(main())
