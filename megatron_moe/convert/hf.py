"""Read a dense Hugging Face Llama-family checkpoint (config.json + safetensors) as a :class:`DenseSource`.

Supported: ``model_type`` llama and mistral (RMSNorm, rotary "rotate_half" embeddings, grouped-query
attention, SwiGLU, no biases). Anything the project's model cannot compute exactly is refused with
the config field (or tensor) at fault: attention/MLP biases (qwen2 always has q/k/v biases), rope
scaling, an active sliding window, an activation other than silu, a head_dim other than
hidden_size / num_attention_heads.

Tensors are read lazily with ``safetensors.safe_open`` (memory-mapped), one at a time, from a
single ``model.safetensors`` or the shards listed in ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from megatron_moe.config import Config
from megatron_moe.convert.source import ConversionError, DenseSource

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

# HF name pattern -> project name pattern ({i} = layer index).
_LAYER_MAP = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
}
_GLOBAL_MAP = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
               "lm_head.weight": "output.weight"}


def hf_to_native_name(name: str) -> str | None:
    """The project parameter name of HF tensor ``name``; None if it has no counterpart."""
    if name in _GLOBAL_MAP:
        return _GLOBAL_MAP[name]
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        target = _LAYER_MAP.get(parts[3])
        if target is not None:
            return f"layers.{parts[2]}.{target}"
    return None


def _rope_theta(hf: dict[str, Any], where: str) -> float:
    """rope theta from transformers 5 ``rope_parameters`` or 4.x ``rope_theta``; refuse any rope scaling."""
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    for field_name, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if isinstance(value, dict):
            kind = value.get("rope_type", value.get("type", "default"))
            if kind not in (None, "default"):
                raise ConversionError(f"{where}: {field_name}.rope_type = {kind!r}; only plain rotary embeddings "
                                      "(rope_type 'default') are supported")
            if "factor" in value and value["factor"] not in (None, 1, 1.0):
                raise ConversionError(f"{where}: {field_name}.factor = {value['factor']}; rope scaling is not "
                                      "supported")
        elif value is not None:
            raise ConversionError(f"{where}: {field_name} = {value!r} is not understood")
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(hf.get("rope_theta", 10000.0))


def config_from_hf(hf: dict[str, Any], where: str = "config.json") -> Config:
    """Map a Llama/Mistral ``config.json`` dict to a dense project :class:`Config`.

    Raises ConversionError naming the field when the architecture is not representable.
    """
    model_type = hf.get("model_type")
    if model_type == "qwen2":
        raise ConversionError(f"{where}: model_type 'qwen2' has q/k/v projection biases "
                              "(self_attn.q_proj.bias...), which this project's attention does not have")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(f"{where}: model_type = {model_type!r}; supported: {SUPPORTED_MODEL_TYPES}")
    for key in ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers", "vocab_size"):
        if not isinstance(hf.get(key), int) or hf[key] <= 0:
            raise ConversionError(f"{where}: {key} = {hf.get(key)!r}; expected a positive integer")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConversionError(f"{where}: hidden_act = {act!r}; only silu (SwiGLU) is supported")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ConversionError(f"{where}: {key} = true; this project's linear layers have no biases")
    if hf.get("pretraining_tp", 1) not in (None, 1):
        raise ConversionError(f"{where}: pretraining_tp = {hf['pretraining_tp']}; only 1 is supported")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hidden % heads:
        raise ConversionError(f"{where}: num_attention_heads = {heads} does not divide hidden_size = {hidden}")
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim != hidden // heads:
        raise ConversionError(f"{where}: head_dim = {head_dim} differs from hidden_size / num_attention_heads = "
                              f"{hidden // heads}; not supported")
    max_pos = int(hf.get("max_position_embeddings") or 4096)
    window = hf.get("sliding_window")
    if window is not None and hf.get("use_sliding_window", True) and window < max_pos:
        raise ConversionError(f"{where}: sliding_window = {window} < max_position_embeddings = {max_pos}; "
                              "sliding-window attention is not supported")
    kv = hf.get("num_key_value_heads") or heads
    cfg = Config()
    m = cfg.model
    m.hidden_size, m.num_attention_heads, m.num_query_groups = hidden, heads, kv
    m.num_layers, m.ffn_hidden_size, m.vocab_size = hf["num_hidden_layers"], hf["intermediate_size"], hf["vocab_size"]
    m.rope_theta = _rope_theta(hf, where)
    m.norm_eps = float(hf.get("rms_norm_eps", 1e-6))
    m.tie_embeddings = bool(hf.get("tie_word_embeddings", False))
    m.init_std = float(hf.get("initializer_range", m.init_std))
    m.make_vocab_size_divisible_by = math.gcd(m.vocab_size, 128)  # never pads the imported vocabulary
    cfg.moe.num_experts = 0
    cfg.data.seq_length = max_pos
    return cfg


def _weight_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it; ConversionError names a missing/corrupt file."""
    index = path / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConversionError(f"{index}: not a safetensors index (no weight_map): {e}") from None
        files = {name: path / fname for name, fname in weight_map.items()}
        for fname in sorted(set(files.values())):
            if not fname.is_file():
                raise ConversionError(f"{index} lists shard {fname.name}, which is missing from {path}")
        return files
    single = path / SINGLE
    if single.is_file():
        try:
            with safe_open(str(single), framework="pt") as f:
                return {name: single for name in f.keys()}
        except Exception as e:  # noqa: BLE001 - safetensors' errors do not name the file
            raise ConversionError(f"{single}: not a readable safetensors file ({e})") from None
    if list(path.glob("*.bin")):
        raise ConversionError(f"{path}: only PyTorch .bin weights found; convert them to safetensors first "
                              "(pickled .bin files are not loaded)")
    raise ConversionError(f"{path}: neither {SINGLE} nor {INDEX} found")


def _loader(file: Path, name: str):
    def load() -> torch.Tensor:
        try:
            with safe_open(str(file), framework="pt") as f:
                return f.get_tensor(name)
        except Exception as e:  # truncated or corrupt shard
            raise ConversionError(f"{file}: cannot read tensor {name}: {e}") from None

    return load


def read_hf(path: str | Path) -> DenseSource:
    """A :class:`DenseSource` for the HF model directory ``path`` (tensors read on demand)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ConversionError(f"{path}: no config.json (expected a Hugging Face model directory)")
    try:
        hf = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{cfg_file}: invalid JSON: {e}") from None
    cfg = config_from_hf(hf, str(cfg_file))
    loaders = {}
    for name, file in _weight_files(path).items():
        if name.endswith(".bias"):
            raise ConversionError(f"{file}: tensor {name} is a bias; this project's model has no biases")
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a recomputed buffer some old checkpoints store
        if name == "lm_head.weight" and cfg.model.tie_embeddings:
            continue  # tied: the embedding is the output layer
        target = hf_to_native_name(name)
        if target is None:
            raise ConversionError(f"{file}: tensor {name} has no counterpart in this project's model")
        loaders[target] = _loader(file, name)
    source = DenseSource(cfg, loaders, f"hf:{path}", extra={"hf_config": hf})
    source.check()
    return source
