"""--calculate-per-token-loss: the LM loss is the mean over every unmasked token of the global batch.

Reference, written differently: one forward of the plain model over the whole global batch at once,
cross entropy summed over its unmasked tokens and divided by their count, autograd for the gradient.
The masks of the micro-batches hold different token counts (~20 % masked at random), so this differs
from the default mean over micro-batches of each one's token mean (checked). Layouts: dp2 (each rank
sees another count: the normaliser is all-reduced) and pp2 (the pipeline schedule's loss), against one
process within the parity tolerances of tests/parallel/helpers.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_moe.testing import run_distributed
from tests.builders import tiny_config
from tests.parallel.helpers import LOSS_RTOL, PARAM_ATOL, compare, make_batches, run_steps

STEP_BATCHES = [make_batches(seed=0), make_batches(seed=1)]


def _config(tp: int = 1, pp: int = 1, dense: bool = False):
    cfg = tiny_config(tp=tp, pp=pp, **({"num_experts": 0} if dense else {}))
    cfg.training.calculate_per_token_loss = True
    return cfg


def test_loss_and_gradient_are_the_global_batch_token_mean():
    from megatron_moe.parallel.engine import ParallelEngine

    batches = STEP_BATCHES[0]
    engine = ParallelEngine(_config(dense=True))  # dense: no auxiliary loss in the gradient
    (model,) = engine.build_model()
    tokens = torch.cat([b["tokens"] for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    mask = torch.cat([b["loss_mask"] for b in batches]).bool()
    ce = F.cross_entropy(model(tokens).flatten(0, 1), labels.flatten(), reduction="none")
    reference = ce[mask.flatten()].sum() / mask.sum()
    reference.backward()
    reference_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    model.zero_grad(set_to_none=True)
    per_micro_batch_mean = torch.stack([c[m].mean() for c, m in zip(ce.view(len(batches), -1),
                                                                       mask.view(len(batches), -1), strict=True)])
    assert abs(per_micro_batch_mean.mean().item() - reference.item()) > 1e-4  # the two definitions differ here

    result = engine.train_step(batches, torch.optim.SGD(model.parameters(), lr=0.0), clip_grad=0.0)
    assert result.lm_loss.item() == pytest.approx(reference.item(), rel=1e-6)
    assert result.grad_norm.item() == pytest.approx(reference_norm.item(), rel=1e-5)


def _layouts_body(rank, world, ref):
    from torch.distributed.device_mesh import init_device_mesh

    out = {}
    for tp, pp, dp in ((1, 1, 2), (1, 2, 1)):
        mesh = init_device_mesh("cpu", (pp, dp, tp), mesh_dim_names=("pp", "dp", "tp"))
        out[(tp, pp, dp)] = compare(run_steps(_config(tp, pp), STEP_BATCHES, mesh), ref)
    return out


@pytest.mark.slow
def test_dp2_and_pp2_match_one_process():
    ref = run_steps(_config(), STEP_BATCHES)
    for rank, results in enumerate(run_distributed(_layouts_body, 2, (ref,), timeout=300)):
        for layout, r in results.items():
            assert r["loss_rel"] <= LOSS_RTOL and r["param_abs"] <= PARAM_ATOL, (rank, layout, r)
