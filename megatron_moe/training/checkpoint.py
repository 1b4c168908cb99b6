"""Distributed checkpoints (torch.distributed.checkpoint), written atomically, loaded without unpickling code.

On-disk layout of a save directory::

    <save>/latest                 text: name of the newest complete checkpoint (replaced last, atomically)
    <save>/iter_0000100/          one DCP checkpoint: .metadata + *.distcp shards, and
    <save>/iter_0000100/meta.json step, config, layout, format version (JSON, human readable)

A checkpoint is first written to ``iter_XXXXXXX.tmp`` and renamed into place once every rank has
finished, then ``latest`` is replaced; a crash at any point leaves the previous checkpoint loadable.
DCP stores tensors by fully-qualified name, so a checkpoint saved in one parallel layout loads
into another (DTensor shards are resharded on load).

Loading never runs pickled code: the DCP ``.metadata`` file is read with an unpickler that only
admits DCP's own metadata classes, and non-tensor entries are refused (all state is tensors; the
rest lives in meta.json).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

# Single-process saves (no process group) are intended here; DCP's notice about it, also raised
# from its background thread for async saves, is noise.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

FORMAT_VERSION = 1
LATEST = "latest"
META = "meta.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt or incompatible; the message names the path."""


def checkpoint_name(step: int) -> str:
    return f"iter_{step:07d}"


