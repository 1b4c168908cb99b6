"""Balance losses, capacity and drop accounting (docs/routing.md §4 and §5) against naive references."""

import math

import pytest
import torch

from megatron_moe.routing import (
    AsyncAllReduce,
    capacity_keep_mask,
    expert_capacity,
    expert_counts,
    router_entropy,
    router_z_loss,
    sequence_balance_loss,
    skywork_balance_loss,
    switch_balance_loss,
    token_drop_rate,
)


def test_expert_counts_vs_loop():
    idx = torch.randint(0, 7, (50, 3), generator=torch.Generator().manual_seed(0))
    counts = expert_counts(idx, 7)
    ref = [0.0] * 7
    for row in idx.tolist():
        for e in row:
            ref[e] += 1
    assert counts.dtype == torch.float32 and counts.tolist() == ref


def test_switch_loss_is_one_at_perfect_balance():
    e, t, k = 4, 8, 2
    probs = torch.full((t, e), 1.0 / e, requires_grad=True)
    idx = torch.arange(t * k).remainder(e).view(t, k)  # every expert gets t*k/e assignments
    loss = switch_balance_loss(probs, expert_counts(idx, e))
    torch.testing.assert_close(loss, torch.tensor(1.0))


def test_switch_loss_reference_and_gradient_only_through_probs():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(30, 5, generator=g, dtype=torch.float64, requires_grad=True)
    probs = torch.softmax(logits, -1)
    counts = torch.tensor([10.0, 20.0, 5.0, 15.0, 10.0], requires_grad=True)
    loss = switch_balance_loss(probs, counts)
    f = [c / 60.0 for c in counts.tolist()]
    p_mean = probs.detach().mean(0).tolist()
    ref = 5 * sum(fi * pi for fi, pi in zip(f, p_mean, strict=True))
    assert math.isclose(float(loss.detach()), ref, rel_tol=1e-12)
    loss.backward()
    assert counts.grad is None
    # d/dP_i = E * f_i / T, chained through the softmax
    p = probs.detach()
    gp = (5 * torch.tensor(f, dtype=torch.float64) / 30).expand(30, 5)
    ref_grad = p * (gp - (gp * p).sum(-1, keepdim=True))
    torch.testing.assert_close(logits.grad, ref_grad)


def test_sequence_loss_against_a_per_sequence_loop_and_megatron_core():
    """mean over sequences of each sequence's Switch loss: against a float64 loop over sequences and tokens, and
    against megatron-core's own seq_aux_loss (its router reshapes [S, B, E] to [S, B*E] and calls
    switch_load_balancing_loss_func with top-K * B, then divides by B); the gradient flows through probs only."""
    g = torch.Generator().manual_seed(3)
    b, s, e, k = 3, 10, 5, 2
    logits = torch.randn(b * s, e, generator=g, dtype=torch.float64)
    probs = logits.softmax(-1).requires_grad_()
    idx = torch.topk(logits + torch.randn(b * s, e, generator=g, dtype=torch.float64), k).indices
    got = sequence_balance_loss(probs, idx, b)
    loop = 0.0
    for seq in range(b):
        rows = range(seq * s, (seq + 1) * s)
        for i in range(e):
            f = sum(int(i in idx[r].tolist()) for r in rows) / (s * k)
            p = sum(probs[r, i].item() for r in rows) / s
            loop += e * f * p / b
    assert got.item() == pytest.approx(loop, rel=1e-12)
    moe_utils = pytest.importorskip("megatron.core.transformer.moe.moe_utils")
    seq_first = probs.detach().view(b, s, e).transpose(0, 1)  # megatron-core's [S, B, E] layout
    routing_map = torch.zeros(b * s, e, dtype=torch.bool).scatter_(1, idx, True).view(b, s, e).transpose(0, 1)
    scores, routing_map = seq_first.reshape(s, b * e), routing_map.reshape(s, b * e)
    reference = moe_utils.switch_load_balancing_loss_func(
        probs=scores, tokens_per_expert=routing_map.sum(0).to(scores.dtype), total_num_tokens=s, topk=k,
        num_experts=e, moe_aux_loss_coeff=1.0) / b
    assert got.item() == pytest.approx(reference.item(), rel=1e-12)
    got.backward()
    counts = torch.zeros(b, e, dtype=torch.float64).scatter_add_(1, idx.view(b, -1), torch.ones(b, s * k,
                                                                                                 dtype=torch.float64))
    expected = (e * counts / (s * k) / s / b).repeat_interleave(s, 0)  # d loss / d p_ti = E f_bi / (S B)
    torch.testing.assert_close(probs.grad, expected, rtol=1e-12, atol=0)


