"""SparseMixer-v2 (docs/routing.md §3; GRIN appendix A and its released code) against independent references."""

import math

import pytest
import torch

from megatron_moe.routing import apply_input_jitter, sparsemixer_v2_routing


def _kept(row: list[float], excluded: int | None, eps: float) -> list[bool]:
    """Naive kept set of one round: expert i (not excluded) is kept iff
    (zmax - z_i) / max(|z_i|, zmax) <= 2 eps, zmax over the non-excluded experts, z the ORIGINAL logits.
    A 0/0 ratio counts as kept (GRIN compares ratio > 2 eps to mask, and NaN > x is False)."""
    zmax = max(v for i, v in enumerate(row) if i != excluded)
    keep = []
    for i, v in enumerate(row):
        if i == excluded:
            keep.append(False)
            continue
        num, den = zmax - v, max(abs(v), zmax)
        ratio = math.nan if den == 0 else num / den
        keep.append(not ratio > 2 * eps)
    return keep


def _masked_softmax(z: torch.Tensor, keep: list[bool]) -> torch.Tensor:
    """Differentiable softmax of one row restricted to ``keep`` (masked entries are exactly 0)."""
    mask = torch.tensor(keep)
    return torch.softmax(z.masked_fill(~mask, float("-inf")), -1)


def _ref_round_probs(z: torch.Tensor, d1: torch.Tensor, eps: float):
    """For each token: (kept1, p1, kept2, p2) where round 2 excludes the given round-1 expert d1."""
    out = []
    for t in range(z.shape[0]):
        row = z[t].detach().tolist()
        k1 = _kept(row, None, eps)
        k2 = _kept(row, int(d1[t]), eps)
        out.append((k1, _masked_softmax(z[t], k1), k2, _masked_softmax(z[t], k2)))
    return out


def _logits(t=64, e=8, seed=0, spread=0.05, dtype=torch.float64):
    """Logits clustered near 2.0 so that several experts fall inside the relative window."""
    g = torch.Generator().manual_seed(seed)
    return 2.0 + spread * torch.randn(t, e, generator=g, dtype=dtype)


# ---------------------------------------------------------------------------------------------- backward


def test_custom_backward_equals_autograd_of_masked_softmax_gather():
    """dz = sum_r G_r * g_r * (onehot(D_r) - p_r), i.e. autograd of sum_r G_r * softmax(masked z)[D_r]
    (c ignored in the backward, as in GRIN's code), both rounds summed, float64."""
    eps = 0.02
    z = _logits(seed=1).requires_grad_()
    w, idx = sparsemixer_v2_routing(z, eps, training=True, generator=torch.Generator().manual_seed(5))
    upstream = torch.randn(w.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    (w * upstream).sum().backward()

    z_ref = z.detach().clone().requires_grad_()
    ref = _ref_round_probs(z_ref, idx[:, 0], eps)
    total = 0
    for t, (_, p1, _, p2) in enumerate(ref):
        total = total + upstream[t, 0] * p1[idx[t, 0]] + upstream[t, 1] * p2[idx[t, 1]]
    total.backward()
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-12, atol=1e-14)
    # several experts were kept per round on many tokens, otherwise the check would be trivial
    assert sum(sum(k1) > 1 for k1, _, _, _ in ref) > 20


def test_forward_is_gate_times_c_and_masked_columns_get_zero_grad():
    eps = 0.02
    z = _logits(seed=2).requires_grad_()
    w, idx = sparsemixer_v2_routing(z, eps, training=True, generator=torch.Generator().manual_seed(7))
    ref = _ref_round_probs(z.detach(), idx[:, 0], eps)
    w.sum().backward()
    for t, (k1, p1, k2, p2) in enumerate(ref):
        d1, d2 = int(idx[t, 0]), int(idx[t, 1])
        assert d1 != d2 and k1[d1] and k2[d2], "sampled experts must be distinct and inside the kept sets"
        for r, (p, d) in enumerate(((p1, d1), (p2, d2))):
            c = float(w[t, r].detach()) / float(p[d])
            is_top = d == int(p.argmax())
            assert math.isclose(c, 1.0, rel_tol=1e-12) or (
                not is_top and math.isclose(c, 1 / 3, rel_tol=1e-12)
            ), f"token {t} round {r}: c={c}"
        union = [a or b for a, b in zip(k1, k2, strict=True)]
        for i, kept in enumerate(union):
            if not kept:
                assert z.grad[t, i] == 0.0


