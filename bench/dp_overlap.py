"""How much of the data-parallel gradient reduction is hidden behind backward (2 gloo ranks on CPU).

Three variants of the same engine train step (tp = pp = 1, dp = 2), interleaved in one run:

- overlapped: the engine as it is - FSDP2's ``replicate``, one all-reduce bucket per transformer
  block, launched as soon as that block's backward is done (on the last micro-batch of the step);
- after backward: no data-parallel wrapping; one flat all-reduce of every gradient once backward
  has finished (how the engine reduced before);
- no reduction: the compute alone (the replicas drift apart; only the time matters).

hidden fraction = (t_after - t_overlapped) / (t_after - t_none), the share of the reduction's cost
that overlapping removed from the step (medians over rounds; negative = overlapping cost more than
it hid). On CPU, FSDP2 has no side stream to run a bucket's reduction on: each block's reduction is
waited for inside backward, so nothing can be hidden and the per-bucket work shows as overhead.
On GPUs the reductions run on their own NCCL stream: measure there.

    .venv/bin/python bench/dp_overlap.py [--hidden 256 --layers 4 --rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from megatron_moe.testing import run_distributed


def _flat_allreduce(params) -> None:
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for g, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
        g.copy_(reduced)


def _body(rank: int, world: int, hidden: int, layers: int, steps: int, rounds: int) -> dict:
    import megatron_moe.parallel.engine as engine_mod
    from megatron_moe.config import Config
    from megatron_moe.parallel.engine import ParallelEngine
    from megatron_moe.training.optim import build_optimizer

    cfg = Config()
    m, e, t = cfg.model, cfg.moe, cfg.training
    m.hidden_size, m.num_layers, m.num_attention_heads, m.num_query_groups, m.vocab_size = hidden, layers, 8, 4, 2048
    e.num_experts, e.topk, e.expert_ffn_hidden_size = 8, 2, hidden
    cfg.data.seq_length, t.micro_batch_size, t.global_batch_size = 128, 2, 8  # 2 micro-batches per rank
    g = torch.Generator().manual_seed(rank)
    batches = []
    for _ in range(2):
        tok = torch.randint(0, 2048, (2, 129), generator=g)
        batches.append({"tokens": tok[:, :-1], "labels": tok[:, 1:], "loss_mask": torch.ones(2, 128)})

    real_wrap, real_materialize = engine_mod.apply_data_parallel, engine_mod.materialize_partial_grads
    engines = {}
    for variant in ("overlapped", "after backward", "no reduction"):
        if variant != "overlapped":
            engine_mod.apply_data_parallel = lambda part, *a, **k: part
        if variant == "after backward":
            engine_mod.materialize_partial_grads = lambda params: (real_materialize(params), _flat_allreduce(params))
        engine = ParallelEngine(cfg)
        module = engine.build_model()
        optimizer = build_optimizer(module, cfg.optimizer)
        engines[variant] = (engine, optimizer, engine_mod.materialize_partial_grads)
        engine_mod.apply_data_parallel, engine_mod.materialize_partial_grads = real_wrap, real_materialize

    times = {v: [] for v in engines}
    for r in range(rounds + 1):  # round 0 is warm-up
        for variant, (engine, optimizer, materialize) in engines.items():
            engine_mod.materialize_partial_grads = materialize
            dist.barrier()
            start = time.perf_counter()
            for _ in range(steps):
                engine.train_step(batches, optimizer, 1.0)
            dist.barrier()
            if r:
                times[variant].append((time.perf_counter() - start) / steps)
            engine_mod.materialize_partial_grads = real_materialize
    return {v: statistics.median(ts) for v, ts in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    results = run_distributed(_body, 2, (args.hidden, args.layers, args.steps, args.rounds), timeout=900)[0]
    t_over, t_after, t_none = results["overlapped"], results["after backward"], results["no reduction"]
    print(f"step time, median of {args.rounds} rounds (rank 0), hidden {args.hidden}, {args.layers} layers:")
    for variant, t in results.items():
        print(f"  {variant:<15} {1e3 * t:8.1f} ms")
    cost = t_after - t_none
    hidden = (t_after - t_over) / cost if cost > 0 else float("nan")
    print(f"  reduction cost after backward: {1e3 * cost:.1f} ms; overlapped/after = {t_over / t_after:.2f}x; "
          f"hidden fraction = {hidden:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
