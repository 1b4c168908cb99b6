"""Typed run configuration: dataclasses grouped by concern, TOML files, command-line overrides.

A run's configuration is a :class:`Config`. It is built from defaults, then a TOML file
(``--config path.toml``, tables named after the groups), then command-line overrides, either
dotted (``--model.hidden_size 256``) or the common Megatron-LM flag names
(``--tensor-model-parallel-size 2``, ``--num-experts 8``, ...; see :data:`MEGATRON_FLAGS`).
Unknown keys, wrong types and inconsistent values raise :class:`ConfigError` naming the setting.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import math
import re
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_moe import megatron_compat as mc


class ConfigError(ValueError):
    """An invalid configuration; the message names the offending setting."""


# Choice lists, declared once: validation below and the modules that branch on them import these.
ROUTERS = ("topk", "sparsemixer")
SCORE_FUNCTIONS = ("softmax", "sigmoid")  # the top-K router's scores (docs/routing.md §1, §1b)
SPARSEMIXER_TOPK = 2  # SparseMixer-v2 as released (GRIN) routes exactly two experts per token
BALANCE_LOSSES = ("switch", "sequence", "skywork", "none")
BALANCE_SCOPES = ("local", "global")
LR_DECAY_STYLES = ("cosine", "linear", "constant", "inverse-square-root", "WSD")  # Megatron-LM's names
LR_WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")  # the annealing phase of WSD
DEVICES = ("auto", "cpu", "cuda")
NONFINITE_POLICIES = ("stop", "skip")
PIPELINE_SCHEDULES = ("1f1b", "interleaved_1f1b", "gpipe")
RECOMPUTE_GRANULARITIES = ("none", "full", "selective")  # Megatron-LM's --recompute-granularity (+ none)
RECOMPUTE_MODULES = ("core_attn", "mlp", "moe")  # Megatron-LM's --recompute-modules that exist here
WANDB_MODES = ("offline", "online", "disabled")
NORMALIZATIONS = ("RMSNorm", "LayerNorm")  # Megatron-LM's --normalization; LayerNorm has a weight and a bias
# "llama3": Llama 3.1's frequency scaling (Megatron-LM's --use-rope-scaling); "yarn": YaRN (arXiv 2309.00071;
# DeepSeek-V3, Kimi-K2; Megatron-LM's --rotary-scaling-factor)
ROPE_SCALINGS = ("none", "llama3", "yarn")
TOKENIZER_TYPES = ("auto", "sentencepiece", "huggingface")  # auto: told from the file (data.tokenizer.load_tokenizer)


def group_limited_routing_fits(num_experts: int, topk: int, num_groups: int, group_topk: int) -> bool:
    """The one place of the rule for group-limited routing: the groups divide the experts, at most the groups
    and K groups are kept, and the kept groups hold at least K experts."""
    if num_groups < 1 or num_experts % num_groups:
        return False
    return 1 <= group_topk <= min(num_groups, topk) and group_topk * (num_experts // num_groups) >= topk


def check_sparsemixer_topk(topk: int) -> None:
    """The one place of the rule: SparseMixer-v2 routes exactly :data:`SPARSEMIXER_TOPK` experts per token."""
    if topk != SPARSEMIXER_TOPK:
        raise ConfigError(f"moe.router = 'sparsemixer' supports moe.topk = {SPARSEMIXER_TOPK} only, got {topk}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} = {value!r}; expected one of {choices}")


def _check_positive(values: dict[str, int | float]) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ConfigError(f"{name} = {value}; must be positive")


def _check_non_negative(values: dict[str, int | float]) -> None:
    for name, value in values.items():
        if not value >= 0:  # also refuses NaN
            raise ConfigError(f"{name} = {value}; must not be negative")


@dataclass
class ModelConfig:
    """Decoder-only transformer shape. Sizes in elements; ``vocab_size`` 0 = from the tokenizer.

    Derived sizes (:attr:`dense_ffn_size`, :attr:`head_dim`, :attr:`num_kv_heads`) are computed here
    and nowhere else.
    """

    vocab_size: int = 0
    make_vocab_size_divisible_by: int = 128
    hidden_size: int = 256
    num_layers: int = 4
    num_attention_heads: int = 4
    num_query_groups: int = 0  # KV heads (grouped-query attention); 0 = num_attention_heads
    # The head dimension (Megatron-LM's --kv-channels; transformers' head_dim); 0 = hidden_size / heads.
    # Qwen3 and Mistral-Nemo set it apart from the hidden size: q is [heads * kv_channels] wide.
    kv_channels: int = 0
    ffn_hidden_size: int = 0  # dense SwiGLU width; 0 = round(8/3 * hidden) to a multiple of 64
    rope_theta: float = 10000.0
    # The fraction of each q/k head that rotary embeddings rotate: its first head_dim x rotary_percent channels
    # (Megatron-LM's --rotary-percent; transformers' partial_rotary_factor: GLM-4.5's 0.5); the rest carry no position.
    rotary_percent: float = 1.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    # Options of released models (GRIN/PhiMoE, Qwen2/3, Llama 3). Experts and router gates never have biases.
    normalization: str = "RMSNorm"  # one of NORMALIZATIONS, for every norm of the model
    # Zero-centred norm scales (Megatron-LM's --apply-layernorm-1p): a norm stores w (initialised to 0)
    # and scales by 1 + w, so the stored values stay near 0, where floats are densest.
    apply_layernorm_1p: bool = False
    # Query/key normalisation (Megatron-LM's --qk-layernorm): a norm of the kind above over each head's
    # head_dim, shared by the heads, on q and on k after their projections and before the rotary embedding.
    qk_layernorm: bool = False
    add_qkv_bias: bool = False  # biases on the q, k, v projections (Qwen2, PhiMoE)
    add_bias_linear: bool = False  # biases on the attention output and the dense MLP's linears
    lm_head_bias: bool = False  # a bias on the output layer (PhiMoE's lm_head_bias)
    rope_scaling: str = "none"  # one of ROPE_SCALINGS
    rope_scaling_factor: float = 8.0  # llama3: long wavelengths are divided by this
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original / low are fully scaled
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original / high are kept
    rope_original_max_position: int = 8192  # llama3: the context length the model was trained at
    # YaRN (rope_scaling = "yarn", factor rope_scaling_factor s), Megatron-LM's YarnRotaryEmbedding and transformers'
    # "yarn" rope type: frequencies blended between f and f / s over the dimensions whose wavelengths fall between
    # beta_fast and beta_slow rotations of the original context; cos/sin scaled by m(s, mscale) / m(s, mscale_all_dim)
    # and latent attention's softmax scale by m(s, mscale_all_dim)^2, m(s, a) = 0.1 a ln s + 1.
    rope_yarn_original_max_position: int = 4096
    rope_yarn_beta_fast: float = 32.0
    rope_yarn_beta_slow: float = 1.0
    rope_yarn_mscale: float = 1.0
    rope_yarn_mscale_all_dim: float = 0.0
    # Multi-head latent attention (DeepSeek-V2 §2.1, DeepSeek-V3; Megatron-LM's --multi-latent-attention): keys and
    # values are projected up per head from one kv_lora_rank-wide latent, queries from a q_lora_rank-wide latent
    # (0: straight from the hidden state); each q/k head is qk_head_dim channels without position plus
    # qk_pos_emb_head_dim rotary ones (the key's shared by all heads), each value head v_head_dim wide. With
    # qk_layernorm the two latents are normalised (megatron-core's layer spec; DeepSeek's q_a/kv_a_layernorm).
    multi_latent_attention: bool = False
    q_lora_rank: int = 0
    kv_lora_rank: int = 32
    qk_head_dim: int = 128
    qk_pos_emb_head_dim: int = 64
    v_head_dim: int = 128
    # Multi-token prediction (DeepSeek-V3 §2.2; Megatron-LM's --mtp-num-layers): D sequential modules after the last
    # layer, depth k predicting the token k + 1 ahead of the main prediction from depth k - 1's hidden state and the
    # embedding of the token k ahead, each with a transformer block of its own (layer num_layers + k - 1) and the
    # shared embedding and output head; training adds training.mtp_loss_scaling_factor x their mean loss.
    mtp_num_layers: int = 0
    # The latent norms' eps; 0 = norm_eps (megatron-core's). transformers' DeepSeek-V3 uses 1e-6 there whatever its
    # rms_norm_eps says (Moonlight: 1e-5): its import sets this.
    latent_norm_eps: float = 0.0

    @property
    def dense_ffn_size(self) -> int:
        """The dense SwiGLU width: ``ffn_hidden_size``, or 8/3 * hidden rounded up to a multiple of 64."""
        return self.ffn_hidden_size or default_ffn_hidden_size(self.hidden_size)

    @property
    def head_dim(self) -> int:
        """Elements per attention head: ``kv_channels``, or hidden_size / num_attention_heads."""
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def _validate_latent_attention(self) -> None:
        _check_positive({"model.kv_lora_rank": self.kv_lora_rank, "model.qk_head_dim": self.qk_head_dim,
                         "model.qk_pos_emb_head_dim": self.qk_pos_emb_head_dim, "model.v_head_dim": self.v_head_dim})
        _check_non_negative({"model.q_lora_rank": self.q_lora_rank, "model.latent_norm_eps": self.latent_norm_eps})
        if self.qk_pos_emb_head_dim % 2:
            raise ConfigError(f"model.qk_pos_emb_head_dim = {self.qk_pos_emb_head_dim} must be even for rotary "
                              "embeddings")
        if self.kv_channels:
            raise ConfigError(f"model.kv_channels = {self.kv_channels} with model.multi_latent_attention: latent "
                              "attention heads are model.qk_head_dim + model.qk_pos_emb_head_dim wide (q, k) and "
                              "model.v_head_dim (v); leave kv_channels at 0")
        if self.num_kv_heads != self.num_attention_heads:
            raise ConfigError(f"model.num_query_groups = {self.num_query_groups} with model.multi_latent_attention: "
                              "latent attention has a key and value per head (leave num_query_groups at 0)")
        if self.add_qkv_bias:
            raise ConfigError("model.add_qkv_bias with model.multi_latent_attention: the latent projections have no "
                              "biases here")
        if self.rope_scaling == "llama3":
            raise ConfigError("model.rope_scaling = 'llama3' (--use-rope-scaling) with model.multi_latent_attention: "
                              "megatron-core's latent attention does not apply it; its long-context scaling is YaRN "
                              "(--rotary-scaling-factor)")
        if self.latent_norm_eps and not self.qk_layernorm:
            raise ConfigError(f"model.latent_norm_eps = {self.latent_norm_eps:g} without model.qk_layernorm: there are "
                              "no latent norms")

    @property
    def rotary_dim(self) -> int:
        """Channels of each q/k head that rotary embeddings rotate: the last ``qk_pos_emb_head_dim`` with
        multi-latent attention, else the first ``head_dim x rotary_percent`` (all of them by default)."""
        if self.multi_latent_attention:
            return self.qk_pos_emb_head_dim
        return int(self.head_dim * self.rotary_percent)

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads (grouped-query attention); ``num_query_groups`` 0 means one per query head."""
        return self.num_query_groups or self.num_attention_heads

    def validate(self) -> None:
        _check_positive({
            "model.hidden_size": self.hidden_size,
            "model.num_layers": self.num_layers,
            "model.num_attention_heads": self.num_attention_heads,
            "model.make_vocab_size_divisible_by": self.make_vocab_size_divisible_by,
        })
        _check_non_negative({
            "model.vocab_size": self.vocab_size,
            "model.num_query_groups": self.num_query_groups,
            "model.ffn_hidden_size": self.ffn_hidden_size,
            "model.kv_channels": self.kv_channels,
            "model.mtp_num_layers": self.mtp_num_layers,
        })
        if self.multi_latent_attention:
            self._validate_latent_attention()
        elif not self.kv_channels and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.num_attention_heads = {self.num_attention_heads} does not divide "
                f"model.hidden_size = {self.hidden_size}; set model.kv_channels (--kv-channels) for a head "
                "dimension of its own"
            )
        if not self.multi_latent_attention and self.head_dim % 2:
            what = "model.kv_channels" if self.kv_channels else "model.hidden_size / model.num_attention_heads"
            raise ConfigError(f"head dimension {what} = {self.head_dim} must be even for rotary embeddings")
        if not 0 < self.rotary_percent <= 1:
            raise ConfigError(f"model.rotary_percent = {self.rotary_percent} (--rotary-percent); expected a fraction "
                              "in (0, 1] of each head's channels")
        if self.rotary_percent != 1 and self.multi_latent_attention:
            raise ConfigError(f"model.rotary_percent = {self.rotary_percent} with model.multi_latent_attention: latent "
                              "attention's rotary channels are model.qk_pos_emb_head_dim")
        if not self.multi_latent_attention and (self.rotary_dim < 2 or self.rotary_dim % 2):
            raise ConfigError(f"model.rotary_percent = {self.rotary_percent} of head dimension {self.head_dim} gives "
                              f"{self.rotary_dim} rotary channels; rotary embeddings need an even number of them")
        if self.num_attention_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.num_query_groups = {self.num_kv_heads} does not divide "
                f"model.num_attention_heads = {self.num_attention_heads}"
            )
        _check_choice("model.normalization", self.normalization, NORMALIZATIONS)
        _check_choice("model.rope_scaling", self.rope_scaling, ROPE_SCALINGS)
        if self.lm_head_bias and self.tie_embeddings:
            raise ConfigError("model.lm_head_bias with model.tie_embeddings: a tied output layer has no bias here "
                              "(no released model this project reads combines them); untie the embeddings")
        if self.rope_scaling == "yarn":
            _check_positive({"model.rope_scaling_factor": self.rope_scaling_factor,
                             "model.rope_yarn_original_max_position": self.rope_yarn_original_max_position,
                             "model.rope_yarn_beta_slow": self.rope_yarn_beta_slow})
            _check_non_negative({"model.rope_yarn_mscale": self.rope_yarn_mscale,
                                 "model.rope_yarn_mscale_all_dim": self.rope_yarn_mscale_all_dim})
            if not self.rope_yarn_beta_fast > self.rope_yarn_beta_slow:
                raise ConfigError(f"model.rope_yarn_beta_fast = {self.rope_yarn_beta_fast} must exceed "
                                  f"model.rope_yarn_beta_slow = {self.rope_yarn_beta_slow} (YaRN)")
        if self.rope_scaling == "llama3":
            _check_positive({
                "model.rope_scaling_factor": self.rope_scaling_factor,
                "model.rope_low_freq_factor": self.rope_low_freq_factor,
                "model.rope_original_max_position": self.rope_original_max_position,
            })
            if not self.rope_high_freq_factor > self.rope_low_freq_factor:
                raise ConfigError(f"model.rope_high_freq_factor = {self.rope_high_freq_factor} must exceed "
                                  f"model.rope_low_freq_factor = {self.rope_low_freq_factor} (llama3 rope scaling)")


