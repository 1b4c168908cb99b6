"""Metrics sinks: metrics.jsonl (the run's record), console progress line, optional wandb."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class MetricsWriter:
    """Appends one JSON object per logged step to ``<run_dir>/metrics.jsonl``; mirrors to wandb/TensorBoard.

    Only the process that should log (rank 0) creates an enabled one; ``enabled=False`` makes every
    call a no-op. wandb runs offline unless ``wandb_mode = "online"`` (its files go to
    ``<run_dir>/wandb``); TensorBoard event files go to ``tensorboard_dir`` when it is set.
    """

    def __init__(self, run_dir: str, enabled: bool = True, wandb_project: str = "", wandb_mode: str = "offline",
                 run_name: str = "", config: dict | None = None, tensorboard_dir: str = ""):
        self.enabled = enabled and bool(run_dir)
        self.path = Path(run_dir) / "metrics.jsonl" if run_dir else None
        self._wandb = None
        self._tensorboard = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if wandb_project and wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = wandb.init(project=wandb_project, mode=wandb_mode, dir=str(self.path.parent),
                                     name=run_name or None, config=config or {})
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RuntimeError(
                    "logging.tensorboard_dir is set but the tensorboard package is not installed "
                    "(pip install tensorboard)"
                ) from None
            self._tensorboard = SummaryWriter(tensorboard_dir)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log(_flatten(record), step=record.get("step"))
        if self._tensorboard is not None:
            for key, value in _flatten(record).items():
                if key != "step":
                    self._tensorboard.add_scalar(key, value, global_step=record.get("step"))

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


def _flatten(record: dict[str, Any]) -> dict[str, Any]:
    """Scalar entries for wandb: per-layer MoE lists become ``moe/layer{i}/{key}``."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if key == "moe":
            for layer in value:
                for k, v in layer.items():
                    if k != "layer" and not isinstance(v, list):
                        flat[f"moe/layer{layer['layer']}/{k}"] = v
        elif isinstance(value, int | float):
            flat[key] = value
    return flat


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """All records of ``<run_dir>/metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
