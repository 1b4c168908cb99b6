"""Export a native checkpoint to Hugging Face format: the architecture that computes the same function.

Usage::

    python -m megatron_moe.convert.export_hf --load DIR --output DIR [--architecture auto] \\
        [--dtype {fp32,bf16}] [--max-shard-size 5GB] [--tokenizer-model FILE.model] [--overwrite]

Architectures (``--architecture auto`` picks by the model, :func:`~.hf_config.choose_architecture`):
multi-latent attention -> DeepSeek-V3 (DeepSeek-V2 with softmax routing), sigmoid routing with grouped-query
attention -> GLM-4-MoE (also partial rotary embeddings, which no other format holds), SparseMixer-v2 MoE -> PhiMoE
(GRIN-MoE's format),
top-K MoE -> Qwen2-MoE with a shared expert, Qwen3-MoE with query/key norms, else Mixtral; dense -> Phi-3 with
partial rotary embeddings, Qwen3 with query/key norms, Qwen2 (q/k/v biases only) or Llama; ``--architecture
phi3`` writes a bias-free dense model in Phi-3's fused layout. A
model not expressible exactly in the chosen architecture is refused with every reason listed
(:func:`~.hf_config.export_blockers`) and nothing is written. Training-only settings map where the
format has them (jitter, aux coefficient); the others (z-loss, global balancing, adaptive
coefficients, dropping) do not change inference.

Written: ``config.json``; ``model.safetensors`` or shards of at most ``--max-shard-size`` with
``model.safetensors.index.json`` (tensor names of the released checkpoints: per-expert ``w1/w2/w3``,
Phi-3's fused ``qkv_proj`` / ``gate_up_proj``; transformers 5 fuses experts on load); in float32 or
bfloat16; the run's sentencepiece tokenizer (``data.tokenizer_model`` or ``--tokenizer-model``) as
``tokenizer.model`` + ``tokenizer_config.json`` (:mod:`.hf_tokenizer`); ``generation_config.json``
with the special token ids.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from megatron_moe.config import Config, ConfigError
from megatron_moe.convert.hf import hf_names_family
from megatron_moe.convert.hf_config import EXPORT_ARCHITECTURES, ExportError, choose_architecture, hf_config
from megatron_moe.convert.hf_tensors import DEEPSEEK_MOE_FORMATS, MTP_COPIES, interleaved_rope, tensor_links, to_hf
from megatron_moe.convert.hf_tokenizer import (
    load_tokenizer,
    special_token_ids,
    write_generation_config,
    write_tokenizer,
)
from megatron_moe.convert.native import load_model
from megatron_moe.convert.source import ConversionError, require_empty_output
from megatron_moe.training.checkpoint import CheckpointError

__all__ = ["ExportError", "export", "hf_config", "hf_state_dict", "write_safetensors"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
               "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """Bytes of a size like transformers' ``max_shard_size``: ``5GB`` (10^9), ``500MiB`` (2^20), ``1000``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise ConversionError(f"--max-shard-size {text!r}; expected a size like 5GB, 500MB, 2GiB or bytes")
    size = int(float(match[1]) * _SIZE_UNITS[(match[2] or "").upper()])
    if size <= 0:
        raise ConversionError(f"--max-shard-size {text!r}; must be positive")
    return size