# ---------------------------------------------------------------------------------------------- sampling


def test_round1_samples_follow_kept_set_softmax_and_c_mean():
    """N = 200000 identical tokens. Kept set {0, 1, 2} with softmax p ~ (0.49, 0.30, 0.22).
    Each empirical frequency has binomial std sqrt(p(1-p)/N) <= 0.0012; the tolerance 0.006 is 5 std.
    Masked experts must never be drawn (exact). Among tokens with D != argmax (~51% = 102000),
    c = 1/3 + 2/3 * Bernoulli(1/4): E[c] = 1/2, std(c) = sqrt(1/12) = 0.289, std of the mean ~0.0009;
    tolerance 0.005 (> 5 std)."""
    n = 200_000
    eps = 0.2  # keep if (zmax - z) / max(|z|, zmax) <= 0.4
    row = torch.tensor([2.0, 1.5, 1.2, 0.5, -1.0, 0.0])
    kept = _kept(row.tolist(), None, eps)
    assert kept == [True, True, True, False, False, False]
    p = _masked_softmax(row.double(), kept)
    z = row.expand(n, -1).contiguous()
    w, idx = sparsemixer_v2_routing(z, eps, training=True, generator=torch.Generator().manual_seed(11))
    freq = torch.bincount(idx[:, 0], minlength=6).double() / n
    assert freq[3:].sum() == 0
    assert (freq - p).abs().max() < 0.006, (freq, p)

    not_top = idx[:, 0] != 0
    c = w[:, 0].double() / p[idx[:, 0]]
    assert torch.allclose(c[~not_top], torch.ones(()).double(), rtol=1e-6)
    assert abs(float(c[not_top].mean()) - 0.5) < 0.005
    # P(c = 1 | D != argmax) = 1/4; binomial std over ~102000 tokens ~0.0014, tolerance 0.007
    frac_one = float((c[not_top] > 0.5).double().mean())
    assert abs(frac_one - 0.25) < 0.007


def test_round2_samples_follow_softmax_without_round1_expert():
    """Round 2 conditional on D1 = 0: kept set of z with expert 0 removed, threshold vs the new max.
    Same tolerance reasoning as above (5 binomial std)."""
    n = 200_000
    eps = 0.2
    row = torch.tensor([2.0, 1.5, 1.2, 0.5, -1.0, 0.0])
    z = row.expand(n, -1).contiguous()
    _, idx = sparsemixer_v2_routing(z, eps, training=True, generator=torch.Generator().manual_seed(12))
    sel = idx[:, 0] == 0
    kept2 = _kept(row.tolist(), 0, eps)  # zmax = 1.5: keep 1.5, 1.2 ((1.5-1.2)/1.5 = 0.2), 0.5? (1/1.5 > 0.4)
    assert kept2 == [False, True, True, False, False, False]
    p2 = _masked_softmax(row.double(), kept2)
    m = int(sel.sum())
    freq = torch.bincount(idx[sel, 1], minlength=6).double() / m
    tol = 5 * math.sqrt(0.25 / m)
    assert (freq - p2).abs().max() < tol, (freq, p2, tol)


def test_same_generator_seed_same_routing_and_default_generator():
    z = _logits(seed=3, dtype=torch.float32)
    a = sparsemixer_v2_routing(z, 0.02, True, generator=torch.Generator().manual_seed(42))
    b = sparsemixer_v2_routing(z, 0.02, True, generator=torch.Generator().manual_seed(42))
    c = sparsemixer_v2_routing(z, 0.02, True, generator=torch.Generator().manual_seed(43))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    torch.manual_seed(42)
    d = sparsemixer_v2_routing(z, 0.02, True)
    torch.manual_seed(42)
    e = sparsemixer_v2_routing(z, 0.02, True)
    assert torch.equal(d[1], e[1]) and torch.equal(d[0], e[0])


def test_float64_and_float32_draw_identically():
    """Noise is drawn in fp32 whatever the logits dtype, so the samples agree."""
    z = _logits(seed=4, dtype=torch.float32)
    a = sparsemixer_v2_routing(z, 0.02, True, generator=torch.Generator().manual_seed(1))
    b = sparsemixer_v2_routing(z.double(), 0.02, True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a[1], b[1])


# ---------------------------------------------------------------------------------------------- eval


