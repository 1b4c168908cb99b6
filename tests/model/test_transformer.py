import math

import pytest
import torch

from megatron_moe.config import ConfigError
from megatron_moe.model.transformer import (
    Attention,
    LatentAttention,
    Llama3RopeScaling,
    MoETransformer,
    RMSNorm,
    apply_rope,
    build_model,
    is_moe_layer,
    rope_tables,
)
from tests.builders import RELEASED_OPTIONS

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


def naive_gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference causal attention as explicit per-head loops: q [B, S, heads, d], k/v [B, S, kv_heads, d]
    (kv head = q head // heads per group), masked softmax; returns [B, S, heads * d]."""
    s, heads, d = q.shape[1], q.shape[2], q.shape[3]
    group = heads // k.shape[2]
    out = []
    for h in range(heads):
        scores = q[:, :, h] @ k[:, :, h // group].transpose(1, 2) / math.sqrt(d)
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
        out.append(scores.softmax(-1) @ v[:, :, h // group])
    return torch.cat(out, dim=-1)


@pytest.mark.parametrize("head_dim", [None, 6])
def test_gqa_attention_matches_naive_reference(head_dim):
    """Grouped-query attention against per-head loops, float64; head_dim 6 (model.kv_channels) makes q
    4 x 6 = 24 wide on a hidden size of 16, as Qwen3's 32 heads of 128 on 2048."""
    torch.manual_seed(0)
    attn = Attention(hidden_size=16, num_heads=4, num_kv_heads=2, head_dim=head_dim).double()
    d = head_dim or 4
    assert attn.wq.weight.shape == (4 * d, 16) and attn.wk.weight.shape == (2 * d, 16)
    assert attn.wo.weight.shape == (16, 4 * d)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    cos, sin = rope_tables(6, d, 10000.0)
    cos, sin = cos.double(), sin.double()
    out = attn(x, cos, sin)
    q = apply_rope(attn.wq(x).view(2, 6, 4, d), cos, sin)
    k = apply_rope(attn.wk(x).view(2, 6, 2, d), cos, sin)
    ref = attn.wo(naive_gqa_attention(q, k, attn.wv(x).view(2, 6, 2, d)))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def _rotate_pairs_complex(x: torch.Tensor, position: int, theta: float) -> torch.Tensor:
    """x [r] rotated as r/2 complex numbers x[j] + i x[j + r/2], each by position * theta^(-2j/r)."""
    half = x.shape[0] // 2
    z = torch.complex(x[:half], x[half:])
    freq = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[0])
    z = z * torch.exp(1j * position * freq)
    return torch.cat([z.real, z.imag])


@pytest.mark.parametrize("percent", [0.5, 0.25])
def test_partial_rotary_rotates_the_first_channels_of_each_head(percent):
    """model.rotary_percent (Megatron-LM's --rotary-percent, transformers' partial_rotary_factor): the first
    head_dim x percent channels of every q/k head rotate, as complex pairs over that width (float64 loop), the rest
    carry no position; the tables and rotation equal transformers' GLM-4-MoE ones (float32)."""
    from transformers import Glm4MoeConfig
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeRotaryEmbedding
    from transformers.models.glm4_moe.modeling_glm4_moe import apply_rotary_pos_emb as glm_rope

    torch.manual_seed(0)
    d, r, s = 16, int(16 * percent), 6
    attn = Attention(hidden_size=16, num_heads=4, num_kv_heads=2, head_dim=d).double()
    x = torch.randn(2, s, 16, dtype=torch.float64)
    cos, sin = rope_tables(s, r, 10000.0)
    out = attn(x, cos.double(), sin.double())

    def rotate_first(t):
        t = t.clone()
        for pos in range(s):
            for b in range(t.shape[0]):
                for h in range(t.shape[2]):
                    t[b, pos, h, :r] = _rotate_pairs_complex(t[b, pos, h, :r], pos, 10000.0)
        return t

    q, k = rotate_first(attn.wq(x).view(2, s, 4, d)), rotate_first(attn.wk(x).view(2, s, 2, d))
    ref = attn.wo(naive_gqa_attention(q, k, attn.wv(x).view(2, s, 2, d)))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-7)  # the tables are float32 (values ~1e-3 here)
    assert (out - ref).abs().max() < 1e-3 * (out - attn(x, *rope_tables(s, d, 10000.0))).abs().max()
    config = Glm4MoeConfig(hidden_size=16, num_attention_heads=4, num_key_value_heads=2, head_dim=d,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                            "partial_rotary_factor": percent})
    hf_cos, hf_sin = Glm4MoeRotaryEmbedding(config)(x.float(), torch.arange(s)[None])
    torch.testing.assert_close(hf_cos[0], cos, rtol=0, atol=1e-6)
    qf, kf = attn.wq(x).view(2, s, 4, d).float(), attn.wk(x).view(2, s, 2, d).float()
    hf_q, hf_k = glm_rope(qf.transpose(1, 2), kf.transpose(1, 2), hf_cos, hf_sin)
    torch.testing.assert_close(hf_q.transpose(1, 2).double(), q, rtol=0, atol=1e-5)
    torch.testing.assert_close(hf_k.transpose(1, 2).double(), k, rtol=0, atol=1e-5)


def test_rotary_percent_settings(tiny_config):
    """The model builds its tables over the rotated channels; widths that do not give an even number are named."""
    cfg = tiny_config(rotary_percent=0.5)  # head_dim 8 -> 4 rotary channels
    model = build_model(cfg)
    assert model.rope_cos.shape == (cfg.data.seq_length, 4) and model.layers["0"].attention.core.rope_first
    tiny_config(rotary_percent=0.25).validate()  # 2 channels
    for percent, needle in [(0.1, "gives 0 rotary channels"), (0.375, "gives 3 rotary channels"),
                            (1.5, "expected a fraction")]:
        with pytest.raises(ConfigError, match=needle):
            tiny_config(rotary_percent=percent).validate()
    with pytest.raises(ConfigError, match="latent attention's rotary channels"):
        tiny_config(rotary_percent=0.5, multi_latent_attention=True, num_query_groups=0).validate()


@pytest.mark.parametrize("q_lora_rank,latent_norms", [(0, False), (12, True)])
def test_latent_attention_matches_deepseek_equations_in_a_loop(q_lora_rank, latent_norms):
    """Multi-head latent attention against DeepSeek-V2's equations (9)-(19), one head, query and key at a
    time in float64: score = q_C . k_C + q_R . k_R over sqrt(d_h + d_R), the rotary parts rotated as complex
    numbers, k_R one vector for all heads, values 5 wide (not the q/k width), RMS-normalised latents."""
    torch.manual_seed(0)
    heads, dn, dr, dv, hidden, s = 3, 6, 4, 5, 16, 5
    norms = (RMSNorm(q_lora_rank) if q_lora_rank else None, RMSNorm(8)) if latent_norms else (None, None)
    attn = LatentAttention(hidden, heads, q_lora_rank, 8, dn, dr, dv, False, *norms).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape, dtype=torch.float64) * 0.5)
    x = torch.randn(1, s, hidden, dtype=torch.float64)
    cos, sin = (t.double() for t in rope_tables(s, dr, 10000.0))
    out = attn(x, cos, sin)

    def rms(t, norm):
        return t / torch.sqrt(t.pow(2).mean() + 1e-5) * norm.weight if norm is not None else t

    rows = []
    for t in range(s):
        heads_out = []
        for h in range(heads):
            c_q = x[0, t] if not q_lora_rank else rms(attn.wq_down.weight @ x[0, t], attn.q_latent_norm)
            q = (attn.wq.weight @ c_q).view(heads, dn + dr)[h]
            q_c, q_r = q[:dn], _rotate_pairs_complex(q[dn:], t, 10000.0)
            scores, values = [], []
            for j in range(t + 1):
                c_kv = rms(attn.wkv_down.weight @ x[0, j], attn.kv_latent_norm)
                kv = (attn.wkv.weight @ c_kv).view(heads, dn + dv)[h]
                k_r = _rotate_pairs_complex(attn.wk_rope.weight @ x[0, j], j, 10000.0)
                scores.append((q_c @ kv[:dn] + q_r @ k_r) / math.sqrt(dn + dr))
                values.append(kv[dn:])
            weights = torch.stack(scores).softmax(0)
            heads_out.append(sum(w * v for w, v in zip(weights, values, strict=True)))
        rows.append(attn.wo.weight @ torch.cat(heads_out))
    # 1e-5: the model's rotary tables are float32 (rope_tables), the loop's angles exact
    torch.testing.assert_close(out[0], torch.stack(rows), rtol=1e-5, atol=1e-5)


