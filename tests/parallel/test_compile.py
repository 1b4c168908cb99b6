"""--compile (torch.compile per transformer block, inductor on CPU) trains like eager, alone and with TP/PP/FSDP2.

The model has a dense first layer and MoE layers (both kinds of block are compiled), SparseMixer-v2
routing in training mode on the routers' deterministic path (see helpers.set_deterministic_routing).

Tolerance: inductor fuses and reorders fp32 elementwise work (a few ulp per op, ~1e-7 relative), the
same order of change as a parallel layout's reordered sums, so the parity tolerances apply
(tests/parallel/helpers.py: 1e-5 relative on losses and grad norms, 1e-6 absolute on parameters).
"""

from __future__ import annotations

import dataclasses

import pytest

from megatron_moe.testing import run_distributed
from tests.builders import tiny_config
from tests.parallel.helpers import LOSS_RTOL, PARAM_ATOL, compare, make_batches, run_steps
from tests.parallel.test_parity import MLA

STEP_BATCHES = [make_batches(seed=0), make_batches(seed=1)]


def _compiled(cfg):
    cfg.training.compile = True
    return cfg


def _layouts_body(rank, world, ref):
    from torch.distributed.device_mesh import init_device_mesh

    out = {}
    for tp, pp, dp, parallel in ((2, 1, 1, {}), (1, 2, 1, {}), (1, 1, 2, {"data_parallel_shard": True})):
        mesh = init_device_mesh("cpu", (pp, dp, tp), mesh_dim_names=("pp", "dp", "tp"))
        cfg = _compiled(tiny_config(tp=tp, pp=pp, router="sparsemixer", first_k_dense=1))
        cfg.parallel = dataclasses.replace(cfg.parallel, **parallel)
        out[f"tp{tp}-pp{pp}-dp{dp}"] = compare(run_steps(cfg, STEP_BATCHES, mesh), ref)
    return out


@pytest.mark.slow
def test_compiled_blocks_match_eager_single_process_and_in_layouts():
    ref = run_steps(tiny_config(router="sparsemixer", first_k_dense=1), STEP_BATCHES)
    single = compare(run_steps(_compiled(tiny_config(router="sparsemixer", first_k_dense=1)), STEP_BATCHES), ref)
    assert single["loss_rel"] <= LOSS_RTOL and single["param_abs"] <= PARAM_ATOL, single
    for rank, results in enumerate(run_distributed(_layouts_body, 2, (ref,), timeout=500)):
        for layout, r in results.items():
            assert r["loss_rel"] <= LOSS_RTOL, f"rank {rank} {layout}: loss rel diff {r['loss_rel']:.2e}"
            assert r["param_abs"] <= PARAM_ATOL, f"rank {rank} {layout}: param abs diff {r['param_abs']:.2e}"


@pytest.mark.slow
def test_compiled_latent_attention_blocks_match_eager():
    """A block with DeepSeek-V3's multi-latent attention (query latent, latent norms) compiles and trains like
    eager, within the parity tolerances."""
    settings = {**MLA, "q_lora_rank": 12, "qk_layernorm": True, "num_layers": 2}
    ref = run_steps(tiny_config(**settings), STEP_BATCHES)
    got = compare(run_steps(_compiled(tiny_config(**settings)), STEP_BATCHES), ref)
    assert got["loss_rel"] <= LOSS_RTOL and got["param_abs"] <= PARAM_ATOL, got
