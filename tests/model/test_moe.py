import pytest
import torch

from megatron_moe.config import MoEConfig
from megatron_moe.model.moe import MoELayer, grouped_swiglu
from megatron_moe.model.transformer import FeedForward
from megatron_moe.testing import run_distributed


def expert_loop(x, w1, w3, w2, counts):
    """Reference: one dense SwiGLU per expert over its slice of the sorted rows."""
    outs, start = [], 0
    for e, n in enumerate(counts):
        xe = x[start : start + n]
        outs.append((torch.nn.functional.silu(xe @ w1[e]) * (xe @ w3[e])) @ w2[e])
        start += n
    return torch.cat(outs)


def test_grouped_gemm_equals_per_expert_loop_forward_and_backward():
    torch.manual_seed(0)
    E, H, F = 5, 12, 20
    counts = [3, 0, 7, 0, 4]  # experts 1 and 3 receive no tokens
    x = torch.randn(sum(counts), H, requires_grad=True)
    ws = [torch.randn(E, H, F, requires_grad=True), torch.randn(E, H, F, requires_grad=True),
          torch.randn(E, F, H, requires_grad=True)]
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    grad_out = torch.randn(sum(counts), H)

    out = grouped_swiglu(x, *ws, offsets)
    out.backward(grad_out)
    got = [x.grad.clone()] + [w.grad.clone() for w in ws]
    for t in [x, *ws]:
        t.grad = None
    ref = expert_loop(x, *ws, counts)
    ref.backward(grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, t in zip(got, [x, *ws], strict=True):
        torch.testing.assert_close(g, t.grad, rtol=1e-5, atol=1e-5)
    assert torch.all(got[1][1] == 0) and torch.all(got[3][3] == 0)


def test_grouped_gemm_reduction_backward_needs_no_contiguous_grad():
    x = torch.randn(6, 4, requires_grad=True)
    w = [torch.randn(2, 4, 8, requires_grad=True), torch.randn(2, 4, 8, requires_grad=True),
         torch.randn(2, 8, 4, requires_grad=True)]
    grouped_swiglu(x, *w, torch.tensor([2, 6], dtype=torch.int32)).sum().backward()  # expanded grad
    assert x.grad is not None


def make_layer(**kw) -> MoELayer:
    cfg = MoEConfig(**{"num_experts": 4, "topk": 2, **kw})
    layer = MoELayer(16, 24, cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3, generator=g)
    return layer


def naive_moe(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Per-token loop over the router's choices."""
    route = layer.router(x)
    w1, w3, w2 = layer.experts.w1, layer.experts.w3, layer.experts.w2
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(layer.topk):
            e = int(route.indices[t, slot])
            y = (torch.nn.functional.silu(x[t] @ w1[e]) * (x[t] @ w3[e])) @ w2[e]
            out[t] += route.weights[t, slot] * y
        if layer.shared_expert is not None:  # every token, scaled by sigmoid(x . g) when gated
            s = layer.shared_expert
            y = s.w2.weight @ (torch.nn.functional.silu(s.w1.weight @ x[t]) * (s.w3.weight @ x[t]))
            if layer.shared_gate is not None:
                y = y / (1 + torch.exp(-(layer.shared_gate.weight[0] @ x[t])))
            out[t] += y
    return out


@pytest.mark.parametrize("router, topk, shared", [("topk", 2, {}), ("topk", 1, {}), ("topk", 3, {}),
                                                  ("sparsemixer", 2, {}),
                                                  ("topk", 2, {"shared_expert_ffn_hidden_size": 20}),
                                                  ("topk", 4, {"shared_expert_ffn_hidden_size": 20,
                                                               "shared_expert_gate": True}),
                                                  ("topk", 2, {"score_function": "sigmoid", "expert_bias": True,
                                                               "topk_scaling_factor": 2.5})])
def test_moe_layer_equals_naive_per_token_reference_forward_and_backward(router, topk, shared):
    """Dispatch to experts and combine (row permutations with gather-only backwards) against a per-token
    loop, outputs and the gradients of the input and of every parameter (float32: the grouped GEMM has no
    float64 kernel; the tolerance is a few float32 roundings of sums of ~50 terms of size ~1). With a shared
    expert (Qwen2-MoE's, gated by a sigmoid) every token also passes it; with DeepSeek-V3's sigmoid routing the
    loop takes the router's choices (made with its expert bias) and weights (x the scaling factor)."""
    layer = make_layer(router=router, topk=topk, balance_loss="none", **shared).eval()
    if layer.router.expert_bias is not None:  # DeepSeek-V3's bias: chooses, never weights
        layer.router.expert_bias.copy_(torch.tensor([0.5, -0.5, 0.0, 0.2]))
    assert (layer.shared_expert is not None) == ("shared_expert_ffn_hidden_size" in shared)
    assert (layer.shared_gate is not None) == ("shared_expert_gate" in shared)
    x = torch.randn(2, 9, 16)
    upstream = torch.randn(18, 16)
    ours, reference = x.clone().requires_grad_(), x.reshape(-1, 16).clone().requires_grad_()
    out, expected = layer(ours).reshape(-1, 16), naive_moe(layer, reference)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    params = list(layer.parameters())
    grads = torch.autograd.grad((out * upstream).sum(), [ours, *params])
    expected_grads = torch.autograd.grad((expected * upstream).sum(), [reference, *params])
    torch.testing.assert_close(grads[0].reshape(-1, 16), expected_grads[0], rtol=1e-5, atol=1e-5)
    for got, want in zip(grads[1:], expected_grads[1:], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_identical_experts_with_renormalised_topk_equal_dense_ffn():
    layer = make_layer(router="topk", renormalize=True)
    dense = FeedForward(16, 24)
    with torch.no_grad():
        layer.experts.w1.copy_(dense.w1.weight.t().expand(4, -1, -1))
        layer.experts.w3.copy_(dense.w3.weight.t().expand(4, -1, -1))
        layer.experts.w2.copy_(dense.w2.weight.t().expand(4, -1, -1))
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-6, atol=1e-6)


def test_aux_loss_gradient_reaches_router_through_output():
    layer = make_layer(aux_loss_coeff=0.5, z_loss_coeff=0.1)
    layer.set_aux_loss_scale(0.25)
    x = torch.randn(20, 16)
    layer(x).sum().backward()
    got = layer.router.gate.weight.grad.clone()
    # Reference: the same quantities formed explicitly and added to the loss.
    layer.zero_grad()
    layer.set_aux_loss_scale(0.0)  # no attached gradient: add it by hand
    route = layer.router(x)
    probs = route.logits.softmax(-1)
    f = torch.bincount(route.indices.flatten(), minlength=4).float() / route.indices.numel()
    switch = 4 * (f * probs.mean(0)).sum()
    z = (torch.logsumexp(route.logits, -1) ** 2).mean()
    (layer(x).sum() + 0.25 * (0.5 * switch + 0.1 * z)).backward()
    torch.testing.assert_close(got, layer.router.gate.weight.grad, rtol=1e-5, atol=1e-7)


def test_sequence_balance_loss_is_taken_over_the_layers_input_sequences():
    """moe.balance_loss = "sequence": the attached gradient is that of the sequence-wise loss over the B sequences
    of the [B, S, H] input (not of one sequence of B * S tokens)."""
    from megatron_moe.routing import sequence_balance_loss

    layer = make_layer(aux_loss_coeff=0.5, balance_loss="sequence")
    x = torch.randn(2, 10, 16, generator=torch.Generator().manual_seed(4))
    layer(x).sum().backward()
    got = layer.router.gate.weight.grad.clone()
    layer.zero_grad()
    layer.set_aux_loss_scale(0.0)
    route = layer.router(x.reshape(-1, 16))
    explicit = sequence_balance_loss(route.probs, route.indices, 2)
    assert explicit.item() != pytest.approx(sequence_balance_loss(route.probs, route.indices, 1).item())
    (layer(x).sum() + 0.5 * explicit).backward()
    torch.testing.assert_close(got, layer.router.gate.weight.grad, rtol=1e-5, atol=1e-7)


def test_capacity_mode_drops_lowest_probability_assignments():
    layer = make_layer(dropless=False, capacity_factor=0.5).eval()
    dropless = make_layer(dropless=True, capacity_factor=0.5).eval()
    x = torch.randn(32, 16)
    out = layer(x)
    route = layer.router(x)
    gate = route.probs.gather(1, route.indices).detach()
    capacity = 8  # ceil(0.5 * 32 tokens * 2 slots / 4 experts)
    keep = torch.zeros_like(route.indices, dtype=torch.bool)
    for e in range(4):  # naive: per expert keep the `capacity` highest-probability assignments
        pos = (route.indices == e).nonzero().tolist()
        pos.sort(key=lambda p: (-gate[p[0], p[1]].item(), p[0]))
        for t, s in pos[:capacity]:
            keep[t, s] = True
    ref_layer = make_layer(dropless=True).eval()
    w1, w3, w2 = ref_layer.experts.w1, ref_layer.experts.w3, ref_layer.experts.w2
    ref = torch.zeros_like(x)
    for t in range(32):
        for s in range(2):
            if keep[t, s]:
                e = int(route.indices[t, s])
                ref[t] += route.weights[t, s] * ((torch.nn.functional.silu(x[t] @ w1[e]) * (x[t] @ w3[e])) @ w2[e])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, dropless(x))
    stats = layer.pop_stats()
    expected_drop = torch.clamp(stats.counts - capacity, min=0).sum() / 64
    torch.testing.assert_close(stats.drop_rate, expected_drop)


def test_stats_accumulate_over_micro_batches():
    layer = make_layer()
    for _ in range(3):
        layer(torch.randn(10, 16))
    stats = layer.pop_stats()
    assert stats.num_micro_batches == 3 and stats.counts.sum().item() == 3 * 10 * 2
    assert layer.pop_stats().num_micro_batches == 0
    with layer.muted_stats():
        layer(torch.randn(10, 16))
    assert layer.pop_stats().num_micro_batches == 0
    layer(torch.randn(10, 16))
    stats = layer.pop_stats()
    row = stats.pack()
    again = type(stats).unpack(row + row)  # packed statistics add up
    assert again.num_micro_batches == 2 and torch.equal(again.counts, 2 * stats.counts)
    torch.testing.assert_close(again.mean("drop_rate"), stats.drop_rate)


def _overlap_body(rank, world_size):
    torch.manual_seed(rank)
    layer = make_layer(balance_scope="global")
    layer.set_balance_group(torch.distributed.group.WORLD)
    events = []
    layer.trace = events.append
    layer(torch.randn(12, 16)).sum().backward()
    return events


def test_global_counts_allreduce_is_in_flight_while_experts_run():
    for events in run_distributed(_overlap_body, world_size=2):
        assert events == ["counts_allreduce_start", "experts_start", "experts_end", "counts_allreduce_wait"]


def test_groups_padded_to_an_alignment_give_the_same_outputs_and_gradients():
    """Padding each expert's rows (what CUDA's grouped GEMM needs) changes nothing but the layout."""
    from megatron_moe.model.moe import expert_row_alignment

    results = []
    for alignment in (1, 8):
        layer = make_layer(expert_row_alignment=alignment).eval()
        with torch.no_grad():
            layer.router.gate.weight[3] = -100.0  # expert 3 gets no token: an empty, still padded group
        x = torch.rand(13, 16, generator=torch.Generator().manual_seed(5)).requires_grad_()  # > 0: logit 3 < 0
        out = layer(x)
        out.pow(2).sum().backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
        results.append((out.detach(), x.grad.clone(), grads))
        assert layer.pop_stats().counts[3] == 0
    (out1, gx1, g1), (out8, gx8, g8) = results
    torch.testing.assert_close(out8, out1, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx8, gx1, rtol=1e-6, atol=1e-6)
    for name in g1:
        torch.testing.assert_close(g8[name], g1[name], rtol=1e-5, atol=1e-6, msg=name)
    assert expert_row_alignment(0, torch.zeros(1)) == 1  # CPU: no padding unless asked
    assert expert_row_alignment(4, torch.zeros(1)) == 4
