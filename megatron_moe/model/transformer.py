"""Decoder-only transformer with MoE feed-forward layers. Single-device code only.

Pre-norm blocks: norm -> grouped-query causal attention (rotary embeddings, SDPA) -> residual,
norm -> SwiGLU FFN or MoE layer -> residual. Layers live in a ``ModuleDict`` keyed by their
global index and the embedding/norm/output may be ``None``, so pipeline stages can be cut from
the same class (torchtitan's layout). Parallelism is applied from outside.

Options of released models (``model.*``, Megatron-LM's flags): every norm RMSNorm (default) or
LayerNorm with weight and bias (``normalization``); biases on q, k, v (``add_qkv_bias``: Qwen2,
PhiMoE); biases on the attention output and the dense SwiGLU's linears (``add_bias_linear``); a
bias on the output layer (``lm_head_bias``: PhiMoE); Llama 3.1's RoPE frequency scaling
(``rope_scaling = "llama3"``) or YaRN (``"yarn"``: :class:`YarnRopeScaling`); DeepSeek-V2/V3's multi-head
latent attention (``multi_latent_attention``: :class:`LatentAttention`). Experts and router gates never have
biases (Mixtral, PhiMoE and GRIN have none there; DeepSeek-V3's expert bias only chooses experts, docs/routing.md §1b).

Weight initialisation (:meth:`MoETransformer.init_weights`), deterministic for a generator:
- embeddings, every input projection (q, k, v, SwiGLU gate/up, expert gate/up) and the output
  layer: normal(0, init_std);
- output projections of each residual branch (attention ``wo``, SwiGLU ``w2``, expert ``w2``):
  normal(0, init_std / sqrt(2 * num_layers)) (GPT-2 / Megatron-LM scaled init), so the residual
  stream's variance does not grow with depth;
- router gates: normal(0, init_std); norm weights: 1 (0 with ``apply_layernorm_1p``, whose norms
  scale by 1 + weight); every bias (norms and linears): 0.
Build large models with ``torch.device("meta")`` and call :func:`materialize` (to_empty + init).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megatron_moe.config import Config, ModelConfig
from megatron_moe.model.moe import MoELayer


class RMSNorm(nn.Module):
    """Root-mean-square layer norm over the last dimension, with a learned scale (``zero_centered``:
    the stored weight w is 0 at init and the scale is 1 + w, Megatron-LM's --apply-layernorm-1p)."""

    def __init__(self, dim: int, eps: float = 1e-5, zero_centered: bool = False):
        super().__init__()
        self.eps, self.zero_centered = eps, zero_centered
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight + 1 if self.zero_centered else self.weight
        return F.rms_norm(x, (x.shape[-1],), scale, self.eps)

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, 0.0 if self.zero_centered else 1.0)


