"""Hugging Face ``config.json`` <-> this project's :class:`~megatron_moe.config.Config`.

Architectures (``model_type``) and what they map to:

========== ======= ================================================================================
model_type kind    settings
========== ======= ================================================================================
llama      dense   RMSNorm; ``attention_bias`` + ``mlp_bias`` (both or neither) -> ``add_qkv_bias`` +
                   ``add_bias_linear``; rope ``default`` or ``llama3``
mistral    dense   RMSNorm, no biases
qwen2      dense   RMSNorm, q/k/v biases (``add_qkv_bias``)
qwen3      dense   RMSNorm, query/key norms over head_dim (``qk_layernorm``), no biases
phi3       dense   RMSNorm, no biases, fused ``qkv_proj`` / ``gate_up_proj`` tensors (split on import),
                   ``partial_rotary_factor`` -> ``model.rotary_percent`` (Phi-4-mini's 0.75)
mixtral    MoE     top-K softmax router, renormalised; ``router_jitter_noise`` is Mixtral's
                   multiplicative input jitter -> ``moe.input_jitter_eps``
phimoe     MoE     LayerNorm (weight and bias, eps ``rms_norm_eps``), ``attention_bias`` (q, k, v and
                   o_proj) -> ``add_qkv_bias`` + ``add_bias_linear``, ``lm_head_bias``; SparseMixer-v2
                   top-2 router: ``router_jitter_noise`` -> ``moe.jitter_eps`` (the relative masking
                   window), ``input_jitter_noise`` -> ``moe.input_jitter_eps``. ``grinmoe`` (GRIN-MoE's
                   released config, its own remote code) is the same format.
qwen3_moe  MoE     Qwen3's attention; top-K softmax router, ``norm_topk_prob`` -> ``moe.renormalize``;
                   ``moe_intermediate_size`` -> the experts' ffn, ``intermediate_size`` -> the dense
                   layers'; MoE layers where ``(i + 1) % decoder_sparse_step == 0`` and ``i`` is not
                   in ``mlp_only_layers``, when that is k dense layers then one every f
                   (``moe.first_k_dense``, ``moe.layer_freq``); export writes step 1 and the dense
                   layers as ``mlp_only_layers``
qwen2_moe  MoE     Qwen1.5-MoE / Qwen2-MoE: q/k/v biases (``qkv_bias``, default true), no query/key
                   norms; routing and layer placement as qwen3_moe; a shared expert of width
                   ``shared_expert_intermediate_size`` gated by sigmoid(``shared_expert_gate``)
                   (``moe.shared_expert_ffn_hidden_size``, ``moe.shared_expert_gate``)
deepseek_v2 MoE     DeepSeek-V2 / V2-Lite: deepseek_v3's attention, experts and layout; top-K of the softmax
                   probabilities as they are (transformers' DeepSeek-V2 ignores norm_topk_prob) x
                   ``routed_scaling_factor``, ``group_limited_greedy`` groups scored by their best expert
                   (so K = topk_group), no expert bias
deepseek_v3 MoE     DeepSeek-V3 / Kimi-K2 / Moonlight: multi-latent attention (``q_lora_rank`` (null: no
                   query latent), ``kv_lora_rank``, ``qk_nope_head_dim`` -> ``qk_head_dim``,
                   ``qk_rope_head_dim`` -> ``qk_pos_emb_head_dim``, ``v_head_dim``; the latent norms
                   -> ``qk_layernorm``); sigmoid routing with ``e_score_correction_bias`` (``moe.expert_bias``),
                   ``norm_topk_prob``, ``routed_scaling_factor`` (``moe.topk_scaling_factor``), groups
                   ``n_group`` / ``topk_group`` (kept groups scored by their top 2, so K / topk_group = 2
                   unless every group is kept); ``n_shared_experts`` x ``moe_intermediate_size`` wide ungated
                   shared expert; ``first_k_dense_replace`` dense layers of ``intermediate_size``
glm4_moe   MoE     GLM-4.5 / GLM-4.5-Air / GLM-4.6: grouped-query attention, ``attention_bias`` -> q/k/v biases
                   (``add_qkv_bias``; o_proj never has one), ``use_qk_norm`` -> ``qk_layernorm``, ``head_dim``,
                   partial rotary ``partial_rotary_factor`` -> ``model.rotary_percent`` (the first head_dim x
                   factor channels; transformers' default 0.5 when the config.json has none, written always on
                   export); deepseek_v3's MoE layer, routing, groups and layer placement (defaults: scaling 1,
                   one group, one dense layer) and multi-token prediction layers
========== ======= ================================================================================

``head_dim`` other than hidden_size / num_attention_heads (Qwen3's 128 on any hidden size,
Mistral-Nemo's) is ``model.kv_channels``, in every architecture; export writes ``head_dim`` always.

A sliding window ``W`` shorter than ``max_position_embeddings`` is kept exact by training on
sequences of at most ``W`` tokens (``data.seq_length = W``): transformers masks key ``j`` for query
``i`` only when ``i - j >= W``, which never happens within ``W`` tokens. Anything else the project's
model cannot compute exactly (other activations, rope types, partial rotary outside glm4_moe and phi3, biases a format
puts elsewhere) is refused, naming the field. Balance-loss coefficients are training recipe, not architecture: they are
not imported (the run's config sets them) and are exported as ``router_aux_loss_coef``.

Input jitter is applied once per MoE layer in training here, as in GRIN's released code
(transformers 5's PhiMoE multiplies by it in both its MoE block and its router); evaluation, which
the tests compare, has no jitter.
"""

from __future__ import annotations

import math
from typing import Any

from megatron_moe.config import Config, group_limited_routing_fits, moe_layer_spacing
from megatron_moe.convert.source import ConversionError
from megatron_moe.model.transformer import is_moe_layer

DENSE_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
MOE_TYPES = ("mixtral", "phimoe", "grinmoe", "qwen3_moe", "qwen2_moe", "deepseek_v2", "deepseek_v3", "glm4_moe")
DEEPSEEK_TYPES = ("deepseek_v2", "deepseek_v3")  # multi-latent attention, experts and shared experts alike
# transformers' DeepseekV3RMSNorm default: the eps of its latent norms, whatever rms_norm_eps says
DEEPSEEK_LATENT_NORM_EPS = 1e-6
QWEN3_TYPES = ("qwen3", "qwen3_moe")
QWEN_MOE_TYPES = ("qwen3_moe", "qwen2_moe")  # routing, expert names and layer placement alike
# DeepSeek's MoE fields: n_routed_experts, moe_intermediate_size, n_shared_experts, first_k_dense_replace
_DEEPSEEK_EXPERT_TYPES = DEEPSEEK_TYPES + ("glm4_moe",)
# transformers' defaults (DeepseekV3Config, Glm4MoeConfig) of the routing fields a config.json may leave out
_SIGMOID_MOE_DEFAULTS = {"deepseek_v3": {"routed_scaling_factor": 2.5, "first_k_dense_replace": 3, "n_group": 8,
                                        "topk_group": 4},
                         "glm4_moe": {"routed_scaling_factor": 1.0, "first_k_dense_replace": 1, "n_group": 1,
                                      "topk_group": 1}}
