"""Checkpoint files: checksums recorded at save and verified on load (flipped bits, every layout), and
failed writes (full disk, errors in DCP's background thread) that publish nothing and lose nothing."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import xxhash
from torch.distributed.checkpoint.filesystem import FileSystem

from megatron_moe.testing import run_distributed
from megatron_moe.training.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    read_meta,
    resolve_checkpoint,
    save_checkpoint,
)
from megatron_moe.training.checkpoint_files import ChecksummingWriter, _verifier
from tests.training.helpers import state, zeros_like


def flip_bit(path: Path, position: float) -> None:
    """Flip one bit of ``path`` at ``position`` (a fraction of its length)."""
    data = bytearray(path.read_bytes())
    data[min(len(data) - 1, int(position * len(data)))] ^= 0x10
    path.write_bytes(bytes(data))


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): xxhash.xxh3_64(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".run.lock"}


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_checksums_are_those_of_the_files_on_disk(tmp_path, async_save):
    path = save_checkpoint(tmp_path, 1, state(1, n=1 << 16), {}, async_save=async_save)  # 2 MiB: hashed on a thread
    path = path.wait() if async_save else path
    recorded = read_meta(path)["checksums"]
    # Reference: each whole file read back and hashed in one call (the writer hashed the stream).
    on_disk = {p.name: "xxh3_64:" + xxhash.xxh3_64(p.read_bytes()).hexdigest()
               for p in path.iterdir() if p.name != "meta.json"}
    assert recorded == on_disk and ".metadata" in recorded and "__0_0.distcp" in recorded
    assert not list(path.glob("*checksums.json"))  # the ranks' sidecars are merged and removed


@pytest.mark.parametrize("name", ["__0_0.distcp", ".metadata"])
@pytest.mark.parametrize("position", [0.01, 0.5, 0.99])
def test_a_flipped_bit_anywhere_is_a_clear_error_naming_the_file(tmp_path, name, position):
    path = save_checkpoint(tmp_path, 1, state(1), {})
    flip_bit(path / name, position)
    with pytest.raises(CheckpointError, match=rf"checkpoint file .*/iter_0000001/{name} is corrupt: checksum"):
        load_checkpoint(path, zeros_like(state(0)))


def test_a_checkpoint_without_checksums_loads_with_a_warning(tmp_path, capsys):
    path = save_checkpoint(tmp_path, 1, state(1), {})
    meta = read_meta(path)
    del meta["checksums"]  # as saved before checksums were recorded
    (path / "meta.json").write_text(json.dumps(meta))
    target = zeros_like(state(0))
    load_checkpoint(path, target)
    assert torch.equal(target["model"]["a.weight"], state(1)["model"]["a.weight"])
    assert "records no checksums (saved by an older version)" in capsys.readouterr().out


def test_a_file_missing_from_the_checksums_or_from_disk_is_named(tmp_path):
    path = save_checkpoint(tmp_path, 1, state(1), {})
    meta = read_meta(path)
    meta["checksums"]["__0_0.distcp"] = meta["checksums"].pop("__0_0.distcp").replace("xxh3_64:", "xxh3_64:f")
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="__0_0.distcp is corrupt"):
        load_checkpoint(path, zeros_like(state(0)))
    meta["checksums"]["__0_1.distcp"] = meta["checksums"]["__0_0.distcp"]  # a file the save wrote, now gone
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="is incomplete: __0_1.distcp is missing"):
        load_checkpoint(path, zeros_like(state(0)))


def test_each_file_has_one_verifying_rank():
    assert [_verifier(f"__{r}_0.distcp", 4) for r in range(6)] == [0, 1, 2, 3, 0, 1]
    assert _verifier("other.distcp", 3) in (0, 1, 2)


# ---------------------------------------------------------------------------------------- two ranks
def _sharded_body(rank, world_size, root: str):
    """Save a row-sharded DTensor and a replicated tensor; load them in the same layout and resharded
    (each rank then reads a part of both ranks' files); flip a bit in rank 1's file and load again."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    full = torch.arange(64 * 16, dtype=torch.float32).reshape(64, 16)
    save_checkpoint(root, 1, {"model": {"w": distribute_tensor(full, mesh, [Shard(0)]), "norm": torch.arange(5.0)}},
                    {})
    path = resolve_checkpoint(root)

    def load(placement):
        target = {"model": {"w": distribute_tensor(torch.zeros_like(full), mesh, [placement]), "norm": torch.zeros(5)}}
        try:
            load_checkpoint(path, target)
        except CheckpointError as e:
            return str(e)
        w = target["model"]["w"].redistribute(mesh, [Replicate()]).to_local()
        return torch.equal(w, full) and torch.equal(target["model"]["norm"], torch.arange(5.0))

    results = {"checksums": sorted(read_meta(path)["checksums"]), "same": load(Shard(0)), "resharded": load(Shard(1))}
    dist.barrier()
    if rank == 0:
        flip_bit(path / "__1_0.distcp", 0.5)
    dist.barrier()
    results |= {"corrupt same": load(Shard(0)), "corrupt resharded": load(Shard(1))}
    return results


@pytest.mark.slow
def test_two_ranks_record_their_files_and_any_layout_verifies_every_file(tmp_path):
    for results in run_distributed(_sharded_body, 2, (str(tmp_path),)):
        assert results["checksums"] == [".metadata", "__0_0.distcp", "__1_0.distcp"]
        assert results["same"] is True and results["resharded"] is True
        for layout in ("corrupt same", "corrupt resharded"):  # every rank fails, naming the corrupt file
            assert "__1_0.distcp is corrupt: checksum" in results[layout], (layout, results[layout])
    target = {"model": {"w": torch.zeros(64, 16), "norm": torch.zeros(5)}}  # one process reads both files
    with pytest.raises(CheckpointError, match="__1_0.distcp is corrupt"):
        load_checkpoint(resolve_checkpoint(tmp_path), target)


# ------------------------------------------------------------------------------------ failed writes
class _FullDisk(io.RawIOBase):
    """A file that takes ``room`` bytes, then fails as a full disk does."""

    def __init__(self, raw, room: int):
        super().__init__()
        self.raw, self.room = raw, room

    def writable(self):
        return True

    def write(self, b):
        if len(memoryview(b).cast("B")) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(memoryview(b).cast("B"))
        return self.raw.write(b)

    def tell(self):
        return self.raw.tell()

    def fileno(self):
        return self.raw.fileno()

    def close(self):
        self.raw.close()
        super().close()


def _fill_disk_after(monkeypatch, room: int) -> None:
    real = FileSystem.create_stream

    @contextmanager
    def create_stream(self, path, mode):
        with real(self, path, mode) as raw:
            yield _FullDisk(raw, room) if "w" in mode else raw

    monkeypatch.setattr(FileSystem, "create_stream", create_stream)


@pytest.mark.parametrize("async_save", [False, True])
def test_a_full_disk_is_named_and_loses_nothing(tmp_path, monkeypatch, async_save):
    save_checkpoint(tmp_path, 1, state(1), {})
    before = tree_digest(tmp_path)
    _fill_disk_after(monkeypatch, room=1000)
    with pytest.raises(OSError, match="no space left on device while writing checkpoint iter_0000002") as info:
        result = save_checkpoint(tmp_path, 2, state(2, n=4096), {}, async_save=async_save)
        if async_save:
            result.wait()  # the background thread's error is raised here
    assert info.value.errno == errno.ENOSPC and "unexpected pos" not in str(info.value)
    monkeypatch.undo()
    assert tree_digest(tmp_path) == before  # the partial write is removed; `latest` unchanged
    target = zeros_like(state(0))
    load_checkpoint(resolve_checkpoint(tmp_path), target)
    assert torch.equal(target["model"]["a.weight"], state(1)["model"]["a.weight"])


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    return os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                                capture_output=True).returncode == 0


