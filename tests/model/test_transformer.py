import math

import pytest
import torch

from megatron_moe.model.transformer import (
    Attention,
    MoETransformer,
    apply_rope,
    build_model,
    is_moe_layer,
    rope_tables,
)

# This module's model: vocab 96, 3 layers, dense ffn 48, 4 experts of ffn 16, Config's default losses and batches.
SMALL = dict(vocab_size=96, num_layers=3, ffn_hidden_size=48, expert_ffn_hidden_size=16, aux_loss_coeff=0.01,
             z_loss_coeff=0.0, micro=4, global_batch=8)


def test_meta_then_init_equals_eager_build(tiny_config):
    cfg = tiny_config(**SMALL)
    eager = MoETransformer(cfg)
    eager.init_weights(torch.Generator().manual_seed(7))
    meta = build_model(cfg, "cpu", seed=7)
    eager_state, meta_state = eager.state_dict(), meta.state_dict()
    assert eager_state.keys() == meta_state.keys()
    for k in eager_state:
        torch.testing.assert_close(meta_state[k], eager_state[k], rtol=0, atol=0, msg=k)
    eager_buffers, meta_buffers = dict(eager.named_buffers()), dict(meta.named_buffers())  # incl. non-persistent
    assert eager_buffers.keys() == meta_buffers.keys() and any("aux_coeff" in k for k in meta_buffers)
    for k in eager_buffers:
        torch.testing.assert_close(meta_buffers[k], eager_buffers[k], rtol=0, atol=0, msg=k)
    tokens = torch.randint(0, 96, (2, 16))
    torch.testing.assert_close(meta.eval()(tokens), eager.eval()(tokens), rtol=0, atol=0)
    other = build_model(cfg, "cpu", seed=8)
    assert not torch.equal(other.tok_embeddings.weight, meta.tok_embeddings.weight)


def test_init_scheme_scales_residual_outputs(tiny_config):
    cfg = tiny_config(**SMALL)
    cfg.model.hidden_size, cfg.model.ffn_hidden_size, cfg.moe.expert_ffn_hidden_size = 256, 512, 256
    model = build_model(cfg, "cpu", seed=0)
    std = cfg.model.init_std
    out_std = std / math.sqrt(2 * cfg.model.num_layers)
    layer = model.layers["0"]
    assert layer.attention.wq.weight.std().item() == pytest.approx(std, rel=0.05)
    assert layer.attention.wo.weight.std().item() == pytest.approx(out_std, rel=0.05)
    assert layer.feed_forward.experts.w2.std().item() == pytest.approx(out_std, rel=0.05)
    assert layer.feed_forward.experts.w1.std().item() == pytest.approx(std, rel=0.05)
    assert torch.all(layer.attention_norm.weight == 1)


def test_moe_layer_placement(tiny_config):
    cfg = tiny_config(**SMALL, first_k_dense=1, layer_freq=2)
    cfg.model.num_layers = 6
    assert [is_moe_layer(cfg, i) for i in range(6)] == [False, True, False, True, False, True]
    model = build_model(cfg)
    kinds = [type(model.layers[str(i)].feed_forward).__name__ for i in range(6)]
    assert kinds == ["FeedForward", "MoELayer"] * 3


def test_causal(tiny_config):
    model = build_model(tiny_config(**SMALL)).eval()
    tokens = torch.randint(0, 96, (1, 16))
    changed = tokens.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 96
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_rope_depends_on_relative_position_only():
    cos, sin = rope_tables(32, 8, 10000.0)
    q, k = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)

    def score(i, j):
        qi = apply_rope(q.view(1, 1, 1, 8).expand(1, 32, 1, 8), cos.double(), sin.double())[0, i, 0]
        kj = apply_rope(k.view(1, 1, 1, 8).expand(1, 32, 1, 8), cos.double(), sin.double())[0, j, 0]
        return (qi * kj).sum()

    torch.testing.assert_close(score(5, 2), score(20, 17), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 4))


def test_gqa_attention_matches_naive_reference():
    torch.manual_seed(0)
    attn = Attention(hidden_size=16, num_heads=4, num_kv_heads=2).double()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    cos, sin = rope_tables(6, 4, 10000.0)
    cos, sin = cos.double(), sin.double()
    out = attn(x, cos, sin)
    # Reference: explicit per-head loops, kv head = q head // (heads per group), masked softmax.
    q = apply_rope(attn.wq(x).view(2, 6, 4, 4), cos, sin)
    k = apply_rope(attn.wk(x).view(2, 6, 2, 4), cos, sin)
    v = attn.wv(x).view(2, 6, 2, 4)
    heads = []
    for h in range(4):
        scores = q[:, :, h] @ k[:, :, h // 2].transpose(1, 2) / 2.0
        scores = scores.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
        heads.append(scores.softmax(-1) @ v[:, :, h // 2])
    ref = attn.wo(torch.cat(heads, dim=-1))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_tied_embeddings_share_weight(tiny_config):
    cfg = tiny_config(**SMALL)
    cfg.model.tie_embeddings = True
    model = build_model(cfg)
    assert model.output is None
    h = torch.randint(0, 96, (1, 4))
    logits = model(h)
    assert logits.shape == (1, 4, 96)


def test_missing_vocab_size_is_an_error(tiny_config):
    cfg = tiny_config(**SMALL)
    cfg.model.vocab_size = 0
    with pytest.raises(ValueError, match="model.vocab_size"):
        MoETransformer(cfg)