# transformers' default partial_rotary_factor of the config classes whose attention rotates part of each head
# (Glm4MoeConfig sets 0.5 when the config.json has none); the other formats rotate every channel
_PARTIAL_ROTARY_DEFAULT = {"glm4_moe": 0.5, "phi3": 1.0}  # phi3: Phi-4-mini's 0.75
# transformers' default rms_norm_eps per config class where it is not 1e-6, used when a config.json has none.
_DEFAULT_NORM_EPS = {"glm4_moe": 1e-5}
# transformers' default rope theta per config class, used when a config.json has none.
_DEFAULT_THETA = {"mixtral": 1e6, "phimoe": 1e6, "grinmoe": 1e6}
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope_settings(hf: dict[str, Any], model_type: str, where: str) -> dict[str, Any]:
    """ModelConfig rope fields from transformers 5 ``rope_parameters`` or 4.x ``rope_theta`` / ``rope_scaling``."""
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    out: dict[str, Any] = {"rope_theta": float(hf.get("rope_theta") or _DEFAULT_THETA.get(model_type, 1e4)),
                           "rotary_percent": _rotary_percent(hf, model_type, where)}
    for field_name, value in (("rope_scaling", scaling), ("rope_parameters", params)):
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ConversionError(f"{where}: {field_name} = {value!r} is not understood")
        if value.get("rope_theta") is not None:
            out["rope_theta"] = float(value["rope_theta"])
        kind = value.get("rope_type", value.get("type", "default"))
        if kind in (None, "default"):
            if value.get("factor") not in (None, 1, 1.0):
                raise ConversionError(f"{where}: {field_name}.factor = {value['factor']} with rope_type "
                                      "'default'; not understood")
        elif kind == "yarn":
            out.update(_yarn_settings(value, f"{where}: {field_name}"))
        elif kind == "llama3":
            missing = [k for k in _LLAMA3_KEYS if value.get(k) is None]
            if missing:
                raise ConversionError(f"{where}: {field_name} of rope_type 'llama3' lacks {missing}")
            out.update(rope_scaling="llama3", rope_scaling_factor=float(value["factor"]),
                       rope_low_freq_factor=float(value["low_freq_factor"]),
                       rope_high_freq_factor=float(value["high_freq_factor"]),
                       rope_original_max_position=int(value["original_max_position_embeddings"]))
        else:
            raise ConversionError(f"{where}: {field_name}.rope_type = {kind!r}; supported: 'default', 'llama3' "
                                  "and 'yarn'")
    return out


def _rotary_percent(hf: dict[str, Any], model_type: str, where: str) -> float:
    """model.rotary_percent: ``partial_rotary_factor`` of ``rope_parameters``, else of ``rope_scaling``, else of the
    top level (transformers' order), else the config class's default; other than 1 only where transformers' attention
    rotates part of each head (glm4_moe)."""
    partial = _PARTIAL_ROTARY_DEFAULT.get(model_type, 1.0)
    for fields in (hf, hf.get("rope_scaling"), hf.get("rope_parameters")):  # the later ones take precedence
        if isinstance(fields, dict) and fields.get("partial_rotary_factor") is not None:
            partial = fields["partial_rotary_factor"]
    if not isinstance(partial, int | float) or not 0 < partial <= 1:
        raise ConversionError(f"{where}: partial_rotary_factor = {partial!r}; expected a fraction in (0, 1]")
    if partial != 1 and model_type not in _PARTIAL_ROTARY_DEFAULT:
        raise ConversionError(f"{where}: partial_rotary_factor = {partial}; transformers' {model_type} rotates every "
                              "channel of a head, so only full rotary embeddings (1.0) are supported (partial rotary: "
                              "glm4_moe, phi3)")
    return float(partial)


def _yarn_settings(value: dict[str, Any], where: str) -> dict[str, Any]:
    """ModelConfig fields of transformers' ``rope_type: yarn`` parameters. transformers scales cos/sin by
    m(s, mscale) / m(s, mscale_all_dim) only when both are set, else by m(s, 1); DeepSeek-V3's softmax by
    m(s, mscale_all_dim)^2 whenever mscale_all_dim is set (the model's formulas: YarnRopeScaling)."""
    for key in ("factor", "original_max_position_embeddings"):
        if not isinstance(value.get(key), int | float) or value[key] <= 0:
            raise ConversionError(f"{where}: rope_type 'yarn' needs a positive {key} (got {value.get(key)!r})")
    if value.get("attention_factor") is not None:
        raise ConversionError(f"{where}.attention_factor = {value['attention_factor']}: an explicit YaRN attention "
                              "factor is not supported (it follows from factor, mscale and mscale_all_dim)")
    if value.get("truncate", True) is not True:
        raise ConversionError(f"{where}.truncate = {value['truncate']}: only the truncated (floored / ceiled) YaRN "
                              "correction range is supported")
    mscale, mscale_all_dim = value.get("mscale"), value.get("mscale_all_dim")
    if mscale_all_dim and not mscale:
        raise ConversionError(f"{where}: mscale_all_dim = {mscale_all_dim} without mscale is not supported")
    return {"rope_scaling": "yarn", "rope_scaling_factor": float(value["factor"]),
            "rope_yarn_original_max_position": int(value["original_max_position_embeddings"]),
            "rope_yarn_beta_fast": float(value.get("beta_fast") or 32),
            "rope_yarn_beta_slow": float(value.get("beta_slow") or 1),
            "rope_yarn_mscale": float(mscale) if mscale and mscale_all_dim else 1.0,
            "rope_yarn_mscale_all_dim": float(mscale_all_dim or 0.0)}


