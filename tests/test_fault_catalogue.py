"""The fault catalogue of issue 14: every fault an adversarial user tried, as one parametrised case.

Each case prepares a fault (a crafted, corrupt or missing file, a bad setting, a full disk, a held
save directory, ...) next to a tiny trained run, runs an entry point (``pretrain_moe.main``,
``upcycle_checkpoint.main``, ``export_hf.main``, ``preprocess.main``; in-process, a subprocess where the
process itself matters) and records one outcome:

- ``clean error``: the expected exit code and one stderr line naming what is wrong;
- ``handled``: a fault the project absorbs behaves as documented (a first run on an empty ``--load``
  directory, ``--eval-iters 0`` while training, a SIGKILL inside a save, replaced data files);
- ``traceback``: an exception escaped (a bug in this project);
- ``silent failure``: exit code 0, or another code or message than expected;
- ``data lost``: a file that existed before the run was changed or deleted;
- ``code executed``: a crafted payload ran (it would create a marker file).

The last test prints the counts and asserts the last four are zero. Cases covered elsewhere because
they need a tool or a layout this file does not set up: wandb offline without network
(tests/training/test_metrics.py, under strace), SIGTERM during training
(tests/training/test_resume.py), the index-cache pickle through megatron-core
(tests/data/test_datasets.py), flipped bits in a multi-rank checkpoint
(tests/training/test_checkpoint_files.py).
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import traceback
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest
import xxhash
from torch.distributed.checkpoint.filesystem import FileSystem

import pretrain_moe
import upcycle_checkpoint
from megatron_moe.convert import export_hf
from megatron_moe.data import preprocess
from megatron_moe.training import checkpoint_files
from megatron_moe.training.checkpoint import resolve_checkpoint

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
OUTCOMES = ("clean error", "handled", "traceback", "silent failure", "data lost", "code executed")
BAD = OUTCOMES[2:]
RESULTS: dict[str, str] = {}  # case id -> outcome


@pytest.fixture(scope="module")
def trained(loop_corpus, tmp_path_factory) -> Path:
    """The save directory of a 2-step run (checkpoints at steps 1 and 2), copied by the cases that alter it."""
    run = tmp_path_factory.mktemp("catalogue") / "trained"
    code = pretrain_moe.main(_flags(loop_corpus, run, **{"--train-iters": "2", "--save-interval": "1"}))
    assert code == 0 and resolve_checkpoint(run).name == "iter_0000002"
    return run


def _flags(corpus: dict, save: Path, **change: str | None) -> list[str]:
    flags = {"--num-layers": "2", "--hidden-size": "32", "--num-attention-heads": "4", "--num-experts": "4",
             "--moe-ffn-hidden-size": "32", "--seq-length": "16", "--micro-batch-size": "2",
             "--global-batch-size": "2", "--train-iters": "1", "--eval-interval": "0", "--training.device": "cpu",
             "--vocab-size": "512", "--data-path": corpus["prefix"], "--tokenizer-model": corpus["tokenizer"],
             "--split": "90,10,0", "--data.cache_dir": str(corpus["root"] / "cache"), "--save": str(save)}
    flags.update(change)
    argv: list[str] = []
    for flag, value in flags.items():
        if value != "<drop>":
            argv += [flag] if value is None else [flag, value]
    return argv


@dataclass
class Env:
    """What a case may use: its own directory, the corpus, a copy of the trained run on request."""

    tmp: Path
    corpus: dict
    trained: Path
    monkeypatch: pytest.MonkeyPatch

    @property
    def marker(self) -> Path:
        return self.tmp / "PWNED"

    def run_copy(self) -> Path:
        copy = self.tmp / "run"
        if not copy.exists():
            shutil.copytree(self.trained, copy, ignore=shutil.ignore_patterns(".run.lock"))
        return copy

    def ckpt(self) -> Path:
        return resolve_checkpoint(self.run_copy())

    def flags(self, **change: str | None) -> list[str]:
        return _flags(self.corpus, self.tmp / "new_run", **change)

    def resume(self, **change: str | None) -> list[str]:
        run = self.run_copy()
        return _flags(self.corpus, run, **{"--load": str(run), "--train-iters": "3", **change})


# --------------------------------------------------------------------------------------- fault makers
def _forge_checksums(checkpoint: Path) -> None:
    """What an attacker who crafts a file also does: record its checksum in meta.json."""
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta["checksums"] = {n: checkpoint_files.file_checksum(checkpoint / n) for n in meta["checksums"]}
    (checkpoint / "meta.json").write_text(json.dumps(meta))


def _crafted_metadata(env: Env) -> Path:
    """The report's payload: a STACK_GLOBAL of an admitted module with the name ``os.system``."""
    ckpt = env.ckpt()
    command = f"touch {env.marker}".encode()
    module = b"torch.distributed.checkpoint.filesystem"
    payload = (b"\x80\x04\x8c" + bytes([len(module)]) + module + b"\x8c\x09os.system\x93\x8c"
               + bytes([len(command)]) + command + b"\x85R.")
    (ckpt / ".metadata").write_bytes(payload)
    _forge_checksums(ckpt)
    return ckpt