@dataclass
class MoEConfig:
    """Mixture-of-experts layers, routing and load balancing (numerics: docs/routing.md)."""

    num_experts: int = 0  # 0 = dense model (Megatron-LM: no --num-experts)
    topk: int = 2
    expert_ffn_hidden_size: int = 0  # 0 = model.ffn_hidden_size
    # A shared expert (Megatron-LM's --moe-shared-expert-intermediate-size; Qwen2-MoE, DeepSeek): one SwiGLU of this
    # width that every token passes besides its routed experts, added to their weighted sum; 0 = none.
    shared_expert_ffn_hidden_size: int = 0
    # Scale the shared expert's output per token by sigmoid(x . g) with a learned g [hidden] (Qwen2-MoE's
    # shared_expert_gate; Megatron-LM's --moe-shared-expert-gate).
    shared_expert_gate: bool = False
    layer_freq: int = 1  # an MoE layer every `layer_freq` layers
    first_k_dense: int = 0  # the first k layers stay dense
    router: str = "topk"  # one of ROUTERS
    renormalize: bool = True  # top-K: renormalise the K picked weights to sum 1
    score_function: str = "softmax"  # top-K: one of SCORE_FUNCTIONS (sigmoid: DeepSeek-V3, docs/routing.md §1b)
    # Auxiliary-loss-free balancing (DeepSeek-V3 §2.1.2, docs/routing.md §1b): a per-expert bias added to the
    # sigmoid scores for choosing experts only, moved by +-expert_bias_update_rate after every step towards
    # equal loads. Megatron-LM's --moe-router-enable-expert-bias / --moe-router-bias-update-rate.
    expert_bias: bool = False
    expert_bias_update_rate: float = 1e-3
    topk_scaling_factor: float = 1.0  # top-K: combine weights x this (Megatron-LM's --moe-router-topk-scaling-factor)
    # Group-limited routing (DeepSeek-V2/V3; --moe-router-num-groups, --moe-router-group-topk): the experts form
    # router_num_groups equal groups; each token chooses among the router_group_topk best (docs/routing.md §1b).
    router_num_groups: int = 0
    router_group_topk: int = 0
    logit_norm: bool = False  # Skywork gating logit normalisation (docs/routing.md §2)
    logit_norm_scale: float = 1.0  # lambda
    jitter_eps: float = 0.01  # SparseMixer-v2 threshold epsilon
    input_jitter_eps: float = 0.0  # multiplicative input jitter on the MoE input (training only)
    balance_loss: str = "switch"  # one of BALANCE_LOSSES
    balance_scope: str = "local"  # one of BALANCE_SCOPES
    aux_loss_coeff: float = 0.0  # constant alpha (Megatron-LM's default: no auxiliary loss)
    z_loss_coeff: float = 0.0
    capacity_factor: float = 1.0  # for the drop rate (and drops in capacity mode)
    dropless: bool = True  # False = capacity mode: really drop over-capacity assignments
    # Pad each expert's rows to a multiple of this for the grouped GEMM (0 = automatic: 16 bytes on CUDA).
    expert_row_alignment: int = 0
    adaptive_aux: bool = False  # Skywork adaptive per-layer coefficients (docs/routing.md §5)
    adaptive_xi: float = 0.2
    adaptive_alpha_max: float = 0.01
    adaptive_beta: float = 0.99
    adaptive_alpha_0: float = -1.0  # < 0 means alpha_max

    def validate(self) -> None:
        """Checks of the MoE settings alone (those against the model are in :meth:`Config.validate`)."""
        _check_choice("moe.router", self.router, ROUTERS)
        _check_choice("moe.score_function", self.score_function, SCORE_FUNCTIONS)
        _check_choice("moe.balance_loss", self.balance_loss, BALANCE_LOSSES)
        _check_choice("moe.balance_scope", self.balance_scope, BALANCE_SCOPES)
        _check_non_negative({
            "moe.num_experts": self.num_experts,
            "moe.expert_ffn_hidden_size": self.expert_ffn_hidden_size,
            "moe.first_k_dense": self.first_k_dense,
            "moe.aux_loss_coeff": self.aux_loss_coeff,
            "moe.z_loss_coeff": self.z_loss_coeff,
            "moe.jitter_eps": self.jitter_eps,
            "moe.input_jitter_eps": self.input_jitter_eps,
            "moe.expert_row_alignment": self.expert_row_alignment,
            "moe.shared_expert_ffn_hidden_size": self.shared_expert_ffn_hidden_size,
            "moe.expert_bias_update_rate": self.expert_bias_update_rate,
            "moe.router_num_groups": self.router_num_groups,
            "moe.router_group_topk": self.router_group_topk,
        })
        if bool(self.router_num_groups) != bool(self.router_group_topk):
            raise ConfigError("moe.router_num_groups and moe.router_group_topk (--moe-router-num-groups, "
                              "--moe-router-group-topk) go together: group-limited routing needs both")
        _check_positive({"moe.topk_scaling_factor": self.topk_scaling_factor})
        if self.expert_bias and self.score_function != "sigmoid":
            raise ConfigError("moe.expert_bias (--moe-router-enable-expert-bias) biases sigmoid scores: set "
                              "moe.score_function = 'sigmoid' (--moe-router-score-function sigmoid), as Megatron-LM "
                              "requires")
        if self.router == "sparsemixer" and (self.score_function != "softmax" or self.topk_scaling_factor != 1.0):
            raise ConfigError("moe.score_function and moe.topk_scaling_factor belong to the top-K router; "
                              "SparseMixer-v2 (moe.router = 'sparsemixer') samples from a softmax")
        if self.shared_expert_gate and not self.shared_expert_ffn_hidden_size:
            raise ConfigError("moe.shared_expert_gate needs a shared expert: set moe.shared_expert_ffn_hidden_size "
                              "(--moe-shared-expert-intermediate-size)")
        if not self.num_experts:
            return
        if self.topk <= 0:
            raise ConfigError(f"moe.topk = {self.topk}; must be positive")
        if self.topk > self.num_experts:
            raise ConfigError(f"moe.topk = {self.topk} exceeds moe.num_experts = {self.num_experts}")
        if self.router == "sparsemixer":
            check_sparsemixer_topk(self.topk)
        if self.router_group_topk:
            g, kept = self.router_num_groups, self.router_group_topk
            if self.router != "topk" or not group_limited_routing_fits(self.num_experts, self.topk, g, kept):
                raise ConfigError(
                    f"group-limited routing: moe.router_num_groups = {g} must divide moe.num_experts = "
                    f"{self.num_experts}, and moe.router_group_topk = {kept} must be at most the groups and "
                    f"moe.topk = {self.topk}, with enough experts in the kept groups for top-{self.topk}, "
                    f"on the top-K router (moe.router = {self.router!r})")
        if self.layer_freq <= 0:
            raise ConfigError(f"moe.layer_freq = {self.layer_freq}; must be positive")
        if not self.capacity_factor > 0:
            raise ConfigError(f"moe.capacity_factor = {self.capacity_factor}; must be positive")
        if self.balance_scope == "global" and self.balance_loss != "switch":
            raise ConfigError(
                f"moe.balance_scope = 'global' sums token counts, which only the Switch loss uses; "
                f"moe.balance_loss = {self.balance_loss!r} is computed from local probabilities (use 'switch')"
            )
        if self.adaptive_aux and self.balance_loss == "none":
            raise ConfigError("moe.adaptive_aux needs a balance loss; moe.balance_loss is 'none'")
        if not 0 <= self.adaptive_beta < 1:
            raise ConfigError(f"moe.adaptive_beta = {self.adaptive_beta}; must be in [0, 1)")
        if self.adaptive_xi < 0 or self.adaptive_alpha_max < 0:
            raise ConfigError("moe.adaptive_xi and moe.adaptive_alpha_max must not be negative")


