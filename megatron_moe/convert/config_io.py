"""Rebuild a :class:`~megatron_moe.config.Config` from the ``config`` entry of a checkpoint's meta.json."""

from __future__ import annotations

from typing import Any

from megatron_moe.config import Config, apply_settings


def config_from_dict(data: dict[str, Any], check: bool = True) -> Config:
    """The Config whose ``dataclasses.asdict`` is ``data`` (groups of settings, e.g. ``{"model": {...}}``).

    Missing groups or fields keep their defaults (older checkpoints); unknown groups or fields raise
    :class:`~megatron_moe.config.ConfigError` naming the setting (the checkpoint was written by a
    newer or different version). ``check`` also runs :meth:`~megatron_moe.config.Config.validate`.
    """
    cfg = apply_settings(Config(), data, "checkpoint config")
    if check:
        cfg.validate()
    return cfg
