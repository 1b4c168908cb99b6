"""Small checkpoint states shared by the checkpoint tests."""

from __future__ import annotations

import torch


def state(seed: int, n: int = 64) -> dict:
    """A nested training state of seeded random tensors: ``model`` (a [n, 8] and a [3] tensor), ``train_state``."""
    g = torch.Generator().manual_seed(seed)
    return {"model": {"a.weight": torch.randn(n, 8, generator=g), "b": torch.randn(3, generator=g)},
            "train_state": {"step": torch.tensor(seed)}}


def zeros_like(s: dict) -> dict:
    """The same nesting and shapes as ``s``, all zeros (a load target)."""
    return {k: zeros_like(v) if isinstance(v, dict) else torch.zeros_like(v) for k, v in s.items()}
