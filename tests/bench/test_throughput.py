"""bench/throughput.py's rows that compare implementations: each starts from our weights and checks it
computes what ours does before it is timed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))
import throughput  # noqa: E402

from megatron_moe.config import parse_args  # noqa: E402
from megatron_moe.model.moe import MoELayer  # noqa: E402
from megatron_moe.parallel.engine import init_distributed_from_env  # noqa: E402

SMALL = ["--training.device", "cpu", "--lr", "1e-4", "--min-lr", "1e-5"]


def test_torchtitan_row_holds_our_weights_and_trains():
    """torchtitan's MoE layer in our model (where torchtitan imports): the row's own check (each layer's
    output against ours on the same input, bf16-rounded experts) passes, and one engine step trains."""
    pytest.importorskip("torchtitan.models.common.moe", reason="torchtitan is not installed (optional)")
    init_distributed_from_env("cpu", single_process=True)
    cfg, _ = parse_args(throughput.CPU_SHAPES["small"] + SMALL)
    ours = throughput._ours("ours", cfg, torch.device("cpu"))
    row = throughput._torchtitan_row(cfg, ours.module[0], torch.device("cpu"))
    assert row.step is not None, row.note
    (model,) = row.module
    assert not any(isinstance(m, MoELayer) for m in model.modules())
    assert sum(isinstance(m, throughput._TorchtitanMoE) for m in model.modules()) == cfg.model.num_layers
    before = [p.detach().clone() for p in model.parameters()]
    row.step()
    assert all(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters(), strict=True))