def _bias_settings(hf: dict[str, Any], model_type: str, where: str) -> dict[str, bool]:
    """add_qkv_bias / add_bias_linear / lm_head_bias of the HF architecture."""
    attention, mlp = bool(hf.get("attention_bias")), bool(hf.get("mlp_bias"))
    if model_type in ("qwen2", "qwen2_moe"):
        if attention or mlp:
            raise ConversionError(f"{where}: {model_type} with attention_bias/mlp_bias set is not its format")
        return {"add_qkv_bias": model_type == "qwen2" or bool(hf.get("qkv_bias", True))}
    if model_type == "glm4_moe":  # attention_bias: q, k and v only; o_proj and the MLPs have none
        if mlp:
            raise ConversionError(f"{where}: mlp_bias = true is not part of the glm4_moe format")
        return {"add_qkv_bias": attention}
    if model_type in ("phimoe", "grinmoe"):
        out = {"add_qkv_bias": attention, "add_bias_linear": attention}
        return out | {"lm_head_bias": bool(hf.get("lm_head_bias"))}
    if model_type in QWEN3_TYPES and attention:
        raise ConversionError(f"{where}: attention_bias = true puts biases on q, k, v and o_proj but none on the MLP; "
                              "this project ties the attention output bias to the MLP biases (model.add_bias_linear)")
    if model_type == "llama" and attention != mlp:
        raise ConversionError(
            f"{where}: attention_bias = {str(attention).lower()} with mlp_bias = {str(mlp).lower()}; this project "
            "ties the attention output bias to the MLP biases (model.add_bias_linear), so both or neither")
    if model_type != "llama" and (attention or mlp):
        raise ConversionError(f"{where}: attention_bias/mlp_bias = true is not part of the {model_type} format")
    return {"add_qkv_bias": attention, "add_bias_linear": attention} if attention else {}


def _sequence_length(hf: dict[str, Any], model_type: str, notes: list[str], where: str) -> int:
    """data.seq_length: max_position_embeddings, or an active sliding window shorter than it."""
    max_pos = int(hf.get("max_position_embeddings") or 4096)
    window = hf.get("sliding_window")
    # Qwen2 and Qwen3 store a window they do not use unless use_sliding_window is set.
    if window is None or not hf.get("use_sliding_window", model_type not in ("qwen2", "qwen2_moe") + QWEN3_TYPES):
        return max_pos
    if not isinstance(window, int) or window < 1:
        raise ConversionError(f"{where}: sliding_window = {window!r}; expected a positive integer")
    if window < max_pos:
        notes.append(f"sliding_window = {window} < max_position_embeddings = {max_pos}: data.seq_length set to "
                     f"{window}, where full causal attention equals the windowed one")
        return window
    return max_pos


def config_from_hf(hf: dict[str, Any], where: str = "config.json", notes: list[str] | None = None) -> Config:
    """Map a supported ``config.json`` dict (table in the module docstring) to a project :class:`Config`.

    Dense architectures give ``moe.num_experts = 0``; MoE ones every layer an MoE layer with the
    checkpoint's router. ``notes`` (if given) receives what was adapted on purpose. Raises
    ConversionError naming the field when the architecture is not representable exactly.
    """
    notes = [] if notes is None else notes
    model_type = hf.get("model_type")
    if model_type not in DENSE_TYPES + MOE_TYPES:
        raise ConversionError(f"{where}: model_type = {model_type!r}; supported: {DENSE_TYPES + MOE_TYPES}")
    for key in ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers", "vocab_size"):
        if not isinstance(hf.get(key), int) or hf[key] <= 0:
            raise ConversionError(f"{where}: {key} = {hf.get(key)!r}; expected a positive integer")
    quantization = hf.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else quantization
        raise ConversionError(f"{where}: quantization_config (quant_method {method!r}): quantized weights are not "
                              "read; dequantize the checkpoint to bf16 or fp32 first")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConversionError(f"{where}: hidden_act = {act!r}; only silu (SwiGLU) is supported")
    if hf.get("pretraining_tp", 1) not in (None, 1):
        raise ConversionError(f"{where}: pretraining_tp = {hf['pretraining_tp']}; only 1 is supported")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") if model_type not in DEEPSEEK_TYPES else None  # there: the rotary width
    if head_dim is None and model_type == "qwen3":
        head_dim = 128  # transformers' Qwen3Config default (Qwen3MoeConfig has none: hidden / heads)
    if head_dim is None and hidden % heads:
        raise ConversionError(f"{where}: num_attention_heads = {heads} does not divide hidden_size = {hidden} and "
                              "there is no head_dim")
    if head_dim is not None and (not isinstance(head_dim, int) or head_dim <= 0):
        raise ConversionError(f"{where}: head_dim = {head_dim!r}; expected a positive integer")
    cfg = Config()
    m = cfg.model
    m.hidden_size, m.num_attention_heads = hidden, heads
    m.kv_channels = 0 if head_dim is None or head_dim * heads == hidden else head_dim
    m.qk_layernorm = model_type in QWEN3_TYPES or (model_type == "glm4_moe" and bool(hf.get("use_qk_norm")))
    m.num_query_groups = hf.get("num_key_value_heads") or heads
    m.num_layers, m.ffn_hidden_size, m.vocab_size = hf["num_hidden_layers"], hf["intermediate_size"], hf["vocab_size"]
    for name, value in _rope_settings(hf, model_type, where).items():
        setattr(m, name, value)
    if m.rotary_percent != 1 and (m.rotary_dim < 2 or m.rotary_dim % 2):
        raise ConversionError(f"{where}: partial_rotary_factor = {m.rotary_percent:g} of head_dim {m.head_dim} gives "
                              f"{m.rotary_dim} rotary channels; rotary embeddings need an even number of them")
    for name, value in _bias_settings(hf, model_type, where).items():
        if value:
            setattr(m, name, value)
    if model_type in ("phimoe", "grinmoe"):
        m.normalization = "LayerNorm"
    m.norm_eps = float(hf.get("rms_norm_eps", _DEFAULT_NORM_EPS.get(model_type, 1e-6)))
    if model_type in DEEPSEEK_TYPES:
        _latent_attention_settings(m, hf, where)
    m.tie_embeddings = bool(hf.get("tie_word_embeddings", False))
    m.init_std = float(hf.get("initializer_range", m.init_std))
    m.make_vocab_size_divisible_by = math.gcd(m.vocab_size, 128)  # never pads the imported vocabulary
    cfg.data.seq_length = _sequence_length(hf, model_type, notes, where)
    _moe_settings(cfg, hf, model_type, where)
    return cfg