def test_eval_is_deterministic_argmax_with_unnormalised_masked_softmax():
    eps = 0.02
    z = _logits(seed=5)
    w, idx = sparsemixer_v2_routing(z, eps, training=False)
    w2, idx2 = sparsemixer_v2_routing(z, eps, training=False)
    assert torch.equal(w, w2) and torch.equal(idx, idx2)
    top2 = torch.topk(z, 2, dim=-1).indices
    assert torch.equal(idx, top2)
    ref = _ref_round_probs(z, idx[:, 0], eps)
    ref_w = torch.stack([torch.stack([p1[idx[t, 0]], p2[idx[t, 1]]]) for t, (_, p1, _, p2) in enumerate(ref)])
    torch.testing.assert_close(w, ref_w, rtol=1e-12, atol=1e-14)
    assert (w.sum(-1) < 1.5).any()  # genuinely unnormalised (not all weights 1 and not summing to 1)


def test_round2_uses_original_logits_not_round1_masked_copy():
    """z = [5, 1, 0.9, -3]: round 1 keeps only expert 0 ((5-1)/5 = 0.8 > 0.2). Round 2 must start from the
    original z without expert 0 (zmax = 1) and keep {1, 2} ((1-0.9)/1 = 0.1 <= 0.2), so its weight is
    softmax([1, 0.9])[0], not 1 (which a round-1-masked start or no re-threshold would not give)."""
    z = torch.tensor([[5.0, 1.0, 0.9, -3.0]], dtype=torch.float64)
    w, idx = sparsemixer_v2_routing(z, 0.1, training=False)
    assert idx.tolist() == [[0, 1]]
    expected2 = 1 / (1 + math.exp(-0.1))
    torch.testing.assert_close(w, torch.tensor([[1.0, expected2]], dtype=torch.float64))
    # negative maxima: the factor is max(|z_i|, zmax) = |z_i|, not |zmax|:
    # (-1 - -1.105) / 1.105 = 0.095 <= 0.1 kept (with |zmax| = 1 as factor it would be 0.105: masked)
    z = torch.tensor([[-1.0, -1.105, -3.0]], dtype=torch.float64)
    w, idx = sparsemixer_v2_routing(z, 0.05, training=False)
    assert idx.tolist() == [[0, 1]]
    torch.testing.assert_close(w[0, 0], torch.tensor(1 / (1 + math.exp(-0.105)), dtype=torch.float64))
    torch.testing.assert_close(w[0, 1], torch.tensor(1.0, dtype=torch.float64))


def test_eval_kept_sets_match_naive_on_mixed_sign_logits():
    """Random logits of both signs (and zeros) with a wide window: weights equal the naive reference."""
    g = torch.Generator().manual_seed(8)
    z = torch.randn(200, 6, generator=g, dtype=torch.float64)
    z[::7, 2] = 0.0
    z[::11] = 0.0  # all-zero rows: 0/0 ratios count as kept
    for eps in (0.05, 0.3):
        w, idx = sparsemixer_v2_routing(z, eps, training=False)
        ref = _ref_round_probs(z, idx[:, 0], eps)
        ref_w = torch.stack(
            [torch.stack([p1[idx[t, 0]], p2[idx[t, 1]]]) for t, (_, p1, _, p2) in enumerate(ref)]
        )
        torch.testing.assert_close(w, ref_w, rtol=1e-12, atol=1e-14)


def test_training_with_one_kept_expert_gives_exact_ones():
    z = torch.tensor([[5.0, 1.0, 0.2, -3.0]] * 4)
    w, idx = sparsemixer_v2_routing(z, 0.01, training=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(w, torch.ones_like(w)) and idx.tolist() == [[0, 1]] * 4


# ---------------------------------------------------------------------------------------------- validation


def test_validation_errors():
    with pytest.raises(ValueError, match="num_experts >= 2"):
        sparsemixer_v2_routing(torch.randn(3, 1), 0.01, training=True)
    with pytest.raises(ValueError, match="moe.topk"):
        sparsemixer_v2_routing(torch.randn(3, 4), 0.01, training=True, topk=3)
    with pytest.raises(ValueError, match="jitter"):
        sparsemixer_v2_routing(torch.randn(3, 4), -0.1, training=True)


def test_input_jitter_range_and_determinism():
    x = torch.ones(1000, 4)
    y = apply_input_jitter(x, 0.01, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, torch.ones(1000, 4))
    assert (y >= 0.99).all() and (y <= 1.01).all() and y.std() > 0.001
    assert torch.equal(y, apply_input_jitter(x, 0.01, generator=torch.Generator().manual_seed(0)))
    assert apply_input_jitter(x, 0.0) is x