@dataclass
class DataConfig:
    """Megatron .bin/.idx data and the sentencepiece tokenizer."""

    data_path: list[str] = field(default_factory=list)  # ["prefix"] or ["w1", "p1", "w2", "p2", ...]
    split: str = "969,30,1"
    eval_data_path: list[str] = field(default_factory=list)
    tokenizer_model: str = ""
    seq_length: int = 256
    cache_dir: str = ""  # where megatron-core writes its index caches; "" = next to the run
    # Independent training data (Megatron-LM's --train-data-path): all of it trains, data_path and split unused.
    train_data_path: list[str] = field(default_factory=list)
    tokenizer_type: str = "auto"  # one of TOKENIZER_TYPES (Megatron-LM's --tokenizer-type, mapped)
    eod_mask_loss: bool = False  # no loss on the end-of-document token (Megatron-LM's --eod-mask-loss)

    def validate(self) -> None:
        _check_positive({"data.seq_length": self.seq_length})
        _check_choice("data.tokenizer_type", self.tokenizer_type, TOKENIZER_TYPES)
        if self.train_data_path and self.data_path:
            raise ConfigError("data.train_data_path (--train-data-path) and data.data_path (--data-path) exclude "
                              "each other: give one blend split by data.split, or per-split paths")
        for name, path in (("data.train_data_path", self.train_data_path),
                           ("data.eval_data_path", self.eval_data_path)):
            if len(path) > 1 and len(path) % 2:
                raise ConfigError(f"{name} = {path}: a blend is a list of weight, prefix pairs (odd length given)")
        if len(self.data_path) > 1 and len(self.data_path) % 2:
            raise ConfigError(
                f"data.data_path = {self.data_path}: a blend is a list of weight, prefix pairs (odd length given)"
            )
        parse_split(self.split)


def _unquote(value: str) -> str:
    """``value`` stripped, without one layer of matching quotes: a bash array expanded unquoted passes the
    quotes on (Megatron-LM's llama3 script: ``--split '99,1,0'``; slime's Qwen3 scripts: ``--moe-layer-freq
    "'([1]*48)'"``), where a shell running the command as a string would have removed them."""
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def parse_split(split: str) -> list[float]:
    """Normalise a Megatron split string (``"969,30,1"``, or ``"969/30/1"``, optionally in quotes) to three
    fractions summing to 1.

    Raises ConfigError naming ``data.split`` for anything else (the one parser: validation and the
    dataset builder both call it).
    """
    if not isinstance(split, str):
        raise ConfigError(f"data.split must be a string like '969,30,1', got {split!r}")
    given, split = split, _unquote(split)
    sep = "/" if "/" in split and "," not in split else ","
    parts = [p.strip() for p in split.split(sep) if p.strip()]
    if not 1 <= len(parts) <= 3:
        raise ConfigError(f"data.split = {given!r}; expected 1 to 3 numbers separated by ',' or '/'")
    if not all(re.fullmatch(r"\d+(\.\d*)?|\.\d+", p) for p in parts):
        raise ConfigError(f"data.split = {given!r}; expected plain non-negative numbers like '969,30,1'")
    values = [float(p) for p in parts] + [0.0] * (3 - len(parts))
    total = sum(values)
    if not math.isfinite(total) or total <= 0:
        raise ConfigError(f"data.split = {given!r}; the weights must have a positive, finite sum")
    return [v / total for v in values]


@dataclass
class OptimizerConfig:
    """AdamW and Megatron-LM's learning-rate schedule (linear warmup, then a decay style); defaults are
    Megatron-LM's. Schedule lengths in iterations, or in samples for a run set by ``training.train_samples``."""

    lr: float = 3e-4  # Megatron-LM has no default (--lr is required there)
    min_lr: float = 0.0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # 0 = no clipping
    lr_warmup_iters: int = 0
    lr_decay_iters: int = 0  # 0 = training.train_iters
    lr_decay_style: str = "linear"  # one of LR_DECAY_STYLES
    lr_warmup_fraction: float = 0.0  # > 0: warmup = this fraction of the decay length (instead of *_iters/_samples)
    lr_warmup_samples: int = 0  # sample-based runs (training.train_samples)
    lr_decay_samples: int = 0  # sample-based runs; 0 = training.train_samples
    lr_warmup_init: float = 0.0  # the learning rate warmup starts from
    lr_wsd_decay_style: str = "exponential"  # one of LR_WSD_DECAY_STYLES: WSD's final annealing
    lr_wsd_decay_iters: int = 0  # WSD: the annealing phase, the last iterations of the decay length
    lr_wsd_decay_samples: int = 0  # the same for sample-based runs
    # The input and output layers (embedding, output head) on their own schedule, Megatron-LM's
    # --decoupled-lr / --decoupled-min-lr: the same warmup and decay from lr_warmup_init to these.
    decoupled_lr: float = -1.0  # -1: not set (those layers follow optimizer.lr)
    decoupled_min_lr: float = -1.0  # -1: optimizer.min_lr (Megatron-LM's default)

    def lr_bounds(self, decoupled: bool) -> tuple[float, float]:
        """(max, min) learning rate of a parameter group: the decoupled pair for the input and output
        layers when ``decoupled_lr`` is set, else ``lr`` and ``min_lr``."""
        if not decoupled or self.decoupled_lr < 0:
            return self.lr, self.min_lr
        return self.decoupled_lr, self.min_lr if self.decoupled_min_lr < 0 else self.decoupled_min_lr

    def validate(self) -> None:
        _check_choice("optimizer.lr_decay_style", self.lr_decay_style, LR_DECAY_STYLES)
        _check_choice("optimizer.lr_wsd_decay_style", self.lr_wsd_decay_style, LR_WSD_DECAY_STYLES)
        _check_non_negative({
            "optimizer.lr": self.lr,
            "optimizer.min_lr": self.min_lr,
            "optimizer.weight_decay": self.weight_decay,
            "optimizer.clip_grad": self.clip_grad,
            "optimizer.lr_warmup_iters": self.lr_warmup_iters,
            "optimizer.lr_decay_iters": self.lr_decay_iters,
            "optimizer.lr_warmup_fraction": self.lr_warmup_fraction,
            "optimizer.lr_warmup_samples": self.lr_warmup_samples,
            "optimizer.lr_decay_samples": self.lr_decay_samples,
            "optimizer.lr_warmup_init": self.lr_warmup_init,
            "optimizer.lr_wsd_decay_iters": self.lr_wsd_decay_iters,
            "optimizer.lr_wsd_decay_samples": self.lr_wsd_decay_samples,
        })
        if self.min_lr > self.lr:
            raise ConfigError(f"optimizer.min_lr = {self.min_lr} exceeds optimizer.lr = {self.lr}")
        if self.lr_warmup_init > self.lr:
            raise ConfigError(f"optimizer.lr_warmup_init = {self.lr_warmup_init} exceeds optimizer.lr = {self.lr}")
        if self.lr_warmup_fraction >= 1:
            raise ConfigError(f"optimizer.lr_warmup_fraction = {self.lr_warmup_fraction}; must be below 1")
        for name, value in (("decoupled_lr", self.decoupled_lr), ("decoupled_min_lr", self.decoupled_min_lr)):
            if value < 0 and value != -1.0:
                raise ConfigError(f"optimizer.{name} = {value}; must be >= 0 (or -1: not set)")
        if self.decoupled_min_lr >= 0 and self.decoupled_lr < 0:
            raise ConfigError("optimizer.decoupled_min_lr (--decoupled-min-lr) has no effect without "
                              "optimizer.decoupled_lr (--decoupled-lr)")
        if self.decoupled_lr >= 0:
            top, bottom = self.lr_bounds(decoupled=True)
            if bottom > top:
                raise ConfigError(f"the input and output layers' minimum learning rate {bottom} exceeds "
                                  f"optimizer.decoupled_lr = {top}")
            if self.lr_warmup_init > top:
                raise ConfigError(f"optimizer.lr_warmup_init = {self.lr_warmup_init} exceeds "
                                  f"optimizer.decoupled_lr = {top}")
        if not 0 <= self.adam_beta1 < 1 or not 0 <= self.adam_beta2 < 1:
            raise ConfigError("optimizer.adam_beta1 and optimizer.adam_beta2 must be in [0, 1)")


