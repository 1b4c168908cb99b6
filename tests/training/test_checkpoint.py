import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_moe.training import checkpoint as ck
from megatron_moe.training import checkpoint_files
from megatron_moe.training.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    read_meta,
    resolve_checkpoint,
    save_checkpoint,
)
from tests.training.helpers import state, zeros_like


def assert_equal(a: dict, b: dict) -> None:
    for k in a:
        if isinstance(a[k], dict):
            assert_equal(a[k], b[k])
        else:
            assert torch.equal(a[k], b[k]), k


def test_round_trip_latest_and_keep_last(tmp_path):
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, state(step), {"config": {"x": step}}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["iter_0000020", "iter_0000030"]
    latest = resolve_checkpoint(tmp_path)
    assert latest.name == "iter_0000030" and read_meta(latest)["config"] == {"x": 30}
    target = zeros_like(state(0))
    load_checkpoint(latest, target)
    assert_equal(target, state(30))
    assert resolve_checkpoint(tmp_path / "iter_0000020") == tmp_path / "iter_0000020"


def test_failure_mid_save_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, state(1), {})
    real_save = ck.dcp.save

    def crash_during_write(sd, checkpoint_id, **kw):
        real_save(sd, checkpoint_id=checkpoint_id, **kw)
        Path(checkpoint_id, "__0_0.distcp").write_bytes(b"half")  # a torn shard
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(ck.dcp, "save", crash_during_write)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, state(2), {})
    monkeypatch.undo()
    assert (tmp_path / "iter_0000002.tmp").exists() and not (tmp_path / "iter_0000002").exists()
    target = zeros_like(state(0))
    load_checkpoint(resolve_checkpoint(tmp_path), target)
    assert_equal(target, state(1))
    save_checkpoint(tmp_path, 2, state(2), {})  # the debris is cleaned up by the next save
    assert not (tmp_path / "iter_0000002.tmp").exists() and resolve_checkpoint(tmp_path).name == "iter_0000002"


# Saves checkpoint 2 after checkpoint 1 exists, with a hook that announces itself and then blocks at
# one point of the save, so the parent kills the process provably INSIDE that point.
_KILL_SCRIPT = """
import sys, time, torch
from torch.distributed.checkpoint.filesystem import FileSystemWriter
from megatron_moe.training import checkpoint as ck
from megatron_moe.training import checkpoint_files

where = sys.argv[2]

def block():
    print("blocked", flush=True)
    time.sleep(600)

if where == "shard_write":  # DCP has written part of the shards of iter_0000002.tmp
    real_write = FileSystemWriter.write_data
    def write_data(self, *args, **kwargs):
        fut = real_write(self, *args, **kwargs)
        fut.wait()
        block()
    FileSystemWriter.write_data = write_data
else:  # "publish": iter_0000002 is renamed into place, `latest` not yet replaced
    real_write_text = ck.write_text_atomic
    def write_text_atomic(path, text):
        if path.name == ck.LATEST and "0000002" in text:
            block()
        real_write_text(path, text)
    ck.write_text_atomic = write_text_atomic

ck.save_checkpoint(sys.argv[1], 2, {"model": {"w": torch.full((256, 64), 2.0)}}, {})
print("finished", flush=True)
"""


@pytest.mark.parametrize("where", ["shard_write", "publish"])
def test_sigkill_inside_a_save_never_breaks_latest(tmp_path, where):
    save_checkpoint(tmp_path, 1, state(1), {})
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(tmp_path), where], stdout=subprocess.PIPE,
                            cwd=Path(__file__).parents[2], text=True)
    try:
        assert proc.stdout.readline().strip() == "blocked"  # the save is provably in progress
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    if where == "shard_write":
        assert (tmp_path / "iter_0000002.tmp").exists() and not (tmp_path / "iter_0000002").exists()
    else:
        assert (tmp_path / "iter_0000002").exists() and not (tmp_path / "iter_0000002.tmp").exists()
    latest = resolve_checkpoint(tmp_path)
    assert latest.name == "iter_0000001"  # `latest` still names the last complete, published save
    target = zeros_like(state(0))
    load_checkpoint(latest, target)
    assert_equal(target, state(1))
    save_checkpoint(tmp_path, 3, state(3), {})  # the next save succeeds over the debris
    assert resolve_checkpoint(tmp_path).name == "iter_0000003"


def test_incompatible_state_is_a_clear_error(tmp_path):
    save_checkpoint(tmp_path, 1, state(1), {})
    with pytest.raises(CheckpointError, match=r"a\.weight has shape \(64, 8\).*expects \(32, 8\)"):
        load_checkpoint(resolve_checkpoint(tmp_path), zeros_like(state(0, n=32)))
    extra = zeros_like(state(0))
    extra["model"]["c"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match="lacks 1 entries.*model.c"):
        load_checkpoint(resolve_checkpoint(tmp_path), extra)