def _rank(group) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def _barrier(group) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (readers never see half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _SafeUnpickler(pickle.Unpickler):
    """Admits exactly the globals DCP's metadata is made of, by (module, name): no other name of those
    modules, no dotted name (pickle resolves ``module.a.b`` attribute chains), so loading runs no code.

    The list was taken from the metadata this project writes (model, optimizer, DTensor shards, FSDP);
    the ``.metadata`` of a checkpoint written by another version of torch may need an entry more.
    """

    _ALLOWED = {
        *(("torch.distributed.checkpoint.metadata", name) for name in (
            "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
            "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        # megatron-core's torch_dist saves also pickle their save plans (Metadata.all_local_plans)
        *(("torch.distributed.checkpoint.planner", name) for name in (
            "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # a lookup in a dict of torch's layouts
        ("collections", "OrderedDict"),
        *((module, name) for module in ("pathlib", "pathlib._local") for name in ("PosixPath", "PurePosixPath")),
    }

    @classmethod
    def allowed(cls, module: str, name: str) -> bool:
        """Whether ``module.name`` may be looked up while loading checkpoint metadata."""
        if "." in name:
            return False
        if (module, name) in cls._ALLOWED:
            return True
        return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)

    def find_class(self, module: str, name: str):
        if not self.allowed(module, name):
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from checkpoint metadata")
        return super().find_class(module, name)


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata is read with :class:`_SafeUnpickler` and must hold tensors only."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / ".metadata"
        if not path.is_file():
            raise CheckpointError(f"checkpoint {self.path} is incomplete: {path.name} is missing")
        try:
            with open(path, "rb") as f:
                metadata = _SafeUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as e:
            raise CheckpointError(f"checkpoint metadata {path} is corrupt or not a DCP checkpoint: {e}") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"checkpoint metadata {path} does not hold DCP metadata")
        pickled = [k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]
        if pickled:
            raise CheckpointError(f"checkpoint {self.path} holds pickled objects ({pickled[:3]}...); refusing to load")
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def save_checkpoint(save_dir: str | Path, step: int, state: dict[str, Any], meta: dict[str, Any],
                    keep_last: int = 0, group=None, async_save: bool = False) -> Path | PendingSave:
    """Write ``state`` (nested dicts of tensors / DTensors) as checkpoint ``step`` under ``save_dir``.

    Collective over ``group`` (default world) when torch.distributed is initialised. ``meta`` must
    be JSON-serialisable. ``keep_last`` > 0 deletes all but the newest ``keep_last`` checkpoints whose
    meta.json has the same ``run_id`` as ``meta`` (all, when ``meta`` has none).
    Returns the final checkpoint directory; with ``async_save`` the state is staged to CPU memory,
    written by a background thread, and a :class:`PendingSave` is returned whose ``wait()`` (called
    by every rank at the same point) makes the checkpoint visible.
    """
    save_dir = Path(save_dir)
    final = save_dir / checkpoint_name(step)
    tmp = save_dir / (checkpoint_name(step) + ".tmp")
    if _rank(group) == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # debris of an earlier crash
    _barrier(group)
    kwargs = dict(checkpoint_id=str(tmp), process_group=group, no_dist=not dist.is_initialized())
    if async_save:
        future = dcp.async_save(state, **kwargs)
        return PendingSave(future, lambda: _finalize(save_dir, tmp, final, step, meta, keep_last, group))
    dcp.save(state, **kwargs)
    return _finalize(save_dir, tmp, final, step, meta, keep_last, group)


class PendingSave:
    """An asynchronous save in flight; ``wait()`` blocks until it is written, then publishes it."""

    def __init__(self, future, finalize):
        self._future, self._finalize, self.path = future, finalize, None

    def wait(self) -> Path:
        if self.path is None:
            # torch returns a Future, or a response holding one (upload_completion) in newer versions
            getattr(self._future, "upload_completion", self._future).result()
            self.path = self._finalize()
        return self.path


def _finalize(save_dir: Path, tmp: Path, final: Path, step: int, meta: dict, keep_last: int, group) -> Path:
    """After every rank wrote its shards: meta.json, rename into place, then replace ``latest``."""
    _barrier(group)
    if _rank(group) == 0:
        write_text_atomic(tmp / META, json.dumps({"format_version": FORMAT_VERSION, "step": step, **meta},
                                                  indent=1))
        if final.exists():
            old = final.with_name(final.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(save_dir)
        write_text_atomic(save_dir / LATEST, final.name + "\n")
        if keep_last > 0:  # only this run's checkpoints, never the one just published
            run_id = meta.get("run_id")
            own = [c for c in list_checkpoints(save_dir) if run_id is None or _run_id(c) == run_id]
            for stale in [c for c in own[:-keep_last] if c != final]:
                shutil.rmtree(stale, ignore_errors=True)
    _barrier(group)
    return final


def _run_id(checkpoint: Path) -> str | None:
    try:
        return json.loads((checkpoint / META).read_text()).get("run_id")
    except (OSError, ValueError):
        return None


def list_checkpoints(save_dir: str | Path) -> list[Path]:
    """Complete checkpoints (with meta.json) under ``save_dir``, oldest first."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    found = [p for p in save_dir.iterdir() if p.is_dir() and p.name.startswith("iter_") and p.name[5:].isdigit()
             and (p / META).is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory for ``--load PATH``: a checkpoint itself, or a save dir (its ``latest``)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"--load {path}: no such file or directory")
    if (path / META).is_file():
        return path
    pointer = path / LATEST
    if pointer.is_file():
        name = pointer.read_text().strip()
        if not name.startswith("iter_") or "/" in name or "\\" in name or name in (".", ".."):
            raise CheckpointError(f"{pointer} names {name!r}; it must name a checkpoint directory (iter_*) inside "
                                  f"{path}, not a path elsewhere")
        target = path / name
        if not (target / META).is_file():
            raise CheckpointError(f"{pointer} points to {target.name}, which is missing or incomplete")
        return target
    complete = list_checkpoints(path)
    if not complete:
        raise CheckpointError(f"--load {path}: no complete checkpoint (no '{LATEST}' file, no iter_*/{META})")
    return complete[-1]


def read_meta(checkpoint: str | Path) -> dict[str, Any]:
    """The JSON metadata of a checkpoint directory; raises CheckpointError if missing/corrupt/too new."""
    path = Path(checkpoint) / META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {checkpoint} is incomplete: {META} is missing") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is corrupt: {e}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {meta.get('format_version')} (this code reads {FORMAT_VERSION})")
    return meta


def checkpoint_keys(checkpoint: str | Path) -> dict[str, tuple[int, ...]]:
    """Flattened state keys stored in a checkpoint and their global shapes."""
    metadata = SafeFileSystemReader(str(checkpoint)).read_metadata()
    return {k: tuple(v.size) for k, v in metadata.state_dict_metadata.items() if hasattr(v, "size")}


def load_checkpoint(checkpoint: str | Path, state: dict[str, Any], group=None) -> None:
    """Load into ``state`` in place (its tensors define what is read and how it is sharded).

    Raises CheckpointError naming the checkpoint when entries are missing or shapes differ.
    """
    checkpoint = Path(checkpoint)
    stored = checkpoint_keys(checkpoint)
    wanted = _flat_shapes(state)
    missing = sorted(k for k in wanted if k not in stored)
    if missing:
        raise CheckpointError(f"checkpoint {checkpoint} lacks {len(missing)} entries the model needs, e.g. "
                              f"{missing[:4]}: was it saved from a different model configuration?")
    wrong = [(k, stored[k], s) for k, s in wanted.items() if stored[k] != s]
    if wrong:
        k, got, want = wrong[0]
        raise CheckpointError(f"checkpoint {checkpoint}: {k} has shape {got}, the model expects {want} "
                              f"({len(wrong)} mismatched entries): different model configuration?")
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(str(checkpoint)), process_group=group,
                 no_dist=not dist.is_initialized())
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # DCP wraps shard read errors (missing/truncated shards)
        raise CheckpointError(f"checkpoint {checkpoint} could not be read (missing or truncated shard?): "
                              f"{_root_cause(e)}") from e


def _root_cause(e: BaseException) -> str:
    """The innermost error line of a (possibly DCP-wrapped, per-rank) exception."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def _flat_shapes(state: dict[str, Any], prefix: str = "") -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for k, v in state.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_shapes(v, key + "."))
        elif isinstance(v, torch.Tensor):
            out[key] = tuple(v.shape)  # a DTensor reports its global shape
        else:
            raise TypeError(f"checkpoint state entry {key} is {type(v).__name__}; only tensors are stored")
    return out
