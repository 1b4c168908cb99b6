import math

import pytest
import torch

from megatron_moe.config import OptimizerConfig
from megatron_moe.training.optim import build_optimizer, learning_rate


def test_warmup_then_cosine():
    cfg = OptimizerConfig(lr=1.0, min_lr=0.1, lr_warmup_iters=10)
    assert learning_rate(0, cfg, 110) == pytest.approx(0.1)
    assert learning_rate(9, cfg, 110) == pytest.approx(1.0)
    assert learning_rate(10, cfg, 110) == pytest.approx(1.0)
    assert learning_rate(60, cfg, 110) == pytest.approx(0.55)
    assert learning_rate(110, cfg, 110) == pytest.approx(0.1)
    assert learning_rate(500, cfg, 110) == pytest.approx(0.1)
    s = 35
    ref = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 10) / 100))
    assert learning_rate(s, cfg, 110) == pytest.approx(ref)


def test_linear_and_constant():
    assert learning_rate(50, OptimizerConfig(lr=1.0, min_lr=0.0, lr_decay_style="linear"), 100) == pytest.approx(0.5)
    assert learning_rate(50, OptimizerConfig(lr=1.0, lr_decay_style="constant"), 100) == pytest.approx(1.0)


def test_no_weight_decay_on_norms_and_vectors():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=True), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, OptimizerConfig(weight_decay=0.5))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert decayed == {id(model[0].weight)}
    assert opt.param_groups[1]["weight_decay"] == 0.0
