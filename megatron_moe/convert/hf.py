"""Read a Hugging Face checkpoint (config.json + safetensors) as a :class:`ModelSource`.

Dense llama, mistral, qwen2, qwen3, phi3 and MoE mixtral, phimoe (grinmoe), qwen3_moe, qwen2_moe,
deepseek_v2, deepseek_v3, glm4_moe directories; the config mapping is :mod:`.hf_config`, the tensor layout
:mod:`.hf_tensors`. Anything the project's model cannot compute exactly is refused with the config field (or
tensor) at fault.

Tensors are read lazily with ``safetensors.safe_open`` (memory-mapped), one at a time, from a
single ``model.safetensors`` or the shards listed in ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from megatron_moe.convert.hf_config import config_from_hf
from megatron_moe.convert.hf_tensors import DEEPSEEK_MOE_FORMATS, MTP_COPIES, from_hf, interleaved_rope, tensor_links
from megatron_moe.convert.source import ConversionError, ModelSource, expected_shapes

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Architectures sharing another's tensor names.
_NAMES_OF = {"mistral": "llama", "qwen2": "llama", "qwen3": "llama", "grinmoe": "phimoe", "deepseek_v2": "deepseek_v3"}


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


def hf_names_family(model_type: str) -> str:
    """The architecture whose tensor names ``model_type`` uses (mistral, qwen2 and qwen3 use llama's)."""
    return _NAMES_OF.get(model_type, model_type)


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """The config.json dict of the HF model directory ``path``; ConversionError if absent or invalid."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise ConversionError(f"{path}: no config.json (expected a Hugging Face model directory)")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{cfg_file}: invalid JSON: {e}") from None


def _multi_token_prediction_depths(hf: dict[str, Any], names: set[str]) -> int:
    """DeepSeek-V3's (and GLM-4-MoE's) multi-token prediction depths (``num_nextn_predict_layers``) whose modules the
    checkpoint holds (layers from ``num_hidden_layers`` on); 0 for checkpoints without them (transformers saves
    none)."""
    depth = hf.get("num_nextn_predict_layers") or 0
    if hf.get("model_type") not in DEEPSEEK_MOE_FORMATS or not isinstance(depth, int) or depth <= 0:
        return 0
    return depth if f"model.layers.{hf['num_hidden_layers']}.eh_proj.weight" in names else 0


def read_hf(path: str | Path) -> ModelSource:
    """A :class:`ModelSource` for the HF model directory ``path`` (tensors read on demand).

    Dense or MoE as the checkpoint is; ``extra["hf_config"]`` holds the config.json dict and
    ``notes`` what was adapted (a sliding window turned into the sequence length).
    """
    path = Path(path)
    hf = read_hf_config(path)
    notes: list[str] = []
    cfg = config_from_hf(hf, str(path / "config.json"), notes)
    files = _weight_files(path)
    cfg.model.mtp_num_layers = _multi_token_prediction_depths(hf, set(files))
    shapes = expected_shapes(cfg)
    links = tensor_links(shapes, hf_names_family(hf["model_type"]), cfg.moe.num_experts,
                         interleaved_rope(cfg, bool(hf.get("rope_interleave", True))))
    needed = {name for link in links for name in link.hf}
    missing = sorted(needed - set(files))
    if missing:
        raise ConversionError(f"{path}: {len(missing)} tensors the config implies are missing, e.g. {missing[:4]}")
    layers = cfg.model.num_layers
    copies = {f"model.layers.{i}.{copy}" for i in range(layers, layers + cfg.model.mtp_num_layers)
              for copy in MTP_COPIES}
    for name in sorted(set(files) - needed - copies):  # the depths' copies of the embedding and head: the main ones
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a recomputed buffer some old checkpoints store
        if name == "lm_head.weight" and cfg.model.tie_embeddings:
            continue  # tied: the embedding is the output layer
        what = "a bias the config does not declare" if name.endswith(".bias") else "no counterpart"
        raise ConversionError(f"{files[name]}: tensor {name} has {what} in this project's model")

    def read(name: str) -> torch.Tensor:
        return _loader(files[name], name)()

    loaders = {}
    for link in links:
        for native in link.native:
            loaders[native] = lambda link=link, native=native: from_hf(link, read, shapes)[native]
    source = ModelSource(cfg, loaders, f"hf:{path}", extra={"hf_config": hf}, notes=notes)
    source.check()
    return source
