"""Pretrain an MoE language model: config -> model -> train/eval.

    python pretrain_moe.py --config examples/tiny_cpu.toml --save runs/demo
    python pretrain_moe.py --config examples/tiny_cpu.toml --num-experts 16 --moe-router-topk 2 --lr 1e-3
"""

from __future__ import annotations

import sys

from megatron_moe.config import ConfigError, parse_args
from megatron_moe.training.trainer import train


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, extras = parse_args(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    train(cfg, eval_only=extras["eval_only"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
