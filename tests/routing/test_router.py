"""The Router module: shapes, fp32 gate under autocast, logit normalisation, validation."""

import pytest
import torch

from megatron_moe.routing import Router, normalize_gate_logits, topk_softmax_routing


def _router(**kw):
    r = Router(hidden_size=16, num_experts=8, topk=kw.pop("topk", 2), **kw)
    r.reset_parameters(0.2, generator=torch.Generator().manual_seed(0))
    return r


@pytest.mark.parametrize("kind", ["topk", "sparsemixer"])
@pytest.mark.parametrize("training", [True, False])
def test_output_shapes_and_dtypes(kind, training):
    r = _router(kind=kind).train(training)
    out = r(torch.randn(10, 16), generator=torch.Generator().manual_seed(1))
    assert out.indices.shape == (10, 2) and out.indices.dtype == torch.int64
    assert out.weights.shape == (10, 2) and out.weights.dtype == torch.float32
    assert out.logits.shape == (10, 8) and out.logits.dtype == torch.float32
    torch.testing.assert_close(out.probs, torch.softmax(out.logits, -1))
    out.weights.sum().backward()
    assert r.gate.weight.grad is not None and r.gate.weight.grad.abs().sum() >= 0


def test_topk_router_matches_function():
    r = _router(kind="topk", topk=3, renormalize=False)
    x = torch.randn(12, 16)
    out = r(x)
    w, idx = topk_softmax_routing(x @ r.gate.weight.T, 3, renormalize=False)
    assert torch.equal(out.indices, idx)
    torch.testing.assert_close(out.weights, w)


def test_fp32_gate_under_bf16_autocast():
    r = _router()
    x = torch.randn(10, 16).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = r(x)
    assert out.logits.dtype == torch.float32 and out.weights.dtype == torch.float32
    ref = x.double() @ r.gate.weight.double().T  # bf16 rounding would give errors ~1e-2
    torch.testing.assert_close(out.logits.double(), ref, rtol=1e-5, atol=1e-5)


def test_logit_norm_toggle():
    x = torch.randn(10, 16)
    plain = _router()(x)
    normed = _router(logit_norm=True, logit_norm_scale=2.0)(x)
    torch.testing.assert_close(normed.logits, normalize_gate_logits(plain.logits, scale=2.0))
    assert not torch.allclose(plain.logits, normed.logits)


def test_reset_parameters_std_and_generator():
    r = Router(64, 32, 2)
    r.reset_parameters(0.02, generator=torch.Generator().manual_seed(3))
    w1 = r.gate.weight.detach().clone()
    assert abs(float(w1.std()) - 0.02) < 0.002 and abs(float(w1.mean())) < 0.002
    r.reset_parameters(0.02, generator=torch.Generator().manual_seed(3))
    assert torch.equal(w1, r.gate.weight)
    assert r.gate.bias is None


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"kind": "expert_choice"}, "moe.router"),
        ({"topk": 9}, "moe.topk"),
        ({"topk": 0}, "moe.topk"),
        ({"kind": "sparsemixer", "topk": 1}, "moe.topk"),
        ({"jitter_eps": -1.0}, "jitter"),
    ],
)
def test_validation(kwargs, name):
    kwargs.setdefault("topk", 2)
    with pytest.raises(ValueError, match=name):
        Router(16, 8, **kwargs)


def test_single_expert_with_logit_norm_raises():
    with pytest.raises(ValueError, match="logit_norm"):
        Router(16, 1, 1, logit_norm=True)


def test_input_shape_checked():
    with pytest.raises(ValueError, match="shape"):
        _router()(torch.randn(2, 3, 16))
