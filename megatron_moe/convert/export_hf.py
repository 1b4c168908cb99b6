"""Export a native checkpoint to Hugging Face format: Mixtral for MoE models, Llama for dense ones.

Usage::

    python -m megatron_moe.convert.export_hf --load DIR --output DIR [--max-shard-size-gb 5]

Writes ``config.json`` plus ``model.safetensors`` (or shards with ``model.safetensors.index.json``)
in float32, on-disk names as transformers' Mixtral/Llama checkpoints use them
(``model.layers.N.block_sparse_moe.experts.E.w1.weight``...; transformers 5 fuses experts on load).

An MoE model is expressible in Mixtral only if Mixtral computes the same function: top-K softmax
router with renormalised weights, no gating logit normalisation, and every layer an MoE layer
(Mixtral has no dense layers, so ``moe.first_k_dense`` and ``moe.layer_freq`` must be 0 and 1).
Otherwise :func:`mixtral_blockers` lists every reason and nothing is written. Training-only settings
map where Mixtral has them (input jitter -> ``router_jitter_noise``, aux coefficient ->
``router_aux_loss_coef``); the others (z-loss, global balancing, adaptive coefficients,
dropping) do not change inference and are not exported.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from megatron_moe.config import Config, ConfigError
from megatron_moe.convert.native import load_model
from megatron_moe.convert.source import ConversionError, require_empty_output
from megatron_moe.training.checkpoint import CheckpointError


class ExportError(ConversionError):
    """The model cannot be expressed in the requested Hugging Face architecture; the message says why."""


def mixtral_blockers(cfg: Config) -> list[str]:
    """Reasons the MoE model ``cfg`` is not expressible as Mixtral (empty when it is)."""
    e = cfg.moe
    reasons = []
    if e.router != "topk":
        reasons.append(f"moe.router = {e.router!r}: Mixtral routes by top-K softmax only (SparseMixer-v2 samples "
                       "experts and weights them differently)")
    elif not e.renormalize:
        reasons.append("moe.renormalize = false: Mixtral always renormalises the top-K weights to sum 1")
    if e.logit_norm:
        reasons.append("moe.logit_norm = true: Mixtral has no gating logit normalisation")
    if e.first_k_dense:
        reasons.append(f"moe.first_k_dense = {e.first_k_dense}: Mixtral has no dense feed-forward layers")
    if e.layer_freq != 1:
        reasons.append(f"moe.layer_freq = {e.layer_freq}: Mixtral has no dense feed-forward layers "
                       "(every layer must be MoE)")
    return reasons


def _common_config(cfg: Config) -> dict[str, Any]:
    m = cfg.model
    return {
        "hidden_size": m.hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_kv_heads,
        "head_dim": m.head_dim,
        "vocab_size": m.vocab_size,
        "max_position_embeddings": cfg.data.seq_length,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "tie_word_embeddings": m.tie_embeddings,
        "hidden_act": "silu",
        "initializer_range": m.init_std,
        "attention_dropout": 0.0,
        "torch_dtype": "float32",
        "dtype": "float32",
        "use_cache": True,
    }


def hf_config(cfg: Config) -> dict[str, Any]:
    """config.json for ``cfg``: Mixtral if MoE (ExportError if not expressible), else Llama."""
    out = _common_config(cfg)
    m, e = cfg.model, cfg.moe
    if e.num_experts:
        reasons = mixtral_blockers(cfg)
        if reasons:
            raise ExportError("this MoE model cannot be exported as Mixtral:\n  - " + "\n  - ".join(reasons))
        out.update(model_type="mixtral", architectures=["MixtralForCausalLM"],
                   intermediate_size=cfg.expert_ffn_size,
                   num_local_experts=e.num_experts, num_experts_per_tok=e.topk,
                   router_jitter_noise=e.input_jitter_eps, router_aux_loss_coef=e.aux_loss_coeff,
                   output_router_logits=False, sliding_window=None)
    else:
        out.update(model_type="llama", architectures=["LlamaForCausalLM"], intermediate_size=m.dense_ffn_size,
                   attention_bias=False, mlp_bias=False, pretraining_tp=1)
    return out


def hf_state_dict(cfg: Config, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF tensor names -> contiguous tensors for the native ``state`` (names of MoETransformer)."""
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": state["tok_embeddings.weight"],
                                    "model.norm.weight": state["norm.weight"]}
    if not cfg.model.tie_embeddings:
        out["lm_head.weight"] = state["output.weight"]
    attn = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
    for i in range(cfg.model.num_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        for ours, theirs in attn.items():
            out[dst + f"self_attn.{theirs}.weight"] = state[src + f"attention.{ours}.weight"]
        out[dst + "input_layernorm.weight"] = state[src + "attention_norm.weight"]
        out[dst + "post_attention_layernorm.weight"] = state[src + "ffn_norm.weight"]
        ff = src + "feed_forward."
        if ff + "router.gate.weight" in state:
            moe = dst + "block_sparse_moe."
            out[moe + "gate.weight"] = state[ff + "router.gate.weight"]
            w1, w3, w2 = state[ff + "experts.w1"], state[ff + "experts.w3"], state[ff + "experts.w2"]
            for x in range(w1.shape[0]):
                out[moe + f"experts.{x}.w1.weight"] = w1[x].t()  # [H, F] -> nn.Linear [F, H]
                out[moe + f"experts.{x}.w3.weight"] = w3[x].t()
                out[moe + f"experts.{x}.w2.weight"] = w2[x].t()  # [F, H] -> [H, F]
        else:
            out[dst + "mlp.gate_proj.weight"] = state[ff + "w1.weight"]
            out[dst + "mlp.up_proj.weight"] = state[ff + "w3.weight"]
            out[dst + "mlp.down_proj.weight"] = state[ff + "w2.weight"]
    return {k: v.detach().to(torch.float32).contiguous() for k, v in out.items()}


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


def export(load: str | Path, output: str | Path, max_shard_bytes: int = 5 * 2**30) -> dict[str, Any]:
    """Export the native checkpoint at ``load`` to HF format in ``output``; returns the written config.

    Raises ExportError (nothing written) when the MoE model is not expressible as Mixtral.
    """
    model, meta = load_model(load)
    cfg = model.cfg
    config = hf_config(cfg)  # raises before anything is written
    tensors = hf_state_dict(cfg, model.state_dict())
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, output, max_shard_bytes)
    config["exported_from"] = str(meta.get("source", load))
    (output / "config.json").write_text(json.dumps(config, indent=2))
    return config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Native checkpoint -> Hugging Face (Mixtral for MoE, Llama for dense).")
    p.add_argument("--load", required=True, help="save directory or checkpoint directory")
    p.add_argument("--output", required=True, help="directory for config.json and safetensors")
    p.add_argument("--max-shard-size-gb", type=float, default=5.0)
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --output directory")
    args = p.parse_args(argv)
    try:
        require_empty_output(args.output, args.overwrite)
        config = export(args.load, args.output, int(args.max_shard_size_gb * 2**30))
    except (ConversionError, ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {config['architectures'][0]} to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