def test_multi_token_prediction_depths_match_a_truncated_sequence_reference(tiny_config):
    """Depth k at position i predicts token i + k + 1 from depth k - 1's normalised hidden state (the main model's
    final-norm output for k = 1, as megatron-core) and the embedding of token i + k (DeepSeek-V3 eqs. 21-23).
    Reference, float64: the depths run on sequences cut to the positions whose inputs exist (no rolling, nothing
    masked), block by block from the model's own modules; the model's rolled inputs give the same logits there
    (causal attention keeps the wrapped-around tail from reaching them)."""
    cfg = tiny_config(vocab_size=96, mtp_num_layers=2, num_experts=0)  # dense: float64 (no grouped GEMM)
    model = build_model(cfg, "cpu", seed=2).double()
    _randomize(model, 3)
    tokens = torch.randint(0, 96, (2, 10))
    logits, *predictions = model(tokens)
    main, s = cfg.model.num_layers, tokens.shape[1]
    h = model.tok_embeddings(tokens)
    for i in range(main):
        h = model.layers[str(i)](h, model.rope_cos.double(), model.rope_sin.double())
    h = model.norm(h)
    torch.testing.assert_close(logits, model.output(h), rtol=1e-12, atol=1e-12)
    for k in (1, 2):
        depth = model.mtp[str(k - 1)]
        h = h[:, : s - k]  # positions whose token i + k exists
        x = depth.proj(torch.cat([depth.embedding_norm(model.tok_embeddings(tokens[:, k:])), depth.hidden_norm(h)], -1))
        h = depth.norm(model.layers[str(main + k - 1)](x, model.rope_cos.double(), model.rope_sin.double()))
        torch.testing.assert_close(predictions[k - 1][:, : s - k], model.output(h), rtol=1e-10, atol=1e-10)
    # a depth's block is MoE or dense as the last layer (megatron-core builds it from the last layer's spec)
    for layer_freq, moe_depths in ((1, True), (2, False)):
        moe = build_model(tiny_config(vocab_size=96, mtp_num_layers=2, layer_freq=layer_freq), "cpu")
        last = cfg.model.num_layers
        assert [hasattr(moe.layers[str(i)].feed_forward, "experts") for i in (last - 1, last, last + 1)] == [
            moe_depths] * 3


