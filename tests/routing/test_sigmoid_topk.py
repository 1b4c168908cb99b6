"""Sigmoid scores with an expert bias for choosing (DeepSeek-V3's auxiliary-loss-free balancing,
docs/routing.md §1b) against megatron-core's own functions (``topk_routing_with_score_function``,
``compute_routing_scores_for_aux_loss``, ``get_updated_expert_bias``), a per-token float64 loop and
finite differences."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_moe.routing.router import Router
from megatron_moe.routing.topk import sigmoid_balance_probs, sigmoid_topk_routing, updated_expert_bias

moe_utils = pytest.importorskip("megatron.core.transformer.moe.moe_utils")


def _dense(weights: torch.Tensor, indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    return torch.zeros(weights.shape[0], num_experts, dtype=weights.dtype).scatter(1, indices, weights)


@pytest.mark.parametrize("topk,groups", [(1, None), (2, None), (4, None), (2, (4, 2)), (4, (2, 1))])
@pytest.mark.parametrize("biased", [False, True])
@pytest.mark.parametrize("scaling", [None, 2.5])
def test_sigmoid_routing_equals_megatron_cores(topk, groups, biased, scaling):
    """Weights and chosen experts of the router equal megatron-core's ``topk_routing_with_score_function``
    (score_function sigmoid, its expert bias, top-K scaling factor and group-limited routing), fp32."""
    g = torch.Generator().manual_seed(topk)
    logits = torch.randn(64, 8, generator=g)
    bias = torch.randn(8, generator=g) * 0.3 if biased else None
    router = Router(4, 8, topk, score_function="sigmoid", expert_bias=biased, topk_scaling_factor=scaling or 1.0,
                    groups=groups)
    if biased:
        router.expert_bias.copy_(bias)
    router.gate_logits = lambda x: logits  # route these logits
    route = router(torch.zeros(64, 4))
    probs, routing_map = moe_utils.topk_routing_with_score_function(
        logits, topk, use_pre_softmax=False, score_function="sigmoid", expert_bias=bias, scaling_factor=scaling,
        num_groups=groups and groups[0], group_topk=groups and groups[1])
    ours = _dense(route.weights, route.indices, 8)
    assert torch.equal(ours != 0, routing_map)
    torch.testing.assert_close(ours, probs, rtol=1e-6, atol=1e-7)
    aux_map, aux_scores = moe_utils.compute_routing_scores_for_aux_loss(logits, topk, "sigmoid")
    torch.testing.assert_close(route.probs, aux_scores, rtol=1e-6, atol=1e-8)
    counted = route.indices if route.balance_indices is None else route.balance_indices  # what the losses count
    assert torch.equal(_dense(torch.ones_like(route.weights), counted, 8) != 0, aux_map)


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("groups", [(4, 2), (2, 1)])
def test_group_limited_softmax_routing_equals_megatron_cores(renormalize, groups):
    """Group-limited top-K softmax routing (DeepSeek-V2's device-limited routing) equals megatron-core's: groups
    scored by the logits (top-K then softmax, renormalised) or by the probabilities (pre-softmax). Groups scored by
    their best expert alone (K / groups kept = 1) choose as plain top-K does; by their best two, differently."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(128, 8, generator=g) * 2
    router = Router(4, 8, 2, renormalize=renormalize, groups=groups)
    router.gate_logits = lambda x: logits
    route = router(torch.zeros(128, 4))
    probs, routing_map = moe_utils.topk_routing_with_score_function(
        logits, 2, use_pre_softmax=not renormalize, num_groups=groups[0], group_topk=groups[1])
    ours = _dense(route.weights, route.indices, 8)
    assert torch.equal(ours != 0, routing_map)
    torch.testing.assert_close(ours, probs, rtol=1e-6, atol=1e-7)
    plain = Router(4, 8, 2, renormalize=renormalize)
    plain.gate_logits = lambda x: logits
    same = torch.equal(plain(torch.zeros(128, 4)).indices.sort(-1).values, route.indices.sort(-1).values)
    assert same == (2 // groups[1] == 1)
    assert torch.equal(route.balance_indices.sort(-1).values, torch.topk(route.probs, 2).indices.sort(-1).values)


@pytest.mark.parametrize("scope", ["local", "global"])
def test_balance_loss_counts_the_choice_without_the_bias(scope):
    """The Switch loss of a layer routing with an expert bias equals megatron-core's: the scores normalised
    over the experts and the token counts of the unbiased top-K (DeepSeek-V3 eq. 18), not of the experts the
    bias chose (which differ here, and give another loss)."""
    from megatron_moe.config import MoEConfig
    from megatron_moe.model.moe import MoELayer
    from megatron_moe.routing.balance import expert_counts, switch_balance_loss

    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=8, topk=2, score_function="sigmoid", expert_bias=True, aux_loss_coeff=1.0,
                    balance_loss="switch", balance_scope=scope)
    layer = MoELayer(16, 8, cfg)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
        layer.router.expert_bias.copy_(torch.linspace(-0.4, 0.4, 8))
    x = torch.randn(96, 16)
    layer(x)
    aux = layer.pop_stats().aux_loss
    route = layer.router(x)
    aux_map, scores = moe_utils.compute_routing_scores_for_aux_loss(route.logits, 2, "sigmoid")
    reference = moe_utils.switch_load_balancing_loss_func(scores, aux_map.sum(0), 96, 2, 8, 1.0)
    torch.testing.assert_close(aux, reference, rtol=1e-6, atol=0)
    biased = switch_balance_loss(route.probs, expert_counts(route.indices, 8))
    assert not torch.equal(route.indices.sort(-1).values, route.balance_indices.sort(-1).values)
    assert abs(biased.item() - reference.item()) > 1e-3


def test_sigmoid_routing_equals_a_float64_loop():
    """Per token: s = 1 / (1 + e^-z); choose the K largest s + b; weights s / sum of the chosen s."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20, 6, generator=g, dtype=torch.float64)
    bias = torch.randn(6, generator=g, dtype=torch.float64)
    weights, indices = sigmoid_topk_routing(logits, 3, True, bias)
    for t, row in enumerate(logits.tolist()):
        s = [1 / (1 + math.exp(-z)) for z in row]
        chosen = sorted(range(6), key=lambda i: -(s[i] + bias[i].item()))[:3]
        total = sum(s[i] for i in chosen)
        assert indices[t].tolist() == chosen
        torch.testing.assert_close(weights[t], torch.tensor([s[i] / total for i in chosen], dtype=torch.float64))


@pytest.mark.parametrize("renormalize", [True, False])
def test_sigmoid_weights_gradcheck_and_the_bias_only_chooses(renormalize):
    """The weights' gradient w.r.t. the logits (finite differences, float64); the bias changes which experts are
    chosen but never a chosen expert's weight, and carries no gradient."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(6, dtype=torch.float64)
    _, indices = sigmoid_topk_routing(logits, 2, renormalize, bias)

    def weights_of(z):  # the choice held fixed, as it is piecewise constant
        s = torch.sigmoid(z).gather(1, indices)
        return s / s.sum(-1, keepdim=True) if renormalize else s

    assert torch.autograd.gradcheck(lambda z: sigmoid_topk_routing(z, 2, renormalize, bias)[0], (logits,))
    torch.testing.assert_close(sigmoid_topk_routing(logits, 2, renormalize, bias)[0], weights_of(logits))
    pushed = bias.clone()
    pushed[indices[0, 0]] -= 100.0  # expert no token can pick any more
    w2, i2 = sigmoid_topk_routing(logits, 2, renormalize, pushed)
    assert not (i2 == indices[0, 0]).any()
    kept = (i2 == indices).all(-1)  # tokens whose choice the push did not change keep their weights
    torch.testing.assert_close(w2[kept], sigmoid_topk_routing(logits, 2, renormalize, bias)[0][kept])


def test_bias_update_equals_megatron_cores(monkeypatch):
    """b + rate * sign(mean(c) - c) per layer, as megatron-core's ``get_updated_expert_bias`` (its all-reduce over
    the data-parallel group stands in for ours, an identity here: the counts are already global)."""
    counts = torch.tensor([[10.0, 2.0, 4.0, 4.0], [3.0, 3.0, 3.0, 3.0], [0.0, 9.0, 1.0, 2.0]])
    bias = torch.tensor([[0.1, -0.2, 0.0, 0.05], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda *a, **k: None)
    monkeypatch.setattr(moe_utils.parallel_state, "get_tensor_and_data_parallel_group", lambda **k: None)
    reference = moe_utils.get_updated_expert_bias(counts.clone(), bias, 1e-3)
    ours = torch.stack([updated_expert_bias(b, c, 1e-3) for b, c in zip(bias, counts, strict=True)])
    assert torch.equal(ours, reference)
    assert ours[0].tolist() == pytest.approx([0.099, -0.199, 0.001, 0.051])  # mean 5: 10 down, 2 / 4 / 4 up
    assert torch.equal(ours[1], bias[1])  # balanced: unchanged


def test_router_bias_moves_only_where_the_step_applies_and_balances_a_skewed_router():
    """update_expert_bias with ``apply`` false (a non-finite step) changes nothing; repeated updates from the
    router's own loads make a gate that sends most tokens to one expert balanced (the max load falls from over
    half of the assignments to below 0.2 with 8 experts, top-2)."""
    torch.manual_seed(0)
    router = Router(16, 8, 2, score_function="sigmoid", expert_bias=True)
    with torch.no_grad():
        router.gate.weight.normal_(0, 0.1)
        router.gate.weight[0] += 0.5  # expert 0 scores high for most tokens
    x = torch.randn(512, 16) + 1.0

    def loads():
        counts = torch.bincount(router(x).indices.flatten(), minlength=8).float()
        return counts, counts.max().item() / counts.sum().item()

    counts, first = loads()
    router.update_expert_bias(counts, 1e-2, torch.tensor(False))
    assert torch.equal(router.expert_bias, torch.zeros(8))
    for _ in range(300):
        counts, last = loads()
        router.update_expert_bias(counts, 1e-2)
    assert first > 0.4 and last < 0.2, (first, last)


def test_sigmoid_settings_are_checked():
    with pytest.raises(ValueError, match="moe.expert_bias needs moe.score_function = 'sigmoid'"):
        Router(4, 8, 2, expert_bias=True)
    with pytest.raises(ValueError, match="moe.score_function = 'sigmoid' with moe.router = 'sparsemixer'"):
        Router(4, 8, 2, kind="sparsemixer", score_function="sigmoid")
    for groups in [(3, 1), (4, 3), (8, 1)]:  # not dividing 8; more groups kept than top-2; 1 expert for top-2
        with pytest.raises(ValueError, match="group-limited routing"):
            Router(4, 8, 2, groups=groups)
    assert Router(4, 8, 2).expert_bias is None and "expert_bias" not in Router(4, 8, 2).state_dict()
    assert "expert_bias" in Router(4, 8, 2, score_function="sigmoid", expert_bias=True).state_dict()
    torch.testing.assert_close(sigmoid_balance_probs(torch.zeros(3, 4)), torch.full((3, 4), 0.25))
