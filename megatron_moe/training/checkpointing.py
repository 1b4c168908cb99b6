"""The checkpoint manager of a training run: what to resume from, saving (sync or async), keep-last.

It owns every decision about checkpoints that the trainer would otherwise make inline:
- :func:`open_checkpoint` resolves ``--load`` (a save directory's ``latest`` or a checkpoint
  directory), reads its meta.json and checks it against the run: model shape
  (:func:`~megatron_moe.training.state.check_compatible`) and tokenizer; a Megatron-LM checkpoint
  (:func:`open_megatron_checkpoint`) is a weights-only start;
- :meth:`CheckpointManager.restore` loads a training checkpoint (model, optimizer, train state,
  aux coefficients, RNG when the layout is the same) or a model-only one (upcycled / converted);
- :meth:`CheckpointManager.save` writes one (asynchronously with ``checkpoint.async_save``: the
  previous save is published before the next starts, and :meth:`finish` publishes the last);
- :meth:`CheckpointManager.claim` makes the save directory this run's: a lock held for the run's
  life (a second run on it fails at start, naming the holder), no start over another run's
  checkpoints unless resuming from them, and an id in every meta.json so that rotation
  (``checkpoint.keep_last``) only deletes this run's checkpoints.

The on-disk format and its atomicity live in :mod:`megatron_moe.training.checkpoint`.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_moe.config import Config, ConfigError
from megatron_moe.model.transformer import padded_vocab_size
from megatron_moe.parallel.pipeline import pipeline_layers, split_layers
from megatron_moe.training.checkpoint import (
    CheckpointError,
    list_checkpoints,
    make_directory,
    read_meta,
    resolve_checkpoint,
    save_checkpoint,
)
from megatron_moe.training.state import (
    check_compatible,
    load_full_state,
    load_model_only,
    load_training_state,
    training_state,
)

LOCK = ".run.lock"


@dataclass
class LoadedCheckpoint:
    """A resolved ``--load`` target: its directory and its meta.json (for a Megatron-LM checkpoint, one
    made from its arguments, and ``megatron``, the :class:`~megatron_moe.convert.source.DenseSource`
    reading its weights)."""

    path: Path
    meta: dict[str, Any] = field(default_factory=dict)
    megatron: Any = None

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


# What a run writes into its save directory besides checkpoints (Megatron-LM's examples put the
# TensorBoard directory there too): a directory holding only these has no checkpoint yet.
RUN_FILES = frozenset({LOCK, "metrics.jsonl", "tensorboard", "wandb"})


def open_checkpoint(load: str, start_if_absent: bool = False) -> LoadedCheckpoint | None:
    """Resolve ``checkpoint.load`` (None when it is empty); raises CheckpointError naming the path.

    ``start_if_absent`` (training): a ``--load`` directory that does not exist or holds nothing yet
    (but :data:`RUN_FILES`, left by a run that stopped before its first checkpoint) means a first run,
    as in Megatron-LM (``--save X --load X``): a warning, and None. A directory holding anything that
    is not a checkpoint is still an error.
    """
    if not load:
        return None
    from megatron_moe.convert.megatron_format import megatron_checkpoint_dir
    from megatron_moe.convert.source import ConversionError

    try:
        megatron = megatron_checkpoint_dir(load)
    except ConversionError as e:
        raise CheckpointError(f"--load {load}: {e}") from None
    if megatron is not None:
        return open_megatron_checkpoint(megatron)
    if start_if_absent and (not os.path.exists(load) or (
            os.path.isdir(load) and not [n for n in os.listdir(load) if n not in RUN_FILES])):
        if os.environ.get("RANK", "0") == "0":
            print(f"warning: --load {load} holds no checkpoint yet; starting from scratch", flush=True)
        return None
    path = resolve_checkpoint(load)
    return LoadedCheckpoint(path, read_meta(path))


def open_megatron_checkpoint(path: Path) -> LoadedCheckpoint:
    """A Megatron-LM checkpoint directory (``iter_*``/``release``, torch_dist or legacy torch) as a ``--load``
    target: a model-only checkpoint whose config (the architecture) comes from Megatron's saved arguments
    (:func:`~megatron_moe.convert.megatron_format.read_megatron`) and whose ``step`` is its iteration; no
    tokenizer is recorded. Only the arguments are read here; :meth:`CheckpointManager.load_model` then reads
    the whole model on every rank, one tensor at a time on CPU, and keeps each rank's slice (for a large
    model convert once with ``upcycle_checkpoint.py`` instead: each rank then reads only its shards).
    """
    from megatron_moe.convert.megatron_format import read_megatron
    from megatron_moe.convert.source import ConversionError

    try:
        source = read_megatron(path)
    except ConversionError as e:
        raise CheckpointError(f"--load {path}: {e}") from None
    iteration = int(path.name[5:]) if path.name.startswith("iter_") and path.name[5:].isdigit() else 0
    return LoadedCheckpoint(path, {"config": source.cfg.to_dict(), "contents": ["model"], "step": iteration},
                            megatron=source)


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
        if s.pp > 1 and [len(layers) for layers in pipeline_layers(cfg)] != [
                len(layers) for layers in split_layers(cfg.model.num_layers, s.pp * s.virtual_stages)]:
            self.layout["stage_layers"] = [len(layers) for layers in pipeline_layers(cfg)]  # which layers a rank runs
        self._pending: list = []
        self.run_id = uuid.uuid4().hex
        self._lock_file = None

    # ------------------------------------------------------------------ ownership
    def claim(self, loaded: LoadedCheckpoint | None) -> None:
        """Make ``checkpoint.save`` this run's (module docstring); raises CheckpointError naming the
        directory otherwise. Rank 0 holds the lock; every rank checks the directory's contents."""
        save = self.cfg.checkpoint.save
        if not save:
            return
        save_dir = Path(save)
        refuse_megatron_save_dir(save_dir)
        resuming_here = loaded is not None and loaded.path.parent.resolve() == save_dir.resolve()
        existing = list_checkpoints(save_dir)
        if existing and not resuming_here:
            raise CheckpointError(
                f"--save {save_dir} already holds checkpoints of a run (newest {existing[-1].name}); resume it with "
                f"--load {save_dir}, or save this run elsewhere: nothing there is overwritten or deleted")
        if resuming_here:
            self.run_id = loaded.meta.get("run_id") or self.run_id
        if self.engine.rank == 0:
            self._lock_file = _lock(save_dir)

    def release(self) -> None:
        """Drop the save directory's lock (also dropped by the OS if the process dies)."""
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    # ------------------------------------------------------------------ restore
    def restore(self, loaded: LoadedCheckpoint, optimizer, coefficients) -> ResumePoint:
        """Load ``loaded`` into the model (and, for a training checkpoint, the optimizer, aux
        coefficients and RNG); returns where training continues."""
        engine, t, c = self.engine, self.cfg.training, self.cfg.checkpoint
        if loaded.megatron is not None:
            self.load_model(loaded)
            self._print(f"loaded the model weights of Megatron-LM checkpoint {loaded.path} (iteration "
                        f"{loaded.meta['step']}); a weights-only start, as Megatron-LM's --finetune: its optimizer "
                        "state and iteration are not resumed, training starts at step 1 with a fresh optimizer")
            return ResumePoint()
        if not loaded.is_training_checkpoint or c.finetune:
            self.load_model(loaded)
            self._print(f"loaded model weights from {loaded.path}; starting a new run at step 0")
            return ResumePoint()
        info = load_training_state(loaded.path, engine.parts, optimizer, engine.num_moe_layers, engine.rank,
                                   engine.device, same_layout=loaded.meta.get("layout") == self.layout,
                                   load_optimizer=c.load_optim, load_rng=c.load_rng)
        if not c.load_optim:
            self._print("optimizer state not loaded (checkpoint.load_optim = false): AdamW starts afresh")
        if info["step"] != loaded.meta.get("step"):
            raise CheckpointError(f"checkpoint {loaded.path}: meta.json says step {loaded.meta.get('step')} but its "
                                  f"tensors hold step {info['step']}; the directory mixes two checkpoints")
        saved_samples = loaded.meta.get("train_samples")
        if saved_samples not in (None, t.run_samples):
            self._print(f"warning: training.train_iters x global_batch_size changed since the checkpoint "
                        f"({saved_samples} -> {t.run_samples} samples): megatron-core shuffles over all "
                        "epochs, so the sample order after the resume point may differ")
        saved_aux = loaded.meta.get("aux_coefficients", {})
        if info["aux_coefficients"] is not None and saved_aux.get("kind") == coefficients.kind:
            coefficients.load_state_dict(saved_aux | {"coefficients": info["aux_coefficients"]}, strict=False)
        if not info["rng_restored"]:  # another layout: a deterministic, step-dependent reseed
            torch.manual_seed(t.seed + engine.dp_rank + 1_000_003 * info["step"])
        rng = "restored" if info["rng_restored"] else "reseeded: " + ("different layout" if c.load_rng else
                                                                      "checkpoint.load_rng = false")
        self._print(f"resumed from {loaded.path} at step {info['step']} ({info['consumed_samples']} samples "
                    f"consumed; RNG {rng})")
        return ResumePoint(info["step"], info["consumed_samples"])

    def load_model(self, loaded: LoadedCheckpoint) -> None:
        """Load only the model weights of ``loaded`` into this rank's parts; a Megatron-LM checkpoint is
        read whole by every rank (:func:`open_megatron_checkpoint`)."""
        if loaded.megatron is None:
            load_model_only(loaded.path, self.engine.parts)
            return
        from megatron_moe.convert.source import ConversionError, expected_shapes

        try:
            load_full_state(self.engine.parts, loaded.megatron.loaders, expected_shapes(self.cfg), loaded.path)
        except ConversionError as e:
            raise CheckpointError(str(e)) from None

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
                "train_samples": self.cfg.training.run_samples, "consumed_samples": consumed_samples,
                "aux_coefficients": aux_settings, "run_id": self.run_id}
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