def test_padding_value_heads_to_the_qk_width_changes_nothing():
    """CUDA pads value heads narrower than q/k (latent attention) with zeros for SDPA's flash kernel; forced on
    here, the output and every input gradient equal the unpadded core's (float64)."""
    from megatron_moe.model.transformer import CoreAttention

    torch.manual_seed(0)
    q, k = (torch.randn(2, 6, 3, 10, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 6, 3, 5, dtype=torch.float64, requires_grad=True)
    cos, sin = (t.double() for t in rope_tables(6, 4, 10000.0))
    outs = []
    for pad in (True, False):
        core = CoreAttention(softmax_factor=1.3)
        core.pad_values = pad
        out = core(q, k, v, cos, sin)
        outs.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v))))
    assert outs[0][0].shape == (2, 6, 15)
    for padded, plain in zip(*outs, strict=True):
        torch.testing.assert_close(padded, plain, rtol=1e-12, atol=1e-12)


def test_latent_attention_model_settings(tiny_config):
    """model.multi_latent_attention builds LatentAttention in every layer with the configured widths, rotary
    tables over qk_pos_emb_head_dim only, latent norms with model.qk_layernorm; hidden 20 with 3 heads is fine."""
    cfg = tiny_config(hidden_size=20, num_attention_heads=3, vocab_size=96, multi_latent_attention=True,
                      q_lora_rank=10, kv_lora_rank=8, qk_head_dim=6, qk_pos_emb_head_dim=4, v_head_dim=5,
                      qk_layernorm=True, norm_eps=1e-5, latent_norm_eps=1e-6)
    model = build_model(cfg, "cpu", seed=0)
    attn = model.layers["1"].attention
    assert (attn.q_latent_norm.eps, attn.kv_latent_norm.eps, model.layers["1"].attention_norm.eps) == (1e-6, 1e-6, 1e-5)
    assert isinstance(attn, LatentAttention) and model.rope_cos.shape[1] == 4
    shapes = {n: tuple(p.shape) for n, p in attn.named_parameters()}
    assert shapes == {"wq_down.weight": (10, 20), "q_latent_norm.weight": (10,), "wq.weight": (30, 10),
                      "wkv_down.weight": (8, 20), "kv_latent_norm.weight": (8,), "wkv.weight": (33, 8),
                      "wk_rope.weight": (4, 20), "wo.weight": (20, 15)}
    assert model(torch.randint(0, 96, (2, 8))).shape == (2, 8, 96)
    plain = build_model(tiny_config(vocab_size=96, multi_latent_attention=True, kv_lora_rank=8, qk_head_dim=8,
                                    qk_pos_emb_head_dim=4, v_head_dim=8), "cpu").layers["0"].attention
    assert plain.wq_down is None and plain.q_latent_norm is None and plain.kv_latent_norm is None