class _Boom:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _as_dense(ckpt: Path) -> None:
    """meta.json claims a dense model (it is the attacker's file too), so upcycling reads the .metadata."""
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["config"]["moe"]["num_experts"] = 0
    (ckpt / "meta.json").write_text(json.dumps(meta))


def _flip(path: Path, position: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(position * (len(data) - 1))] ^= 0x04
    path.write_bytes(bytes(data))


def _edit_meta(ckpt: Path, **fields) -> None:
    meta = json.loads((ckpt / "meta.json").read_text())
    meta.update(fields)
    (ckpt / "meta.json").write_text(json.dumps(meta))


@contextmanager
def _full_disk_after(room: int):
    """Every file DCP writes takes ``room`` bytes, then fails with ENOSPC (as a full disk does)."""
    real = FileSystem.create_stream

    class Full(io.RawIOBase):
        def __init__(self, raw):
            super().__init__()
            self.raw, self.left = raw, room

        def writable(self):
            return True

        def write(self, b):
            size = memoryview(b).nbytes
            if size > self.left:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.left -= size
            return self.raw.write(b)

        def tell(self):
            return self.raw.tell()

        def fileno(self):
            return self.raw.fileno()

    @contextmanager
    def create_stream(self, path, mode):
        with real(self, path, mode) as raw:
            yield Full(raw) if "w" in mode else raw

    FileSystem.create_stream = create_stream
    try:
        yield
    finally:
        FileSystem.create_stream = real


# ------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    """``prepare(env)`` alters files and returns the argv; ``entry`` names the entry point; the run must
    exit with ``code`` and stderr must match ``message`` (a regex; its first line is checked)."""

    id: str
    group: str
    prepare: Callable[[Env], list[str]]
    code: int
    message: str | None  # None: the run succeeds (exit 0, nothing on stderr)
    entry: str = "pretrain"
    around: Callable[[Env], object] | None = None  # a context manager active during the run


def _pre(kind: str, needle: str) -> str:
    return rf"{kind} error: .*{needle}"


def _dense_moe(env: Env) -> list[str]:
    return env.flags(**{"--num-experts": "0", "--moe-ffn-hidden-size": "<drop>", "--moe.router": "sparsemixer"})


def _upcycle(env: Env, source: Path, fmt: str, output: Path) -> list[str]:
    return ["--input", str(source), "--input-format", fmt, "--output", str(output), "--num-experts", "4",
            "--moe-router-topk", "2"]


def _dense_hf(env: Env) -> Path:
    """A tiny random Llama model in HF format (transformers builds it offline)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    path = env.tmp / "hf"
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return path


