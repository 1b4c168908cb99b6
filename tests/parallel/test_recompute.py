"""Selective recompute of whole modules (Megatron-LM's --recompute-modules core_attn / mlp / moe): the
same numbers as no recompute, the MoE layers' statistics counted once, fewer activations kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.utils.checkpoint

from megatron_moe.model.moe import MoELayer
from megatron_moe.parallel.engine import ParallelEngine
from tests.builders import tiny_config
from tests.parallel.helpers import make_batches, run_steps, set_deterministic_routing

ALL = ["core_attn", "mlp", "moe"]


def _config(granularity: str = "none", modules: list[str] | None = None):
    # SparseMixer-v2 samples its routing: the recomputed MoE layers must draw the same samples again.
    # Layer 0 dense, so that "mlp" has a module to recompute.
    cfg = tiny_config(router="sparsemixer", first_k_dense=1, recompute_granularity=granularity)
    cfg.parallel.recompute_modules = modules or ["core_attn"]
    return cfg


def test_recomputed_modules_give_the_same_losses_and_parameters():
    """Two SGD steps (lr 1, so parameters after the first are the gradients): recomputing the attention core,
    the dense MLP and the MoE layers changes nothing but the summation order of nothing (identical ops
    replayed with the same random state): equal to 1e-6 relative / absolute."""
    batches = [make_batches(seed=0), make_batches(seed=1)]
    ref = run_steps(_config(), batches)
    got = run_steps(_config("selective", ALL), batches)
    for key in ("lm", "aux", "gnorm"):
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-6, err_msg=key)
    assert set(got["params"]) == set(ref["params"])  # checkpoint names unchanged by the wrappers
    for name, value in ref["params"].items():
        np.testing.assert_allclose(got["params"][name], value, rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("early_stop", [True, False])
def test_a_recomputed_moe_layer_runs_twice_but_counts_its_statistics_once(early_stop):
    """torch stops a recompute once it has what backward needs (early stop, its default), before the layer
    records its statistics; without early stop the recompute runs to the end, and must not count them again."""
    batches = make_batches()
    stats = {}
    for modules in (["core_attn"], ALL):
        engine = ParallelEngine(_config("selective", modules))
        module = engine.build_model()
        set_deterministic_routing(module)
        forwards = []
        for m in module.modules():
            if isinstance(m, MoELayer):
                m.register_forward_pre_hook(lambda *_, calls=forwards: calls.append(1))
        with torch.utils.checkpoint.set_checkpoint_early_stop(early_stop):
            result = engine.train_step(batches, torch.optim.SGD(engine.parameters(), lr=0.0), 1.0)
        moe_layers = sum(isinstance(m, MoELayer) for m in module.modules())
        assert len(forwards) == moe_layers * len(batches) * (2 if "moe" in modules else 1)
        stats[tuple(modules)] = [(s.counts.tolist(), float(s.num_micro_batches)) for s in result.layer_stats]
    assert stats[("core_attn",)] == stats[tuple(ALL)]
    tokens = sum(b["tokens"].numel() for b in batches)
    assert all(sum(counts) == tokens * 2 and micro == len(batches) for counts, micro in stats[tuple(ALL)])


def test_recomputing_more_modules_keeps_fewer_activations():
    """Bytes autograd keeps for backward outside the recomputed regions, one forward of the model."""
    tokens = make_batches()[0]["tokens"]

    def saved_bytes(cfg) -> int:
        engine = ParallelEngine(cfg)
        module = engine.build_model()
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module[0](tokens).sum()
        return total[0]

    none, attention, everything = (saved_bytes(c) for c in (_config(), _config("selective"),
                                                             _config("selective", ALL)))
    assert everything < attention < none, (none, attention, everything)