def hf_state_dict(cfg: Config, state: dict[str, torch.Tensor], arch: str | None = None,
                  dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """HF tensor names -> contiguous ``dtype`` tensors for the native ``state`` (names of MoETransformer)."""
    arch = arch or choose_architecture(cfg)
    # multi-token prediction (training only: the model's function does not use it) is written in DeepSeek-V3's and
    # GLM-4-MoE's formats only, which have a place for it (layers from num_hidden_layers on)
    main = cfg.model.num_layers
    if arch not in DEEPSEEK_MOE_FORMATS:
        state = {k: v for k, v in state.items()
                 if not k.startswith("mtp.") and not (k.startswith("layers.") and int(k.split(".")[1]) >= main)}
    if cfg.model.apply_layernorm_1p:  # Hugging Face's norms scale by their weight: store 1 + w
        state = {k: v + 1 if k.endswith("norm.weight") else v for k, v in state.items()}
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    out: dict[str, torch.Tensor] = {}
    rope = interleaved_rope(cfg) if arch in ("deepseek_v2", "deepseek_v3") else None  # as DeepSeek lays it out
    for link in tensor_links(shapes, hf_names_family(arch), cfg.moe.num_experts, rope):
        out.update(to_hf(link, state))
    if arch in DEEPSEEK_MOE_FORMATS and not cfg.moe.expert_bias:  # the format always has it: zero chooses as none
        for name in [n for n in out if n.endswith("mlp.gate.weight")]:
            out[name.replace(".weight", ".e_score_correction_bias")] = torch.zeros(cfg.moe.num_experts)
    if arch in DEEPSEEK_MOE_FORMATS:  # each depth's layer holds copies of the embedding and output layer
        for i in range(main, main + cfg.model.mtp_num_layers):
            out.update({f"model.layers.{i}.{copy}": out.get(source, out["model.embed_tokens.weight"]).clone()
                        for copy, source in MTP_COPIES.items()})  # tied: the embedding twice
    # DeepSeek-V3's (GLM-4-MoE's) router weight and expert bias stay float32, as transformers keeps and computes them:
    # a bf16 bias would choose other experts for some tokens
    fp32 = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias") if arch in DEEPSEEK_MOE_FORMATS else ()
    return {k: v.detach().to(torch.float32 if k.endswith(fp32) else dtype).contiguous() for k, v in out.items()}


def write_safetensors(tensors: dict[str, torch.Tensor], output: Path, max_shard_bytes: int) -> list[str]:
    """Write ``tensors`` as one model.safetensors or as shards + index; returns the file names."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(output / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards, strict=True):
        save_file(shard, str(output / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (output / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names


def export(load: str | Path, output: str | Path, max_shard_bytes: int = 5 * 10**9, dtype: str = "fp32",
           architecture: str = "auto", tokenizer_model: str | None = None) -> dict[str, Any]:
    """Export the native checkpoint at ``load`` to HF format in ``output``; returns the written config.

    Raises ExportError (nothing written) when the model is not expressible as ``architecture``
    (``"auto"``: :func:`~.hf_config.choose_architecture`), ConversionError for an unreadable tokenizer.
    """
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    model, meta = load_model(load)
    cfg = model.cfg
    imported = meta.get("hf_import", {})
    arch = choose_architecture(cfg) if architecture == "auto" else architecture
    tokenizer_path = tokenizer_model or cfg.data.tokenizer_model
    setting = "--tokenizer-model" if tokenizer_model else "the checkpoint's data.tokenizer_model"
    tokenizer = load_tokenizer(tokenizer_path, setting) if tokenizer_path else None
    if tokenizer is not None:
        special = special_token_ids(tokenizer)
    else:  # an imported model keeps the ids its source declared
        special = {k: imported["special_tokens"][k] for k in imported.get("special_tokens", {})}
    torch_dtype = DTYPES[dtype]
    config = hf_config(cfg, arch, _DTYPE_NAMES[torch_dtype], special)  # raises before anything is written
    tensors = hf_state_dict(cfg, model.state_dict(), arch, torch_dtype)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, output, max_shard_bytes)
    config["exported_from"] = str(meta.get("source", load))
    (output / "config.json").write_text(json.dumps(config, indent=2))
    write_generation_config(output, special)
    if tokenizer is not None:
        write_tokenizer(tokenizer, output, cfg.data.seq_length)
    return config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Native checkpoint -> Hugging Face (PhiMoE, Mixtral, Qwen3-MoE, Qwen2-MoE, DeepSeek-V2/V3, "
                    "GLM-4-MoE, Llama, Qwen2, Qwen3, Phi-3).")
    p.add_argument("--load", required=True, help="save directory or checkpoint directory")
    p.add_argument("--output", required=True, help="directory for config.json, safetensors and tokenizer")
    p.add_argument("--architecture", default="auto", choices=("auto",) + EXPORT_ARCHITECTURES,
                   help="HF architecture (auto: deepseek_v3 or deepseek_v2 for latent attention, glm4_moe for "
                        "sigmoid routing, phimoe for SparseMixer-v2, qwen2_moe, qwen3_moe or mixtral for top-K, qwen3, "
                        "qwen2 or llama dense)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="dtype of the written weights")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (5GB, 500MB, 2GiB, bytes)")
    p.add_argument("--tokenizer-model", default=None,
                   help="sentencepiece .model to ship (default: the checkpoint's data.tokenizer_model)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --output directory")
    args = p.parse_args(argv)
    try:
        max_shard = parse_size(args.max_shard_size)
        require_empty_output(args.output, args.overwrite)
        config = export(args.load, args.output, max_shard, args.dtype, args.architecture, args.tokenizer_model)
    except (ConversionError, ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    shipped = "with tokenizer" if (Path(args.output) / "tokenizer.model").is_file() else (
        "without tokenizer (no data.tokenizer_model; pass --tokenizer-model)")
    print(f"exported {config['architectures'][0]} ({config['dtype']}) to {args.output}, {shipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
