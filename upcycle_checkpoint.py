"""Bring a checkpoint into this project: upcycle a dense one into an MoE model, or import one as it is.

Usage::

    python upcycle_checkpoint.py --input PATH --input-format {hf,megatron,native} --num-experts E \\
        [--moe-router-topk K] [--granularity G] [--expert-noise STD] [--router-init-std STD] \\
        [--seed S] [--megatron-args FILE.json] --output DIR [--overwrite] [--verify]
    python upcycle_checkpoint.py --input HF_DIR --input-format hf --output DIR [--verify]
    python upcycle_checkpoint.py --input MEGATRON_DIR --input-format megatron --output DIR

With ``--num-experts`` the dense input is upcycled (:mod:`megatron_moe.convert.upcycle`). Without it
a Hugging Face checkpoint is imported unchanged to continue pretraining: an MoE one (Mixtral,
Qwen3-MoE, Qwen1.5/Qwen2-MoE -> top-K router, PhiMoE / GRIN-MoE -> SparseMixer-v2 with its jitter
settings) or a dense one (Llama, Mistral, Qwen2, Qwen3, Phi-3); :mod:`megatron_moe.convert.hf_config`
has the mapping. A dense
Megatron-LM checkpoint is imported too (``pretrain_moe.py --load`` reads one directly, but every rank
reads all of it; the import is read once, then each rank reads only its shards). The weights keep the
dtype they are stored in (bf16 for released models).

Writes a model-only step-0 checkpoint under DIR (``DIR/iter_0000000`` + ``DIR/latest``) that
``pretrain_moe.py --load DIR`` starts from. ``--verify``: after upcycling, the dense and the upcycled
model run on the same random tokens and the largest logit difference is printed (rounding level
unless noise is added); after an import, the imported model is compared with transformers' own
model of the input directory, both in float32 and eval mode.
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
from megatron_moe.convert.source import ConversionError, ModelSource, require_empty_output
from megatron_moe.convert.upcycle import UpcycleOptions, max_logit_difference, upcycle
from megatron_moe.convert.verify import compare_with_transformers
from megatron_moe.training.checkpoint import CheckpointError

# float32 on both sides: observed ~2e-7 relative on tiny models; sums over wider layers round more.
VERIFY_RTOL = 1e-4


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Dense checkpoint -> MoE checkpoint (sparse upcycling), or a Hugging "
                                "Face or Megatron-LM checkpoint imported as it is (no --num-experts).")
    p.add_argument("--input", required=True, help="HF model dir, Megatron checkpoint dir/file, or native save dir")
    p.add_argument("--input-format", required=True, choices=("hf", "megatron", "native"))
    p.add_argument("--num-experts", type=int, default=None,
                   help="upcycle into this many experts; omit to import a Hugging Face or Megatron-LM checkpoint "
                   "as it is")
    p.add_argument("--moe-router-topk", type=int, default=2)
    p.add_argument("--granularity", type=int, default=1, help="split the dense FFN into G slices (default 1: copies)")
    p.add_argument("--expert-noise", type=float, default=0.0, help="relative std of noise added to expert weights")
    p.add_argument("--router-init-std", type=float, default=None, help="router init std (default model init_std)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--megatron-args", default=None,
                   help="JSON file of Megatron arguments (for checkpoints without 'args', or to override them)")
    p.add_argument("--output", required=True, help="save directory of the MoE checkpoint")
    p.add_argument("--verify", action="store_true",
                   help="compare logits on random tokens: dense vs upcycled, or transformers vs imported")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --output directory")
    return p


def read_source(fmt: str, path: str, megatron_args: str | None = None) -> ModelSource:
    """The model at ``path`` in format ``fmt`` (hf | megatron | native)."""
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


def hf_import_meta(source: ModelSource) -> dict:
    """meta.json entry of a checkpoint read from HF: its model_type, its special token ids (exported when
    no tokenizer is shipped) and the reader's notes."""
    hf = source.extra.get("hf_config")
    if hf is None:
        return {}
    special = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if isinstance(hf.get(k), int)}
    return {"hf_import": {"model_type": hf["model_type"], "special_tokens": special, "notes": source.notes}}


def import_hf(args: argparse.Namespace) -> None:
    """Import the HF (or dense Megatron-LM) checkpoint ``args.input`` unchanged (no upcycling) into ``args.output``."""
    if args.input_format not in ("hf", "megatron"):
        raise ConversionError(f"--input-format {args.input_format} without --num-experts: importing without "
                              "upcycling reads Hugging Face and Megatron-LM checkpoints only (--input-format hf or "
                              "megatron)")
    if args.verify and args.input_format != "hf":
        raise ConversionError("--verify of an import compares with transformers' model: --input-format hf only")
    require_empty_output(args.output, args.overwrite)
    source = read_source(args.input_format, args.input, args.megatron_args)
    # Stored dtype (bf16 for released checkpoints): half the memory of float32; the trainer loads the
    # checkpoint into its float32 master weights.
    cfg, state = source.cfg, source.state_dict(dtype=None)
    hf = source.extra.get("hf_config", {"model_type": "megatron"})
    out = save_model_checkpoint(args.output, cfg, state, f"imported from {source.origin}", hf_import_meta(source))
    m, e = cfg.model, cfg.moe
    kind = (f"{e.num_experts} experts, {e.router} router (top-{e.topk})" if e.num_experts else "dense")
    print(f"imported {hf['model_type']} {source.origin}: {m.num_layers} layers, hidden {m.hidden_size}, {kind}, "
          f"{m.normalization} -> {out}")
    for note in source.notes:
        print(f"note: {note}")
    if args.verify:
        seq = min(32, cfg.data.seq_length)
        diff, rel = compare_with_transformers(args.input, model_from_state(cfg, state), m.vocab_size, seq)
        print(f"verify: max |logit(transformers) - logit(imported)| = {diff:.3e} (relative {rel:.3e}) "
              f"on 2 x {seq} random tokens")
        if not rel <= VERIFY_RTOL:
            raise ConversionError(f"--verify: the imported model's logits differ from transformers' by {rel:.3e} "
                                  f"relative (more than rounding, {VERIFY_RTOL:g}); the checkpoint in {out} is "
                                  "kept for inspection")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.num_experts is None:
            import_hf(args)
            return 0
        opts = UpcycleOptions(args.num_experts, args.moe_router_topk, args.granularity, args.expert_noise,
                              args.router_init_std, args.seed)
        require_empty_output(args.output, args.overwrite)
        source = read_source(args.input_format, args.input, args.megatron_args)
        if source.cfg.moe.num_experts:
            raise ConversionError(f"{source.origin} is already an MoE model ({source.cfg.moe.num_experts} experts): "
                                  "omit --num-experts to import it as it is")
        cfg, state = upcycle(source, opts)
        meta = {"upcycling": {"input_format": args.input_format, "num_experts": opts.num_experts,
                              "topk": opts.topk, "granularity": opts.granularity,
                              "expert_noise": opts.expert_noise, "router_init_std": opts.router_init_std,
                              "seed": opts.seed}, **hf_import_meta(source)}
        out = save_model_checkpoint(args.output, cfg, state, f"upcycled from {source.origin}", meta)
        m, e = cfg.model, cfg.moe
        print(f"upcycled {source.origin}: {m.num_layers} layers, hidden {m.hidden_size}, {e.num_experts} experts "
              f"(top-{e.topk}, expert FFN {e.expert_ffn_hidden_size}) -> {out}")
        for note in source.notes:
            print(f"note: {note}")
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