@dataclass
class TrainingConfig:
    """Batch sizes (in sequences), iterations, precision, evaluation cadence."""

    micro_batch_size: int = 4
    global_batch_size: int = 8
    train_iters: int = 100
    eval_interval: int = 1000
    eval_iters: int = 100
    seed: int = 1234
    bf16: bool = False  # bf16 compute copies of fp32 master weights; fp32 gradient reduction
    # The LM loss as the mean over every unmasked token of the global batch (Megatron-LM's
    # --calculate-per-token-loss), not the mean over micro-batches of each one's token mean.
    calculate_per_token_loss: bool = False
    # lambda of DeepSeek-V3 eq. 25: the multi-token prediction loss (model.mtp_num_layers) is lambda x the mean of
    # the depths' cross entropies (Megatron-LM's --mtp-loss-scaling-factor and default)
    mtp_loss_scaling_factor: float = 0.1
    device: str = "auto"  # one of DEVICES
    num_threads: int = 0  # CPU intra-op threads; 0 = torch default
    exit_interval: int = 0  # save a checkpoint and exit after this many steps (0 = run to train_iters)
    nonfinite_loss: str = "stop"  # one of NONFINITE_POLICIES: raise (no checkpoint) | drop that step
    # Build on the meta device and allocate only this rank's pipeline stages (models too large for
    # host memory); each stage is initialised from seed + stage index, not the single-process stream.
    meta_init: bool = False
    compile: bool = False  # torch.compile every transformer block (as torchtitan applies it)
    # Sample-based run (Megatron-LM's --train-samples): train_iters = train_samples // global_batch_size
    # (set so by the command line); the schedule counts in samples. 0 = iteration-based.
    train_samples: int = 0
    exit_duration_in_mins: int = 0  # save a checkpoint and exit after this many minutes of training (0 = never)

    def num_microbatches(self, data_parallel_size: int) -> int:
        """Micro-batches per rank and optimizer step: global / (micro x dp) (Megatron-LM's rule)."""
        per_step = self.micro_batch_size * data_parallel_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"training.global_batch_size = {self.global_batch_size} is not divisible by "
                f"training.micro_batch_size ({self.micro_batch_size}) x data-parallel size ({data_parallel_size})"
            )
        return self.global_batch_size // per_step

    @property
    def run_samples(self) -> int:
        """Sequences a full run trains on: ``train_samples``, else train_iters x global_batch_size."""
        return self.train_samples or self.train_iters * self.global_batch_size

    def validate(self) -> None:
        _check_choice("training.device", self.device, DEVICES)
        _check_choice("training.nonfinite_loss", self.nonfinite_loss, NONFINITE_POLICIES)
        _check_positive({
            "training.micro_batch_size": self.micro_batch_size,
            "training.global_batch_size": self.global_batch_size,
            "training.train_iters": self.train_iters,
        })
        _check_non_negative({
            "training.eval_interval": self.eval_interval,
            "training.eval_iters": self.eval_iters,
            "training.num_threads": self.num_threads,
            "training.exit_interval": self.exit_interval,
            "training.train_samples": self.train_samples,
            "training.exit_duration_in_mins": self.exit_duration_in_mins,
            "training.mtp_loss_scaling_factor": self.mtp_loss_scaling_factor,
        })
        if self.train_samples and self.train_iters != self.train_samples // self.global_batch_size:
            raise ConfigError(
                f"training.train_samples = {self.train_samples} trains train_samples // global_batch_size = "
                f"{self.train_samples // self.global_batch_size} iterations, but training.train_iters = "
                f"{self.train_iters}: give one of --train-iters and --train-samples"
            )


@dataclass
class ParallelConfig:
    """Parallel layout; data parallel size = world size / (tp * pp)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    pipeline_schedule: str = "1f1b"  # one of PIPELINE_SCHEDULES
    virtual_pipeline_stages: int = 1  # model chunks per pipeline rank (interleaved 1F1B)
    # Megatron-LM's --account-for-embedding-in-pipeline-split / --account-for-loss-in-pipeline-split: the embedding
    # (the output layer and loss) count as a layer of the first (last) stage, which holds one decoder layer fewer
    account_for_embedding_in_pipeline_split: bool = False
    account_for_loss_in_pipeline_split: bool = False
    # Megatron-LM's --pipeline-model-parallel-layout: each stage's layers as a string, stages separated by "|",
    # E the embedding, t a decoder layer, m a multi-token prediction depth, L the loss, (...)*n and x*n repeat,
    # e.g. "Et*3|(tt|)*29m|L" (parallel/pipeline.py parse_pipeline_layout); "" = not set.
    pipeline_layout: str = ""
    # Megatron-LM's uneven pipeline (--decoder-first-pipeline-num-layers, --decoder-last-pipeline-num-layers): the
    # layers of the first / last pipeline rank (over its virtual stages); 0 = not set. The other ranks share the rest
    # evenly (parallel/pipeline.py pipeline_layers).
    pipeline_first_stage_layers: int = 0
    pipeline_last_stage_layers: int = 0
    data_parallel_shard: bool = False  # FSDP2 over the data-parallel group instead of replication
    # bf16 mode: accumulate and reduce data-parallel gradients in bf16 (half the bytes) instead of fp32,
    # as Megatron-LM's --grad-reduce-in-bf16; the optimizer still steps fp32 master weights.
    grad_reduce_in_bf16: bool = False
    # Activation recompute in backward: "full" = every transformer block, "selective" = the modules of
    # recompute_modules, as Megatron-LM's --recompute-granularity and --recompute-modules: "core_attn" the
    # attention core (softmax(QK^T)V), "mlp" the dense MLPs, "moe" the MoE layers (router and experts).
    recompute_granularity: str = "none"
    recompute_modules: list[str] = field(default_factory=lambda: ["core_attn"])

    def validate(self) -> None:
        _check_choice("parallel.pipeline_schedule", self.pipeline_schedule, PIPELINE_SCHEDULES)
        _check_choice("parallel.recompute_granularity", self.recompute_granularity, RECOMPUTE_GRANULARITIES)
        if not self.recompute_modules:
            raise ConfigError(f"parallel.recompute_modules is empty; give some of {RECOMPUTE_MODULES}")
        for module in self.recompute_modules:
            _check_choice("parallel.recompute_modules", module, RECOMPUTE_MODULES)
        if self.recompute_granularity != "selective" and sorted(self.recompute_modules) != ["core_attn"]:
            raise ConfigError(f"parallel.recompute_modules = {self.recompute_modules}: no effect without "
                              "parallel.recompute_granularity = 'selective' (--recompute-granularity selective)")
        _check_positive({
            "parallel.tensor_model_parallel_size": self.tensor_model_parallel_size,
            "parallel.pipeline_model_parallel_size": self.pipeline_model_parallel_size,
            "parallel.virtual_pipeline_stages": self.virtual_pipeline_stages,
        })
        if self.virtual_pipeline_stages > 1 and self.pipeline_schedule != "interleaved_1f1b":
            raise ConfigError(
                f"parallel.virtual_pipeline_stages = {self.virtual_pipeline_stages} needs "
                f"parallel.pipeline_schedule = 'interleaved_1f1b' (got {self.pipeline_schedule!r})"
            )
        if self.virtual_pipeline_stages > 1 and self.pipeline_model_parallel_size == 1:
            raise ConfigError("parallel.virtual_pipeline_stages > 1 needs pipeline_model_parallel_size > 1")
        _check_non_negative({"parallel.pipeline_first_stage_layers": self.pipeline_first_stage_layers,
                             "parallel.pipeline_last_stage_layers": self.pipeline_last_stage_layers})
        accounted = self.account_for_embedding_in_pipeline_split or self.account_for_loss_in_pipeline_split
        if (self.uneven_pipeline or accounted) and self.pipeline_model_parallel_size == 1:
            raise ConfigError("parallel.pipeline_first_stage_layers / pipeline_last_stage_layers "
                              "(--decoder-first/last-pipeline-num-layers) and parallel.account_for_embedding/loss_in_"
                              "pipeline_split need pipeline_model_parallel_size > 1")
        if self.pipeline_layout and (self.uneven_pipeline or accounted):
            raise ConfigError("parallel.pipeline_layout (--pipeline-model-parallel-layout) with the other pipeline "
                              "split settings (--decoder-first/last-pipeline-num-layers, --account-for-*-in-pipeline-"
                              "split): the layout places every layer itself (as Megatron-LM refuses them together)")
        if self.uneven_pipeline and accounted:
            raise ConfigError("parallel.account_for_embedding/loss_in_pipeline_split with parallel.pipeline_first/"
                              "last_stage_layers: give the layer counts of the first and last stage, or let the "
                              "embedding and loss count as layers, not both (as Megatron-LM)")

    @property
    def uneven_pipeline(self) -> bool:
        """Whether the first or last pipeline rank's layer count is given (Megatron-LM's uneven pipeline)."""
        return bool(self.pipeline_first_stage_layers or self.pipeline_last_stage_layers)


@dataclass
class CheckpointConfig:
    save: str = ""  # run directory: metrics.jsonl, checkpoints
    load: str = ""  # a save directory (its latest checkpoint) or one checkpoint directory
    save_interval: int = 0  # 0 = save only at the end of training and on SIGTERM/SIGINT
    keep_last: int = 0  # checkpoints kept in the save directory (0 = all, as Megatron-LM)
    async_save: bool = False  # stage to CPU memory, write in the background, publish before the next save
    allow_tokenizer_change: bool = False  # resume with a tokenizer other than the checkpoint's
    load_optim: bool = True  # False: resume the step and data position, not the optimizer state (--no-load-optim)
    load_rng: bool = True  # False: reseed instead of restoring the random state (--no-load-rng)
    finetune: bool = False  # load the model weights only and start at step 0 (--finetune)

    def validate(self) -> None:
        _check_non_negative({"checkpoint.save_interval": self.save_interval, "checkpoint.keep_last": self.keep_last})


@dataclass
class LoggingConfig:
    log_interval: int = 100
    wandb_project: str = ""
    wandb_mode: str = "offline"  # one of WANDB_MODES
    tensorboard_dir: str = ""  # "" = no TensorBoard
    run_name: str = ""  # the wandb run's name (--wandb-exp-name)
    wandb_save_dir: str = ""  # where wandb writes its files; "" = <checkpoint.save>/wandb
    wandb_entity: str = ""  # the wandb team or user; "" = wandb's default
    log_params_norm: bool = False  # L2 norm of all parameters after each step (one all-reduce per step)
    log_num_zeros_in_grad: bool = False  # gradient elements exactly 0 per step (in the grad norm's all-reduce)

    def validate(self) -> None:
        _check_choice("logging.wandb_mode", self.wandb_mode, WANDB_MODES)
        _check_positive({"logging.log_interval": self.log_interval})


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def expert_ffn_size(self) -> int:
        """Each expert's SwiGLU width: ``moe.expert_ffn_hidden_size``, else the dense width."""
        return self.moe.expert_ffn_hidden_size or self.model.dense_ffn_size

    def with_vocab_size(self, vocab_size: int) -> Config:
        """A validated copy with ``model.vocab_size`` set (resolved from a tokenizer or a checkpoint)."""
        resolved = dataclasses.replace(self, model=dataclasses.replace(self.model, vocab_size=vocab_size))
        resolved.validate()
        return resolved

    def validate(self) -> None:
        """Every group checks itself, then the settings that involve several groups; raises ConfigError."""
        for f in dataclasses.fields(self):
            group = getattr(self, f.name)
            for name, value in dataclasses.asdict(group).items():
                if isinstance(value, float) and not math.isfinite(value):
                    raise ConfigError(f"{f.name}.{name} = {value}; must be a finite number")
            group.validate()
        m, e, t = self.model, self.moe, self.training
        if e.num_experts and e.first_k_dense >= m.num_layers:
            raise ConfigError(
                f"moe.first_k_dense = {e.first_k_dense} leaves no MoE layer among model.num_layers = "
                f"{m.num_layers}; set moe.num_experts = 0 for a dense model"
            )
        if self.data.train_data_path and not self.data.eval_data_path and t.eval_iters:
            raise ConfigError("data.train_data_path (--train-data-path) needs data.eval_data_path (--valid-data-path) "
                              "to validate on, or training.eval_iters = 0 (--eval-iters 0) for no validation")
        if self.parallel.grad_reduce_in_bf16 and not t.bf16:
            raise ConfigError("parallel.grad_reduce_in_bf16 (--grad-reduce-in-bf16): no effect without training.bf16 "
                              "(--bf16): fp32 training reduces its fp32 gradients")
        self._check_schedule()

    def lr_schedule_samples(self) -> tuple[float, int, int]:
        """(warmup, decay, WSD annealing) lengths of the learning-rate schedule in samples, as Megatron-LM's
        ``get_optimizer_param_scheduler`` derives them: iteration settings x global batch size, or the
        sample settings of a ``training.train_samples`` run; a warmup fraction is of the decay length."""
        o, t = self.optimizer, self.training
        if t.train_samples:
            decay = o.lr_decay_samples or t.train_samples
            warmup, wsd = o.lr_warmup_samples, o.lr_wsd_decay_samples
        else:
            decay = (o.lr_decay_iters or t.train_iters) * t.global_batch_size
            warmup, wsd = o.lr_warmup_iters * t.global_batch_size, o.lr_wsd_decay_iters * t.global_batch_size
        return (o.lr_warmup_fraction * decay if o.lr_warmup_fraction else warmup), decay, wsd

    def _check_schedule(self) -> None:
        """Megatron-LM's rules: iteration and sample settings are not mixed, one warmup length, warmup
        not longer than the decay, WSD's annealing within the decay."""
        o = self.optimizer
        unit, other = ("samples", "iters") if self.training.train_samples else ("iters", "samples")
        mixed = [f"optimizer.{name}" for name in (f"lr_warmup_{other}", f"lr_decay_{other}", f"lr_wsd_decay_{other}")
                 if getattr(o, name)]
        if mixed:
            mode = "sample-based (training.train_samples)" if unit == "samples" else "iteration-based"
            raise ConfigError(f"{', '.join(mixed)}: this run is {mode}; use the lr_*_{unit} settings")
        if o.lr_warmup_fraction and getattr(o, f"lr_warmup_{unit}"):
            raise ConfigError(f"give one of optimizer.lr_warmup_fraction and optimizer.lr_warmup_{unit}")
        warmup, decay, wsd = self.lr_schedule_samples()
        if warmup > decay:  # Megatron-LM asserts warmup < decay; a warmup over the whole decay is well defined
            raise ConfigError(f"the learning-rate warmup ({warmup:g} samples) is longer than the decay "
                              f"({decay} samples: optimizer.lr_decay_{unit}, else the whole run)")
        if o.lr_decay_style == "WSD" and not 0 < wsd <= decay:
            raise ConfigError(f"optimizer.lr_decay_style = 'WSD' needs optimizer.lr_wsd_decay_{unit} in (0, the "
                              f"decay length]: the annealing phase at the end of the decay")


