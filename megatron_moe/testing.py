"""Helpers for multi-process tests: spawn real ranks with the gloo backend on CPU.

Usage (OLMo-core's pattern)::

    def _body(rank, world_size, x):
        ...  # torch.distributed is initialised here, backend gloo
    run_distributed(_body, world_size=2, args=(x,))

Exceptions raised in any rank are re-raised in the caller with the rank's traceback.

Ranks are forked from a fork server that has imported torch and this package once (Python's
``forkserver`` start method with preloading): a fresh interpreter per rank would import them again
each time, 10-15 s of CPU per rank, most of a short test. The server only imports; it runs no
torch work, so forking it is safe. Each rank gets the caller's environment as it is at the call.
"""

from __future__ import annotations

import io
import os
import queue as queue_module
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on localhost that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Imported once by the fork server: what the ranks of the tests and benchmarks use.
_PRELOAD = ["megatron_moe.training.trainer"]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue,
            environ: dict[str, str]) -> None:
    os.environ.clear()
    os.environ.update(environ)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        # Serialise here: tensors sent through a multiprocessing queue live in shared memory that
        # disappears when this process exits before the parent has read them.
        buffer = io.BytesIO()
        torch.save(result, buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int = 2, args: tuple = (), timeout: float = 240.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes; return their results.

    ``fn`` must be importable (a module-level function) and its result picklable.
    Raises RuntimeError naming the failing rank with its traceback.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # takes effect when the server starts (the first call)
    queue = ctx.Queue()
    port = free_port()
    environ = dict(os.environ)
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, environ))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    # Drain the queue before joining: a child blocks on a full pipe until its result is read.
    for _ in range(world_size):
        try:
            rank, status, payload = queue.get(timeout=timeout)
        except queue_module.Empty:
            errors.append(f"no result from some rank within {timeout}s")
            break
        if status == "ok":
            results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        else:
            errors.append(f"rank {rank} failed:\n{payload}")
            break
    for p in procs:
        p.join(5 if errors else timeout)
        if p.is_alive():
            p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    missing = [r for r in range(world_size) if r not in results]
    if missing:
        raise RuntimeError(f"ranks {missing} exited without a result (exit codes {[p.exitcode for p in procs]})")
    return [results[r] for r in range(world_size)]