def test_a_real_full_disk_on_a_small_tmpfs(tmp_path):
    disk = tmp_path / "disk"
    if not _tmpfs(disk, "256k"):
        pytest.skip("mounting a tmpfs needs root")
    try:
        save_checkpoint(disk, 1, state(1), {})
        before = tree_digest(disk)
        with pytest.raises(OSError, match="no space left on device") as info:
            save_checkpoint(disk, 2, state(2, n=16384), {})  # 512 KiB of tensors
        assert info.value.errno == errno.ENOSPC
        assert tree_digest(disk) == before and [p.name for p in list_checkpoints(disk)] == ["iter_0000001"]
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_an_error_in_the_background_save_thread_publishes_nothing(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, state(1), {})
    before = tree_digest(tmp_path)

    def refuse(self, plan, planner):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(Path(self.path) / "__0_0.distcp"))

    monkeypatch.setattr(ChecksummingWriter, "write_data", refuse)
    pending = save_checkpoint(tmp_path, 2, state(2), {}, async_save=True)
    with pytest.raises(CheckpointError, match=r"writing checkpoint .*iter_0000002 failed \(Permission denied: "
                                              r".*__0_0.distcp\); the previous checkpoint and 'latest' are unchanged"):
        pending.wait()
    assert tree_digest(tmp_path) == before and resolve_checkpoint(tmp_path).name == "iter_0000001"