def test_kv_channels_sets_the_head_dimension_of_the_model(tiny_config):
    """model.kv_channels reaches every attention and the rotary tables; hidden 16 with 3 heads (not a
    divisor) is fine once the head dimension is its own."""
    cfg = tiny_config(num_experts=0, hidden_size=16, num_attention_heads=3, num_query_groups=1, kv_channels=10,
                      vocab_size=96, qk_layernorm=True)
    model = build_model(cfg, "cpu", seed=0)
    attn = model.layers["0"].attention
    assert attn.head_dim == 10 and attn.wq.weight.shape == (30, 16) and attn.wv.weight.shape == (10, 16)
    assert attn.q_norm.weight.shape == (10,) and model.rope_cos.shape[1] == 10
    assert model(torch.randint(0, 96, (2, 8))).shape == (2, 8, 96)


@pytest.mark.parametrize("normalization", ["RMSNorm", "LayerNorm"])
def test_qk_layernorm_normalises_each_head_of_q_and_k_before_rope(tiny_config, normalization):
    """model.qk_layernorm: the model's attention equals explicit per-head loops that normalise q and k over
    head_dim with the (shared, non-trivial) norm weights, in float64, then rotate and attend."""
    cfg = tiny_config(num_experts=0, qk_layernorm=True, normalization=normalization, hidden_size=16,
                      num_attention_heads=4, num_query_groups=2, vocab_size=96)
    model = build_model(cfg, "cpu", seed=3).double()
    attn = model.layers["0"].attention
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for norm in (attn.q_norm, attn.k_norm):
            for p in norm.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(2, 6, 16, generator=g, dtype=torch.float64)
    cos, sin = (t.double() for t in rope_tables(6, 4, 10000.0))

    def normalise(t, norm):  # t [B, S, heads, 4], each head on its own
        out = torch.empty_like(t)
        for h in range(t.shape[2]):
            head = t[:, :, h]
            if normalization == "RMSNorm":
                head = head / torch.sqrt(head.pow(2).mean(-1, keepdim=True) + cfg.model.norm_eps)
                out[:, :, h] = head * norm.weight
            else:
                centred = head - head.mean(-1, keepdim=True)
                head = centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + cfg.model.norm_eps)
                out[:, :, h] = head * norm.weight + norm.bias
        return out

    q = apply_rope(normalise(attn.wq(x).view(2, 6, 4, 4), attn.q_norm), cos, sin)
    k = apply_rope(normalise(attn.wk(x).view(2, 6, 2, 4), attn.k_norm), cos, sin)
    ref = attn.wo(naive_gqa_attention(q, k, attn.wv(x).view(2, 6, 2, 4)))
    torch.testing.assert_close(attn(x, cos, sin), ref, rtol=1e-10, atol=1e-10)
    assert build_model(tiny_config(num_experts=0, vocab_size=96), "cpu").layers["0"].attention.q_norm is None


def test_tied_embeddings_share_weight(tiny_config):
    cfg = tiny_config(**SMALL)
    cfg.model.tie_embeddings = True
    model = build_model(cfg)
    assert not list(model.output.parameters()) and "output.weight" not in model.state_dict()
    h = torch.randint(0, 96, (1, 4))
    logits = model(h)
    assert logits.shape == (1, 4, 96)
    torch.testing.assert_close(logits, model.norm(_hidden(model, h)) @ model.tok_embeddings.weight.T)