def refuse_megatron_save_dir(save_dir: Path | str) -> None:
    """CheckpointError when ``save_dir`` (``--save``) is a Megatron-LM save directory: nothing of this run is
    written into one (its ``iter_*`` names would collide with ours, and it is another program's)."""
    if (Path(save_dir) / "latest_checkpointed_iteration.txt").is_file():
        raise CheckpointError(f"--save {save_dir} holds a Megatron-LM checkpoint; save this run elsewhere: "
                              "nothing there is overwritten or deleted")


def _lock(save_dir: Path):
    """An exclusive, non-blocking lock on ``save_dir/.run.lock`` holding who holds it; the open file."""
    import fcntl

    make_directory(save_dir, "--save")
    handle = open(save_dir / LOCK, "a+")  # noqa: SIM115 - kept open for the run's life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise CheckpointError(f"--save {save_dir} is in use by another run ({holder}); wait for it to finish or "
                              "save elsewhere") from None
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
    handle.flush()
    return handle


def resolve_vocab_size(cfg: Config, tokenizer_vocab: int, loaded: LoadedCheckpoint | None) -> Config:
    """The run's config with ``model.vocab_size`` resolved, validated; ``cfg`` is not changed.

    ``model.vocab_size = 0`` takes the checkpoint's size, else the tokenizer's padded as Megatron-LM
    does; a size below the tokenizer's vocabulary is an error. Then the checkpoint's architecture
    settings must match (:func:`~megatron_moe.training.state.check_compatible`).
    """
    m = cfg.model
    vocab = m.vocab_size
    if vocab == 0 and loaded is not None:
        vocab = int(loaded.saved_config.get("model", {}).get("vocab_size", 0))
    if vocab == 0:
        vocab = padded_vocab_size(tokenizer_vocab, m.make_vocab_size_divisible_by,
                                  cfg.parallel.tensor_model_parallel_size)
    elif vocab < tokenizer_vocab:
        raise ConfigError(
            f"model.vocab_size = {vocab} is smaller than the tokenizer's vocabulary "
            f"({tokenizer_vocab} in {cfg.data.tokenizer_model!r})"
        )
    resolved = cfg.with_vocab_size(vocab)
    if loaded is not None:
        check_compatible(loaded.saved_config, resolved, loaded.path,
                         "megatron" if loaded.megatron is not None else "native")
    return resolved