def _corrupt_safetensors(env: Env) -> list[str]:
    path = _dense_hf(env)
    (path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    return _upcycle(env, path, "hf", env.tmp / "up")


def _bin_of_another_size(env: Env) -> list[str]:
    prefix = _data_copy(env)
    with open(prefix + ".bin", "ab") as f:
        f.write(b"\x00" * 64)
    return env.flags(**{"--data-path": prefix, "--data.cache_dir": str(env.tmp / "cache")})


def _other_tokenizer_data(env: Env) -> list[str]:
    prefix = _data_copy(env)
    record = json.loads(Path(prefix + ".tokenizer.json").read_text())
    record["model_sha256"] = "0" * 64
    Path(prefix + ".tokenizer.json").write_text(json.dumps(record))
    return env.flags(**{"--data-path": prefix, "--data.cache_dir": str(env.tmp / "cache")})


def _token_ids_beyond_vocab(env: Env) -> list[str]:
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(env.tmp / "big_ids")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for _ in range(40):
        builder.add_document(np.full(40, 5000, dtype=np.int32), [40])
    builder.finalize(prefix + ".idx")
    return env.flags(**{"--data-path": prefix, "--data.cache_dir": str(env.tmp / "cache")})


def _data_copy(env: Env) -> str:
    """A copy of the corpus files (its prefix) in the case's directory."""
    data = env.tmp / "data"
    shutil.copytree(Path(env.corpus["prefix"]).parent, data, ignore=shutil.ignore_patterns("index-cache", "cache"))
    return str(data / Path(env.corpus["prefix"]).name)


def _pickled_index_cache(env: Env) -> list[str]:
    """The report's file: a pickle named .npy in the index cache megatron-core reads."""
    cache = env.tmp / "cache"
    shutil.copytree(Path(env.corpus["root"]) / "cache", cache)
    sorted(cache.rglob("*.npy"))[0].write_bytes(pickle.dumps(_Boom(env.marker)))
    return env.flags(**{"--data.cache_dir": str(cache)})


def _replaced_data_files(env: Env) -> list[str]:
    """Data files replaced (same path, other contents) after a run built its index cache: a new cache."""
    prefix, cache = _data_copy(env), env.tmp / "cache"
    argv = env.flags(**{"--data-path": prefix, "--data.cache_dir": str(cache)})
    assert _run("pretrain", argv)[0] == 0
    first = {p.parent for p in cache.rglob("*.npy")}
    shutil.copy(env.corpus["prefix"] + ".bin", prefix + ".bin")  # same bytes, new modification time
    os.utime(prefix + ".bin", (1, 1))
    shutil.rmtree(env.tmp / "new_run")
    assert _run("pretrain", argv)[0] == 0
    assert {p.parent for p in cache.rglob("*.npy")} - first, "the old index cache was reused"
    shutil.rmtree(env.tmp / "new_run")
    return argv


def _non_utf8(env: Env) -> list[str]:
    path = env.tmp / "bad.txt"
    path.write_bytes(b"fine\nbad \xff byte\n")
    return ["--input", str(path), "--output-prefix", str(env.tmp / "out"), "--tokenizer-model",
            env.corpus["tokenizer"]]


def _bad_toml(env: Env) -> list[str]:
    (env.tmp / "bad.toml").write_text("[model\nhidden_size = ")
    return env.flags(**{"--config": str(env.tmp / "bad.toml")})


def _held_save_dir(env: Env):
    from megatron_moe.training.checkpointing import _lock

    @contextmanager
    def held():
        handle = _lock(env.run_copy())
        try:
            yield
        finally:
            handle.close()

    return held()


def _oom_at_build(env: Env):
    import torch

    from megatron_moe.parallel.engine import ParallelEngine

    def build_model(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    env.monkeypatch.setattr(ParallelEngine, "build_model", build_model)
    return _nothing()


def _bare_memory_error_at_build(env: Env):
    from megatron_moe.parallel.engine import ParallelEngine

    def build_model(self, *args, **kwargs):
        raise MemoryError

    env.monkeypatch.setattr(ParallelEngine, "build_model", build_model)
    return _nothing()


def _ctrl_c_in_training(env: Env):
    from megatron_moe.training import trainer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    env.monkeypatch.setattr(trainer.Trainer, "_train", interrupted)
    return _nothing()


def _background_save_error(env: Env):
    def refuse(self, plan, planner):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(Path(self.path) / "__0_0.distcp"))

    env.monkeypatch.setattr(checkpoint_files.ChecksummingWriter, "write_data", refuse)
    return _nothing()


@contextmanager
def _nothing():
    yield


def _huge_metadata_length(env: Env) -> list[str]:
    ckpt = env.ckpt()
    (ckpt / ".metadata").write_bytes(b"\x80\x04\x8e" + (2**62).to_bytes(8, "little") + b"x")  # BINBYTES8
    _forge_checksums(ckpt)
    return env.resume()


def _pickled_boom(env: Env) -> list[str]:
    ckpt = env.ckpt()
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Boom(env.marker)))
    _forge_checksums(ckpt)
    return env.resume()