def test_corrupt_incomplete_and_missing(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path / "empty")
    path = save_checkpoint(tmp_path / "run", 1, state(1), {})
    (path / ".metadata").write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path, zeros_like(state(0)))
    path = save_checkpoint(tmp_path / "run2", 1, state(1), {})
    os.remove(path / "__0_0.distcp")
    with pytest.raises(CheckpointError, match="is incomplete: __0_0.distcp is missing"):
        load_checkpoint(path, zeros_like(state(0)))
    (path / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="meta.json is corrupt"):
        read_meta(path)
    (tmp_path / "run2" / "latest").write_text("iter_0000009\n")
    with pytest.raises(CheckpointError, match="points to iter_0000009"):
        resolve_checkpoint(tmp_path / "run2")


def forge_checksums(checkpoint: Path) -> None:
    """What an attacker who crafted a file also does: record its checksum in meta.json."""
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta["checksums"] = {name: checkpoint_files.file_checksum(checkpoint / name) for name in meta["checksums"]}
    (checkpoint / "meta.json").write_text(json.dumps(meta))


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_loading_never_unpickles_arbitrary_objects(tmp_path):
    path = save_checkpoint(tmp_path, 1, state(1), {})
    (path / ".metadata").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(CheckpointError, match=r"\.metadata is corrupt: checksum"):
        load_checkpoint(path, zeros_like(state(0)))
    forge_checksums(path)
    with pytest.raises(CheckpointError, match="refusing to unpickle posix.system|refusing to unpickle os.system"):
        load_checkpoint(path, zeros_like(state(0)))
    # A checkpoint holding a pickled (non-tensor) object is refused before anything is read.
    bad = tmp_path / "objs"
    ck.dcp.save({"x": {"y": 3}}, checkpoint_id=str(bad), no_dist=True)
    (bad / "meta.json").write_text('{"format_version": 1, "step": 0}')
    with pytest.raises(CheckpointError, match="pickled objects"):
        ck.checkpoint_keys(bad)


def test_no_global_reachable_through_the_allowed_modules_is_admitted(tmp_path):
    """Fuzz the metadata unpickler: every attribute of every module it admits anything from, and every
    dotted chain one level deeper (how a crafted pickle reached os.system through an admitted module)."""
    import importlib
    import io

    unpickler = checkpoint_files._SafeUnpickler
    admitted = unpickler._ALLOWED
    tried = refused = 0
    for module_name in sorted({m for m, _ in admitted} | {"torch"}):
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # pathlib._local exists from Python 3.13 on
            continue
        for name in dir(module):
            tried += 1
            expected = (module_name, name) in admitted or isinstance(getattr(module, name), torch.dtype) and (
                module_name == "torch")
            assert unpickler.allowed(module_name, name) == expected, (module_name, name)
            refused += not expected
            inner = getattr(module, name, None)
            if module_name != "torch" and inner is not None:
                for attr in dir(inner)[:50]:
                    tried += 1
                    assert not unpickler.allowed(module_name, f"{name}.{attr}"), (module_name, name, attr)
    assert tried > 1000 and refused > 500
    # The crafted file of the report: STACK_GLOBAL of an admitted module with the name "os.system".
    payload = (b"\x80\x04\x8c\x27torch.distributed.checkpoint.filesystem\x8c\x09os.system\x93"
               b"\x8c\x0eecho pwned\x85R.")
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        unpickler(io.BytesIO(payload)).load()
    path = save_checkpoint(tmp_path, 1, state(1), {})
    (path / ".metadata").write_bytes(payload)
    forge_checksums(path)
    with pytest.raises(CheckpointError, match="refusing to unpickle torch.distributed.checkpoint.filesystem.os"):
        load_checkpoint(path, zeros_like(state(0)))


def test_async_save_stages_a_snapshot_and_publishes_on_wait(tmp_path):
    save_checkpoint(tmp_path, 1, state(1), {})
    live = state(2)
    pending = save_checkpoint(tmp_path, 2, live, {}, async_save=True)
    live["model"]["a.weight"].add_(100.0)  # training goes on while the save is written
    assert resolve_checkpoint(tmp_path).name == "iter_0000001"  # not visible before wait()
    assert pending.wait().name == "iter_0000002" and resolve_checkpoint(tmp_path).name == "iter_0000002"
    target = zeros_like(state(0))
    load_checkpoint(resolve_checkpoint(tmp_path), target)
    assert_equal(target, state(2))


def test_rotation_deletes_only_this_runs_checkpoints_and_latest_stays_inside(tmp_path):
    save_checkpoint(tmp_path, 0, state(0), {})  # e.g. an upcycled model: no run id
    for step in (1, 2):
        save_checkpoint(tmp_path, step, state(step), {"run_id": "other"})
    for step in (3, 4, 5):
        save_checkpoint(tmp_path, step, state(step), {"run_id": "mine"}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == [f"iter_000000{i}" for i in (0, 1, 2, 4, 5)]
    assert resolve_checkpoint(tmp_path).name == "iter_0000005"
    for bad in ("../elsewhere/iter_0000001", "/tmp/iter_0000001", "..", "not_a_checkpoint"):
        (tmp_path / "latest").write_text(bad + "\n")
        with pytest.raises(CheckpointError, match="must name a checkpoint directory"):
            resolve_checkpoint(tmp_path)


def test_text_written_atomically_leaves_the_old_file_and_no_debris_when_the_write_fails(tmp_path, monkeypatch):
    import errno

    target = tmp_path / "eval.json"
    target.write_text("old")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        ck.write_text_atomic(target, "new")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]