def test_sequence_loss_is_one_at_balance_and_differs_from_the_batch_loss():
    e, s, k = 4, 8, 2
    probs = torch.full((2 * s, e), 1.0 / e)
    balanced = torch.arange(2 * s * k).remainder(e).view(2 * s, k)
    assert sequence_balance_loss(probs, balanced, 2).item() == pytest.approx(1.0)
    # sequence 0 uses experts 0-1 only, sequence 1 experts 2-3 only: balanced over the batch, not per sequence
    skewed = torch.tensor([[0, 1]] * s + [[2, 3]] * s)
    peaked = torch.cat([torch.tensor([[0.4, 0.4, 0.1, 0.1]]).expand(s, e), torch.tensor([[0.1, 0.1, 0.4, 0.4]]
                                                                                          ).expand(s, e)])
    assert switch_balance_loss(peaked, expert_counts(skewed, e)).item() == pytest.approx(1.0)
    assert sequence_balance_loss(peaked, skewed, 2).item() == pytest.approx(4 * 0.5 * 0.4 * 2)


def test_skywork_loss_vs_reference():
    probs = torch.softmax(torch.randn(40, 6, dtype=torch.float64), -1)
    cols = list(zip(*probs.tolist(), strict=True))
    ref = sum((1 / 6 - sum(c) / 40) ** 2 for c in cols)
    assert math.isclose(float(skywork_balance_loss(probs)), ref, rel_tol=1e-12)
    assert float(skywork_balance_loss(torch.full((3, 6), 1 / 6))) == pytest.approx(0.0, abs=1e-14)


def test_z_loss_vs_reference():
    z = torch.randn(12, 5, dtype=torch.float64) * 4
    ref = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in z.tolist()) / 12
    assert math.isclose(float(router_z_loss(z)), ref, rel_tol=1e-12)
    assert router_z_loss(z.float()).dtype == torch.float32


def test_router_entropy():
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]], requires_grad=True)
    ent = router_entropy(p)
    assert not ent.requires_grad
    assert math.isclose(float(ent), math.log(2) / 2, rel_tol=1e-6)


@pytest.mark.parametrize(
    ("t", "k", "e", "cf"),
    [(100, 2, 4, 1.1), (7, 2, 3, 1.0), (64, 1, 8, 1.25), (1, 2, 16, 1.0), (0, 2, 4, 1.0)],
)
def test_capacity_vs_naive(t, k, e, cf):
    # naive: exact rational arithmetic (cf given with few decimals)
    from fractions import Fraction

    ref = math.ceil(Fraction(str(cf)) * t * k / e)
    assert expert_capacity(t, k, e, cf) == ref


def test_capacity_validation():
    with pytest.raises(ValueError, match="capacity_factor"):
        expert_capacity(10, 2, 4, 0.0)
    with pytest.raises(ValueError, match="moe.topk"):
        expert_capacity(10, 0, 4, 1.0)


def test_drop_rate_vs_naive_loop():
    g = torch.Generator().manual_seed(2)
    t, k, e = 64, 2, 8
    # skewed routing so that some experts overflow
    idx = torch.multinomial(torch.tensor([8.0, 4, 2, 1, 1, 1, 1, 1]), t * k, replacement=True, generator=g)
    idx = idx.view(t, k)
    cap = expert_capacity(t, k, e, 1.0)
    counts = expert_counts(idx, e)
    dropped = 0
    for ex in range(e):
        n = sum(1 for v in idx.flatten().tolist() if v == ex)
        dropped += max(0, n - cap)
    rate = token_drop_rate(counts, cap, t * k)
    assert dropped > 0
    assert math.isclose(float(rate), dropped / (t * k), rel_tol=1e-6)
    assert float(token_drop_rate(counts, 10**6, t * k)) == 0.0


def _naive_keep(idx, probs, e, cap):
    keep = [[False] * idx.shape[1] for _ in range(idx.shape[0])]
    for ex in range(e):
        slots = [(t, j) for t in range(idx.shape[0]) for j in range(idx.shape[1]) if idx[t, j] == ex]
        # highest probability first; ties by token order (flat position), python sort is stable
        slots.sort(key=lambda s: -float(probs[s[0], s[1]]))
        for t, j in slots[:cap]:
            keep[t][j] = True
    return torch.tensor(keep)


@pytest.mark.parametrize("cap", [0, 1, 3, 5, 100])
def test_capacity_keep_mask_vs_naive(cap):
    g = torch.Generator().manual_seed(cap)
    t, k, e = 40, 2, 5
    logits = torch.randn(t, e, generator=g)
    probs = torch.softmax(logits, -1)
    p_top, idx = torch.topk(probs, k, -1)
    # quantise the probabilities to create ties that must go to the earlier token
    p_top = (p_top * 4).round() / 4
    keep = capacity_keep_mask(idx, p_top, e, cap)
    assert keep.dtype == torch.bool and keep.shape == (t, k)
    assert torch.equal(keep, _naive_keep(idx, p_top, e, cap))
    kept_counts = expert_counts(idx[keep].view(-1, 1), e)
    assert (kept_counts <= cap).all()


def test_async_all_reduce_without_group_is_local_copy():
    x = torch.tensor([1.0, 2.0])
    h = AsyncAllReduce.start(x, None)
    out = h.wait()
    assert torch.equal(out, x) and out is not x
    assert h.wait() is out
