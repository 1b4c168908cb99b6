"""This project's checkpoints on the converter side: read a model from one, write a model-only one.

A model-only checkpoint (what the converters write) is ``save_checkpoint(dir, 0, {"model": state},
meta)`` with ``meta = {"config": asdict(cfg), "contents": ["model"], "source": ...}``: the training
loop loads the model from it and starts optimizer and train state fresh at step 0.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from megatron_moe.config import Config
from megatron_moe.convert.config_io import config_from_dict
from megatron_moe.convert.source import ConversionError, DenseSource
from megatron_moe.model.transformer import MoETransformer, build_model
from megatron_moe.training.checkpoint import load_checkpoint, read_meta, resolve_checkpoint, save_checkpoint


def read_config(path: str | Path) -> tuple[Path, Config, dict[str, Any]]:
    """(checkpoint dir, Config, meta) for ``--load``-style ``path`` (a save dir or one checkpoint)."""
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    if "config" not in meta:
        raise ConversionError(f"{ckpt}/meta.json has no 'config' entry")
    contents = meta.get("contents", ["model"])
    if "model" not in contents:
        raise ConversionError(f"{ckpt}/meta.json: contents = {contents} has no 'model'")
    return ckpt, config_from_dict(meta["config"]), meta


def model_from_state(cfg: Config, state: dict[str, torch.Tensor]) -> MoETransformer:
    """A CPU :class:`MoETransformer` for ``cfg`` holding ``state`` (strict: names and shapes must match)."""
    model = build_model(cfg, "cpu", seed=0)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ConversionError(f"converted weights do not fit the model of the converted config: {e}") from None
    return model.eval()


def load_model(path: str | Path) -> tuple[MoETransformer, dict[str, Any]]:
    """The model stored in the native checkpoint at ``path`` (CPU, eval mode) and its meta.json."""
    ckpt, cfg, meta = read_config(path)
    model = build_model(cfg, "cpu", seed=0)
    load_checkpoint(ckpt, {"model": model.state_dict()})
    return model.eval(), meta


def read_native(path: str | Path) -> DenseSource:
    """A :class:`DenseSource` for a dense native checkpoint (``moe.num_experts == 0``)."""
    ckpt, cfg, _ = read_config(path)
    if cfg.moe.num_experts:
        raise ConversionError(f"{ckpt}: moe.num_experts = {cfg.moe.num_experts}; upcycling needs a dense "
                              "checkpoint (num_experts = 0)")
    model, _ = load_model(ckpt)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    source = DenseSource(cfg, {k: (lambda v=v: v) for k, v in state.items()}, f"native:{ckpt}")
    source.check()
    return source


def save_model_checkpoint(output: str | Path, cfg: Config, state: dict[str, torch.Tensor], source: str,
                          extra_meta: dict[str, Any] | None = None) -> Path:
    """Write ``state`` as a model-only step-0 checkpoint under save directory ``output``; returns its path."""
    meta = {"config": dataclasses.asdict(cfg), "contents": ["model"], "source": source, **(extra_meta or {})}
    return save_checkpoint(output, 0, {"model": state}, meta)
