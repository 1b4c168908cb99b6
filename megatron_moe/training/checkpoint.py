"""Distributed checkpoints (torch.distributed.checkpoint), written atomically, verified, loaded without
unpickling code.

On-disk layout of a save directory::

    <save>/latest                 text: name of the newest complete checkpoint (replaced last, atomically)
    <save>/iter_0000100/          one DCP checkpoint: .metadata + *.distcp shards, and
    <save>/iter_0000100/meta.json step, config, layout, format version, each file's checksum (JSON)

A checkpoint is first written to ``iter_XXXXXXX.tmp`` and renamed into place once every rank has
finished, then ``latest`` is replaced; a crash at any point leaves the previous checkpoint loadable.
A save that fails (a full disk: an ``OSError`` with ``errno.ENOSPC``; any other write error: a
:class:`CheckpointError`), synchronous or in DCP's background thread, publishes nothing: its
``.tmp`` directory is removed and ``latest`` still names the previous checkpoint.
DCP stores tensors by fully-qualified name, so a checkpoint saved in one parallel layout loads
into another (DTensor shards are resharded on load).

Every file's checksum is recorded at save and verified on load, and the DCP ``.metadata`` pickle
is read without running code: :mod:`megatron_moe.training.checkpoint_files`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from megatron_moe.training.checkpoint_files import (
    CheckpointError,
    ChecksummingWriter,
    SafeFileSystemReader,
    collect_checksums,
    write_failure,
)

# Single-process saves (no process group) are intended here; DCP's notice about it, also raised
# from its background thread for async saves, is noise.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

FORMAT_VERSION = 1
LATEST = "latest"
META = "meta.json"


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
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # no debris beside the file when the write fails (a full disk...)
            tmp.unlink()
        raise


def make_directory(path: Path | str, setting: str) -> Path:
    """``mkdir -p path``; a CheckpointError naming ``setting`` (e.g. ``--save``) and the reason when it cannot
    be made (a file in the way, no permission), instead of an OSError from deep inside a run."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"{setting} {path}: cannot create this directory ({e.strerror or e}); "
                              f"pass a writable {setting}") from None
    return path


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(save_dir: str | Path, step: int, state: dict[str, Any], meta: dict[str, Any],
                    keep_last: int = 0, group=None, async_save: bool = False) -> Path | PendingSave:
    """Write ``state`` (nested dicts of tensors / DTensors) as checkpoint ``step`` under ``save_dir``.

    Collective over ``group`` (default world) when torch.distributed is initialised. ``meta`` must
    be JSON-serialisable. ``keep_last`` > 0 deletes all but the newest ``keep_last`` checkpoints whose
    meta.json has the same ``run_id`` as ``meta`` (all, when ``meta`` has none).
    Returns the final checkpoint directory; with ``async_save`` the state is staged to CPU memory,
    written by a background thread, and a :class:`PendingSave` is returned whose ``wait()`` (called
    by every rank at the same point) makes the checkpoint visible.
    Raises OSError(ENOSPC) for a full disk, CheckpointError for any other failed write (module docstring).
    """
    save_dir = Path(save_dir)
    final = save_dir / checkpoint_name(step)
    tmp = save_dir / (checkpoint_name(step) + ".tmp")
    if _rank(group) == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # debris of an earlier crash
    _barrier(group)
    kwargs = dict(storage_writer=ChecksummingWriter(tmp), checkpoint_id=str(tmp), process_group=group,
                  no_dist=not dist.is_initialized())
    publish = _Publisher(save_dir, tmp, final, step, meta, keep_last, group)
    try:
        if async_save:
            return PendingSave(dcp.async_save(state, **kwargs), publish)
        dcp.save(state, **kwargs)
    except (Exception, CheckpointException) as e:
        raise publish.failed(e) from None
    return publish()


