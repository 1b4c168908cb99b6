"""Rebuild a :class:`~megatron_moe.config.Config` from the ``config`` entry of a checkpoint's meta.json."""

from __future__ import annotations

import dataclasses
from typing import Any

from megatron_moe.config import Config, ConfigError, set_value, validate


def config_from_dict(data: dict[str, Any], check: bool = True) -> Config:
    """The Config whose ``dataclasses.asdict`` is ``data`` (groups of settings, e.g. ``{"model": {...}}``).

    Missing groups or fields keep their defaults (older checkpoints); unknown groups or fields raise
    :class:`~megatron_moe.config.ConfigError` naming the setting (the checkpoint was written by a
    newer or different version). ``check`` also runs :func:`~megatron_moe.config.validate`.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"checkpoint config must be a mapping of groups, got {type(data).__name__}")
    cfg = Config()
    groups = {f.name for f in dataclasses.fields(Config)}
    for group, table in data.items():
        if group not in groups:
            raise ConfigError(f"checkpoint config has unknown group {group!r} (known: {sorted(groups)})")
        if not isinstance(table, dict):
            raise ConfigError(f"checkpoint config group {group!r} must be a mapping, got {type(table).__name__}")
        for key, value in table.items():
            set_value(cfg, f"{group}.{key}", value)
    if check:
        validate(cfg)
    return cfg
