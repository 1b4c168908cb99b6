"""What checkpoint checksums cost: hash throughput, and save/load time with and without them.

A state of ``--gib`` GiB of float32 tensors (``--tensor-mib`` each) is saved and loaded with DCP's own
``FileSystemWriter``/``FileSystemReader`` and with this project's checksumming writer and verifying
reader (:mod:`megatron_moe.training.checkpoint_files`), back to back, ``--rounds`` times (the order
alternating, dirty pages flushed before each); the figure is the median over rounds of the paired
ratio, wall-clock and CPU time (on a busy machine the wall-clock figures are noise; CPU time
counts the hashing threads too, so it bounds the overhead from above). Files stay in the page cache,
so this is the worst case for the overhead (a disk-bound save or load hides hashing behind the disk).

    .venv/bin/python bench/checkpoint_checksum.py [--gib 1.5 --tensor-mib 64 --rounds 3 --dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
import warnings
import zlib
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import xxhash
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

from megatron_moe.training.checkpoint_files import ChecksummingWriter, SafeFileSystemReader, collect_checksums

warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def _throughput(fn, data: memoryview) -> float:
    start = time.perf_counter()
    fn(data)
    return len(data) / (time.perf_counter() - start) / 1e9


def _timed(fn, *args, **kwargs) -> tuple[float, float]:
    """Wall-clock and CPU seconds (all threads of this process) of ``fn(*args, **kwargs)``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*args, **kwargs)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.5)
    parser.add_argument("--tensor-mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()

    block = memoryview(torch.randn((64 << 20) // 4).numpy().tobytes())
    print(f"hash throughput on 64 MiB: xxh3_64 {_throughput(xxhash.xxh3_64, block):.2f} GB/s, "
          f"zlib.crc32 {_throughput(zlib.crc32, block):.2f} GB/s")

    numel = (args.tensor_mib << 20) // 4
    count = max(1, round(args.gib * 1024 / args.tensor_mib))
    state = {"model": {f"w{i}": torch.randn(numel) for i in range(count)}}
    target = {"model": {k: torch.empty_like(v) for k, v in state["model"].items()}}
    gib = count * args.tensor_mib / 1024
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="ckpt_bench_"))
    kinds = ("save plain", "save checksummed", "load plain", "load verified")
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
    try:
        for round_ in range(args.rounds):
            # The order alternates between rounds and dirty pages are flushed before every timed
            # operation, so neither variant pays for the other's writeback.
            order = ("plain", "checksummed") if round_ % 2 == 0 else ("checksummed", "plain")
            for kind in order:
                path = root / kind
                shutil.rmtree(path, ignore_errors=True)
                writer = FileSystemWriter(path) if kind == "plain" else ChecksummingWriter(path)
                os.sync()
                times[f"save {kind}"].append(_timed(dcp.save, state, storage_writer=writer, no_dist=True))
            checksums = collect_checksums(root / "checksummed")
            for kind in ("plain", "verified") if round_ % 2 == 0 else ("verified", "plain"):
                reader = (FileSystemReader(root / "plain") if kind == "plain"
                          else SafeFileSystemReader(root / "checksummed", checksums))
                os.sync()
                times[f"load {kind}"].append(_timed(dcp.load, target, storage_reader=reader, no_dist=True))
        assert all(torch.equal(target["model"][k], v) for k, v in state["model"].items())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    wall = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
    print(json.dumps({"gib": round(gib, 2), "rounds": args.rounds,
                      **{f"{k} s (wall, cpu)": [round(wall[k], 3), round(cpu[k], 3)] for k in times}}))
    for op, ours in (("save", "checksummed"), ("load", "verified")):
        # Per round: ours / plain measured back to back; the median of those ratios is the figure.
        ratios = [(a[0] / b[0], a[1] / b[1]) for a, b in zip(times[f"{op} {ours}"], times[f"{op} plain"], strict=True)]
        print(f"{op} overhead (median of {len(ratios)} paired rounds): "
              f"wall {100 * (statistics.median(r for r, _ in ratios) - 1):+.1f} %, "
              f"cpu {100 * (statistics.median(c for _, c in ratios) - 1):+.1f} %; "
              f"rounds: {', '.join(f'{100 * (r - 1):+.0f}' for r, _ in ratios)} % wall")

if __name__ == "__main__":
    main()
