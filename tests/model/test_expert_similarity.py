import itertools

import pytest
import torch

from megatron_moe.model.expert_similarity import expert_gram, expert_similarity, mean_pairwise_cosine
from megatron_moe.model.moe import GroupedExperts
from megatron_moe.model.transformer import build_model


def test_matches_naive_pairwise_cosine():
    experts = GroupedExperts(4, 6, 5)
    with torch.no_grad():
        for w in experts.parameters():
            w.normal_()
    vecs = [torch.cat([experts.w1[e].flatten(), experts.w3[e].flatten(), experts.w2[e].flatten()]).double()
            for e in range(4)]
    ref = sum(torch.nn.functional.cosine_similarity(vecs[a], vecs[b], dim=0)
              for a, b in itertools.combinations(range(4), 2)) / 6
    assert mean_pairwise_cosine(expert_gram(experts)) == pytest.approx(ref.item(), abs=1e-6)  # float32 products


def test_identical_experts_have_similarity_one_and_sharded_grams_add_up():
    experts = GroupedExperts(3, 4, 8)
    with torch.no_grad():
        base = [torch.randn(4, 8), torch.randn(4, 8), torch.randn(8, 4)]
        for w, b in zip(experts.parameters(), base, strict=True):
            w.copy_(b.expand_as(w))
    assert mean_pairwise_cosine(expert_gram(experts)) == pytest.approx(1.0, abs=1e-6)
    # Two ffn slices (as two TP ranks hold them): their Gram matrices sum to the full one.
    halves = [GroupedExperts(3, 4, 4) for _ in range(2)]
    with torch.no_grad():
        for k, h in enumerate(halves):
            h.w1.copy_(experts.w1[:, :, 4 * k : 4 * k + 4])
            h.w3.copy_(experts.w3[:, :, 4 * k : 4 * k + 4])
            h.w2.copy_(experts.w2[:, 4 * k : 4 * k + 4, :])
    summed = expert_gram(halves[0]) + expert_gram(halves[1])
    torch.testing.assert_close(summed, expert_gram(experts), rtol=1e-5, atol=1e-5)


def test_model_reports_one_value_per_moe_layer(tiny_config):
    cfg = tiny_config(vocab_size=96, num_layers=3, ffn_hidden_size=48, expert_ffn_hidden_size=16)
    sims = expert_similarity(build_model(cfg))
    assert len(sims) == 3 and all(abs(s) < 0.2 for s in sims)  # random init: nearly orthogonal experts
