"""Adaptive auxiliary-loss coefficients (docs/routing.md §5, Skywork-MoE 4.2) vs a pure-python reference."""

import pytest
import torch

from megatron_moe.routing import AdaptiveAuxLossCoefficients, ConstantAuxLossCoefficients


def _reference(drop_seq, xi, alpha_max, beta, alpha_0):
    alpha = [alpha_0] * len(drop_seq[0])
    for d in drop_seq:
        alpha = [beta * a + (1 - beta) * min(xi * di, alpha_max) for a, di in zip(alpha, d, strict=True)]
    return alpha


def test_update_rule_follows_reference_and_clips():
    # layer 2 has drop rates large enough that xi * d exceeds alpha_max (clipped)
    drops = [[0.0, 0.01, 0.2], [0.02, 0.03, 0.5], [0.0, 0.0, 0.9], [0.04, 0.01, 0.3]]
    coef = AdaptiveAuxLossCoefficients(3, xi=0.2, alpha_max=0.01, beta=0.9, alpha_0=0.005)
    for d in drops:
        coef.update(torch.tensor(d))
    ref = _reference(drops, 0.2, 0.01, 0.9, 0.005)
    torch.testing.assert_close(coef.coefficients, torch.tensor(ref, dtype=torch.float32))
    assert coef.coefficients.dtype == torch.float32 and coef.coefficients.shape == (3,)
    # without clipping the last layer would differ
    assert _reference(drops, 0.2, 1.0, 0.9, 0.005)[2] > ref[2] + 1e-3


def test_defaults_and_convergence_to_alpha_max():
    coef = AdaptiveAuxLossCoefficients(2)
    assert (coef.xi, coef.alpha_max, coef.beta) == (0.2, 0.01, 0.99)
    torch.testing.assert_close(coef.coefficients, torch.full((2,), 0.01))
    for _ in range(2000):
        coef.update(torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(coef.coefficients, torch.tensor([0.01, 0.0]), atol=1e-10, rtol=0)


def test_state_dict_round_trip_and_mismatch():
    a = AdaptiveAuxLossCoefficients(3, alpha_0=0.0)
    a.update(torch.tensor([0.01, 0.02, 0.03]))
    sd = a.state_dict()
    b = AdaptiveAuxLossCoefficients(3, alpha_0=0.0)
    b.load_state_dict(sd)
    assert torch.equal(a.coefficients, b.coefficients)
    b.update(torch.tensor([0.01, 0.02, 0.03]))
    a.update(torch.tensor([0.01, 0.02, 0.03]))
    assert torch.equal(a.coefficients, b.coefficients)
    assert sd["coefficients"] is not a.coefficients  # a snapshot

    with pytest.raises(ValueError, match="num_layers"):
        AdaptiveAuxLossCoefficients(4, alpha_0=0.0).load_state_dict(sd)
    with pytest.raises(ValueError, match="beta"):
        AdaptiveAuxLossCoefficients(3, beta=0.9, alpha_0=0.0).load_state_dict(sd)
    AdaptiveAuxLossCoefficients(3, beta=0.9, alpha_0=0.0).load_state_dict(sd, strict=False)
    with pytest.raises(ValueError, match="kind"):
        AdaptiveAuxLossCoefficients(3).load_state_dict(ConstantAuxLossCoefficients(3, 0.01).state_dict())


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"xi": -1.0}, "xi"),
        ({"beta": 1.0}, "beta"),
        ({"beta": -0.1}, "beta"),
        ({"alpha_max": -1}, "alpha_max"),
    ],
)
def test_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        AdaptiveAuxLossCoefficients(2, **kwargs)


def test_update_shape_checked():
    with pytest.raises(ValueError, match="shape"):
        AdaptiveAuxLossCoefficients(2).update(torch.zeros(3))


def test_constant_coefficients():
    c = ConstantAuxLossCoefficients(3, 0.001)
    c.update(torch.tensor([0.5, 0.5, 0.5]))
    torch.testing.assert_close(c.coefficients, torch.full((3,), 0.001))
    c2 = ConstantAuxLossCoefficients(3, 0.001)
    c2.load_state_dict(c.state_dict())
    with pytest.raises(ValueError, match="num_layers"):
        ConstantAuxLossCoefficients(2, 0.001).load_state_dict(c.state_dict())
    with pytest.raises(ValueError, match="aux_loss_coeff"):
        ConstantAuxLossCoefficients(2, -1.0)