CASES = [
    # ---- code execution: a crafted .metadata through each entry point that loads checkpoints
    Case("crafted-metadata --load", "code execution", lambda e: (_crafted_metadata(e), e.resume())[1], 3,
         _pre("checkpoint", "refusing to unpickle torch.distributed.checkpoint.filesystem.os")),
    Case("crafted-metadata --eval-only", "code execution",
         lambda e: (_crafted_metadata(e), e.flags(**{"--load": str(e.run_copy()), "--eval-only": None}))[1], 3,
         _pre("checkpoint", "refusing to unpickle")),
    Case("crafted-metadata export_hf --load", "code execution",
         lambda e: (_crafted_metadata(e), ["--load", str(e.run_copy()), "--output", str(e.tmp / "hf")])[1], 2,
         "error: .*refusing to unpickle", entry="export"),
    Case("crafted-metadata upcycle --input-format native", "code execution",
         lambda e: (_as_dense(_crafted_metadata(e)), _upcycle(e, e.run_copy(), "native", e.tmp / "up"))[1], 2,
         "error: .*refusing to unpickle", entry="upcycle"),
    Case("pickled os.system object as .metadata", "code execution", _pickled_boom, 3,
         _pre("checkpoint", "refusing to unpickle (os|posix).system")),
    Case("pickle in the dataset index cache", "code execution", _pickled_index_cache, 4,
         _pre("data", r"index cache file .*\.npy is not a valid \.npy file")),
    # ---- data lost
    Case("new run into another run's --save", "data lost", lambda e: _flags(e.corpus, e.run_copy()), 3,
         _pre("checkpoint", "already holds checkpoints of a run")),
    Case("second run while the first holds --save", "data lost",
         lambda e: e.resume(), 3, _pre("checkpoint", r"in use by another run \(\{\"pid\""), around=_held_save_dir),
    Case("upcycle --output into a training run", "data lost",
         lambda e: _upcycle(e, _dense_hf(e), "hf", e.run_copy()), 2, "error: .*not empty", entry="upcycle"),
    Case("export --output into a non-empty directory", "data lost",
         lambda e: ["--load", str(e.trained), "--output", str(e.run_copy())], 2, "error: .*not empty", entry="export"),
    Case("full disk during a save", "data lost", lambda e: e.resume(), 6,
         r"disk full error: \[Errno 28\] no space left on device while writing checkpoint iter_0000003 .*the "
         r"previous checkpoint and 'latest' are unchanged", around=lambda e: _full_disk_after(2000)),
    Case("full disk during an async save", "data lost", lambda e: e.resume(**{"--async-save": None}), 6,
         r"disk full error: .*no space left on device while writing checkpoint iter_0000003",
         around=lambda e: _full_disk_after(2000)),
    Case("error in DCP's background save thread", "data lost",
         lambda e: e.resume(**{"--async-save": None}), 3,
         _pre("checkpoint", r"writing checkpoint .*iter_0000003 failed \(Permission denied"),
         around=_background_save_error),
    # ---- silent wrong results (now errors)
    Case("flipped bit in a shard", "silent",
         lambda e: (_flip(e.ckpt() / "__0_0.distcp"), e.resume())[1], 3,
         _pre("checkpoint", r"__0_0.distcp is corrupt: checksum")),
    Case("flipped bit in .metadata", "silent",
         lambda e: (_flip(e.ckpt() / ".metadata"), e.resume())[1], 3,
         _pre("checkpoint", r"\.metadata is corrupt: checksum")),
    Case("flipped bit at the start of a shard", "silent",
         lambda e: (_flip(e.ckpt() / "__0_0.distcp", 0.0), e.resume())[1], 3,
         _pre("checkpoint", r"__0_0.distcp is corrupt: checksum")),
    Case(".bin of another size than its .idx", "silent", _bin_of_another_size, 4, _pre("data", r"\.bin")),
    Case(".bin tokenised with another tokenizer", "silent", _other_tokenizer_data, 4, _pre("data", "tokenizer")),
    Case("--clip-grad nan", "silent", lambda e: e.flags(**{"--clip-grad": "nan"}), 2,
         _pre("configuration", "optimizer.clip_grad = nan")),
    Case("MoE-only settings on a dense model", "silent", _dense_moe, 2, _pre("configuration", "moe")),
    Case("resume at step 2 with --train-iters 1", "silent", lambda e: e.resume(**{"--train-iters": "1"}), 2,
         _pre("configuration", "beyond training.train_iters = 1")),
    Case("--expert-noise nan (upcycle)", "silent",
         lambda e: _upcycle(e, _dense_hf(e), "hf", e.tmp / "up") + ["--expert-noise", "nan"], 2, "error: .*noise",
         entry="upcycle"),
    Case("--router-init-std inf --verify (upcycle)", "silent",
         lambda e: _upcycle(e, _dense_hf(e), "hf", e.tmp / "up") + ["--router-init-std", "inf", "--verify"], 2,
         "error: .*router_init_std|error: .*router-init-std", entry="upcycle"),
    Case("latest pointing outside the save directory", "silent",
         lambda e: ((e.run_copy() / "latest").write_text("../../elsewhere/iter_0000002\n"), e.resume())[1], 3,
         _pre("checkpoint", "must name a checkpoint directory")),
    Case("meta.json step disagreeing with the tensors", "silent",
         lambda e: (_edit_meta(e.ckpt(), step=1), e.resume())[1], 3,
         _pre("checkpoint", "meta.json says step 1 but its tensors hold step 2")),
    Case("--weight-decay inf", "silent", lambda e: e.flags(**{"--weight-decay": "inf"}), 2,
         _pre("configuration", "weight_decay = inf")),
    Case("--moe-aux-loss-coeff nan", "silent", lambda e: e.flags(**{"--moe-aux-loss-coeff": "nan"}), 2,
         _pre("configuration", "nan")),
    # ---- tracebacks (now one line)
    Case("corrupt .metadata (garbage)", "traceback",
         lambda e: ((e.ckpt() / ".metadata").write_bytes(b"\x80\x04garbage"), e.resume())[1], 3,
         _pre("checkpoint", r"\.metadata is corrupt")),
    Case("corrupt .metadata (huge length: MemoryError)", "traceback", _huge_metadata_length, 3,
         _pre("checkpoint", r"\.metadata is corrupt or not a DCP checkpoint")),
    Case("truncated shard", "traceback",
         lambda e: (os.truncate(e.ckpt() / "__0_0.distcp", 100), e.resume())[1], 3,
         _pre("checkpoint", "__0_0.distcp is corrupt")),
    Case("missing shard", "traceback", lambda e: (os.remove(e.ckpt() / "__0_0.distcp"), e.resume())[1], 3,
         _pre("checkpoint", "__0_0.distcp is missing")),
    Case("corrupt meta.json", "traceback",
         lambda e: ((e.ckpt() / "meta.json").write_text("{not json"), e.resume())[1], 3,
         _pre("checkpoint", "meta.json is corrupt")),
    Case("meta.json from a newer format", "traceback",
         lambda e: (_edit_meta(e.ckpt(), format_version=99), e.resume())[1], 3,
         _pre("checkpoint", "format version 99")),
    Case("latest names a missing checkpoint", "traceback",
         lambda e: ((e.run_copy() / "latest").write_text("iter_0000009\n"), e.resume())[1], 3,
         _pre("checkpoint", "points to iter_0000009")),
    Case("--load of a directory holding something else", "traceback",
         lambda e: ((e.tmp / "notes").mkdir(), (e.tmp / "notes" / "a.txt").write_text("x"),
                    e.flags(**{"--load": str(e.tmp / "notes")}))[2], 3, _pre("checkpoint", "notes")),
    Case("resume with another model shape", "traceback", lambda e: e.resume(**{"--hidden-size": "64"}), 3,
         _pre("checkpoint", "model.hidden_size: checkpoint 32, config 64")),
    Case("--eval-iters 0 while training (validation off)", "traceback",
         lambda e: e.flags(**{"--eval-iters": "0", "--eval-interval": "1"}), 0, None),
    Case("data files replaced under an old index cache", "silent", _replaced_data_files, 0, None),
    Case("--eval-only without --load", "traceback", lambda e: e.flags(**{"--eval-only": None}), 2,
         _pre("configuration", "--eval-only needs a checkpoint")),
    Case("--eval-iters 0 with --eval-only", "traceback",
         lambda e: e.flags(**{"--eval-iters": "0", "--eval-only": None, "--load": str(e.trained)}), 2,
         _pre("configuration", "evaluates nothing")),
    Case("--lr nan", "traceback", lambda e: e.flags(**{"--lr": "nan"}), 2, _pre("configuration", "optimizer.lr = nan")),
    Case("--lr inf", "traceback", lambda e: e.flags(**{"--lr": "inf"}), 2, _pre("configuration", "optimizer.lr = inf")),
    Case("tokenizer missing (demo data not built)", "traceback",
         lambda e: e.flags(**{"--tokenizer-model": str(e.tmp / "tok.model")}), 4, _pre("data", "tok.model")),
    Case("data prefix missing", "traceback", lambda e: e.flags(**{"--data-path": str(e.tmp / "nothing")}), 4,
         _pre("data", "nothing")),
    Case("token id >= vocabulary", "traceback", _token_ids_beyond_vocab, 4, _pre("data", "5000")),
    Case("vocab size below the tokenizer's", "traceback", lambda e: e.flags(**{"--vocab-size": "64"}), 2,
         _pre("configuration", "model.vocab_size = 64 is smaller")),
    Case("unknown flag", "traceback", lambda e: e.flags(**{"--no-such-flag": "1"}), 2,
         _pre("configuration", "no-such-flag")),
    Case("malformed --config TOML", "traceback", _bad_toml, 2, _pre("configuration", "bad.toml")),
    Case("missing --config file", "traceback", lambda e: e.flags(**{"--config": str(e.tmp / "none.toml")}), 2,
         _pre("configuration", "none.toml")),
    Case("unreadable model.safetensors (upcycle)", "traceback", _corrupt_safetensors, 2,
         "error: .*model.safetensors", entry="upcycle"),
    Case("non-UTF-8 input to preprocessing", "traceback", _non_utf8, 4, r"data error: .*bad.txt:2", entry="preprocess"),
    Case("out of memory at build", "traceback", lambda e: e.flags(), 7, r"out of memory error: CUDA out of memory",
         around=_oom_at_build),
    Case("bare MemoryError at build", "traceback", lambda e: e.flags(), 7,
         r"out of memory error: MemoryError \(the model",
         around=_bare_memory_error_at_build),
    Case("Ctrl-C during training", "traceback", lambda e: e.flags(), 130, r"interrupted error",
         around=_ctrl_c_in_training),
]

