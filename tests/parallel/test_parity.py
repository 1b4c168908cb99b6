"""Loss / gradient parity of every (tp, pp, dp) layout with the single-process run (real gloo ranks).

One spawn per world size runs every variant of every layout of that size (both routers, 1F1B and
interleaved 1F1B when pp > 1, plus a few layout-specific extras); the single-process references are
computed once in the parent. Tolerances and their justification: tests/parallel/helpers.py.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
import torch.distributed as dist

from megatron_moe.config import ParallelConfig
from megatron_moe.testing import run_distributed
from tests.builders import tiny_config
from tests.parallel.helpers import LOSS_RTOL, PARAM_ATOL, compare, make_batches, run_steps

STEP_BATCHES = [make_batches(seed=0), make_batches(seed=1)]
GLOBAL_BALANCE_BATCHES = [make_batches(num=2, seed=2, full_mask=True)]


@functools.cache
def reference(router: str) -> dict:
    return run_steps(tiny_config(router=router), STEP_BATCHES)


@functools.cache
def global_balance_reference() -> dict:
    """Single process, ONE micro-batch of 4 sequences = both dp ranks' micro-batches, local scope."""
    cfg = tiny_config(micro=4, global_batch=4)
    merged = [{k: torch.cat([b[k] for b in GLOBAL_BALANCE_BATCHES[0]]) for k in GLOBAL_BALANCE_BATCHES[0][0]}]
    return run_steps(cfg, [merged])


def _variants(tp: int, pp: int, dp: int) -> list[tuple[str, str, dict]]:
    """(router, name, parallel settings) of every variant of a layout."""
    schedules = [{}]
    if pp > 1:
        schedules.append({"pipeline_schedule": "interleaved_1f1b", "virtual_pipeline_stages": 2})
    default = ParallelConfig().pipeline_schedule
    out = [(r, f"{r}/{o.get('pipeline_schedule', default)}", o) for r in ("topk", "sparsemixer") for o in schedules]
    if (tp, pp, dp) == (1, 2, 1):
        out.append(("topk", "topk/gpipe", {"pipeline_schedule": "gpipe"}))
    if dp > 1 and (tp, pp, dp) != (2, 2, 2):
        out.append(("topk", "topk/fsdp2", {"data_parallel_shard": True}))
    if (tp, pp, dp) == (2, 2, 1):
        out.append(("sparsemixer", "sparsemixer/1f1b+checkpointing", {"recompute_granularity": "full"}))
    if (tp, pp, dp) == (2, 1, 1):
        out.append(("sparsemixer", "sparsemixer/selective-recompute", {"recompute_granularity": "selective"}))
    return out


def _tp_ranks_draw_same_routing(mesh) -> bool:
    """SparseMixer-v2 in TRAINING mode (sampled routing): TP ranks must route identically."""
    from megatron_moe.parallel.engine import ParallelEngine
    from megatron_moe.routing.router import Router

    cfg = tiny_config(tp=mesh["tp"].size(), router="sparsemixer")
    cfg.moe.input_jitter_eps = 0.01
    engine = ParallelEngine(cfg, mesh=mesh)
    module = engine.build_model()
    module.train()
    picked = []
    for m in module.modules():
        if isinstance(m, Router):
            m.register_forward_hook(lambda mod, args, out: picked.append(out.indices.clone()))
    optimizer = torch.optim.SGD(engine.parameters(), lr=0.1)
    for batches in STEP_BATCHES:
        engine.train_step(batches, optimizer, 1.0)
    mine = torch.cat([p.flatten() for p in picked])
    gathered = [None] * mesh["tp"].size()
    dist.all_gather_object(gathered, mine.tolist(), group=mesh["tp"].get_group())
    return all(g == gathered[0] for g in gathered)


def _meta_init_trains(mesh, tp: int, pp: int) -> bool:
    """Big-model path: construct on meta, allocate only this rank's stages; one finite training step."""
    import math

    from megatron_moe.parallel.engine import ParallelEngine

    engine = ParallelEngine(tiny_config(tp=tp, pp=pp), mesh=mesh)
    module = engine.build_model(meta_init=True)
    if any(p.is_meta for p in module.parameters()):
        return False
    res = engine.train_step(STEP_BATCHES[0], torch.optim.SGD(engine.parameters(), lr=0.1), 1.0)
    return math.isfinite(res.lm_loss.item()) and math.isfinite(res.grad_norm.item())


def _layouts_body(rank, world, layouts, refs, gb_ref):
    """Every variant of every layout in ``layouts`` (all of this world size) in one spawn."""
    from torch.distributed.device_mesh import init_device_mesh

    results = {}
    for tp, pp, dp in layouts:
        mesh = init_device_mesh("cpu", (pp, dp, tp), mesh_dim_names=("pp", "dp", "tp"))
        prefix = f"tp{tp}-pp{pp}-dp{dp}"
        for router, name, parallel in _variants(tp, pp, dp):
            cfg = tiny_config(tp=tp, pp=pp, router=router)
            cfg.parallel = dataclasses.replace(cfg.parallel, **parallel)
            run = run_steps(cfg, STEP_BATCHES, mesh)
            results[f"{prefix} {name}"] = compare(run, refs[router])
        if (tp, pp, dp) == (2, 1, 1):
            results[f"{prefix} tp_same_sparsemixer_samples"] = _tp_ranks_draw_same_routing(mesh)
        if (tp, pp, dp) == (1, 2, 1):
            results[f"{prefix} meta_init_trains"] = _meta_init_trains(mesh, tp, pp)
        if (tp, pp, dp) == (1, 1, 2):
            cfg = tiny_config(micro=2, global_batch=4)
            cfg.moe.balance_scope = "global"
            results[f"{prefix} global_balance"] = compare(
                run_steps(cfg, GLOBAL_BALANCE_BATCHES, mesh=mesh), gb_ref
            )
    return results


LAYOUTS = [(2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1), (2, 1, 2), (1, 2, 2), (2, 2, 2)]
WORLDS = sorted({t * p * d for t, p, d in LAYOUTS})


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS, ids=[f"world{w}" for w in WORLDS])
def test_layouts_match_single_process(world):
    """Layouts (tp, pp, dp) of this world size: losses, grad norms and parameters after a step."""
    layouts = [lay for lay in LAYOUTS if lay[0] * lay[1] * lay[2] == world]
    refs = {r: reference(r) for r in ("topk", "sparsemixer")}
    gb_ref = global_balance_reference() if (1, 1, 2) in layouts else None
    results = run_distributed(_layouts_body, world, (layouts, refs, gb_ref), timeout=400)
    expected = {f"tp{t}-pp{p}-dp{d} {name}" for t, p, d in layouts for _, name, _ in _variants(t, p, d)}
    for rank, res in enumerate(results):
        assert expected <= set(res), f"rank {rank}: missing variants {expected - set(res)}"
        for name, r in res.items():
            if isinstance(r, bool):  # tp_same_sparsemixer_samples, meta_init_trains
                assert r, f"rank {rank}: {name} failed"
                continue
            assert r["num_params"] > 0, (rank, name)
            assert r["loss_rel"] <= LOSS_RTOL, (
                f"rank {rank} {name}: loss/grad-norm rel diff {r['loss_rel']:.2e}"
            )
            assert r["param_abs"] <= PARAM_ATOL, f"rank {rank} {name}: param abs diff {r['param_abs']:.2e}"