# Flags that imply a value: Megatron-LM's --recompute-activations is selective recompute.
IMPLIED_FLAGS: dict[str, tuple[str, str]] = {
    "recompute-activations": ("parallel.recompute_granularity", "selective"),
    "account-for-embedding-in-pipeline-split": ("parallel.account_for_embedding_in_pipeline_split", "true"),
    "account-for-loss-in-pipeline-split": ("parallel.account_for_loss_in_pipeline_split", "true"),
    "untie-embeddings-and-output-weights": ("model.tie_embeddings", "false"),
    "disable-bias-linear": ("model.add_bias_linear", "false"),
    "use-rope-scaling": ("model.rope_scaling", "llama3"),
    "no-load-optim": ("checkpoint.load_optim", "false"),
    "no-load-rng": ("checkpoint.load_rng", "false"),
    "finetune": ("checkpoint.finetune", "true"),
    "eod-mask-loss": ("data.eod_mask_loss", "true"),
    "moe-router-pre-softmax": ("moe.renormalize", "false"),  # softmax over all experts, then top-K: unnormalised
    "init-model-with-meta-device": ("training.meta_init", "true"),
    "qk-layernorm": ("model.qk_layernorm", "true"),
    "multi-latent-attention": ("model.multi_latent_attention", "true"),
    "moe-shared-expert-gate": ("moe.shared_expert_gate", "true"),
    "moe-router-enable-expert-bias": ("moe.expert_bias", "true"),
}

# Flags that set a second setting besides their own: a capacity factor given means tokens are dropped
# (Megatron-LM is dropless exactly when --moe-expert-capacity-factor is absent).
ALSO_SETS: dict[str, tuple[str, str]] = {
    "moe-expert-capacity-factor": ("moe.dropless", "false"),
}

# Settings renamed since checkpoints were first written: old dotted name -> its value -> {new name: value}.
RENAMED_SETTINGS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "parallel.activation_checkpointing": lambda on: {"parallel.recompute_granularity": "full" if on else "none"},
    # the embedding and the output layer counted as a layer each, now Megatron-LM's two settings (without the old
    # fallback to an even split where the counts do not divide)
    "parallel.pipeline_first_last_fewer_layers": lambda on: {"parallel.account_for_embedding_in_pipeline_split": on,
                                                              "parallel.account_for_loss_in_pipeline_split": on},
}