ENTRY_POINTS = {"pretrain": pretrain_moe.main, "upcycle": upcycle_checkpoint.main, "export": export_hf.main,
                "preprocess": preprocess.main}


def _digest(root: Path) -> dict[str, tuple[int, str]]:
    """Size and hash of every file under ``root`` (run locks excepted)."""
    return {str(p.relative_to(root)): (p.stat().st_size, xxhash.xxh3_64(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".run.lock"}


def _lost(before: dict[str, tuple[int, str]], root: Path) -> list[str]:
    """Files of ``before`` deleted or changed (appending to a log such as metrics.jsonl changes nothing)."""
    lost = []
    for name, (size, digest) in before.items():
        path = root / name
        if not path.is_file():
            lost.append(name)
            continue
        with open(path, "rb") as f:
            if xxhash.xxh3_64(f.read(size)).hexdigest() != digest:
                lost.append(name)
    return lost


def _run(entry: str, argv: list[str]) -> tuple[int | None, str]:
    """(exit code, stderr) of an entry point run in-process; (None, traceback) if an exception escaped."""
    err, out = io.StringIO(), io.StringIO()
    try:
        with redirect_stderr(err), redirect_stdout(out):
            code = ENTRY_POINTS[entry](argv)
    except SystemExit as e:  # argparse
        code = e.code if isinstance(e.code, int) else 2
    except BaseException:  # noqa: BLE001 - that is the traceback outcome
        return None, err.getvalue() + traceback.format_exc()
    return code, err.getvalue()


def _outcome(case: Case, code: int | None, stderr: str, lost: list[str], executed: bool) -> str:
    import re

    if executed:
        return "code executed"
    if lost:
        return "data lost"
    if code is None or "Traceback" in stderr:
        return "traceback"
    lines = [ln for ln in stderr.strip().splitlines() if not ln.startswith(("note:", "warning:"))]
    if case.message is None:  # the fault is absorbed: success, nothing on stderr
        return "handled" if code == case.code == 0 and not lines else "silent failure"
    if code != case.code or len(lines) != 1 or not re.search(case.message, lines[0]):
        return "silent failure"
    return "clean error"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fault(case: Case, loop_corpus, trained, tmp_path, monkeypatch):
    env = Env(tmp_path, loop_corpus, trained, monkeypatch)
    argv = case.prepare(env)
    before = _digest(tmp_path)
    trained_before = _digest(trained)
    with case.around(env) if case.around else _nothing():
        code, stderr = _run(case.entry, argv)
    lost = _lost(before, tmp_path) + _lost(trained_before, trained)
    RESULTS[case.id] = outcome = _outcome(case, code, stderr, lost, env.marker.exists())
    expected = "handled" if case.message is None else "clean error"
    assert outcome == expected, (f"{case.id}: {outcome}; exit {code} (want {case.code}); lost {lost}\n"
                                      f"stderr: {stderr[-3000:]}")


def test_first_run_on_an_empty_load_directory_starts_from_scratch(loop_corpus, tmp_path):
    """Megatron-LM's first run, --save X --load X with X empty: not an error (a warning)."""
    argv = _flags(loop_corpus, tmp_path / "run", **{"--load": str(tmp_path / "run")})
    code, stderr = _run("pretrain", argv)
    RESULTS["empty --load starts from scratch"] = "handled" if code == 0 else (
        "traceback" if code is None else "silent failure")
    assert code == 0, stderr


_KILL = """
import sys, time
from torch.distributed.checkpoint.filesystem import FileSystemWriter
real = FileSystemWriter.write_data
def write_data(self, *args, **kwargs):
    fut = real(self, *args, **kwargs)
    print("blocked inside the shard write", file=sys.stderr, flush=True)
    time.sleep(600)
FileSystemWriter.write_data = write_data
import pretrain_moe
sys.exit(pretrain_moe.main(sys.argv[1:]))
"""


def test_sigkill_inside_a_training_save_keeps_latest(loop_corpus, trained, tmp_path):
    """A subprocess run resumed from the trained run is killed while provably inside its save."""
    run = tmp_path / "run"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns(".run.lock"))
    before = _digest(run)
    argv = _flags(loop_corpus, run, **{"--load": str(run), "--train-iters": "3"})
    proc = subprocess.Popen([sys.executable, "-c", _KILL, *argv], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        blocked = any("blocked inside the shard write" in line for line in iter(proc.stderr.readline, ""))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    lost = _lost(before, run)
    code, stderr = _run("pretrain", argv)  # the next run resumes from the last published checkpoint
    ok = blocked and not lost and code == 0 and resolve_checkpoint(run).name == "iter_0000003"
    RESULTS["SIGKILL inside a save"] = "handled" if ok else ("data lost" if lost else "silent failure")
    assert ok, (blocked, lost, code, stderr)


def test_a_real_full_disk(loop_corpus, trained, tmp_path):
    """A run resumed on a tmpfs with room for little more than the run it resumes: its save fills it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    room = sum(p.stat().st_size for p in trained.rglob("*") if p.is_file()) + (256 << 10)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={room}", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        run = disk / "run"
        shutil.copytree(trained, run, ignore=shutil.ignore_patterns(".run.lock"))
        before = _digest(run)
        code, stderr = _run("pretrain", _flags(loop_corpus, run, **{"--load": str(run), "--train-iters": "3"}))
        lines = [ln for ln in stderr.strip().splitlines() if not ln.startswith(("note:", "warning:"))]
        lost = _lost(before, run)
        ok = (code == 6 and len(lines) == 1 and lines[0].startswith("disk full error: ")
              and resolve_checkpoint(run).name == "iter_0000002")
        RESULTS["full tmpfs"] = "data lost" if lost else (
            "traceback" if code is None else "clean error" if ok else "silent failure")
        assert ok and not lost, (code, lost, stderr[-3000:])
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_catalogue_counts():
    """The counts of issue 14's closing note: cases, clean errors, tracebacks, silent failures, data lost,
    code executed (the last four must be zero)."""
    counts = Counter(RESULTS.values())
    line = f"fault catalogue: {len(RESULTS)} cases; " + ", ".join(f"{counts[o]} {o}" for o in OUTCOMES)
    print("\n" + line)
    assert len(RESULTS) >= min(len(CASES), 1), line
    assert all(counts[o] == 0 for o in BAD), line