class LayerNorm1P(nn.LayerNorm):
    """torch's LayerNorm with a zero-centred scale: the stored weight w is 0 at init, the scale 1 + w."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight + 1, self.bias, self.eps)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)


def build_norm(m: ModelConfig, dim: int | None = None, eps: float = 0.0) -> nn.Module:
    """A norm over ``dim`` (default ``m.hidden_size``) as ``m.normalization`` says: :class:`RMSNorm` (a
    weight) or torch's ``LayerNorm`` (a weight and a bias), with ``eps`` (0: ``m.norm_eps``); zero-centred
    scales with ``m.apply_layernorm_1p``."""
    dim, eps = dim or m.hidden_size, eps or m.norm_eps
    if m.normalization == "LayerNorm":
        cls = LayerNorm1P if m.apply_layernorm_1p else nn.LayerNorm
        return cls(dim, eps=eps)
    return RMSNorm(dim, eps, m.apply_layernorm_1p)


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1's RoPE frequency scaling (transformers' ``rope_type: llama3``, Megatron-LM's --use-rope-scaling).

    With wavelength ``w = 2 pi / f`` of each frequency ``f``: ``w < original / high_freq_factor``
    (high frequencies) keep ``f``; ``w > original / low_freq_factor`` use ``f / factor``; in between
    ``f`` is interpolated, ``(1 - a) f / factor + a f`` with ``a = (original / w - low) / (high - low)``.
    """

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position: int
    attention_factor = 1.0  # cos/sin as they are

    def apply(self, inv_freq: torch.Tensor) -> torch.Tensor:
        """Scaled frequencies (radians per position) of ``inv_freq``; same shape and dtype."""
        wavelength = 2 * math.pi / inv_freq
        low_wavelength = self.original_max_position / self.low_freq_factor
        high_wavelength = self.original_max_position / self.high_freq_factor
        alpha = (self.original_max_position / wavelength - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor)
        interpolated = (1 - alpha) * inv_freq / self.factor + alpha * inv_freq
        scaled = torch.where(wavelength > low_wavelength, inv_freq / self.factor, interpolated)
        return torch.where(wavelength < high_wavelength, inv_freq, scaled)


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN's attention temperature m(s, a) = 0.1 a ln s + 1 (1 for s <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass(frozen=True)
class YarnRopeScaling:
    """YaRN (arXiv 2309.00071 §3.2-3.4; DeepSeek-V3 §4.3), as megatron-core's YarnRotaryEmbedding and
    transformers' ``rope_type: yarn`` compute it.

    Over the d/2 frequencies f_i = theta^(-2i/d): a dimension rotating fewer than ``beta_slow`` times over
    ``original_max_position`` positions is interpolated (f / s), one rotating more than ``beta_fast`` times kept,
    with a linear ramp over the dimensions between (their bounds floored / ceiled, clamped to [0, d - 1]):
    ``f' = f / s (1 - e) + f e``, ``e = 1 - clamp((i - low) / (high - low), 0, 1)``, the dimension of r
    rotations being ``d ln(original / (2 pi r)) / (2 ln theta)``. cos/sin are multiplied by
    :attr:`attention_factor` = m(s, mscale) / m(s, mscale_all_dim); multi-latent attention also multiplies its
    softmax scale by :attr:`softmax_factor` = m(s, mscale_all_dim)^2 (:func:`yarn_mscale`).
    """

    factor: float
    original_max_position: int
    beta_fast: float
    beta_slow: float
    mscale: float
    mscale_all_dim: float
    theta: float

    @property
    def attention_factor(self) -> float:
        return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)

    @property
    def softmax_factor(self) -> float:
        return yarn_mscale(self.factor, self.mscale_all_dim) ** 2

    def apply(self, inv_freq: torch.Tensor) -> torch.Tensor:
        """Scaled frequencies of ``inv_freq`` [d/2] (theta^(-2i/d), float64); same shape and dtype."""
        dim = 2 * inv_freq.shape[0]

        def dimension(rotations: float) -> float:
            return dim * math.log(self.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(self.theta))

        low = max(math.floor(dimension(self.beta_fast)), 0)
        high = min(math.ceil(dimension(self.beta_slow)), dim - 1)
        high = high + 0.001 if low == high else high
        ramp = ((torch.arange(dim // 2, dtype=inv_freq.dtype, device=inv_freq.device) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp
        return inv_freq / self.factor * (1 - keep) + inv_freq * keep


def rope_scaling_of(m: ModelConfig) -> Llama3RopeScaling | YarnRopeScaling | None:
    """The rotary scaling ``m`` asks for (llama3 or YaRN), or None (``m.rope_scaling = "none"``)."""
    if m.rope_scaling == "yarn":
        return YarnRopeScaling(m.rope_scaling_factor, m.rope_yarn_original_max_position, m.rope_yarn_beta_fast,
                               m.rope_yarn_beta_slow, m.rope_yarn_mscale, m.rope_yarn_mscale_all_dim, m.rope_theta)
    if m.rope_scaling == "llama3":
        return Llama3RopeScaling(m.rope_scaling_factor, m.rope_low_freq_factor, m.rope_high_freq_factor,
                                 m.rope_original_max_position)
    return None


def rope_tables(seq_len: int, head_dim: int, theta: float, device=None,
                scaling: Llama3RopeScaling | YarnRopeScaling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [seq_len, head_dim] for rotary embeddings (half-split "rotate_half" layout),
    computed in float64 (frequencies scaled, and with YaRN the tables multiplied by its attention factor, by
    ``scaling`` if given) and returned in float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    factor = 1.0
    if scaling is not None:
        inv_freq, factor = scaling.apply(inv_freq), scaling.attention_factor
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return (angles.cos() * factor).float(), (angles.sin() * factor).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, first: bool = False) -> torch.Tensor:
    """Rotate x [B, S, heads, d] by position; cos/sin [S, r] with r <= d: r channels of each head are rotated,
    the last r (multi-latent attention keeps the first d - r without position) or with ``first`` the first r
    (partial rotary, ``model.rotary_percent``: Megatron-LM's and GLM's layout); all of them when r = d."""
    if cos.shape[-1] < x.shape[-1]:
        r = cos.shape[-1]
        if first:
            return torch.cat([apply_rope(x[..., :r], cos, sin), x[..., r:]], dim=-1)
        return torch.cat([x[..., :-r], apply_rope(x[..., -r:], cos, sin)], dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    cos = cos[None, :, None, :].to(x.dtype)
    sin = sin[None, :, None, :].to(x.dtype)
    return x * cos + rotated * sin


class CoreAttention(nn.Module):
    """Rotary embeddings, then softmax(Q K^T / sqrt(d)) V, causal, grouped-query (SDPA). No parameters:
    its own module so that selective recompute (Megatron-LM's "core attention") and compilation can
    take exactly this part."""

    # Pad value heads narrower than the q/k heads with zeros to their width (latent attention: 128 vs 192) so that
    # SDPA can take its flash kernel, which needs equal widths; the padded output channels are zero and dropped.
    # None: on CUDA only (tests force it on CPU).
    pad_values: bool | None = None

    def __init__(self, softmax_factor: float = 1.0, rope_first: bool = False):
        super().__init__()
        self.softmax_factor = softmax_factor
        self.rope_first = rope_first  # rotate the first r channels of a head (else the last r): apply_rope

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        """q/k [B, S, heads or kv_heads, d], v [B, S, kv_heads, d_v], cos/sin [>= S, r] (r of the d channels are
        rotated, :func:`apply_rope`) -> [B, S, heads * d_v]. The scale is ``softmax_factor`` / sqrt(d)."""
        b, s = q.shape[:2]
        q, k = (apply_rope(t, cos[:s], sin[:s], self.rope_first) for t in (q, k))
        d_v = v.shape[-1]
        pad = self.pad_values if self.pad_values is not None else q.device.type == "cuda"
        if pad and d_v < q.shape[-1]:
            v = F.pad(v, (0, q.shape[-1] - d_v))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scale = None if self.softmax_factor == 1.0 else self.softmax_factor / math.sqrt(q.shape[-1])
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1],
                                             scale=scale)
        return out[..., :d_v].transpose(1, 2).reshape(b, s, -1)


class Attention(nn.Module):
    """Grouped-query causal self-attention. Head counts are read from the (possibly sharded) weights.

    ``head_dim``: elements per head (None: hidden_size / num_heads; q is ``num_heads * head_dim`` wide,
    which need not be hidden_size); ``qkv_bias``: biases on the q, k, v projections; ``out_bias``: a bias
    on the output projection ``wo``; ``q_norm`` / ``k_norm``: norms over head_dim applied to every head
    of q / k before the rotary embedding (Megatron-LM's --qk-layernorm), or None.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int | None = None,
                 qkv_bias: bool = False, out_bias: bool = False, q_norm: nn.Module | None = None,
                 k_norm: nn.Module | None = None):
        super().__init__()
        self.head_dim = head_dim or hidden_size // num_heads
        self.wq = nn.Linear(hidden_size, num_heads * self.head_dim, bias=qkv_bias)
        self.wk = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=qkv_bias)
        self.wv = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=qkv_bias)
        self.wo = nn.Linear(num_heads * self.head_dim, hidden_size, bias=out_bias)
        self.q_norm, self.k_norm = q_norm, k_norm
        self.core = CoreAttention(rope_first=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, S, hidden] -> [B, S, hidden]."""
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, -1, self.head_dim)
        k = self.wk(x).view(b, s, -1, self.head_dim)
        v = self.wv(x).view(b, s, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.wo(self.core(q, k, v, cos, sin))


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2 §2.1, eqs. 9-19; DeepSeek-V3 §2.1.1), causal, trained form.

    With ``c_kv = kv_latent_norm(wkv_down x)`` [kv_lora_rank] and ``c_q = q_latent_norm(wq_down x)``
    [q_lora_rank] (or ``c_q = x`` with ``q_lora_rank = 0``), per head i:
    ``q_i = [wq c_q]_i`` (qk_head_dim channels without position, then qk_pos_emb_head_dim rotated ones),
    ``[k_i^C, v_i] = [wkv c_kv]_i``, ``k_i = [k_i^C, RoPE(wk_rope x)]`` (the rotated part is one
    qk_pos_emb_head_dim vector shared by every head), output ``wo [softmax(q_i k_i^T / sqrt(qk_head_dim +
    qk_pos_emb_head_dim)) v_i]_i``, the softmax scale times YaRN's ``softmax_factor`` (DeepSeek-V3's mscale^2).
    Heads are read from the (possibly sharded) up-projections. The latent norms are None without
    ``model.qk_layernorm``. DeepSeek's checkpoints hold ``wkv_down`` and ``wk_rope``
    as one tensor (kv_a_proj_with_mqa) and lay the rotary channels out in interleaved pairs; the converters
    split and reorder them (:mod:`megatron_moe.convert.hf_tensors`).
    """

    def __init__(self, hidden_size: int, num_heads: int, q_lora_rank: int, kv_lora_rank: int, qk_head_dim: int,
                 rope_dim: int, v_head_dim: int, out_bias: bool = False,
                 q_latent_norm: nn.Module | None = None, kv_latent_norm: nn.Module | None = None,
                 softmax_factor: float = 1.0):
        super().__init__()
        self.qk_head_dim, self.rope_dim, self.v_head_dim = qk_head_dim, rope_dim, v_head_dim
        q_width = num_heads * (qk_head_dim + rope_dim)
        self.wq_down = nn.Linear(hidden_size, q_lora_rank, bias=False) if q_lora_rank else None
        self.q_latent_norm = q_latent_norm
        self.wq = nn.Linear(q_lora_rank or hidden_size, q_width, bias=False)
        self.wkv_down = nn.Linear(hidden_size, kv_lora_rank, bias=False)
        self.kv_latent_norm = kv_latent_norm
        self.wkv = nn.Linear(kv_lora_rank, num_heads * (qk_head_dim + v_head_dim), bias=False)
        self.wk_rope = nn.Linear(hidden_size, rope_dim, bias=False)
        self.wo = nn.Linear(num_heads * v_head_dim, hidden_size, bias=out_bias)
        self.core = CoreAttention(softmax_factor)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, S, hidden] -> [B, S, hidden]; cos/sin [>= S, qk_pos_emb_head_dim]."""
        c_q = x if self.wq_down is None else self.wq_down(x)
        if self.q_latent_norm is not None:
            c_q = self.q_latent_norm(c_q)
        c_kv = self.wkv_down(x)
        if self.kv_latent_norm is not None:
            c_kv = self.kv_latent_norm(c_kv)
        q = self.wq(c_q)
        kv = self.wkv(c_kv)
        k_rope = self.wk_rope(x)  # [B, S, rope_dim], one for all heads
        b, s = q.shape[:2]
        q = q.view(b, s, -1, self.qk_head_dim + self.rope_dim)
        k_nope, v = kv.view(b, s, -1, self.qk_head_dim + self.v_head_dim).split(
            [self.qk_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_rope[:, :, None, :].expand(-1, -1, k_nope.shape[2], -1)], dim=-1)
        return self.wo(self.core(q, k, v, cos, sin))


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x), every linear with a bias if ``bias``."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, bias: bool = False):
        super().__init__()
        self.w1 = nn.Linear(hidden_size, ffn_hidden_size, bias=bias)
        self.w3 = nn.Linear(hidden_size, ffn_hidden_size, bias=bias)
        self.w2 = nn.Linear(ffn_hidden_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm decoder block; ``feed_forward`` is a dense SwiGLU or an :class:`MoELayer`."""

    def __init__(self, cfg: Config, layer_idx: int):
        super().__init__()
        m, e = cfg.model, cfg.moe
        self.layer_idx = layer_idx
        self.attention_norm = build_norm(m)
        self.attention = build_attention(m)
        self.ffn_norm = build_norm(m)
        if is_moe_block(cfg, layer_idx):
            self.feed_forward: nn.Module = MoELayer(m.hidden_size, cfg.expert_ffn_size, e)
        else:
            self.feed_forward = FeedForward(m.hidden_size, m.dense_ffn_size, m.add_bias_linear)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


def build_attention(m: ModelConfig) -> Attention | LatentAttention:
    """The attention ``m`` asks for: :class:`LatentAttention` with ``m.multi_latent_attention`` (latent norms
    with ``m.qk_layernorm``), else grouped-query :class:`Attention` (query/key norms with ``m.qk_layernorm``)."""
    if m.multi_latent_attention:
        q_norm = build_norm(m, m.q_lora_rank, m.latent_norm_eps) if m.qk_layernorm and m.q_lora_rank else None
        norms = (q_norm, build_norm(m, m.kv_lora_rank, m.latent_norm_eps) if m.qk_layernorm else None)
        yarn = rope_scaling_of(m)
        return LatentAttention(m.hidden_size, m.num_attention_heads, m.q_lora_rank, m.kv_lora_rank, m.qk_head_dim,
                               m.qk_pos_emb_head_dim, m.v_head_dim, m.add_bias_linear, *norms,
                               softmax_factor=yarn.softmax_factor if isinstance(yarn, YarnRopeScaling) else 1.0)
    qk_norms = (build_norm(m, m.head_dim), build_norm(m, m.head_dim)) if m.qk_layernorm else (None, None)
    return Attention(m.hidden_size, m.num_attention_heads, m.num_kv_heads, m.head_dim, m.add_qkv_bias,
                     m.add_bias_linear, *qk_norms)


class MultiTokenPrediction(nn.Module):
    """Depth k's own parts of multi-token prediction (DeepSeek-V3 §2.2, eqs. 21-22; megatron-core's MTP layer):
    ``combine`` gives ``proj [embedding_norm(Emb(t_{i+k})); hidden_norm(h_i^{k-1})]`` [2 hidden -> hidden], the
    input of the depth's transformer block (a layer of :class:`MoETransformer` past the last), and ``norm`` is
    applied to the block's output, which the shared output head and the next depth read. The embedding comes
    first, as DeepSeek's (vLLM's) and megatron-core's code concatenate it (the paper writes the other order)."""

    def __init__(self, m: ModelConfig):
        super().__init__()
        self.embedding_norm = build_norm(m)
        self.hidden_norm = build_norm(m)
        self.proj = nn.Linear(2 * m.hidden_size, m.hidden_size, bias=False)
        self.norm = build_norm(m)

    def combine(self, hidden: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        """hidden, embedded [B, S, H] -> [B, S, H]."""
        return self.proj(torch.cat([self.embedding_norm(embedded), self.hidden_norm(hidden)], dim=-1))


class TiedOutput(nn.Module):
    """The output layer tied to the embedding (``model.tie_embeddings``): logits = h E^T with the embedding's
    weight E passed in, so that the weight is held (and checkpointed) once, as the embedding's."""

    def forward(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """h [B, S, H], weight [V, H] -> logits [B, S, V]."""
        return F.linear(h, weight)


def is_moe_layer(cfg: Config, layer_idx: int) -> bool:
    """Whether layer ``layer_idx`` (0-based) has an MoE feed-forward: after the first k dense, every freq-th."""
    e = cfg.moe
    return e.num_experts > 0 and layer_idx >= e.first_k_dense and (layer_idx - e.first_k_dense) % e.layer_freq == 0


def is_moe_block(cfg: Config, block_idx: int) -> bool:
    """Whether block ``block_idx`` of :class:`MoETransformer` has an MoE feed-forward: a layer's as
    :func:`is_moe_layer`; a multi-token prediction depth's (blocks past the last layer) as the last layer's, as
    megatron-core builds them from the last layer's spec."""
    return is_moe_layer(cfg, min(block_idx, cfg.model.num_layers - 1))


def main_logits(output: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The main prediction's logits of a :class:`MoETransformer` output (with multi-token prediction a tuple)."""
    return output[0] if isinstance(output, tuple) else output


class MoETransformer(nn.Module):
    """Token ids [B, S] -> logits [B, S, vocab]; pipeline stages may drop embedding/norm/output.

    A pipeline stage after the first has ``embeds_tokens = False``: its input is the previous stage's hidden
    states. The last stage may still hold ``tok_embeddings``, a copy of the first stage's (tied output layer,
    multi-token prediction), kept equal to it by :mod:`megatron_moe.parallel.pipeline`'s embedding sharing.

    With multi-token prediction (``model.mtp_num_layers`` D > 0) ``layers`` also holds the D depths' blocks
    (keys num_layers .. num_layers + D - 1, so that tensor parallelism, recompute, compilation and data
    parallelism treat them as every block; MoE or dense as the last layer), ``mtp`` their own parts
    (:class:`MultiTokenPrediction`), and the whole model returns ``(logits, logits of depth 1, .., depth D)``: depth
    k's logits at position i predict token i + k + 1. As megatron-core, depth 1 takes the main model's
    normalised output (what the output layer reads) and depth k + 1 depth k's (after its own norm). Its input
    at position i is the embedding of token i + k, the tokens rolled left by k: the last k positions see
    wrapped-around tokens, so their predictions have no target and the loss masks them
    (:func:`megatron_moe.parallel.loss.mtp_target`); causal attention keeps the others exact.
    """

    def __init__(self, cfg: Config):
        super().__init__()
        m = cfg.model
        if m.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (resolve it from the tokenizer first)")
        self.cfg = cfg
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(m.vocab_size, m.hidden_size)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg, i)
                                     for i in range(m.num_layers + m.mtp_num_layers)})
        self.norm: nn.Module | None = build_norm(m)
        self.output: nn.Linear | TiedOutput | None = (
            TiedOutput() if m.tie_embeddings else nn.Linear(m.hidden_size, m.vocab_size, bias=m.lm_head_bias))
        self.mtp = nn.ModuleDict({str(k): MultiTokenPrediction(m) for k in range(m.mtp_num_layers)})
        cos, sin = rope_tables(cfg.data.seq_length, m.rotary_dim, m.rope_theta, scaling=rope_scaling_of(m))
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.embeds_tokens = True

    def forward(self, tokens: torch.Tensor, mtp_tokens: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """tokens: int64 [B, S] (or hidden states [B, S, hidden] on a later pipeline stage); ``mtp_tokens``: the
        token ids [B, S] that multi-token prediction embeds on a last pipeline stage (default ``tokens``)."""
        main = self.cfg.model.num_layers
        h = self.tok_embeddings(tokens) if self.embeds_tokens else tokens
        for name, layer in self.layers.items():
            if int(name) < main:
                h = layer(h, self.rope_cos, self.rope_sin)
        if self.norm is None:
            return h
        x = self.norm(h)
        logits = self._head(x)
        if not len(self.mtp):
            return logits
        ids = tokens if self.embeds_tokens else mtp_tokens
        if ids is None:
            raise ValueError("a last pipeline stage with multi-token prediction needs the token ids (mtp_tokens)")
        predictions = []
        for k, depth in enumerate(self.mtp.values(), start=1):
            y = depth.combine(x, self.tok_embeddings(torch.roll(ids, -k, dims=1)))
            x = depth.norm(self.layers[str(main + k - 1)](y, self.rope_cos, self.rope_sin))
            predictions.append(self._head(x))
        return (logits, *predictions)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """The output layer (or tied to the embedding)."""
        if isinstance(self.output, TiedOutput):
            return self.output(h, self.tok_embeddings.weight)
        return self.output(h)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """(Re)initialise every parameter and buffer deterministically (scheme in the module docstring)."""
        m = self.cfg.model
        std, out_std = m.init_std, m.init_std / math.sqrt(2 * m.num_layers)
        cos, sin = rope_tables(self.cfg.data.seq_length, m.rotary_dim, m.rope_theta, device=self.rope_cos.device,
                               scaling=rope_scaling_of(m))
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        for module in self.modules():
            if isinstance(module, MoELayer):
                module.reset_buffers()
        for name, p in self.named_parameters():
            parts = name.split(".")
            if parts[-1] == "bias":
                p.zero_()
            elif name.endswith("norm.weight"):
                p.fill_(0.0 if self.cfg.model.apply_layernorm_1p else 1.0)
            elif parts[-1] == "w2" or parts[-2:-1] in (["wo"], ["w2"]):  # residual-branch outputs
                p.normal_(0.0, out_std, generator=generator)
            else:
                p.normal_(0.0, std, generator=generator)


def materialize(model: nn.Module, device: torch.device | str, seed: int) -> nn.Module:
    """Allocate a (meta-device) model on ``device`` and initialise it from ``seed``."""
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    model.init_weights(generator)
    return model


def build_model(cfg: Config, device: torch.device | str = "cpu", seed: int | None = None) -> MoETransformer:
    """Construct on the meta device (no memory), then allocate on ``device`` and initialise."""
    with torch.device("meta"):
        model = MoETransformer(cfg)
    return materialize(model, device, cfg.training.seed if seed is None else seed)


def padded_vocab_size(tokenizer_vocab: int, divisible_by: int, tp_size: int = 1) -> int:
    """Megatron-LM's vocabulary padding: round up to a multiple of ``divisible_by * tp_size``."""
    multiple = divisible_by * tp_size
    return int(math.ceil(tokenizer_vocab / multiple) * multiple)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total parameters and those active per token (one expert's share times top-K)."""
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    e = model.cfg.moe if hasattr(model, "cfg") else None
    active = total - expert
    if e is not None and e.num_experts:
        active += expert * e.topk // e.num_experts
    return {"total": total, "active": active}