# Megatron-LM flag name -> dotted setting.
MEGATRON_FLAGS: dict[str, str] = {
    "tensor-model-parallel-size": "parallel.tensor_model_parallel_size",
    "pipeline-model-parallel-size": "parallel.pipeline_model_parallel_size",
    "num-experts": "moe.num_experts",
    "moe-router-topk": "moe.topk",
    "moe-ffn-hidden-size": "moe.expert_ffn_hidden_size",
    "moe-shared-expert-intermediate-size": "moe.shared_expert_ffn_hidden_size",
    "moe-router-score-function": "moe.score_function",
    "moe-router-bias-update-rate": "moe.expert_bias_update_rate",
    "moe-router-topk-scaling-factor": "moe.topk_scaling_factor",
    "moe-router-num-groups": "moe.router_num_groups",
    "moe-router-group-topk": "moe.router_group_topk",
    "moe-aux-loss-coeff": "moe.aux_loss_coeff",
    "moe-z-loss-coeff": "moe.z_loss_coeff",
    "moe-expert-capacity-factor": "moe.capacity_factor",
    "micro-batch-size": "training.micro_batch_size",
    "global-batch-size": "training.global_batch_size",
    "train-iters": "training.train_iters",
    "eval-interval": "training.eval_interval",
    "eval-iters": "training.eval_iters",
    "seed": "training.seed",
    "bf16": "training.bf16",
    "seq-length": "data.seq_length",
    "data-path": "data.data_path",
    "eval-data-path": "data.eval_data_path",
    "split": "data.split",
    "tokenizer-model": "data.tokenizer_model",
    "lr": "optimizer.lr",
    "min-lr": "optimizer.min_lr",
    "decoupled-lr": "optimizer.decoupled_lr",
    "decoupled-min-lr": "optimizer.decoupled_min_lr",
    "weight-decay": "optimizer.weight_decay",
    "clip-grad": "optimizer.clip_grad",
    "adam-beta1": "optimizer.adam_beta1",
    "adam-beta2": "optimizer.adam_beta2",
    "adam-eps": "optimizer.adam_eps",
    "lr-warmup-iters": "optimizer.lr_warmup_iters",
    "lr-decay-iters": "optimizer.lr_decay_iters",
    "lr-decay-style": "optimizer.lr_decay_style",
    "hidden-size": "model.hidden_size",
    "num-layers": "model.num_layers",
    "num-attention-heads": "model.num_attention_heads",
    "num-query-groups": "model.num_query_groups",
    "kv-channels": "model.kv_channels",
    "rotary-percent": "model.rotary_percent",
    "mtp-num-layers": "model.mtp_num_layers",
    "mtp-loss-scaling-factor": "training.mtp_loss_scaling_factor",
    "q-lora-rank": "model.q_lora_rank",
    "kv-lora-rank": "model.kv_lora_rank",
    "qk-head-dim": "model.qk_head_dim",
    "qk-pos-emb-head-dim": "model.qk_pos_emb_head_dim",
    "v-head-dim": "model.v_head_dim",
    "ffn-hidden-size": "model.ffn_hidden_size",
    "rotary-base": "model.rope_theta",
    "norm-epsilon": "model.norm_eps",
    "init-method-std": "model.init_std",
    "vocab-size": "model.vocab_size",
    "make-vocab-size-divisible-by": "model.make_vocab_size_divisible_by",
    "save": "checkpoint.save",
    "load": "checkpoint.load",
    "save-interval": "checkpoint.save_interval",
    "async-save": "checkpoint.async_save",
    "exit-interval": "training.exit_interval",
    "virtual-pipeline-model-parallel-size": "parallel.virtual_pipeline_stages",
    "pipeline-model-parallel-layout": "parallel.pipeline_layout",
    "decoder-first-pipeline-num-layers": "parallel.pipeline_first_stage_layers",
    "decoder-last-pipeline-num-layers": "parallel.pipeline_last_stage_layers",
    "recompute-granularity": "parallel.recompute_granularity",
    "recompute-modules": "parallel.recompute_modules",
    "compile": "training.compile",  # torchtitan's name; not a Megatron-LM flag
    "use-torch-fsdp2": "parallel.data_parallel_shard",
    "grad-reduce-in-bf16": "parallel.grad_reduce_in_bf16",
    "log-interval": "logging.log_interval",
    "wandb-project": "logging.wandb_project",
    "tensorboard-dir": "logging.tensorboard_dir",
    "normalization": "model.normalization",
    "apply-layernorm-1p": "model.apply_layernorm_1p",
    "calculate-per-token-loss": "training.calculate_per_token_loss",
    "add-qkv-bias": "model.add_qkv_bias",
    "add-bias-linear": "model.add_bias_linear",
    "rope-scaling-factor": "model.rope_scaling_factor",
    "train-samples": "training.train_samples",
    "exit-duration-in-mins": "training.exit_duration_in_mins",
    "lr-warmup-fraction": "optimizer.lr_warmup_fraction",
    "lr-warmup-samples": "optimizer.lr_warmup_samples",
    "lr-decay-samples": "optimizer.lr_decay_samples",
    "lr-warmup-init": "optimizer.lr_warmup_init",
    "lr-wsd-decay-style": "optimizer.lr_wsd_decay_style",
    "lr-wsd-decay-iters": "optimizer.lr_wsd_decay_iters",
    "lr-wsd-decay-samples": "optimizer.lr_wsd_decay_samples",
    "train-data-path": "data.train_data_path",
    "valid-data-path": "data.eval_data_path",
    "data-cache-path": "data.cache_dir",
    "moe-input-jitter-eps": "moe.input_jitter_eps",
    "moe-layer-freq": "moe.layer_freq",
    "wandb-exp-name": "logging.run_name",
    "wandb-save-dir": "logging.wandb_save_dir",
    "wandb-entity": "logging.wandb_entity",
    "log-params-norm": "logging.log_params_norm",
    "log-num-zeros-in-grad": "logging.log_num_zeros_in_grad",
}

# Run-level switches of the dry run (megatron_moe.planning.dry_run), not settings: flag -> (extras key, type,
# default when not given).
DRY_RUN_FLAGS: dict[str, tuple[str, type, Any]] = {
    "dry-run": ("dry_run", bool, False),
    "world-size": ("world_size", int, 0),
    "dry-run-rank": ("dry_run_ranks", list, ()),
    "dry-run-output": ("dry_run_output", str, ""),
    "dry-run-device-memory": ("dry_run_device_memory", float, 80.0),  # GB
    "dry-run-mfu": ("dry_run_mfu", float, 0.4),
    "dry-run-peak-tflops": ("dry_run_peak_tflops", float, 989.0),  # H100 SXM dense bf16
}


def _group_fields(obj: Any) -> dict[str, tuple[Any, Any]]:
    hints = typing.get_type_hints(type(obj))
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(obj)}


def _convert(value: Any, annotation: Any, name: str) -> Any:
    """Convert a TOML value or a command-line string to ``annotation``; raise ConfigError if impossible."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        return _convert(value, args[0], name)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, str):
            value = value.split()
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [_convert(v, item_type, name) for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            return int(str(value), 0)
        except ValueError:
            raise ConfigError(f"{name}: expected an integer, got {value!r}") from None
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{name}: unsupported setting type {annotation!r}")


def set_value(cfg: Config, dotted: str, value: Any) -> None:
    """Set ``group.field`` on ``cfg`` from a TOML value or string, converting to the field's type."""
    parts = dotted.split(".")
    if len(parts) != 2:
        raise ConfigError(f"unknown setting {dotted!r}: expected 'group.field' (groups: {_group_names()})")
    group_name, key = parts
    if group_name not in _group_names():
        raise ConfigError(f"unknown setting {dotted!r}: no group {group_name!r} (groups: {_group_names()})")
    group = getattr(cfg, group_name)
    fields = _group_fields(group)
    if key not in fields:
        raise ConfigError(f"unknown setting {dotted!r}; {group_name} has: {', '.join(sorted(fields))}")
    setattr(group, key, _convert(value, fields[key][0], dotted))


def _group_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


def load_toml(path: str | Path, cfg: Config | None = None, given: set[str] | None = None) -> Config:
    """Apply a TOML file (tables named after the groups) on top of ``cfg`` (defaults if None)."""
    cfg = cfg or Config()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {e}") from None
    return apply_settings(cfg, data, str(path), given)


