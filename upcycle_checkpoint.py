"""Upcycle a dense checkpoint (Hugging Face, Megatron-LM or this project's) into an MoE checkpoint.

Usage::

    python upcycle_checkpoint.py --input PATH --input-format {hf,megatron,native} --num-experts E \\
        [--moe-router-topk K] [--granularity G] [--expert-noise STD] [--router-init-std STD] \\
        [--seed S] [--megatron-args FILE.json] --output DIR [--overwrite] [--verify]

Writes a model-only step-0 checkpoint under DIR (``DIR/iter_0000000`` + ``DIR/latest``) that
``pretrain_moe.py --load DIR`` starts from. ``--verify`` runs the dense and the upcycled model on the
same random tokens and prints the largest logit difference (rounding level unless noise is added).
See :mod:`megatron_moe.convert.upcycle` for the method.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_moe.config import ConfigError
from megatron_moe.convert.hf import read_hf
from megatron_moe.convert.megatron_format import read_megatron
from megatron_moe.convert.native import model_from_state, read_native, save_model_checkpoint
from megatron_moe.convert.source import ConversionError, DenseSource, require_empty_output
from megatron_moe.convert.upcycle import UpcycleOptions, max_logit_difference, upcycle
from megatron_moe.training.checkpoint import CheckpointError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Dense checkpoint -> MoE checkpoint (sparse upcycling).")
    p.add_argument("--input", required=True, help="HF model dir, Megatron checkpoint dir/file, or native save dir")
    p.add_argument("--input-format", required=True, choices=("hf", "megatron", "native"))
    p.add_argument("--num-experts", type=int, required=True)
    p.add_argument("--moe-router-topk", type=int, default=2)
    p.add_argument("--granularity", type=int, default=1, help="split the dense FFN into G slices (default 1: copies)")
    p.add_argument("--expert-noise", type=float, default=0.0, help="relative std of noise added to expert weights")
    p.add_argument("--router-init-std", type=float, default=None, help="router init std (default model init_std)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--megatron-args", default=None,
                   help="JSON file of Megatron arguments (for checkpoints without 'args', or to override them)")
    p.add_argument("--output", required=True, help="save directory of the MoE checkpoint")
    p.add_argument("--verify", action="store_true", help="compare dense and upcycled logits on random tokens")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --output directory")
    return p


def read_source(fmt: str, path: str, megatron_args: str | None = None) -> DenseSource:
    """The dense model at ``path`` in format ``fmt`` (hf | megatron | native)."""
    if fmt == "hf":
        return read_hf(path)
    if fmt == "megatron":
        overrides = None
        if megatron_args:
            try:
                overrides = json.loads(Path(megatron_args).read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ConversionError(f"--megatron-args {megatron_args}: {e}") from None
            if not isinstance(overrides, dict):
                raise ConversionError(f"--megatron-args {megatron_args}: expected a JSON object")
        return read_megatron(path, overrides)
    if fmt == "native":
        return read_native(path)
    raise ConversionError(f"--input-format {fmt!r}; expected hf, megatron or native")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts = UpcycleOptions(args.num_experts, args.moe_router_topk, args.granularity, args.expert_noise,
                          args.router_init_std, args.seed)
    try:
        require_empty_output(args.output, args.overwrite)
        source = read_source(args.input_format, args.input, args.megatron_args)
        cfg, state = upcycle(source, opts)
        meta = {"upcycling": {"input_format": args.input_format, "num_experts": opts.num_experts,
                              "topk": opts.topk, "granularity": opts.granularity,
                              "expert_noise": opts.expert_noise, "router_init_std": opts.router_init_std,
                              "seed": opts.seed}}
        out = save_model_checkpoint(args.output, cfg, state, f"upcycled from {source.origin}", meta)
        m, e = cfg.model, cfg.moe
        print(f"upcycled {source.origin}: {m.num_layers} layers, hidden {m.hidden_size}, {e.num_experts} experts "
              f"(top-{e.topk}, expert FFN {e.expert_ffn_hidden_size}) -> {out}")
        if args.verify:
            dense = model_from_state(source.cfg, source.state_dict())
            moe = model_from_state(cfg, state)
            seq = min(32, cfg.data.seq_length)
            diff = max_logit_difference(dense, moe, m.vocab_size, seq_len=seq)
            print(f"verify: max |logit(dense) - logit(upcycled)| = {diff:.3e} on 2 x {seq} random tokens")
    except (ConversionError, ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
