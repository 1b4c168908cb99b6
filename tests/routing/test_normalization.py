"""Gating logit normalisation (docs/routing.md §2, Skywork-MoE eq. 6)."""

import math

import pytest
import torch

from megatron_moe.routing import normalize_gate_logits


def _reference(z: torch.Tensor, scale: float, eps: float) -> torch.Tensor:
    """Float64 per-token loop: lambda * (z - mean) / (unbiased std + eps)."""
    out = []
    for row in z.double().tolist():
        n = len(row)
        mean = sum(row) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in row) / (n - 1))
        out.append([scale * (v - mean) / (std + eps) for v in row])
    return torch.tensor(out, dtype=torch.float64)


def test_matches_float64_reference():
    z = torch.randn(20, 8, dtype=torch.float64) * 3 + 1
    torch.testing.assert_close(normalize_gate_logits(z), _reference(z, 1.0, 1e-6), rtol=1e-12, atol=1e-12)
    # and the unbiased torch.std definition
    ref = (z - z.mean(-1, keepdim=True)) / (torch.std(z, dim=-1, unbiased=True, keepdim=True) + 1e-6)
    torch.testing.assert_close(normalize_gate_logits(z), ref)


def test_fp32_close_to_reference_and_unit_std():
    z = torch.randn(16, 8) * 5
    out = normalize_gate_logits(z)
    torch.testing.assert_close(out.double(), _reference(z, 1.0, 1e-6), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.std(-1), torch.ones(16), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.mean(-1), torch.zeros(16), rtol=0, atol=1e-5)


def test_scale_two_is_twice():
    z = torch.randn(10, 6, dtype=torch.float64)
    torch.testing.assert_close(normalize_gate_logits(z, scale=2.0), 2 * normalize_gate_logits(z))


def test_softmax_unchanged_by_centering():
    z = torch.randn(10, 6, dtype=torch.float64)
    a = torch.softmax(normalize_gate_logits(z, center=True), -1)
    b = torch.softmax(normalize_gate_logits(z, center=False), -1)
    torch.testing.assert_close(a, b)


def test_all_equal_logits_no_nan():
    z = torch.full((4, 8), 3.25)
    out = normalize_gate_logits(z)
    assert torch.isfinite(out).all()
    assert torch.equal(out, torch.zeros_like(out))
    z.requires_grad_()
    normalize_gate_logits(z).sum().backward()
    assert torch.isfinite(z.grad).all()


def test_single_expert_raises():
    with pytest.raises(ValueError, match="num_experts >= 2"):
        normalize_gate_logits(torch.randn(3, 1))
