"""Metrics: the records of a run and their sinks (metrics.jsonl, console, wandb, TensorBoard).

:func:`step_record` and :func:`validation_record` build the records; :class:`MetricsWriter` sends
each record to every sink, so metrics.jsonl, wandb and TensorBoard always hold the same numbers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch


class MetricsWriter:
    """Appends one JSON object per logged step to ``<run_dir>/metrics.jsonl``; mirrors to wandb/TensorBoard.

    Only the process that should log (rank 0) creates an enabled one; ``enabled=False`` makes every
    call a no-op. wandb runs offline unless ``wandb_mode = "online"`` (its files go to
    ``<wandb_dir or run_dir>/wandb``); TensorBoard event files go to ``tensorboard_dir`` when it is set.
    """

    def __init__(self, run_dir: str, enabled: bool = True, wandb_project: str = "", wandb_mode: str = "offline",
                 run_name: str = "", config: dict | None = None, tensorboard_dir: str = "", wandb_dir: str = "",
                 wandb_entity: str = ""):
        self.enabled = enabled and bool(run_dir)
        self.path = Path(run_dir) / "metrics.jsonl" if run_dir else None
        self._wandb = None
        self._tensorboard = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if wandb_project and wandb_mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            settings = None
            if wandb_mode == "offline":
                # Offline must mean no network and no subprocess looking around: no git, code, host metadata,
                # machine info or system monitor (otherwise wandb ran git and made DNS queries). Set in the
                # environment too: wandb reads its global settings (git root) before any run's.
                quiet = {"disable_git": True, "disable_code": True, "x_disable_meta": True, "x_disable_stats": True,
                         "x_disable_machine_info": True, "disable_job_creation": True}
                for key in quiet:
                    os.environ.setdefault(f"WANDB_{key.upper()}", "true")
                os.environ.setdefault("WANDB_MODE", "offline")  # wandb's global settings: no telemetry exporter
                os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
            import wandb

            if wandb_mode == "offline":
                settings = wandb.Settings(**quiet)
            if wandb_dir:
                Path(wandb_dir).mkdir(parents=True, exist_ok=True)
            self._wandb = wandb.init(project=wandb_project, mode=wandb_mode, dir=wandb_dir or str(self.path.parent),
                                     entity=wandb_entity or None, name=run_name or None, config=config or {},
                                     settings=settings)
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RuntimeError(
                    "logging.tensorboard_dir is set but the tensorboard package is not installed "
                    "(pip install tensorboard)"
                ) from None
            self._tensorboard = SummaryWriter(tensorboard_dir)

    def log(self, record: dict[str, Any], console: str | None = None) -> None:
        """Append ``record`` to every sink; print ``console`` (a one-line summary) on the logging rank."""
        if not self.enabled:
            return
        if console:
            print(console, flush=True)
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


def step_record(step: int, lr: float, result, coefficients: torch.Tensor, tokens_per_sec: float,
                mtp_scale: float = 0.0) -> dict[str, Any]:
    """The record of one optimizer step: losses, lr, grad norm, throughput, per-MoE-layer statistics; the
    parameter norm (``params_norm``), the gradient's zero count (``num_zeros_in_grad``) and the multi-token
    prediction loss (``mtp_loss``, counted into ``loss`` times ``mtp_scale``) when the step has them.

    ``result`` is the engine's :class:`~megatron_moe.parallel.engine.StepResult`; ``coefficients``
    [num MoE layers] the aux-loss coefficients used in the step. Reads device values (a host sync).
    """
    lm, aux = result.lm_loss.item(), result.aux_loss.item()
    coeffs = coefficients.tolist()
    moe = []
    for layer_idx, s in enumerate(result.layer_stats):
        load = s.load_fractions()
        moe.append({
            "layer": layer_idx,
            "aux_loss": s.mean("aux_loss").item(),
            "aux_coeff": coeffs[layer_idx],
            "drop_rate": s.mean("drop_rate").item(),
            "entropy": s.mean("entropy").item(),
            "load": [round(v, 5) for v in load],
            "load_max_over_mean": max(load) * len(load) if load else 0.0,
        })
    record = {"step": step, "loss": lm + aux, "lm_loss": lm, "aux_loss": aux, "lr": lr,
              "grad_norm": result.grad_norm.item(), "tokens_per_sec": tokens_per_sec, "moe": moe}
    if result.mtp_loss is not None:  # the optimized loss adds lambda x the mean multi-token prediction loss
        record["mtp_loss"] = result.mtp_loss.item()
        record["loss"] += mtp_scale * record["mtp_loss"]
    if result.num_zeros_in_grad is not None:
        record["num_zeros_in_grad"] = int(result.num_zeros_in_grad.item())
    if result.params_norm is not None:
        record["params_norm"] = result.params_norm.item()
    return record


def progress_line(rec: dict[str, Any]) -> str:
    """The console line of a :func:`step_record`."""
    mtp = f" | mtp {rec['mtp_loss']:.4f}" if "mtp_loss" in rec else ""
    line = (
        f"step {rec['step']:>6} | loss {rec['loss']:.4f} | lm {rec['lm_loss']:.4f}{mtp}"
        f" | aux {rec['aux_loss']:.4f} | lr {rec['lr']:.2e} | gnorm {rec['grad_norm']:.3f}"
    )
    if "num_zeros_in_grad" in rec:  # Megatron-LM's order and names: grad norm, num zeros, params norm
        line += f" | num zeros {rec['num_zeros_in_grad']}"
    if "params_norm" in rec:
        line += f" | params norm {rec['params_norm']:.3f}"
    line += f" | {rec['tokens_per_sec']:.0f} tok/s"
    if rec["moe"]:
        moe = rec["moe"]
        drop = sum(r["drop_rate"] for r in moe) / len(moe)
        spread = max(r["load_max_over_mean"] for r in moe)
        coeff = sum(r["aux_coeff"] for r in moe) / len(moe)
        line += f" | drop {drop:.3f} | max/mean load {spread:.2f} | alpha {coeff:.2e}"
    return line


def validation_record(step: int, result: dict[str, Any], has_moe: bool) -> dict[str, Any]:
    """The record of one evaluation (``result`` from :meth:`~megatron_moe.training.evaluator.Evaluator.evaluate`)."""
    record = {"step": step, "valid_loss": result["loss"], "valid_ppl": result["ppl"]}
    if has_moe:
        record["expert_similarity"] = [round(v, 6) for v in result["expert_similarity"]]
    return record


def nonfinite_report(step: int, result) -> str:
    """What a non-finite step looked like, per MoE layer (printed before stopping or skipping)."""
    lines = [f"non-finite loss or gradient at step {step}: lm_loss={result.lm_loss.item()}, "
             f"aux_loss={result.aux_loss.item()}, grad_norm={result.grad_norm.item()}"]
    for i, st in enumerate(result.layer_stats):
        lines.append(f"  MoE layer {i}: aux_loss={st.mean('aux_loss').item():.4g} "
                     f"drop_rate={st.mean('drop_rate').item():.4g} entropy={st.mean('entropy').item():.4g} "
                     f"max/mean load={(st.counts.max() / st.counts.mean().clamp_min(1e-9)).item():.3g}")
    return "\n".join(lines)


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
