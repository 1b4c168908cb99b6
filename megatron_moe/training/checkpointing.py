"""The checkpoint manager of a training run: what to resume from, saving (sync or async), keep-last.

It owns every decision about checkpoints that the trainer would otherwise make inline:
- :meth:`CheckpointManager.open` resolves ``--load`` (a save directory's ``latest`` or a checkpoint
  directory), reads its meta.json and checks it against the run: model shape
  (:func:`~megatron_moe.training.state.check_compatible`) and tokenizer;
- :meth:`CheckpointManager.restore` loads a training checkpoint (model, optimizer, train state,
  aux coefficients, RNG when the layout is the same) or a model-only one (upcycled / converted);
- :meth:`CheckpointManager.save` writes one (asynchronously with ``checkpoint.async_save``: the
  previous save is published before the next starts, and :meth:`finish` publishes the last).

The on-disk format and its atomicity live in :mod:`megatron_moe.training.checkpoint`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_moe.config import Config
from megatron_moe.training.checkpoint import CheckpointError, read_meta, resolve_checkpoint, save_checkpoint
from megatron_moe.training.state import check_compatible, load_model_only, load_training_state, training_state


@dataclass
class LoadedCheckpoint:
    """A resolved ``--load`` target: its directory and its meta.json."""

    path: Path
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def saved_config(self) -> dict[str, Any]:
        return self.meta.get("config", {})

    @property
    def is_training_checkpoint(self) -> bool:
        """Holds optimizer state (else model weights only: an upcycled or converted model)."""
        return "optimizer" in self.meta.get("contents", [])


@dataclass
class ResumePoint:
    """Where training continues: the next step is ``step + 1``; ``consumed_samples`` sequences are used."""

    step: int = 0
    consumed_samples: int = 0


def open_checkpoint(load: str) -> LoadedCheckpoint | None:
    """Resolve ``checkpoint.load`` (None when it is empty); raises CheckpointError naming the path."""
    if not load:
        return None
    path = resolve_checkpoint(load)
    return LoadedCheckpoint(path, read_meta(path))


def tokenizer_identity(vocab_size: int, sha256: str) -> dict[str, Any]:
    """What a checkpoint records of its tokenizer (compared on resume)."""
    return {"vocab_size": vocab_size, "sha256": sha256}


def check_tokenizer(loaded: LoadedCheckpoint | None, tokenizer_id: dict, cfg: Config) -> None:
    """Raise CheckpointError if the run's tokenizer is not the checkpoint's (unless allowed on purpose)."""
    saved = (loaded.meta if loaded else {}).get("tokenizer")
    if not saved or saved == tokenizer_id or cfg.checkpoint.allow_tokenizer_change:
        return
    raise CheckpointError(
        f"tokenizer {cfg.data.tokenizer_model!r} (vocab {tokenizer_id['vocab_size']}, sha256 "
        f"{tokenizer_id['sha256'][:12]}...) is not the one checkpoint {loaded.path} was trained with (vocab "
        f"{saved['vocab_size']}, sha256 {saved['sha256'][:12]}...); pass that tokenizer, "
        "or --checkpoint.allow_tokenizer_change true on purpose"
    )


class CheckpointManager:
    """Saves and restores the training state of one run (every rank calls every method).

    Args:
        cfg: the resolved run configuration (stored in each checkpoint's meta.json).
        engine: the :class:`~megatron_moe.parallel.engine.ParallelEngine` (parts, rank, layout).
        tokenizer_id: :func:`tokenizer_identity` of the run's tokenizer.
        log: print what was saved / restored (rank 0).
    """

    def __init__(self, cfg: Config, engine, tokenizer_id: dict, log: bool):
        self.cfg, self.engine, self.tokenizer_id, self.log = cfg, engine, tokenizer_id, log
        s = engine.sizes
        self.layout = {"tp": s.tp, "pp": s.pp, "dp": s.dp, "virtual_stages": s.virtual_stages}
        self._pending: list = []

    # ------------------------------------------------------------------ restore
    def restore(self, loaded: LoadedCheckpoint, optimizer, coefficients) -> ResumePoint:
        """Load ``loaded`` into the model (and, for a training checkpoint, the optimizer, aux
        coefficients and RNG); returns where training continues."""
        engine, t = self.engine, self.cfg.training
        if not loaded.is_training_checkpoint:
            load_model_only(loaded.path, engine.parts)
            self._print(f"loaded model weights from {loaded.path}; starting a new run at step 0")
            return ResumePoint()
        info = load_training_state(loaded.path, engine.parts, optimizer, engine.num_moe_layers, engine.rank,
                                   engine.device, same_layout=loaded.meta.get("layout") == self.layout)
        saved_samples = loaded.meta.get("train_samples")
        if saved_samples not in (None, t.train_samples):
            self._print(f"warning: training.train_iters x global_batch_size changed since the checkpoint "
                        f"({saved_samples} -> {t.train_samples} samples): megatron-core shuffles over all "
                        "epochs, so the sample order after the resume point may differ")
        saved_aux = loaded.meta.get("aux_coefficients", {})
        if info["aux_coefficients"] is not None and saved_aux.get("kind") == coefficients.kind:
            coefficients.load_state_dict(saved_aux | {"coefficients": info["aux_coefficients"]}, strict=False)
        if not info["rng_restored"]:  # another layout: a deterministic, step-dependent reseed
            torch.manual_seed(t.seed + engine.dp_rank + 1_000_003 * info["step"])
        self._print(f"resumed from {loaded.path} at step {info['step']} ({info['consumed_samples']} samples "
                    f"consumed; RNG {'restored' if info['rng_restored'] else 'reseeded: different layout'})")
        return ResumePoint(info["step"], info["consumed_samples"])

    # ------------------------------------------------------------------ save
    def save(self, step: int, optimizer, consumed_samples: int, coefficients) -> None:
        """Write checkpoint ``step`` under ``checkpoint.save`` (publishing an async save in flight first)."""
        engine, c = self.engine, self.cfg.checkpoint
        state = training_state(engine.parts, optimizer, step, consumed_samples,
                               coefficients.coefficients if engine.num_moe_layers else None, engine.rank,
                               engine.device)
        aux_settings = {k: v for k, v in coefficients.state_dict().items() if not isinstance(v, torch.Tensor)}
        meta = {"config": self.cfg.to_dict(), "contents": ["model", "optimizer", "train_state"],
                "layout": self.layout, "tokenizer": self.tokenizer_id,
                "train_samples": self.cfg.training.train_samples, "consumed_samples": consumed_samples,
                "aux_coefficients": aux_settings}
        self.finish()
        result = save_checkpoint(c.save, step, state, meta, keep_last=c.keep_last, async_save=c.async_save)
        if c.async_save:
            self._pending.append(result)
        else:
            self._print(f"saved checkpoint {result}")

    def finish(self) -> None:
        """Publish the asynchronous save in flight, if any (collective: every rank calls it)."""
        while self._pending:
            self._print(f"saved checkpoint {self._pending.pop().wait()} (asynchronously)")

    def _print(self, message: str) -> None:
        if self.log:
            print(message, flush=True)


def resolve_vocab_size(cfg: Config, tokenizer_vocab: int, loaded: LoadedCheckpoint | None) -> Config:
    """The run's config with ``model.vocab_size`` resolved, validated; ``cfg`` is not changed.

    ``model.vocab_size = 0`` takes the checkpoint's size, else the tokenizer's padded as Megatron-LM
    does; a size below the tokenizer's vocabulary is an error. Then the checkpoint's architecture
    settings must match (:func:`~megatron_moe.training.state.check_compatible`).
    """
    from megatron_moe.model.transformer import padded_vocab_size

    m = cfg.model
    vocab = m.vocab_size
    if vocab == 0 and loaded is not None:
        vocab = int(loaded.saved_config.get("model", {}).get("vocab_size", 0))
    if vocab == 0:
        vocab = padded_vocab_size(tokenizer_vocab, m.make_vocab_size_divisible_by,
                                  cfg.parallel.tensor_model_parallel_size)
    elif vocab < tokenizer_vocab:
        raise ValueError(
            f"model.vocab_size = {vocab} is smaller than the tokenizer's vocabulary "
            f"({tokenizer_vocab} in {cfg.data.tokenizer_model!r})"
        )
    resolved = cfg.with_vocab_size(vocab)
    if loaded is not None:
        check_compatible(loaded.saved_config, resolved, loaded.path)
    return resolved