def test_missing_vocab_size_is_an_error(tiny_config):
    cfg = tiny_config(**SMALL)
    cfg.model.vocab_size = 0
    with pytest.raises(ValueError, match="model.vocab_size"):
        MoETransformer(cfg)


# ----------------------------------------------------------------- options of released models
def _llama3_frequencies_loop(head_dim, theta, factor, low, high, original):
    """Meta's llama3 ``apply_scaling``, one frequency at a time in Python floats (float64)."""
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / theta ** (i / head_dim)
        wavelength = 2 * math.pi / freq
        if wavelength < original / high:
            out.append(freq)
        elif wavelength > original / low:
            out.append(freq / factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("head_dim", [8, 64, 128])
def test_llama3_rope_scaling_matches_transformers_and_a_loop(head_dim):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = Llama3RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192)
    theta = 500000.0
    base = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ours = scaling.apply(base)
    loop = _llama3_frequencies_loop(head_dim, theta, 8.0, 1.0, 4.0, 8192)
    torch.testing.assert_close(ours, loop, rtol=1e-15, atol=0)  # same formula, float64: rounding only
    hf_config = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, max_position_embeddings=131072,
                            rope_parameters={"rope_type": "llama3", "rope_theta": theta, "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 8192})
    hf, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    assert attention_factor == 1.0
    torch.testing.assert_close(ours.float(), hf, rtol=1e-6, atol=0)  # transformers computes in float32
    if head_dim == 128:  # Llama 3.1's shape: all three regimes present, so the test could fail
        assert (ours == base).any() and (ours == base / 8).any() and ((ours != base) & (ours != base / 8)).any()
    cos, sin = rope_tables(16, head_dim, theta, scaling=scaling)
    angles = torch.outer(torch.arange(16, dtype=torch.float64), loop)
    torch.testing.assert_close(cos[:, : head_dim // 2], angles.cos().float(), rtol=0, atol=1e-7)
    torch.testing.assert_close(sin[:, head_dim // 2 :], angles.sin().float(), rtol=0, atol=1e-7)


def _yarn_frequencies_loop(dim, theta, factor, original, beta_fast, beta_slow):
    """YaRN's frequencies (arXiv 2309.00071 eq. 18-19 as DeepSeek-V3 and megatron-core apply them), one at a
    time in Python floats: the wavelength ratio r_i = original / (2 pi theta^(2i/d)) against beta_slow/fast,
    the ramp's ends at the dimensions of beta_fast and beta_slow rotations, floored / ceiled."""
    def bound(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = max(math.floor(bound(beta_fast)), 0), min(math.ceil(bound(beta_slow)), dim - 1)
    out = []
    for i in range(dim // 2):
        freq = theta ** (-2 * i / dim)
        interpolate = min(max((i - low) / (high - low), 0.0), 1.0)  # 0: keep f, 1: f / s
        out.append(freq * (1 - interpolate) + freq / factor * interpolate)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("dim,theta,factor,original,mscale,mscale_all_dim", [
    (64, 10000.0, 40.0, 4096, 1.0, 1.0),  # DeepSeek-V3's rotary part
    (64, 50000.0, 32.0, 4096, 1.0, 1.0),  # Kimi-K2's
    (128, 1000000.0, 4.0, 32768, 1.0, 0.0),  # Qwen2.5's long-context YaRN (GQA)
    (64, 10000.0, 40.0, 4096, 0.707, 0.707),  # DeepSeek-V2-Lite's
])
def test_yarn_matches_transformers_megatron_core_and_a_loop(dim, theta, factor, original, mscale, mscale_all_dim):
    """YaRN's frequencies, cos/sin factor and latent attention's softmax factor against a float64 loop,
    transformers' _compute_yarn_parameters (float32) and megatron-core's own YaRN functions."""
    from megatron.core.models.common.embeddings import yarn_rotary_pos_embedding as mc
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megatron_moe.model.transformer import YarnRopeScaling

    yarn = YarnRopeScaling(factor, original, 32.0, 1.0, mscale, mscale_all_dim, theta)
    base = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    ours = yarn.apply(base)
    torch.testing.assert_close(ours, _yarn_frequencies_loop(dim, theta, factor, original, 32.0, 1.0), rtol=1e-14,
                               atol=0)
    assert (ours == base).any() and (ours == base / factor).any() and ((ours != base) & (ours != base / factor)).any()
    params = {"rope_type": "yarn", "rope_theta": theta, "factor": factor, "original_max_position_embeddings": original,
              "beta_fast": 32, "beta_slow": 1, "mscale": mscale, "mscale_all_dim": mscale_all_dim}
    hf_config = DeepseekV3Config(hidden_size=256, num_attention_heads=2, qk_rope_head_dim=dim,
                                 max_position_embeddings=original * int(factor), rope_parameters=params)
    hf, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config, "cpu")
    torch.testing.assert_close(ours.float(), hf, rtol=1e-6, atol=0)
    assert yarn.attention_factor == pytest.approx(attention_factor, rel=1e-12)
    low, high = mc._yarn_find_correction_range(32.0, 1.0, dim, theta, original, True)
    keep = 1.0 - mc._yarn_linear_ramp_mask(low, high, dim // 2, device="cpu").double()
    torch.testing.assert_close(ours, base / factor * (1 - keep) + base * keep, rtol=1e-6, atol=0)  # a float32 ramp
    assert yarn.attention_factor == pytest.approx(mc._yarn_get_concentration_factor(factor, mscale, mscale_all_dim))
    assert yarn.softmax_factor == pytest.approx(mc._yarn_get_mscale(factor, mscale_all_dim) ** 2)
    cos, sin = rope_tables(8, dim, theta, scaling=yarn)
    angles = torch.outer(torch.arange(8, dtype=torch.float64), ours)
    torch.testing.assert_close(cos[:, : dim // 2].double(), angles.cos() * yarn.attention_factor, rtol=0, atol=1e-7)


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (norm weights around 1, biases nonzero), so each one matters to the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            values = torch.randn(p.shape, generator=g, dtype=torch.float64)
            p.copy_(1 + 0.3 * values if name.endswith("norm.weight") else 0.3 * values)


def _reference_forward(params: dict, tokens: torch.Tensor, m, num_layers: int) -> torch.Tensor:
    """The decoder written out in float64: LayerNorm from mean and variance, x @ W^T + b, RoPE as a
    rotation of each (i, i + d/2) pair by position x frequency (loop frequencies), attention per head."""
    heads, kv_heads, d = m.num_attention_heads, m.num_kv_heads, m.head_dim
    freqs = _llama3_frequencies_loop(d, m.rope_theta, m.rope_scaling_factor, m.rope_low_freq_factor,
                                     m.rope_high_freq_factor, m.rope_original_max_position)

    def layer_norm(x, prefix):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + m.norm_eps) * params[prefix + ".weight"] + params[prefix + ".bias"]

    def linear(x, prefix):
        return x @ params[prefix + ".weight"].T + params[prefix + ".bias"]

    def rotate(x):  # [B, S, n, d]
        out = x.clone()
        for pos in range(x.shape[1]):
            for i in range(d // 2):
                c, s = math.cos(pos * freqs[i]), math.sin(pos * freqs[i])
                a, b = x[:, pos, :, i], x[:, pos, :, i + d // 2]
                out[:, pos, :, i], out[:, pos, :, i + d // 2] = a * c - b * s, a * s + b * c
        return out

    h = params["tok_embeddings.weight"][tokens]
    b, s = tokens.shape
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)
    for layer in range(num_layers):
        p = f"layers.{layer}."
        x = layer_norm(h, p + "attention_norm")
        q = rotate(linear(x, p + "attention.wq").view(b, s, heads, d))
        k = rotate(linear(x, p + "attention.wk").view(b, s, kv_heads, d))
        v = linear(x, p + "attention.wv").view(b, s, kv_heads, d)
        outs = []
        for head in range(heads):
            kv = head // (heads // kv_heads)
            scores = (q[:, :, head] @ k[:, :, kv].transpose(1, 2) / math.sqrt(d)).masked_fill(causal, float("-inf"))
            outs.append(scores.softmax(-1) @ v[:, :, kv])
        h = h + linear(torch.cat(outs, -1), p + "attention.wo")
        x = layer_norm(h, p + "ffn_norm")
        gate = linear(x, p + "feed_forward.w1")
        h = h + linear(gate * torch.sigmoid(gate) * linear(x, p + "feed_forward.w3"), p + "feed_forward.w2")
    return linear(layer_norm(h, "norm"), "output")


def test_layernorm_bias_llama3_model_matches_float64_reference(tiny_config):
    cfg = tiny_config(num_experts=0, num_layers=2, hidden_size=16, num_attention_heads=2, num_query_groups=1,
                      ffn_hidden_size=24, vocab_size=40, **RELEASED_OPTIONS)
    model = build_model(cfg).double()
    assert isinstance(model.norm, torch.nn.LayerNorm) and model.norm.bias is not None
    biases = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    assert biases == {"norm.bias", "output.bias"} | {
        f"layers.{i}.{n}.bias" for i in range(2) for n in (
            "attention_norm", "ffn_norm", "attention.wq", "attention.wk", "attention.wv", "attention.wo",
            "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")}
    assert all(not model.state_dict()[n].any() for n in biases)  # initialised to zero
    _randomize(model, seed=1)
    tokens = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(2))
    ours = model.eval()(tokens)
    ref = _reference_forward(dict(model.named_parameters()), tokens, cfg.model, 2)
    # float64 both ways, except the model's cos/sin tables, which are float32 buffers (6e-8 relative):
    # observed 1.6e-7 absolute on O(1) logits. A missing bias or an unscaled RoPE frequency moves them by O(0.1).
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def test_moe_experts_and_router_stay_bias_free(tiny_config):
    model = build_model(tiny_config(**RELEASED_OPTIONS))
    moe = model.layers["0"].feed_forward
    assert not [n for n, _ in moe.named_parameters() if "bias" in n]
    assert model.layers["0"].attention.wo.bias is not None


def test_biased_rope_scaled_model_matches_transformers_llama(tiny_config):
    """transformers' Llama with attention and MLP biases and llama3 RoPE = our add_qkv_bias + add_bias_linear
    (RMSNorm), weights copied; eval logits equal at float64 rounding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    options = {k: v for k, v in RELEASED_OPTIONS.items() if k not in ("normalization", "lm_head_bias")}
    cfg = tiny_config(num_experts=0, num_layers=2, hidden_size=16, num_attention_heads=2, num_query_groups=1,
                      ffn_hidden_size=24, vocab_size=40, **options)
    m = cfg.model
    model = build_model(cfg).double()
    _randomize(model, seed=3)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, rms_norm_eps=m.norm_eps, attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
        max_position_embeddings=128, rope_parameters={"rope_type": "llama3", "rope_theta": m.rope_theta, "factor": 8.0,
                                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 64},
        attn_implementation="eager")).double().eval()
    names = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head",
             "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
             "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj",
             "feed_forward.w3": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj"}
    hf_params = dict(hf.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            module, kind = name.rsplit(".", 1)
            if module.startswith("layers."):
                _, i, rest = module.split(".", 2)
                target = f"model.layers.{i}.{names[rest]}.{kind}"
            else:
                target = f"{names[module]}.{kind}"
            hf_params.pop(target).copy_(p)
    assert not hf_params, f"transformers parameters without a counterpart: {sorted(hf_params)}"
    tokens = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(4))
    # transformers computes the RoPE frequencies in float32 (~1e-7 relative): logits agree to ~1e-6.
    torch.testing.assert_close(model.eval()(tokens), hf(tokens).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("normalization", ["RMSNorm", "LayerNorm"])
def test_apply_layernorm_1p_is_the_plain_norm_with_its_weight_plus_one(tiny_config, normalization):
    """--apply-layernorm-1p: every norm weight starts at 0 and the model computes what the plain model
    computes with each norm weight + 1, bit for bit (the same scale tensor reaches the same kernel)."""
    settings = dict(num_layers=2, vocab_size=40, normalization=normalization)
    one_p = build_model(tiny_config(**settings, apply_layernorm_1p=True))
    norms = [n for n, _ in one_p.named_parameters() if n.endswith("norm.weight")]
    assert len(norms) == 5 and all(not one_p.state_dict()[n].any() for n in norms)
    _randomize(one_p, seed=3)
    plain = build_model(tiny_config(**settings))
    plain.load_state_dict({k: v + 1 if k in norms else v for k, v in one_p.state_dict().items()})
    tokens = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(one_p.eval()(tokens), plain.eval()(tokens))
        assert not torch.equal(build_model(tiny_config(**settings)).eval()(tokens), plain(tokens))


def _hidden(model, tokens):
    """The last block's output, by hand."""
    h = model.tok_embeddings(tokens)
    for layer in model.layers.values():
        h = layer(h, model.rope_cos, model.rope_sin)
    return h
