"""The fused vocabulary-parallel cross entropy against references written differently: torch's
``F.cross_entropy`` in float64, finite differences (gradcheck), and on two gloo ranks the same logits
sharded on the vocabulary against one process holding them whole."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import megatron_moe.parallel.loss as loss_mod
from megatron_moe.parallel.loss import IGNORE_INDEX, lm_loss_from_target, vocab_parallel_cross_entropy
from megatron_moe.testing import run_distributed


def _case(rows: int = 37, vocab: int = 50, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(rows, vocab, generator=g, dtype=torch.float64)).to(dtype)
    target = torch.randint(0, vocab, (rows,), generator=g)
    target[::5] = IGNORE_INDEX  # masked positions
    return logits, target


@pytest.mark.parametrize("chunk_elements", [1 << 24, 150])  # one chunk; many chunks of 3 rows
def test_loss_and_gradient_equal_torch_cross_entropy_in_float64(monkeypatch, chunk_elements):
    monkeypatch.setitem(loss_mod._CHUNK_ELEMENTS, "cpu", chunk_elements)
    logits, target = _case()
    weights = torch.rand(target.shape, dtype=torch.float64)  # a non-uniform upstream gradient per token
    ours = logits.clone().requires_grad_()
    reference = logits.clone().requires_grad_()
    ce = vocab_parallel_cross_entropy(ours, target)
    expected = F.cross_entropy(reference, target, ignore_index=IGNORE_INDEX, reduction="none")
    torch.testing.assert_close(ce, expected, rtol=1e-12, atol=1e-12)
    assert (ce[target == IGNORE_INDEX] == 0).all()
    (ce * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(ours.grad, reference.grad, rtol=1e-12, atol=1e-12)
    assert (ours.grad[target == IGNORE_INDEX] == 0).all()


def test_gradient_matches_finite_differences():
    logits, target = _case(rows=6, vocab=7)
    logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda z: vocab_parallel_cross_entropy(z, target), (logits,))


def test_large_logits_do_not_overflow():
    logits, target = _case()
    shifted = logits + 1e4  # exp would overflow without the row maximum subtracted
    torch.testing.assert_close(vocab_parallel_cross_entropy(shifted, target),
                               vocab_parallel_cross_entropy(logits, target), rtol=1e-9, atol=1e-9)


def test_bf16_logits_are_read_in_float32_and_get_a_bf16_gradient():
    logits, target = _case(dtype=torch.bfloat16)
    ours = logits.clone().requires_grad_()
    reference = logits.double().requires_grad_()
    ce = vocab_parallel_cross_entropy(ours, target)
    assert ce.dtype == torch.float32
    expected = F.cross_entropy(reference, target, ignore_index=IGNORE_INDEX, reduction="none")
    torch.testing.assert_close(ce.double(), expected, rtol=1e-6, atol=1e-6)  # float32 arithmetic on exact inputs
    ce.sum().backward()
    expected.sum().backward()
    assert ours.grad.dtype == torch.bfloat16
    torch.testing.assert_close(ours.grad.double(), reference.grad, rtol=0, atol=4e-3)  # bf16 rounding of p <= 1


def test_lm_loss_is_the_mean_over_unmasked_tokens_of_a_batch():
    logits, target = _case(rows=24)
    logits, target = logits.view(4, 6, -1), target.view(4, 6)
    mask = target != IGNORE_INDEX
    per_token = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    torch.testing.assert_close(lm_loss_from_target(logits, target), per_token.sum() / mask.sum())
    torch.testing.assert_close(lm_loss_from_target(logits, target, torch.tensor(7.0, dtype=torch.float64)),
                               per_token.sum() / 7)
    nothing = torch.full_like(target, IGNORE_INDEX)
    assert lm_loss_from_target(logits, nothing).item() == 0.0  # no unmasked token: 0, not NaN


def _sharded_rank(rank: int, world_size: int, logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    sharded = distribute_tensor(logits, mesh, [Shard(-1)]).requires_grad_()
    ce = vocab_parallel_cross_entropy(sharded, target)
    (ce * weights).sum().backward()
    return ce, sharded.grad.full_tensor()


@pytest.mark.parametrize("world_size", [2, 4])
def test_vocabulary_sharded_logits_give_the_single_process_loss_and_gradient(world_size):
    logits, target = _case(rows=9, vocab=48)
    target[1] = 0  # targets in the first and the last shard
    target[2] = 47
    weights = torch.rand(target.shape, dtype=torch.float64)
    whole = logits.clone().requires_grad_()
    expected = vocab_parallel_cross_entropy(whole, target)
    (expected * weights).sum().backward()
    for ce, grad in run_distributed(_sharded_rank, world_size, args=(logits, target, weights)):
        # float64 sums of shard partial sums: equal up to reassociation
        torch.testing.assert_close(ce, expected.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, whole.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("per_token", [False, True])
def test_multi_token_prediction_loss_is_the_mean_of_the_depths_shifted_cross_entropies(per_token):
    """DeepSeek-V3 eqs. 24-25 through the engine: lm_loss is the main prediction's alone; mtp_loss the mean over
    depths k of the cross entropy of depth k's logits at positions 0 .. S - k - 1 against the labels k positions
    on (their loss mask too), written here with F.cross_entropy on slices; the step optimizes
    lm + lambda x mtp (lambda 0 leaves the parameters as the plain objective moves them). With
    --calculate-per-token-loss each depth's logged loss is per token of its own (megatron-core logs it so; divided
    by the main prediction's count it read 0.94x here)."""
    from megatron_moe.parallel.engine import ParallelEngine
    from megatron_moe.parallel.loss import mtp_target
    from tests.builders import tiny_config
    from tests.parallel.helpers import make_batches

    target = torch.arange(10).view(2, 5)
    assert mtp_target(target, 2).tolist() == [[2, 3, 4, IGNORE_INDEX, IGNORE_INDEX], [7, 8, 9, IGNORE_INDEX,
                                                                                      IGNORE_INDEX]]
    cfg = tiny_config(mtp_num_layers=2, router="topk", micro=2, global_batch=2, calculate_per_token_loss=per_token)
    (batch,) = make_batches(num=1)
    engine = ParallelEngine(cfg)
    module = engine.build_model()
    with torch.no_grad():
        logits, *predictions = module[0](batch["tokens"])
    s, labels, mask = batch["tokens"].shape[1], batch["labels"], batch["loss_mask"].bool()

    def ce(z, y, m):
        return F.cross_entropy(z[m].double(), y[m])

    want_mtp = sum(ce(predictions[k - 1][:, : s - k], labels[:, k:], mask[:, k:]) for k in (1, 2)) / 2
    result = engine.train_step([batch], torch.optim.SGD(engine.parameters(), lr=0.0), 1.0)
    assert result.lm_loss.item() == pytest.approx(ce(logits, labels, mask).item(), rel=1e-6)
    assert result.mtp_loss.item() == pytest.approx(want_mtp.item(), rel=1e-6)