def apply_settings(cfg: Config, data: dict[str, Any], source: str, given: set[str] | None = None) -> Config:
    """Apply ``{group: {field: value}}`` (a TOML file, a checkpoint's config) to ``cfg`` in place.

    Raises ConfigError naming ``source`` and the setting for unknown groups/fields and wrong types.
    ``given`` collects the dotted names set.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of setting groups, got {type(data).__name__}")
    groups = _group_names()
    for group_name, table in data.items():
        if group_name not in groups:
            raise ConfigError(f"{source}: unknown group {group_name!r} (groups: {groups})")
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: {group_name!r} must be a table of settings like [{group_name}]")
        for key, value in table.items():
            dotted = f"{group_name}.{key}"
            settings = RENAMED_SETTINGS[dotted](value) if dotted in RENAMED_SETTINGS else {dotted: value}
            for dotted, value in settings.items():
                set_value(cfg, dotted, value)
                if given is not None:
                    given.add(dotted)
    return cfg


def parse_args(argv: list[str], cfg: Config | None = None) -> tuple[Config, dict[str, Any]]:
    """Build a Config from ``--config FILE`` plus overrides in ``argv``.

    Returns (config, extras) where extras holds run-level switches that are not settings
    (``eval_only``), ``notes``: one line per accepted Megatron-LM flag that has no effect here, and
    ``given``: the dotted names of the settings the TOML file or the command line set (for
    :func:`adopt_checkpoint_architecture`).
    The dry run's switches (:data:`DRY_RUN_FLAGS`) are extras too, present when given.
    Boolean settings may be given without a value (``--bf16``). List settings take all following
    values up to the next ``--flag``. Every flag error is collected and reported together.
    """
    cfg = cfg or Config()
    extras: dict[str, Any] = {"eval_only": False, "notes": []}
    given: set[str] = set()  # set on the command line
    from_file: set[str] = set()  # set by the --config file
    args = list(argv)
    if "--config" in args:
        i = args.index("--config")
        if i + 1 >= len(args):
            raise ConfigError("--config needs a path to a TOML file")
        cfg = load_toml(args[i + 1], cfg, from_file)
        del args[i : i + 2]
    errors: list[str] = []
    derived: dict[str, list[str]] = {}  # flags checked against the finished configuration (mc.DERIVED)
    layer_pattern: list[str] | None = None
    yarn_flags: dict[str, list[str]] = {}
    i = 0
    while i < len(args):
        flag = args[i]
        if not flag.startswith("--"):
            errors.append(f"unexpected argument {flag!r}: settings look like --group.field VALUE")
            i += 1
            continue
        name = flag[2:]
        if "=" in name:
            name, inline = name.split("=", 1)
            values = [inline]
            i += 1
        else:
            j = i + 1
            while j < len(args) and not args[j].startswith("--"):
                j += 1
            values = args[i + 1 : j]
            i = j
        if name in mc.DERIVED:
            derived[name] = values
            continue
        if name in mc.YARN_FLAGS:  # read together once --multi-latent-attention is known
            yarn_flags[name] = values
            continue
        if name == "moe-layer-freq":  # Megatron-LM's argparse: the last one given counts
            layer_pattern = None
            if values and "[" in values[0]:  # Megatron-LM's list form: applied once --num-layers is known
                layer_pattern = values
                continue
        try:
            _apply_flag(cfg, name, values, extras, given)
        except ConfigError as e:
            errors.append(str(e))
    if layer_pattern is not None:
        try:
            _apply_moe_layer_pattern(cfg, " ".join(layer_pattern), given)
        except ConfigError as e:
            errors.append(str(e))
    if yarn_flags:
        try:
            _apply_megatron_yarn(cfg, yarn_flags, given, extras["notes"])
        except ConfigError as e:
            errors.append(str(e))
    if cfg.model.multi_latent_attention and "--kv-channels" in args:
        # Megatron-LM's DeepSeek scripts pass --kv-channels, which its latent attention does not read either
        cfg.model.kv_channels = 0
        given.discard("model.kv_channels")
        extras["notes"].append("--kv-channels has no effect with --multi-latent-attention (as in Megatron-LM): the "
                               "heads are --qk-head-dim + --qk-pos-emb-head-dim (q, k) and --v-head-dim (v) wide")
    if "--pipeline-model-parallel-layout" in args and "parallel.virtual_pipeline_stages" not in given:
        try:  # megatron-core takes the virtual stages from the layout
            _virtual_stages_from_layout(cfg)
        except ConfigError as e:
            errors.append(str(e))
    if "--moe-router-pre-softmax" in args and cfg.moe.score_function == "sigmoid":
        # megatron-core's sigmoid routing ignores pre-softmax and always normalises the K picked scores (K > 1)
        cfg.moe.renormalize = True
        extras["notes"].append("--moe-router-pre-softmax has no effect with --moe-router-score-function sigmoid "
                               "(as in Megatron-LM): the picked sigmoid scores are normalised")
    if not errors:
        try:
            _derive_train_iters(cfg, given, from_file)
        except ConfigError as e:
            errors.append(str(e))
    dry_run_only = [f"--{flag}" for flag, (key, _, _) in DRY_RUN_FLAGS.items() if key in extras and key != "dry_run"]
    if dry_run_only and not extras.get("dry_run"):
        errors.append(f"{', '.join(dry_run_only)} plan a job: they need --dry-run")
    if errors:
        raise ConfigError(errors[0] if len(errors) == 1 else f"{len(errors)} problems:\n  " + "\n  ".join(errors))
    cfg.validate()
    # A file's MoE settings are moot once the command line makes the model dense (--num-experts 0).
    # With --load the checkpoint may supply moe.num_experts: checked once it is adopted (Trainer).
    if not cfg.checkpoint.load:
        _check_no_ignored_settings(cfg, given if "moe.num_experts" in given else given | from_file)
    _check_derived_flags(cfg, derived)
    extras["given"] = given
    return cfg, extras


_LAYOUT_SYMBOLS = {"E": "embedding", "t": "decoder layer", "m": "multi-token prediction depth", "L": "loss"}


def parse_pipeline_layout(layout: str) -> list[str]:
    """Megatron-LM's --pipeline-model-parallel-layout as one string of symbols per stage: commas are cosmetic,
    ``(...)*n`` and ``x*n`` repeat (as megatron-core's ``PipelineParallelLayerLayout.parse_str_to_list``), ``|``
    separates stages. ``"Et*3|(tt|)*2m|L"`` -> ``["Ettt", "tt", "tt", "m", "L"]``. Raises ConfigError for another
    symbol."""
    text = layout.replace(",", "")
    text = re.sub(r"\(([^)]+)\)\*(\d+)", lambda m: m.group(1) * int(m.group(2)), text)
    text = re.sub(r"(.)\*(\d+)", lambda m: m.group(1) * int(m.group(2)), text)
    stages = text.split("|")
    unknown = sorted({c for stage in stages for c in stage} - set(_LAYOUT_SYMBOLS))
    if unknown:
        raise ConfigError(f"parallel.pipeline_layout = {layout!r}: unknown symbols {unknown}; expected "
                          + ", ".join(f"{k} ({v})" for k, v in _LAYOUT_SYMBOLS.items()))
    return stages


def _virtual_stages_from_layout(cfg: Config) -> None:
    """Megatron-LM's --pipeline-model-parallel-layout of S stages sets the virtual stages to S / pp (more than one:
    the interleaved 1F1B schedule), as megatron-core does."""
    p = cfg.parallel
    stages, pp = len(parse_pipeline_layout(p.pipeline_layout)), p.pipeline_model_parallel_size
    if stages % pp:
        raise ConfigError(f"--pipeline-model-parallel-layout has {stages} stages, not a multiple of "
                          f"--pipeline-model-parallel-size {pp}")
    p.virtual_pipeline_stages = stages // pp
    if p.virtual_pipeline_stages > 1:
        p.pipeline_schedule = "interleaved_1f1b"


def _apply_megatron_yarn(cfg: Config, flags: dict[str, list[str]], given: set[str], notes: list[str]) -> None:
    """Megatron-LM's YaRN flags (:data:`megatron_moe.megatron_compat.YARN_FLAGS`) as megatron-core reads them: YaRN
    with ``--rotary-scaling-factor`` s, ``--mscale``, ``--mscale-all-dim`` for latent attention, whose rope type
    is YaRN unless ``--rope-type rope``; at s = 1 (Megatron-LM's DeepSeek scripts) the plain rotary embedding, so
    the flags are a note. Other attention has no YaRN there (its --position-embedding-type yarn is refused)."""
    def value(name: str, default: float | str, kind: type) -> float | str:
        if name not in flags:
            return default
        if len(flags[name]) != 1:
            raise ConfigError(f"--{name} takes one value, got {flags[name] or 'none'}")
        return _convert(flags[name][0], kind, f"--{name}")

    rope_type = value("rope-type", "yarn", str)
    if rope_type not in ("rope", "yarn"):
        raise ConfigError(f"--rope-type {rope_type}: choose one of ['rope', 'yarn']")
    factor = value("rotary-scaling-factor", 1.0, float)
    mscale, mscale_all_dim = value("mscale", 1.0, float), value("mscale-all-dim", 0.0, float)
    if factor == 1.0:
        if set(flags) - {"rope-type"}:
            notes.append(f"{', '.join('--' + f for f in sorted(set(flags) - {'rope-type'}))}: YaRN at "
                         "--rotary-scaling-factor 1 is the plain rotary embedding (as in Megatron-LM): no effect")
        return
    m = cfg.model
    if not m.multi_latent_attention:
        raise ConfigError(f"--rotary-scaling-factor {factor:g}: Megatron-LM applies it to latent attention "
                          "(--multi-latent-attention) or with --position-embedding-type yarn, which is not available "
                          "here; for YaRN on this model set --model.rope_scaling yarn --model.rope_scaling_factor")
    if rope_type == "rope":
        raise ConfigError(f"--rope-type rope with --rotary-scaling-factor {factor:g}: megatron-core then scales the "
                          "softmax as YaRN does without YaRN's frequencies, which is not implemented")
    m.rope_scaling, m.rope_scaling_factor, m.rope_yarn_mscale, m.rope_yarn_mscale_all_dim = (
        "yarn", factor, mscale, mscale_all_dim)
    given.update({"model.rope_scaling", "model.rope_scaling_factor", "model.rope_yarn_mscale",
                  "model.rope_yarn_mscale_all_dim"})


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def moe_layer_pattern(expression: str) -> list[int]:
    """Megatron-LM's list form of ``--moe-layer-freq``: a Python expression of 0/1 lists (1 = an MoE layer),
    ``*`` by a count and ``+`` (``"[0]*3+[1]*58"``, ``"([0,1]*24)"``, ``"[1,0,1,0]"``), evaluated here without
    running code: only list literals of 0 and 1, integers, ``*`` and ``+``, at most 1000 characters and 100000
    entries at every step. Raises ConfigError otherwise."""
    flag = f"--moe-layer-freq {_shorten(expression)}"

    def bad(why: str) -> ConfigError:
        return ConfigError(f"{flag}: {why}; expected an integer or a list expression of 0 (dense) and 1 (MoE) "
                           "such as [0]*3+[1]*58")

    if len(expression) > 1000:
        raise bad(f"{len(expression)} characters; at most 1000")

    def value(node: ast.AST) -> list[int] | int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.List | ast.Tuple):
            items = [value(e) for e in node.elts]
            if any(v not in (0, 1) or isinstance(v, list) for v in items):
                raise bad("list entries must be 0 or 1")
            return items
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Mult):
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Add) and isinstance(left, list) and isinstance(right, list):
                if len(left) + len(right) > 100_000:
                    raise bad("more than 100000 entries")
                return left + right
            if isinstance(node.op, ast.Mult) and isinstance(left, list) != isinstance(right, list):
                items, count = (left, right) if isinstance(left, list) else (right, left)
                if not 0 <= count <= 100_000 or len(items) * count > 100_000:
                    raise bad(f"repeat count {count} out of range")
                return items * count
        raise bad(f"{ast.unparse(node)!r} is not allowed")

    try:
        tree = ast.parse(_unquote(expression), mode="eval")
        pattern = value(tree.body)
    except SyntaxError:
        raise bad("not an expression") from None
    except RecursionError:
        raise bad("nested too deeply") from None
    if not isinstance(pattern, list):
        raise bad("not a list")
    return pattern


def moe_layer_spacing(moe_layers: list[int], num_layers: int) -> tuple[int, int] | None:
    """``(moe.first_k_dense, moe.layer_freq)`` placing MoE feed-forwards exactly on the (0-based, ascending,
    non-empty) ``moe_layers`` of ``num_layers`` layers, or None when no k dense layers followed by an MoE layer
    every f layers do."""
    first = moe_layers[0]
    freq = moe_layers[1] - first if len(moe_layers) > 1 else num_layers - first
    return (first, freq) if moe_layers == list(range(first, num_layers, freq)) else None


def _apply_moe_layer_pattern(cfg: Config, expression: str, given: set[str]) -> None:
    """Set ``moe.first_k_dense`` and ``moe.layer_freq`` from Megatron-LM's list form of ``--moe-layer-freq``
    (:func:`moe_layer_pattern`): one entry per layer, k dense layers then an MoE layer every f layers (e.g.
    DeepSeek-V3's ``[0]*3+[1]*58``: k = 3, f = 1; ``([0,1]*24)``: k = 1, f = 2). Other patterns are refused."""
    pattern, flag = moe_layer_pattern(expression), f"--moe-layer-freq {_shorten(expression)}"
    if len(pattern) != cfg.model.num_layers:
        raise ConfigError(f"{flag}: {len(pattern)} entries for --num-layers "
                          f"{cfg.model.num_layers}; give one per layer")
    moe_layers = [i for i, v in enumerate(pattern) if v]
    if not moe_layers:
        raise ConfigError(f"{flag}: no MoE layer; drop --num-experts for a dense model")
    spacing = moe_layer_spacing(moe_layers, len(pattern))
    if spacing is None:
        raise ConfigError(f"{flag}: only 'k dense layers, then an MoE layer every f layers' "
                          f"(moe.first_k_dense, moe.layer_freq) is available here, and MoE layers {moe_layers} are "
                          "not that")
    first, freq = spacing
    set_value(cfg, "moe.first_k_dense", first)
    set_value(cfg, "moe.layer_freq", freq)
    given.update({"moe.first_k_dense", "moe.layer_freq"})


def _check_derived_flags(cfg: Config, derived: dict[str, list[str]]) -> None:
    """Megatron-LM flags that restate a size this configuration implies (``--expert-tensor-parallel-size``)
    must agree."""
    for name, values in derived.items():
        implied, what = mc.DERIVED[name]
        if len(values) != 1 or not mc.same_value(values[0], str(implied(cfg))):
            raise ConfigError(f"--{name} {' '.join(values) or '(no value)'}: {what} = {implied(cfg)} here")


def _apply_flag(cfg: Config, name: str, values: list[str], extras: dict[str, Any], given: set[str]) -> None:
    """Apply one command-line flag (module docstring, :mod:`megatron_moe.megatron_compat`)."""
    def single_value() -> str:
        if len(values) != 1:
            raise ConfigError(f"--{name} takes one value, got {values or 'none'}")
        return values[0]

    if name in ("eval-only", "eval_only"):
        extras["eval_only"] = True if not values else _convert(values[0], bool, name)
        return
    if name in DRY_RUN_FLAGS:
        key, kind, _ = DRY_RUN_FLAGS[name]
        if kind is list:
            extras[key] = tuple(_convert(v, int, f"--{name}") for v in values)
        else:
            extras[key] = True if kind is bool and not values else _convert(single_value(), kind, f"--{name}")
        return
    if name in IMPLIED_FLAGS:
        if values:
            raise ConfigError(f"--{name} takes no value")
        set_value(cfg, *IMPLIED_FLAGS[name])
        given.add(IMPLIED_FLAGS[name][0])
        return
    if name in mc.STATES:
        required, what = mc.STATES[name]
        if required is None and values:
            raise ConfigError(f"--{name} takes no value")
        if required is not None and (len(values) != 1 or not mc.same_value(values[0], required)):
            raise ConfigError(f"--{name} {' '.join(values) or '(no value)'}: not available here ({what}); "
                              f"only {required} is")
        return
    if name in mc.NO_EFFECT:
        extras["notes"].append(f"--{name} has no effect here: {mc.NO_EFFECT[name]}")
        return
    if name in mc.REFUSED:
        harmless, why = mc.REFUSED[name]
        if harmless is not None and values and mc.same_value(single_value(), harmless):
            return
        raise ConfigError(f"--{name} is not supported: {why}")
    if name in mc.VALUE_MAPS:
        dotted, mapping = mc.VALUE_MAPS[name]
        value = single_value()
        if value not in mapping:
            why = mc.VALUE_REFUSALS.get((name, value), "not available here")
            raise ConfigError(f"--{name} {value}: {why}; choose one of {sorted(mapping)}")
        if mapping[value] is not None:  # None: a value that asks for nothing; the setting stays as it is
            set_value(cfg, dotted, mapping[value])
            given.add(dotted)
        return
    dotted = MEGATRON_FLAGS.get(name, name if "." in name else None)
    if dotted is None:
        raise ConfigError(f"unknown flag --{name}: use --group.field or a Megatron-LM flag name")
    group_name, key = dotted.split(".", 1)
    group = getattr(cfg, group_name, None)
    annotation = _group_fields(group)[key][0] if group is not None and key in _group_fields(group) else None
    if annotation is bool and not values:
        values = ["true"]
    if not values:
        raise ConfigError(f"--{name} needs a value")
    is_list = typing.get_origin(annotation) is list
    if len(values) > 1 and not is_list:
        raise ConfigError(f"--{name} takes one value, got {values}")
    set_value(cfg, dotted, values if is_list else values[0])
    given.add(dotted)
    if name in ALSO_SETS:
        set_value(cfg, *ALSO_SETS[name])
        given.add(ALSO_SETS[name][0])


def _derive_train_iters(cfg: Config, given: set[str], from_file: set[str]) -> None:
    """A sample-based run (``training.train_samples``) trains train_samples // global_batch_size iterations,
    as Megatron-LM's ``update_train_iters``; giving both lengths is an error there and here (a file's
    train_iters gives way to --train-samples on the command line)."""
    t = cfg.training
    if not t.train_samples:
        return
    both = {"training.train_iters", "training.train_samples"}
    if "training.train_iters" in given or both <= from_file:
        raise ConfigError("give one of training.train_iters (--train-iters) and training.train_samples "
                          "(--train-samples)")
    if t.global_batch_size > 0:
        t.train_iters = t.train_samples // t.global_batch_size
        if not t.train_iters:
            raise ConfigError(f"training.train_samples = {t.train_samples} is less than one global batch "
                              f"({t.global_batch_size} samples)")


ROPE_LLAMA3_SETTINGS = ("rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                        "rope_original_max_position")
ROPE_YARN_SETTINGS = ("rope_scaling_factor", "rope_yarn_original_max_position", "rope_yarn_beta_fast",
                      "rope_yarn_beta_slow", "rope_yarn_mscale", "rope_yarn_mscale_all_dim")
LATENT_ATTENTION_SETTINGS = ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim",
                             "latent_norm_eps")


def _check_no_ignored_settings(cfg: Config, given: set[str]) -> None:
    """Settings a user gave that the chosen model would silently ignore are an error, not a no-op."""
    if cfg.moe.num_experts == 0:
        ignored = sorted(k for k in given if k.startswith("moe.") and k != "moe.num_experts")
        if ignored:
            raise ConfigError(f"{', '.join(ignored)}: no effect on a dense model (moe.num_experts = 0); remove "
                              f"{'it' if len(ignored) == 1 else 'them'} or set --num-experts")
    moved = cfg.moe.expert_bias_update_rate != MoEConfig().expert_bias_update_rate  # a full dump holds the default
    if "moe.expert_bias_update_rate" in given and not cfg.moe.expert_bias and moved:
        raise ConfigError("moe.expert_bias_update_rate (--moe-router-bias-update-rate): no effect without "
                          "moe.expert_bias (--moe-router-enable-expert-bias)")
    if ("training.mtp_loss_scaling_factor" in given and not cfg.model.mtp_num_layers
            and cfg.training.mtp_loss_scaling_factor != TrainingConfig().mtp_loss_scaling_factor):
        raise ConfigError("training.mtp_loss_scaling_factor (--mtp-loss-scaling-factor): no effect without "
                          "model.mtp_num_layers (--mtp-num-layers)")
    if not cfg.model.multi_latent_attention:
        defaults = ModelConfig()
        ignored = sorted(k for k in given if k[6:] in LATENT_ATTENTION_SETTINGS
                         and getattr(cfg.model, k[6:]) != getattr(defaults, k[6:]))
        if ignored:
            raise ConfigError(f"{', '.join(ignored)}: no effect without multi-latent attention; set "
                              "--multi-latent-attention (model.multi_latent_attention)")
    # the parameters of a rope scaling other than the chosen one, given apart from their defaults (a full dump of a
    # config holds them all at their defaults and passes)
    defaults, kind = ModelConfig(), cfg.model.rope_scaling
    used = {"none": (), "llama3": ROPE_LLAMA3_SETTINGS, "yarn": ROPE_YARN_SETTINGS}[kind]
    ignored = sorted(k for k in given if k[6:] in ROPE_LLAMA3_SETTINGS + ROPE_YARN_SETTINGS and k[6:] not in used
                     and getattr(cfg.model, k[6:]) != getattr(defaults, k[6:]))
    if ignored:
        raise ConfigError(f"{', '.join(ignored)}: no effect with model.rope_scaling = {kind!r}; set "
                          "--model.rope_scaling llama3 (--use-rope-scaling) or yarn (--rotary-scaling-factor)")


# MoE settings that, with every model.* setting, define a checkpoint's model: its parameters and routing.
MOE_ARCHITECTURE_SETTINGS = ("num_experts", "topk", "expert_ffn_hidden_size", "layer_freq", "first_k_dense",
                             "router", "renormalize", "logit_norm", "logit_norm_scale", "jitter_eps",
                             "input_jitter_eps", "score_function", "expert_bias", "topk_scaling_factor",
                             "shared_expert_ffn_hidden_size", "shared_expert_gate", "router_num_groups",
                             "router_group_topk")


def adopt_checkpoint_architecture(cfg: Config, saved_config: dict[str, Any], given: set[str], source: str) -> Config:
    """A validated copy of ``cfg`` whose architecture settings not in ``given`` are the checkpoint's.

    Architecture: every ``model.*`` setting and the ``moe.*`` of :data:`MOE_ARCHITECTURE_SETTINGS`, as
    recorded in ``saved_config`` (a checkpoint's meta.json ``config``; settings it lacks keep
    ``cfg``'s). Settings in ``given`` (set by the TOML file or the command line: :func:`parse_args`)
    are kept as given; whether they contradict the checkpoint is checked when it is loaded
    (:func:`megatron_moe.training.state.check_compatible`). Training settings are never taken.
    Then the given settings the resolved model would ignore are refused (what :func:`parse_args`
    leaves to this function when ``checkpoint.load`` is set; ``saved_config = {}``, no checkpoint
    found, only checks). Raises ConfigError naming ``source`` for a saved value of the wrong type or
    an unknown setting.
    """
    wanted = {"model": None, "moe": MOE_ARCHITECTURE_SETTINGS}
    adopted: dict[str, dict[str, Any]] = {}
    for group, keys in wanted.items():
        table = saved_config.get(group, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: {group!r} must be a table of settings, got {type(table).__name__}")
        for key, value in table.items():
            if (keys is None or key in keys) and f"{group}.{key}" not in given:
                adopted.setdefault(group, {})[key] = value
    resolved = copy.deepcopy(cfg)
    try:
        apply_settings(resolved, adopted, source)
    except ConfigError as e:
        raise ConfigError(str(e) if str(e).startswith(source) else f"{source}: {e}") from None
    resolved.validate()
    _check_no_ignored_settings(resolved, given)
    return resolved


def default_ffn_hidden_size(hidden_size: int) -> int:
    """SwiGLU width 8/3 * hidden rounded up to a multiple of 64 (LLaMA convention)."""
    return int(math.ceil(8 * hidden_size / 3 / 64) * 64)
