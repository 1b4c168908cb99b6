"""How much of the global-load-balancing counts all-reduce is hidden behind the expert computation.

Two gloo ranks on CPU run one MoE layer (global-scope Switch balance loss, the balance group = both
ranks) forward + backward, alternating two variants in the same run:

- overlapped: the layer as written (async all-reduce launched right after routing, waited on when
  the balance loss is formed, after the grouped expert GEMMs);
- synchronous: the same layer with the all-reduce waited on right after its launch.

It also times the bare all-reduce of the counts (the cost that could be hidden). Prints median wall
times, their ratio and the hidden fraction = median over iterations of (t_sync - t_overlap), divided
by the bare all-reduce time (clamped to [0, 1]).

    .venv/bin/python bench/global_balance_overlap.py [--tokens 512 --hidden 128 --ffn 256 \
        --experts 16 --iters 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

import megatron_moe.model.moe as moe_module
from megatron_moe.config import MoEConfig
from megatron_moe.model.moe import MoELayer
from megatron_moe.routing.balance import AsyncAllReduce
from megatron_moe.testing import run_distributed


class _SyncAllReduce:
    """Drop-in for AsyncAllReduce whose ``start`` waits immediately (forces the collective synchronous)."""

    @staticmethod
    def start(tensor, group):
        done = AsyncAllReduce.start(tensor, group).wait()

        class _Done:
            @staticmethod
            def wait():
                return done

        return _Done()


def _bench(rank, world, args):
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=args.experts, topk=2, balance_scope="global", aux_loss_coeff=0.01)
    layer = MoELayer(args.hidden, args.ffn, cfg)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.02)
    layer.set_balance_group(dist.group.WORLD)
    x = torch.randn(args.tokens, args.hidden, generator=torch.Generator().manual_seed(rank))

    def step():
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        layer(xi).sum().backward()
        layer.pop_stats()

    def timed(fn):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    counts = torch.zeros(args.experts)

    def allreduce_only():
        dist.all_reduce(counts.clone())

    for _ in range(args.warmup):
        step()
    times = {"overlapped": [], "synchronous": [], "allreduce": []}
    for _ in range(args.iters):
        moe_module.AsyncAllReduce = AsyncAllReduce
        times["overlapped"].append(timed(step))
        moe_module.AsyncAllReduce = _SyncAllReduce
        times["synchronous"].append(timed(step))
        times["allreduce"].append(timed(allreduce_only))
    moe_module.AsyncAllReduce = AsyncAllReduce
    out = {k: statistics.median(v) for k, v in times.items()}
    # Paired per-iteration difference: robust to slow drifts of a shared machine.
    out["saved"] = statistics.median(
        s - o for s, o in zip(times["synchronous"], times["overlapped"], strict=True)
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=512, help="tokens per rank")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--ffn", type=int, default=256, help="expert ffn width")
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    res = run_distributed(_bench, 2, (args,), timeout=900)[0]
    over, sync, ar = res["overlapped"], res["synchronous"], res["allreduce"]
    saved = res["saved"]
    hidden = min(1.0, max(0.0, saved / ar)) if ar > 0 else 0.0
    print(
        f"MoE fwd+bwd, 2 gloo ranks, {args.tokens} tokens/rank, hidden {args.hidden}, ffn {args.ffn}, "
        f"{args.experts} experts top-2 (medians of {args.iters})"
    )
    print(f"  overlapped (async counts all-reduce): {over * 1e3:8.3f} ms")
    print(f"  synchronous (wait right after launch): {sync * 1e3:8.3f} ms")
    print(f"  bare counts all-reduce:               {ar * 1e3:8.3f} ms")
    print(f"  median paired saving (sync - overlapped): {saved * 1e3:8.3f} ms")
    print(f"  ratio synchronous / overlapped: {sync / over:.3f}")
    print(f"  hidden fraction of the all-reduce: {hidden:.2f}")


if __name__ == "__main__":
    main()