def _positive_ints(hf: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    for key in keys:
        if not isinstance(hf.get(key), int) or hf[key] <= 0:
            raise ConversionError(f"{where}: {key} = {hf.get(key)!r}; expected a positive integer")


def _latent_attention_settings(m, hf: dict[str, Any], where: str) -> None:
    """model.* of DeepSeek-V3's multi-latent attention (table in the module docstring)."""
    _positive_ints(hf, ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"), where)
    q_lora_rank = hf.get("q_lora_rank")
    if q_lora_rank is not None:
        _positive_ints(hf, ("q_lora_rank",), where)
    if m.num_query_groups != m.num_attention_heads:
        raise ConversionError(f"{where}: num_key_value_heads = {m.num_query_groups} with num_attention_heads = "
                              f"{m.num_attention_heads}; latent attention has a key and value per head")
    m.latent_norm_eps = DEEPSEEK_LATENT_NORM_EPS
    m.multi_latent_attention, m.qk_layernorm, m.num_query_groups, m.kv_channels = True, True, 0, 0
    m.q_lora_rank, m.kv_lora_rank, m.v_head_dim = q_lora_rank or 0, hf["kv_lora_rank"], hf["v_head_dim"]
    m.qk_head_dim, m.qk_pos_emb_head_dim = hf["qk_nope_head_dim"], hf["qk_rope_head_dim"]


def _deepseek_v2_moe_settings(cfg: Config, hf: dict[str, Any], where: str) -> None:
    """Routing of a deepseek_v2 config: softmax over the experts, the top K taken as they are (transformers'
    DeepSeek-V2 never normalises them, whatever norm_topk_prob says) times routed_scaling_factor; group-limited
    (``group_limited_greedy``) with groups scored by their best expert, this model's rule when K = topk_group."""
    e = cfg.moe
    for key, expected in (("scoring_func", "softmax"), ("moe_layer_freq", 1)):
        if hf.get(key, expected) != expected:
            raise ConversionError(f"{where}: {key} = {hf[key]!r}; DeepSeek-V2's format has {expected!r} only")
    method = hf.get("topk_method") or "greedy"
    if method not in ("greedy", "group_limited_greedy"):
        raise ConversionError(f"{where}: topk_method = {method!r}; expected 'greedy' or 'group_limited_greedy'")
    e.score_function, e.expert_bias, e.renormalize = "softmax", False, False
    e.topk_scaling_factor = float(hf.get("routed_scaling_factor") or 1.0)  # transformers' defaults from here on
    e.first_k_dense = int(hf.get("first_k_dense_replace") or 0)
    groups, kept = hf.get("n_group") or 1, hf.get("topk_group") or 1
    if method == "group_limited_greedy" and kept < groups:
        if e.topk != kept or not group_limited_routing_fits(e.num_experts, e.topk, groups, kept):
            raise ConversionError(f"{where}: n_group = {groups}, topk_group = {kept} with num_experts_per_tok = "
                                  f"{e.topk}: transformers scores each group by its best expert, this model by its "
                                  "num_experts_per_tok / topk_group best; they agree when that is 1")
        e.router_num_groups, e.router_group_topk = groups, kept


def _deepseek_moe_settings(cfg: Config, hf: dict[str, Any], where: str, model_type: str) -> None:
    """Routing, experts and layer placement of a deepseek_v3, glm4_moe (or deepseek_v2) config (module docstring)."""
    e = cfg.moe
    _positive_ints(hf, ("n_routed_experts", "moe_intermediate_size", "n_shared_experts"), where)
    e.num_experts, e.expert_ffn_hidden_size = hf["n_routed_experts"], hf["moe_intermediate_size"]
    e.shared_expert_ffn_hidden_size = hf["n_shared_experts"] * hf["moe_intermediate_size"]
    e.router, e.input_jitter_eps = "topk", 0.0
    if model_type == "deepseek_v2":
        _deepseek_v2_moe_settings(cfg, hf, where)
        return
    for key, expected in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc"), ("moe_layer_freq", 1)):
        if model_type == "deepseek_v3" and hf.get(key, expected) != expected:  # GLM's configs have none of them
            raise ConversionError(f"{where}: {key} = {hf[key]!r}; DeepSeek-V3's format has {expected!r} only")
    e.score_function, e.expert_bias = "sigmoid", True
    e.renormalize = bool(hf.get("norm_topk_prob", True))
    defaults = _SIGMOID_MOE_DEFAULTS[model_type]  # transformers' config class's, for what a config.json leaves out
    e.topk_scaling_factor = float(hf.get("routed_scaling_factor", defaults["routed_scaling_factor"]))
    e.first_k_dense = int(hf.get("first_k_dense_replace", defaults["first_k_dense_replace"]))
    if e.renormalize and e.topk == 1:
        raise ConversionError(f"{where}: norm_topk_prob with num_experts_per_tok = 1 gives every token the weight "
                              "routed_scaling_factor; this model normalises top-K weights only for K > 1")
    groups, kept = hf.get("n_group", defaults["n_group"]), hf.get("topk_group", defaults["topk_group"])
    if not (isinstance(groups, int) and isinstance(kept, int) and 1 <= kept <= groups):
        raise ConversionError(f"{where}: n_group = {groups!r}, topk_group = {kept!r}; expected 1 <= topk_group <= "
                              "n_group")
    if kept < groups:  # DeepSeek-V3 scores a group by its top-2 scores; Megatron-LM (and this model) by top-(K/kept)
        if e.topk != 2 * kept or not group_limited_routing_fits(e.num_experts, e.topk, groups, kept):
            raise ConversionError(f"{where}: n_group = {groups}, topk_group = {kept} with num_experts_per_tok = "
                                  f"{e.topk}: transformers scores each group by its 2 best experts, this model by "
                                  "its num_experts_per_tok / topk_group best; they agree when that is 2")
        e.router_num_groups, e.router_group_topk = groups, kept


def _moe_settings(cfg: Config, hf: dict[str, Any], model_type: str, where: str) -> None:
    e = cfg.moe
    if model_type in DENSE_TYPES:
        e.num_experts = 0
        return
    qwen_key = model_type in QWEN_MOE_TYPES and "num_local_experts" not in hf  # their config.json's name
    experts_key = "num_experts" if qwen_key else "n_routed_experts" if model_type in _DEEPSEEK_EXPERT_TYPES else \
        "num_local_experts"
    experts, topk = hf.get(experts_key), hf.get("num_experts_per_tok")
    for key, value in ((experts_key, experts), ("num_experts_per_tok", topk)):
        if not isinstance(value, int) or value <= 0:
            raise ConversionError(f"{where}: {key} = {value!r}; expected a positive integer")
    e.num_experts, e.topk = experts, topk
    e.expert_ffn_hidden_size = hf["intermediate_size"]
    e.layer_freq, e.first_k_dense, e.logit_norm = 1, 0, False
    if model_type in QWEN_MOE_TYPES:
        _qwen_moe_settings(cfg, hf, model_type, where)
    elif model_type in _DEEPSEEK_EXPERT_TYPES:
        _deepseek_moe_settings(cfg, hf, where, model_type)
    elif model_type == "mixtral":
        e.router, e.renormalize = "topk", True
        e.input_jitter_eps = float(hf.get("router_jitter_noise") or 0.0)
    else:
        if topk != 2:
            raise ConversionError(f"{where}: num_experts_per_tok = {topk}; SparseMixer-v2 routes exactly 2")
        e.router = "sparsemixer"
        e.jitter_eps = float(hf.get("router_jitter_noise", 0.01))
        e.input_jitter_eps = float(hf.get("input_jitter_noise") or 0.0)


def _qwen_moe_settings(cfg: Config, hf: dict[str, Any], model_type: str, where: str) -> None:
    """Router, expert width, MoE-layer placement (and qwen2_moe's shared expert) of a qwen3_moe / qwen2_moe config
    (table in the module docstring)."""
    e, layers = cfg.moe, cfg.model.num_layers
    width = hf.get("moe_intermediate_size")
    step = hf.get("decoder_sparse_step", 1)
    dense_only = hf.get("mlp_only_layers") or []
    for key, value in (("moe_intermediate_size", width), ("decoder_sparse_step", step)):
        if not isinstance(value, int) or value <= 0:
            raise ConversionError(f"{where}: {key} = {value!r}; expected a positive integer")
    if not isinstance(dense_only, list) or not all(isinstance(i, int) for i in dense_only):
        raise ConversionError(f"{where}: mlp_only_layers = {dense_only!r}; expected a list of layer numbers")
    e.expert_ffn_hidden_size = width
    e.router, e.renormalize, e.input_jitter_eps = "topk", bool(hf.get("norm_topk_prob", False)), 0.0
    moe_layers = [i for i in range(layers) if i not in dense_only and (i + 1) % step == 0]
    spacing = moe_layer_spacing(moe_layers, layers) if moe_layers else None
    if spacing is None:
        raise ConversionError(f"{where}: decoder_sparse_step = {step} with mlp_only_layers = {dense_only} makes "
                              f"layers {moe_layers} MoE; only k dense layers followed by an MoE layer every f "
                              "layers (moe.first_k_dense, moe.layer_freq) are supported")
    e.first_k_dense, e.layer_freq = spacing
    if model_type == "qwen2_moe":  # always a shared expert, always gated
        shared = hf.get("shared_expert_intermediate_size")
        if not isinstance(shared, int) or shared <= 0:
            raise ConversionError(f"{where}: shared_expert_intermediate_size = {shared!r}; expected a positive integer")
        e.shared_expert_ffn_hidden_size, e.shared_expert_gate = shared, True


# ------------------------------------------------------------------------------------------ export


class ExportError(ConversionError):
    """The model cannot be expressed in the requested Hugging Face architecture; the message says why."""


EXPORT_ARCHITECTURES = ("llama", "qwen2", "qwen3", "phi3", "mixtral", "phimoe", "qwen3_moe", "qwen2_moe",
                        "deepseek_v2", "deepseek_v3", "glm4_moe")
_MOE_EXPORTS = ("mixtral", "phimoe", "qwen3_moe", "qwen2_moe", "deepseek_v2", "deepseek_v3", "glm4_moe")
_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
          "phi3": "Phi3ForCausalLM", "mixtral": "MixtralForCausalLM", "phimoe": "PhimoeForCausalLM",
          "qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
          "deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
          "glm4_moe": "Glm4MoeForCausalLM"}


def _moe_layout_blockers(cfg: Config, fmt: str) -> list[str]:
    e = cfg.moe
    reasons = []
    if e.logit_norm:
        reasons.append(f"moe.logit_norm = true: {fmt} has no gating logit normalisation")
    if e.first_k_dense:
        reasons.append(f"moe.first_k_dense = {e.first_k_dense}: {fmt} has no dense feed-forward layers")
    if e.layer_freq != 1:
        reasons.append(f"moe.layer_freq = {e.layer_freq}: {fmt} has no dense feed-forward layers "
                       "(every layer must be MoE)")
    return reasons


def _rmsnorm_no_bias_blockers(cfg: Config, fmt: str) -> list[str]:
    m = cfg.model
    reasons = []
    if m.normalization != "RMSNorm":
        reasons.append(f"model.normalization = {m.normalization!r}: {fmt} uses RMSNorm")
    if m.add_qkv_bias or m.add_bias_linear:
        reasons.append(f"model.add_qkv_bias / model.add_bias_linear: {fmt} has no attention or MLP biases")
    if m.lm_head_bias:
        reasons.append(f"model.lm_head_bias = true: {fmt} has no LM-head bias")
    return reasons


def export_blockers(cfg: Config, arch: str) -> list[str]:
    """Every reason the model ``cfg`` is not expressible exactly as HF architecture ``arch`` (empty if it is)."""
    m, e = cfg.model, cfg.moe
    if arch not in EXPORT_ARCHITECTURES:
        return [f"architecture {arch!r}; supported: {EXPORT_ARCHITECTURES}"]
    if arch in _MOE_EXPORTS and not e.num_experts:
        return [f"moe.num_experts = 0: {arch} is an MoE format (dense models export as llama, qwen2, qwen3 or phi3)"]
    if arch not in _MOE_EXPORTS and e.num_experts:
        return [f"moe.num_experts = {e.num_experts}: {arch} is a dense format (MoE exports as mixtral, phimoe, "
                "qwen3_moe or qwen2_moe)"]
    if arch in _MOE_EXPORTS and not e.dropless:  # the capacity applies in evaluation too (Megatron-LM's)
        return [f"moe.dropless = false (capacity factor {e.capacity_factor:g}): this model drops tokens over an "
                f"expert's capacity, in evaluation too; {arch} in transformers never does"]
    if arch == "glm4_moe":
        return _glm4_moe_blockers(cfg)
    reasons = _rotary_percent_blockers(m, arch)
    if arch in DEEPSEEK_TYPES:
        return reasons + _deepseek_blockers(cfg, arch)
    if m.rope_scaling == "yarn" and arch in ("qwen2", "phi3", "mixtral"):  # the others refuse any rope scaling
        reasons.append(f"model.rope_scaling = 'yarn': exported for llama, deepseek_v3 and glm4_moe only (checked "
                       f"against transformers there), not {arch}")
    reasons += _yarn_mscale_blockers(m)
    if m.multi_latent_attention:
        reasons.append(f"model.multi_latent_attention = true: {arch} has grouped-query attention (export as "
                       "deepseek_v3 or deepseek_v2)")
    if e.score_function != "softmax":
        reasons.append(f"moe.score_function = {e.score_function!r}: {arch} routes by softmax (sigmoid routing "
                       "exports as glm4_moe, or deepseek_v3 with latent attention)")
    if e.topk_scaling_factor != 1.0:
        reasons.append(f"moe.topk_scaling_factor = {e.topk_scaling_factor:g}: {arch} does not scale the routing "
                       "weights")
    if e.router_group_topk:
        reasons.append(f"moe.router_group_topk = {e.router_group_topk}: {arch} has no group-limited routing")
    if arch == "qwen2_moe":
        return reasons + _qwen2_moe_blockers(cfg)
    if e.shared_expert_ffn_hidden_size:
        reasons.append(f"moe.shared_expert_ffn_hidden_size = {e.shared_expert_ffn_hidden_size}: {arch} has no shared "
                       "expert (export as qwen2_moe)")
    if arch in QWEN3_TYPES:
        name = "Qwen3" if arch == "qwen3" else "Qwen3-MoE"
        if not m.qk_layernorm:
            reasons.append(f"model.qk_layernorm = false: {name} always normalises queries and keys")
        reasons += _rmsnorm_no_bias_blockers(cfg, name)
        if arch == "qwen3_moe":
            reasons += _qwen_moe_router_blockers(e, name)
        return reasons + _default_rope_blockers(m, "Qwen3")
    if m.qk_layernorm:
        reasons.append(f"model.qk_layernorm = true: {arch} has no query/key norms (export as qwen3 or qwen3_moe)")
    if arch == "mixtral":
        if e.router != "topk":
            reasons.append(f"moe.router = {e.router!r}: Mixtral routes by top-K softmax only (SparseMixer-v2 "
                           "samples experts and weights them differently; it exports as phimoe)")
        elif not e.renormalize:
            reasons.append("moe.renormalize = false: Mixtral always renormalises the top-K weights to sum 1")
        reasons += _moe_layout_blockers(cfg, "Mixtral") + _rmsnorm_no_bias_blockers(cfg, "Mixtral")
    elif arch == "phimoe":
        if e.router != "sparsemixer":
            reasons.append(f"moe.router = {e.router!r}: PhiMoE routes by SparseMixer-v2 only (top-K exports as "
                           "mixtral)")
        reasons += _moe_layout_blockers(cfg, "PhiMoE")
        reasons += _norm_blockers(m, "LayerNorm", "PhiMoE") + _attention_bias_blockers(m, "PhiMoE")
        if m.rope_scaling != "none":
            reasons.append(f"model.rope_scaling = {m.rope_scaling!r}: PhiMoE's rotary embedding knows only "
                           "default and longrope")
    elif arch == "qwen2":
        reasons += _norm_blockers(m, "RMSNorm", "Qwen2")
        if not m.add_qkv_bias:
            reasons.append("model.add_qkv_bias = false: Qwen2 always has q/k/v biases (export as llama)")
        if m.add_bias_linear:
            reasons.append("model.add_bias_linear = true: Qwen2 has no output or MLP biases (export as llama)")
        if m.lm_head_bias:
            reasons.append("model.lm_head_bias = true: Qwen2 has no LM-head bias")
    elif arch == "llama":
        reasons += _norm_blockers(m, "RMSNorm", "Llama") + _attention_bias_blockers(
            m, "Llama", " (q/k/v biases alone export as qwen2)")
        if m.lm_head_bias:
            reasons.append("model.lm_head_bias = true: Llama has no LM-head bias")
    else:  # phi3
        reasons += _rmsnorm_no_bias_blockers(cfg, "Phi-3")
    return reasons


def _deepseek_blockers(cfg: Config, arch: str) -> list[str]:
    """Why ``cfg`` is not a DeepSeek-V3 (``arch`` deepseek_v3) or DeepSeek-V2: latent attention with its latent
    norms, RMSNorm of eps 1e-6 and no biases, top-K routing by sigmoid scores (V3; groups scored by their top 2) or
    by softmax probabilities taken as they are (V2; groups scored by their best), an ungated shared expert a whole
    number of experts wide, dense layers only first, default RoPE or YaRN."""
    m = cfg.model
    if arch == "deepseek_v2":
        name, reasons = "DeepSeek-V2", _deepseek_v2_router_blockers(cfg.moe)
    else:
        name, reasons = "DeepSeek-V3", _deepseek_v3_router_blockers(cfg.moe, "DeepSeek-V3", " (softmax exports as "
                                                                                           "deepseek_v2)")
    reasons += _rmsnorm_no_bias_blockers(cfg, name) + _deepseek_moe_layer_blockers(cfg, name)
    if not (m.multi_latent_attention and m.qk_layernorm):
        reasons.append("model.multi_latent_attention / model.qk_layernorm: DeepSeek-V3 always has latent attention "
                       "with normalised latents")
    latent_eps = m.latent_norm_eps or m.norm_eps
    if latent_eps != DEEPSEEK_LATENT_NORM_EPS:
        reasons.append(f"model.latent_norm_eps = {latent_eps:g} (0: model.norm_eps): transformers' DeepSeek-V3 "
                       f"normalises the latents with eps {DEEPSEEK_LATENT_NORM_EPS:g}")
    return reasons


def _deepseek_moe_layer_blockers(cfg: Config, name: str) -> list[str]:
    """Why the MoE layers and rotary embedding of ``cfg`` are not those of DeepSeek's formats and GLM-4-MoE (``name``):
    no logit normalisation, an ungated shared expert a whole number of experts wide, dense layers only first,
    default RoPE or YaRN."""
    m, e = cfg.model, cfg.moe
    reasons = []
    if m.rope_scaling == "llama3":
        reasons.append(f"model.rope_scaling = 'llama3': {name}'s configs carry default RoPE or YaRN")
    reasons += _yarn_mscale_blockers(m)
    if e.logit_norm:
        reasons.append(f"moe.logit_norm = true: {name} has no gating logit normalisation")
    width, expert = e.shared_expert_ffn_hidden_size, cfg.expert_ffn_size
    if not width or width % expert or e.shared_expert_gate:
        reasons.append(f"moe.shared_expert_ffn_hidden_size = {width} (gate: {str(e.shared_expert_gate).lower()}): "
                       f"{name} has an ungated shared expert of n_shared_experts x {expert} (the experts' width)")
    if e.layer_freq != 1:
        reasons.append(f"moe.layer_freq = {e.layer_freq}: {name}'s dense layers are the first ones only "
                       "(moe.first_k_dense)")
    return reasons


def _deepseek_v3_router_blockers(e, name: str, hint: str = "") -> list[str]:
    """Why the router of ``e`` (a MoEConfig) is not DeepSeek-V3's (and GLM-4-MoE's, ``name``): top-K sigmoid scores,
    groups scored by their top 2."""
    reasons = []
    if e.router != "topk" or e.score_function != "sigmoid":
        reasons.append(f"moe.router = {e.router!r}, moe.score_function = {e.score_function!r}: {name} routes by "
                       f"top-K sigmoid scores{hint}")
    if e.renormalize and e.topk == 1:
        reasons.append(f"moe.renormalize with moe.topk = 1: {name}'s norm_topk_prob would give every token the "
                       "weight 1")
    if e.router_group_topk and e.topk != 2 * e.router_group_topk:
        reasons.append(f"moe.router_group_topk = {e.router_group_topk} with moe.topk = {e.topk}: {name} scores "
                       "groups by their top 2 experts (moe.topk = 2 x moe.router_group_topk)")
    return reasons


def _glm4_moe_blockers(cfg: Config) -> list[str]:
    """Why ``cfg`` is not a GLM-4-MoE: grouped-query attention (any head width, rotary fraction, optional query/key
    norms) whose only biases are q/k/v's, RMSNorm, DeepSeek-V3's MoE layer (:func:`_deepseek_moe_layer_blockers`)."""
    m = cfg.model
    reasons = _deepseek_v3_router_blockers(cfg.moe, "GLM-4-MoE", " (softmax exports as qwen3_moe, qwen2_moe or "
                                                                 "mixtral)")
    reasons += _deepseek_moe_layer_blockers(cfg, "GLM-4-MoE") + _norm_blockers(m, "RMSNorm", "GLM-4-MoE")
    if m.multi_latent_attention:
        reasons.append("model.multi_latent_attention = true: GLM-4-MoE has grouped-query attention (export as "
                       "deepseek_v3)")
    if m.add_bias_linear or m.lm_head_bias:
        reasons.append("model.add_bias_linear / model.lm_head_bias: GLM-4-MoE's only biases are on q, k and v "
                       "(attention_bias; o_proj, the MLPs and the LM head have none)")
    return reasons


def _rotary_percent_blockers(m, arch: str) -> list[str]:
    """Formats other than glm4_moe and phi3 rotate every channel of a head (transformers' attention there has no
    partial rotary)."""
    if m.rotary_percent == 1 or arch in _PARTIAL_ROTARY_DEFAULT:
        return []
    return [f"model.rotary_percent = {m.rotary_percent:g}: {arch} rotates every channel of a head (partial rotary "
            "exports as glm4_moe, or phi3 for dense models)"]


def _deepseek_v2_router_blockers(e) -> list[str]:
    reasons = []
    if e.router != "topk" or e.score_function != "softmax" or e.expert_bias:
        reasons.append(f"moe.router = {e.router!r}, moe.score_function = {e.score_function!r}, moe.expert_bias = "
                       f"{str(e.expert_bias).lower()}: DeepSeek-V2 routes by top-K softmax probabilities")
    if e.renormalize:
        reasons.append("moe.renormalize = true: transformers' DeepSeek-V2 takes the top-K probabilities as they are")
    if e.router_group_topk and e.topk != e.router_group_topk:
        reasons.append(f"moe.router_group_topk = {e.router_group_topk} with moe.topk = {e.topk}: DeepSeek-V2 scores "
                       "groups by their best expert (moe.topk = moe.router_group_topk)")
    return reasons


def _yarn_mscale_blockers(m) -> list[str]:
    """transformers scales YaRN's cos/sin by m(s, mscale) / m(s, mscale_all_dim) only when both are nonzero, else by
    m(s, 1); this model always by the ratio (megatron-core's): they agree then, or with mscale 1 and no
    mscale_all_dim."""
    a, b = m.rope_yarn_mscale, m.rope_yarn_mscale_all_dim
    if m.rope_scaling != "yarn" or (a and b) or (a == 1.0 and not b):
        return []
    return [f"model.rope_yarn_mscale = {a:g} with model.rope_yarn_mscale_all_dim = {b:g}: transformers scales YaRN's "
            "cos/sin by m(s, 1) unless both are nonzero"]


def _qwen2_moe_blockers(cfg: Config) -> list[str]:
    """Why ``cfg`` is not a Qwen2-MoE: RMSNorm, optional q/k/v biases and nothing else, top-K routing, a shared
    expert with its sigmoid gate."""
    m, e = cfg.model, cfg.moe
    reasons = _norm_blockers(m, "RMSNorm", "Qwen2-MoE")
    if m.qk_layernorm:
        reasons.append("model.qk_layernorm = true: Qwen2-MoE has no query/key norms")
    if m.add_bias_linear or m.lm_head_bias:
        reasons.append("model.add_bias_linear / model.lm_head_bias: Qwen2-MoE's only biases are on q, k and v")
    reasons += _default_rope_blockers(m, "Qwen2-MoE") + _qwen_moe_router_blockers(e, "Qwen2-MoE")
    if not (e.shared_expert_ffn_hidden_size and e.shared_expert_gate):
        reasons.append("moe.shared_expert_ffn_hidden_size / moe.shared_expert_gate: Qwen2-MoE always has a shared "
                       "expert with a sigmoid gate")
    return reasons


def _qwen_moe_router_blockers(e, name: str) -> list[str]:
    """Why the router of ``e`` (a MoEConfig) is not Qwen-MoE's plain top-K softmax router."""
    reasons = [f"moe.router = {e.router!r}: {name} routes by top-K softmax only"] if e.router != "topk" else []
    if e.logit_norm:
        reasons.append(f"moe.logit_norm = true: {name} has no gating logit normalisation")
    return reasons


def _default_rope_blockers(m, name: str) -> list[str]:
    """Formats whose exported config carries the default rotary embedding only."""
    if m.rope_scaling == "none":
        return []
    return [f"model.rope_scaling = {m.rope_scaling!r}: exported {name} configs carry default RoPE only"]


def _norm_blockers(m, required: str, name: str) -> list[str]:
    """Why ``m`` (a ModelConfig) cannot be written to format ``name``, whose norms are ``required``."""
    return [] if m.normalization == required else [f"model.normalization = {m.normalization!r}: {name} uses {required}"]


def _attention_bias_blockers(m, name: str, hint: str = "") -> list[str]:
    """Formats with one ``attention_bias`` switch take q/k/v and output biases together or not at all."""
    if m.add_qkv_bias == m.add_bias_linear:
        return []
    return [f"model.add_qkv_bias = {str(m.add_qkv_bias).lower()} with model.add_bias_linear = "
            f"{str(m.add_bias_linear).lower()}: {name}'s attention_bias covers q, k, v and o_proj together{hint}"]


def choose_architecture(cfg: Config) -> str:
    """The HF architecture a model exports to by default: deepseek_v3 (deepseek_v2 with softmax routing) for latent
    attention, glm4_moe for sigmoid routing with grouped-query attention; phimoe for SparseMixer-v2; for
    top-K, qwen2_moe with a shared expert, qwen3_moe with query/key norms (it also holds dense layers and
    weights not renormalised), else mixtral; dense: phi3 for partial rotary (the one dense format holding it),
    qwen3 with query/key norms, qwen2 for q/k/v-only biases, llama otherwise (Phi-3 computes the same function as a
    bias-free Llama; ``--architecture phi3`` writes its fused layout)."""
    m, e = cfg.model, cfg.moe
    if e.num_experts:
        if m.multi_latent_attention:
            return "deepseek_v2" if e.score_function == "softmax" else "deepseek_v3"
        if e.score_function == "sigmoid":
            return "glm4_moe"
        if e.router == "sparsemixer":
            return "phimoe"
        if e.shared_expert_ffn_hidden_size:
            return "qwen2_moe"
        return "qwen3_moe" if m.qk_layernorm else "mixtral"
    if m.rotary_percent != 1:
        return "phi3"
    if m.qk_layernorm:
        return "qwen3"
    return "qwen2" if m.add_qkv_bias and not m.add_bias_linear else "llama"


def _rope_fields(cfg: Config) -> dict[str, Any]:
    m = cfg.model
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": m.rope_theta}
    if m.rope_scaling == "llama3":
        params.update(rope_type="llama3", factor=m.rope_scaling_factor, low_freq_factor=m.rope_low_freq_factor,
                      high_freq_factor=m.rope_high_freq_factor,
                      original_max_position_embeddings=m.rope_original_max_position)
    elif m.rope_scaling == "yarn":
        params.update(rope_type="yarn", factor=m.rope_scaling_factor,
                      original_max_position_embeddings=m.rope_yarn_original_max_position,
                      beta_fast=m.rope_yarn_beta_fast, beta_slow=m.rope_yarn_beta_slow, mscale=m.rope_yarn_mscale,
                      mscale_all_dim=m.rope_yarn_mscale_all_dim, truncate=True)
    return {"rope_theta": m.rope_theta, "rope_parameters": params}


def _deepseek_moe_fields(cfg: Config) -> dict[str, Any]:
    """config.json fields of DeepSeek's MoE layer (deepseek_v2, deepseek_v3, glm4_moe): experts, shared experts,
    dense layers first, routing."""
    m, e = cfg.model, cfg.moe
    groups = (e.router_num_groups, e.router_group_topk) if e.router_group_topk else (1, 1)
    return dict(n_routed_experts=e.num_experts, num_experts_per_tok=e.topk, moe_intermediate_size=cfg.expert_ffn_size,
                intermediate_size=m.dense_ffn_size,
                n_shared_experts=e.shared_expert_ffn_hidden_size // cfg.expert_ffn_size,
                first_k_dense_replace=e.first_k_dense, norm_topk_prob=e.renormalize,
                routed_scaling_factor=e.topk_scaling_factor, n_group=groups[0], topk_group=groups[1],
                router_aux_loss_coef=e.aux_loss_coeff)


def hf_config(cfg: Config, arch: str | None = None, dtype: str = "float32",
              special_tokens: dict[str, int] | None = None) -> dict[str, Any]:
    """config.json of the model ``cfg`` as HF architecture ``arch`` (None: :func:`choose_architecture`).

    ``special_tokens`` (bos/eos/pad token ids, from the tokenizer) are written when given. Raises
    :class:`ExportError` listing every reason when ``cfg`` is not expressible as ``arch``.
    """
    arch = arch or choose_architecture(cfg)
    reasons = export_blockers(cfg, arch)
    if reasons:
        raise ExportError(f"this model cannot be exported as {arch}:\n  - " + "\n  - ".join(reasons))
    m, e = cfg.model, cfg.moe
    out: dict[str, Any] = {
        "architectures": [_CLASS[arch]], "model_type": arch,
        "hidden_size": m.hidden_size, "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_kv_heads, "head_dim": m.head_dim, "vocab_size": m.vocab_size,
        "intermediate_size": cfg.expert_ffn_size if e.num_experts else m.dense_ffn_size,
        "max_position_embeddings": cfg.data.seq_length, "rms_norm_eps": m.norm_eps, **_rope_fields(cfg),
        "tie_word_embeddings": m.tie_embeddings, "hidden_act": "silu", "initializer_range": m.init_std,
        "attention_dropout": 0.0, "torch_dtype": dtype, "dtype": dtype, "use_cache": True,
        "pad_token_id": None,  # not a class default that may lie outside the vocabulary (Phi-3's 32000)
        **(special_tokens or {}),
    }
    if arch == "llama":
        out.update(attention_bias=m.add_qkv_bias, mlp_bias=m.add_bias_linear, pretraining_tp=1)
    elif arch == "glm4_moe":  # the rotary fraction written always: transformers' default is 0.5
        out.update(_deepseek_moe_fields(cfg), attention_bias=m.add_qkv_bias, use_qk_norm=m.qk_layernorm,
                   partial_rotary_factor=m.rotary_percent, num_nextn_predict_layers=m.mtp_num_layers)
        out["rope_parameters"]["partial_rotary_factor"] = m.rotary_percent
    elif arch in DEEPSEEK_TYPES:
        del out["head_dim"]  # transformers sets it to the rotary width itself
        out.update(_deepseek_moe_fields(cfg), q_lora_rank=m.q_lora_rank or None, kv_lora_rank=m.kv_lora_rank,
                   qk_nope_head_dim=m.qk_head_dim, qk_rope_head_dim=m.qk_pos_emb_head_dim, v_head_dim=m.v_head_dim,
                   attention_bias=False, moe_layer_freq=1)
        if arch == "deepseek_v3":  # DeepSeek's own code reads scoring_func and topk_method
            out.update(rope_interleave=True, scoring_func="sigmoid", topk_method="noaux_tc",
                       num_nextn_predict_layers=m.mtp_num_layers)  # written explicitly: transformers' default is 1
        else:
            out.update(scoring_func="softmax", topk_method="group_limited_greedy" if e.router_group_topk else "greedy")
    elif arch in ("qwen2", "qwen3"):
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=m.num_layers)
        if arch == "qwen3":
            out.update(attention_bias=False)
    elif arch in QWEN_MOE_TYPES:
        dense_layers = [i for i in range(m.num_layers) if not is_moe_layer(cfg, i)]
        out.update(num_experts=e.num_experts, num_experts_per_tok=e.topk, moe_intermediate_size=cfg.expert_ffn_size,
                   intermediate_size=m.dense_ffn_size, norm_topk_prob=e.renormalize, decoder_sparse_step=1,
                   mlp_only_layers=dense_layers, router_aux_loss_coef=e.aux_loss_coeff, output_router_logits=False,
                   use_sliding_window=False, sliding_window=None, max_window_layers=m.num_layers)
        if arch == "qwen3_moe":
            out.update(attention_bias=False)
        else:
            out.update(qkv_bias=m.add_qkv_bias, shared_expert_intermediate_size=e.shared_expert_ffn_hidden_size)
    elif arch == "phi3":
        out.update(original_max_position_embeddings=cfg.data.seq_length, resid_pdrop=0.0, embd_pdrop=0.0,
                   sliding_window=None, partial_rotary_factor=m.rotary_percent)
        out["rope_parameters"]["partial_rotary_factor"] = m.rotary_percent
    elif arch == "mixtral":
        out.update(num_local_experts=e.num_experts, num_experts_per_tok=e.topk, router_jitter_noise=e.input_jitter_eps,
                   router_aux_loss_coef=e.aux_loss_coeff, output_router_logits=False, sliding_window=None)
    else:  # phimoe: the fields of GRIN-MoE's released config.json
        out.update(num_local_experts=e.num_experts, num_experts_per_tok=e.topk, router_jitter_noise=e.jitter_eps,
                   input_jitter_noise=e.input_jitter_eps, router_aux_loss_coef=e.aux_loss_coeff,
                   attention_bias=m.add_qkv_bias, lm_head_bias=m.lm_head_bias, output_router_logits=False,
                   sliding_window=None, hidden_dropout=0.0)
    return out
