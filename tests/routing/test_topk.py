"""Top-K softmax router (docs/routing.md §1) against a naive per-token float64 reference."""

import math

import pytest
import torch

from megatron_moe.routing import topk_softmax_routing


def _naive_topk(logits: torch.Tensor, k: int, renormalize: bool):
    """Per-token python loop: softmax by hand, pick the k largest, optionally renormalise."""
    weights, indices = [], []
    for row in logits.tolist():
        m = max(row)
        ex = [math.exp(v - m) for v in row]
        s = sum(ex)
        p = [v / s for v in ex]
        order = sorted(range(len(p)), key=lambda i: -p[i])[:k]
        w = [p[i] for i in order]
        if renormalize:
            tot = sum(w)
            w = [v / tot for v in w]
        weights.append(w)
        indices.append(order)
    return torch.tensor(weights, dtype=torch.float64), torch.tensor(indices)


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_matches_naive_loop(renormalize, k):
    g = torch.Generator().manual_seed(k)
    logits = torch.randn(37, 6, generator=g, dtype=torch.float64) * 2
    w, idx = topk_softmax_routing(logits, k, renormalize=renormalize)
    ref_w, ref_idx = _naive_topk(logits, k, renormalize)
    assert idx.dtype == torch.int64 and idx.shape == (37, k)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(w, ref_w, rtol=1e-12, atol=1e-12)
    if renormalize:
        torch.testing.assert_close(w.sum(-1), torch.ones(37, dtype=torch.float64))


def test_topk_fp32_compute_for_low_precision_input():
    logits = torch.randn(8, 4).to(torch.bfloat16)
    w, _ = topk_softmax_routing(logits, 2)
    assert w.dtype == torch.float32
    ref_w, _ = _naive_topk(logits.double(), 2, True)
    torch.testing.assert_close(w.double(), ref_w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("renormalize", [True, False])
def test_topk_gradcheck(renormalize):
    g = torch.Generator().manual_seed(3)
    # well-separated logits so the finite-difference perturbation never changes the selection
    logits = (torch.randperm(6 * 5, generator=g).double().reshape(5, 6) * 0.3).requires_grad_()
    assert torch.autograd.gradcheck(lambda z: topk_softmax_routing(z, 2, renormalize)[0], (logits,))


def test_topk_gradient_is_gate_gradient():
    """Without renormalisation, dw/dz is the softmax Jacobian rows of the picked experts."""
    logits = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    w, idx = topk_softmax_routing(logits, 2, renormalize=False)
    w.sum().backward()
    p = torch.softmax(logits.detach(), -1)
    pk = p.gather(-1, idx)
    onehot = torch.zeros_like(p).scatter_(-1, idx, 1.0)
    ref = p * (onehot - pk.sum(-1, keepdim=True))  # sum_k p_k (e_k - p)
    torch.testing.assert_close(logits.grad, ref)


def test_topk_validation():
    with pytest.raises(ValueError, match="moe.topk"):
        topk_softmax_routing(torch.randn(3, 4), 5)
    with pytest.raises(ValueError, match="moe.topk"):
        topk_softmax_routing(torch.randn(3, 4), 0)