class _Publisher:
    """Publishes a written checkpoint (:meth:`__call__`) or cleans up after a failed write (:meth:`failed`)."""

    def __init__(self, save_dir: Path, tmp: Path, final: Path, step: int, meta: dict, keep_last: int, group):
        self.save_dir, self.tmp, self.final, self.step = save_dir, tmp, final, step
        self.meta, self.keep_last, self.group = meta, keep_last, group

    def __call__(self) -> Path:
        return _finalize(self.save_dir, self.tmp, self.final, self.step, self.meta, self.keep_last, self.group)

    def failed(self, e: BaseException) -> Exception:
        """The one error to raise for a failed write ``e``, after removing the partial ``.tmp`` directory."""
        if _rank(self.group) == 0:
            shutil.rmtree(self.tmp, ignore_errors=True)  # every rank's write has ended: DCP gathered the error
        unchanged = f"the previous checkpoint and '{LATEST}' are unchanged"
        cause = write_failure(e)
        if cause is not None and cause.errno == errno.ENOSPC:
            return OSError(errno.ENOSPC, f"no space left on device while writing checkpoint {self.final.name} "
                                         f"({cause.filename or self.tmp}); {unchanged}")
        reason = f"{cause.strerror}: {cause.filename}" if cause is not None else _root_cause(e)
        return CheckpointError(f"writing checkpoint {self.final} failed ({reason}); {unchanged}")


class PendingSave:
    """An asynchronous save in flight; ``wait()`` blocks until it is written, then publishes it.

    An error of the background write is raised by ``wait()`` as :meth:`_Publisher.failed` describes,
    and nothing is published.
    """

    def __init__(self, future, publish: _Publisher):
        self._future, self._publish, self.path = future, publish, None

    def wait(self) -> Path:
        if self.path is None:
            try:  # torch returns a Future, or a response holding one (upload_completion) in newer versions
                getattr(self._future, "upload_completion", self._future).result()
            except (Exception, CheckpointException) as e:
                raise self._publish.failed(e) from None
            self.path = self._publish()
        return self.path


def _finalize(save_dir: Path, tmp: Path, final: Path, step: int, meta: dict, keep_last: int, group) -> Path:
    """After every rank wrote its shards: meta.json (with every file's checksum), rename into place,
    then replace ``latest``."""
    _barrier(group)
    if _rank(group) == 0:
        checksums = collect_checksums(tmp)
        write_text_atomic(tmp / META, json.dumps({"format_version": FORMAT_VERSION, "step": step, **meta,
                                                  "checksums": checksums}, indent=1))
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


_warned_unverified: set[Path] = set()


def _reader(checkpoint: Path, group=None) -> SafeFileSystemReader:
    """A reader of ``checkpoint`` that verifies the checksums its meta.json records (a checkpoint written
    before checksums were recorded is read unverified, with a warning once)."""
    checksums = None
    try:
        checksums = json.loads((checkpoint / META).read_text()).get("checksums")
    except (OSError, ValueError, AttributeError):
        pass  # a missing or corrupt meta.json is reported by read_meta; the files themselves still load
    if not checksums and checkpoint not in _warned_unverified:
        _warned_unverified.add(checkpoint)
        if _rank(group) == 0:
            print(f"warning: checkpoint {checkpoint} records no checksums (saved by an older version); its files "
                  "are loaded unverified", flush=True)
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    return SafeFileSystemReader(checkpoint, checksums, rank=_rank(group), world_size=world)


def checkpoint_keys(checkpoint: str | Path) -> dict[str, tuple[int, ...]]:
    """Flattened state keys stored in a checkpoint and their global shapes."""
    metadata = _reader(Path(checkpoint)).read_metadata()
    return {k: tuple(v.size) for k, v in metadata.state_dict_metadata.items() if hasattr(v, "size")}


def load_checkpoint(checkpoint: str | Path, state: dict[str, Any], group=None) -> None:
    """Load into ``state`` in place (its tensors define what is read and how it is sharded).

    Raises CheckpointError naming the checkpoint when entries are missing or shapes differ, and naming
    the file when a file is missing, truncated or fails its checksum (``state`` is then undefined).
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
        dcp.load(state, storage_reader=_reader(checkpoint, group), process_group=group,
                 no_dist=not dist.is_initialized())
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # DCP wraps each rank's read error
        ours = [exc for exc, _ in getattr(e, "failures", {}).values() if isinstance(exc, CheckpointError)]
        if ours:
            raise ours[0] from None
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
