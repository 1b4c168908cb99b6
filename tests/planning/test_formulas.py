"""The dry run's counted figures against formulas written out by hand for a small layout."""

from __future__ import annotations

import pytest

from megatron_moe.planning.dry_run import DryRunOptions, plan
from megatron_moe.planning.flops import matmul_active_params, model_flops_per_token
from megatron_moe.planning.simulate import meta_model
from tests.planning.test_accuracy import layout_config


def test_flops_per_token_by_hand():
    cfg = layout_config("tp2pp2")  # hidden 128, 4 heads / 2 KV heads, 4 MoE layers of 4 experts top-2 (ffn 128)
    h, kv, f, e, k, v, layers, s = 128, 2 * 32, 128, 4, 2, 512, 4, 64
    per_layer = h * h + 2 * h * kv + h * h + h * e + k * 3 * h * f  # q, k+v, o, router, K experts (w1, w3, w2)
    n = layers * per_layer + h * v  # + output layer; the embedding is a lookup
    assert matmul_active_params(meta_model(cfg), cfg) == n
    assert model_flops_per_token(cfg, n) == 6 * n + 6 * layers * s * h


def test_flops_per_token_with_a_head_dimension_of_its_own():
    """model.kv_channels = 48 on hidden 128 with 4 heads: q and o are 4 x 48 = 192 wide, k and v 2 x 48,
    and the attention scores cost 6 L S (4 x 48) per token, not 6 L S H."""
    cfg = layout_config("tp2pp2")
    cfg.model.kv_channels = 48
    h, a, kv, f, e, k, v, layers, s = 128, 4 * 48, 2 * 48, 128, 4, 2, 512, 4, 64
    per_layer = h * a + 2 * h * kv + a * h + h * e + k * 3 * h * f
    n = layers * per_layer + h * v
    assert matmul_active_params(meta_model(cfg), cfg) == n
    assert model_flops_per_token(cfg, n) == 6 * n + 6 * layers * s * a


def test_flops_per_token_with_latent_attention():
    """Multi-latent attention on hidden 128, 4 heads: q latent 48 -> 4 x (32 + 16), kv latent 32 -> 4 x (32 + 24),
    a rotary key of 16, o from 4 x 24; the scores cost 6 L S 4 (32 + 16) / 2 and the values 6 L S 4 x 24 / 2."""
    cfg = layout_config("tp2pp2-mla")
    h, f, e, k, v, layers, s = 128, 128, 4, 2, 512, 4, 64
    attention = h * 48 + 48 * 4 * 48 + h * 32 + 32 * 4 * (32 + 24) + h * 16 + 4 * 24 * h
    n = layers * (attention + h * e + k * 3 * h * f) + h * v
    assert matmul_active_params(meta_model(cfg), cfg) == n
    assert model_flops_per_token(cfg, n) == 6 * n + 6 * layers * s * 4 * (48 + 24) / 2


def test_flops_per_token_with_multi_token_prediction():
    """One depth of multi-token prediction: its block (an MoE layer as the last), its [2H -> H] projection and the
    output layer once more in N; its block in L."""
    cfg = layout_config("tp2dp2-mtp")
    h, kv, f, e, k, v, layers, s = 128, 2 * 32, 128, 4, 2, 512, 4, 64
    per_layer = h * h + 2 * h * kv + h * h + h * e + k * 3 * h * f
    n = (layers + 1) * per_layer + 2 * h * h + 2 * h * v
    assert matmul_active_params(meta_model(cfg), cfg) == n
    assert model_flops_per_token(cfg, n) == 6 * n + 6 * (layers + 1) * s * h


@pytest.mark.slow
def test_tensor_parallel_bytes_by_hand():
    """Per micro-batch and MoE block (fp32, B 2 x S 64 x H 128 gathered = 64 KiB): forward and backward
    each gather the sequence and reduce-scatter it twice (attention, experts): 8 x 64 KiB, plus the
    router's combine-weight gradient all-reduce [T = 128, K = 2]. Embedding and output add a gather and
    a reduce-scatter each, the loss three all-reduces of [B S] fp32; once per step, every
    sequence-parallel norm weight's gradient [H] is all-reduced (2 per block, 1 final)."""
    cfg = layout_config("tp2pp2")
    ranks = plan(cfg, DryRunOptions(world_size=4, ranks=[0, 2]))["ranks"]
    full, micro, blocks = 2 * 64 * 128 * 4, 4, 2
    block = 8 * full + 128 * 2 * 4
    first = micro * (blocks * block + 2 * full) + 2 * blocks * 128 * 4
    last = micro * (blocks * block + 2 * full + 3 * 128 * 4) + (2 * blocks + 1) * 128 * 4
    assert [r["comm"]["tp"] for r in ranks] == [first, last]
    assert [r["comm"]["pp"] for r in ranks] == [micro * full // 2] * 2  # [B, S/tp, H] per micro-batch


def test_shared_embedding_gradient_sum_by_hand():
    """Four pipeline stages with the output layer tied: the first and last rank also all-reduce the embedding's
    fp32 gradient [V 512, H 128] (on their own group, booked as pipeline traffic: 4 x 512 x 128 bytes); the middle
    ranks only send their micro-batches' hidden states [B 2, S 64, H 128] on (4 of them, forward and backward)."""
    cfg = layout_config("tp2pp2")
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size = 1, 4
    cfg.model.tie_embeddings = True
    ranks = plan(cfg, DryRunOptions(world_size=4, ranks=[0, 1, 2, 3]))["ranks"]
    boundary, micro, embedding = 2 * 64 * 128 * 4, 4, 4 * 512 * 128
    assert [r["comm"]["pp"] for r in ranks] == [micro * boundary + embedding, 2 * micro * boundary,
                                                 2 * micro * boundary, micro * boundary + embedding]

