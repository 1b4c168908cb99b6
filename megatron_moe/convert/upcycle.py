"""Sparse upcycling: a dense model's weights -> an MoE model's weights (docs/routing.md §6).

Every feed-forward layer becomes an MoE layer with ``E`` experts and a freshly initialised router;
attention, norms, embeddings and the output layer are copied unchanged.

Copies (``granularity`` G = 1): every expert is the dense SwiGLU FFN. With top-K softmax routing and
renormalised weights the K weights of a token sum to 1, so the MoE output equals the dense output
(up to rounding) whatever the router says.

Granular (G > 1, megatron-core ``upcycling_utils``, arXiv 2410.07524): the FFN width F is cut into G
slices of F/G; expert e takes slice ``e mod G``. The router has E/G distinct rows, each repeated for
G consecutive experts (megatron-core's layout), so a group of G experts that together hold the
whole FFN always has equal logits. A SwiGLU FFN is a sum over its hidden units, so the G slices sum
to the dense output. With K a multiple of G (required), top-K picks K/G whole groups; the
renormalised weights sum to 1 and are equal within a group, so the combined output is
(1/G) * dense; scaling each expert's output projection ``w2`` by G restores the dense output
exactly. megatron-core instead multiplies fc1 and fc2 by scale^(1/3) each, which is exact only for
positively homogeneous activations; scaling ``w2`` alone (linear) is exact for SwiGLU as well.

Optional expert noise (``expert_noise`` = s): each expert's w1, w3, w2 get independent additive
N(0, (s * rms(w))^2) noise, rms taken over that dense weight, so s is relative to the weight's scale.
It breaks the exact equality by design.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from megatron_moe.config import Config, ConfigError
from megatron_moe.convert.source import ConversionError, ModelSource, expected_shapes, require_dense
from megatron_moe.model.transformer import main_logits


@dataclass
class UpcycleOptions:
    """Settings of one upcycling.

    Attributes:
        num_experts: E per MoE layer.
        topk: K experts per token.
        granularity: G slices of the dense FFN (1 = whole copies); must divide E, K and the FFN width.
        expert_noise: relative std of additive noise on expert weights (0 = exact copies).
        router_init_std: std of the router gate's normal init; None = the model's ``init_std``.
        seed: seed of the router initialisation and the expert noise.
    """

    num_experts: int
    topk: int = 2
    granularity: int = 1
    expert_noise: float = 0.0
    router_init_std: float | None = None
    seed: int = 1234

    def validate(self, ffn_hidden_size: int) -> None:
        """Raise ConversionError naming the option when the combination cannot be upcycled."""
        e, k, g = self.num_experts, self.topk, self.granularity
        if not (math.isfinite(self.expert_noise) and self.expert_noise >= 0):
            raise ConversionError(f"--expert-noise = {self.expert_noise}; must be a finite number >= 0")
        if self.router_init_std is not None and not (math.isfinite(self.router_init_std) and self.router_init_std > 0):
            raise ConversionError(f"--router-init-std = {self.router_init_std}; must be a finite number > 0")
        if e < 1:
            raise ConversionError(f"--num-experts = {e}; must be at least 1")
        if not 1 <= k <= e:
            raise ConversionError(f"--moe-router-topk = {k} must be between 1 and --num-experts = {e}")
        if g < 1:
            raise ConversionError(f"--granularity = {g}; must be at least 1")
        if e % g:
            raise ConversionError(f"--granularity = {g} does not divide --num-experts = {e}")
        if k % g:
            raise ConversionError(f"--granularity = {g} does not divide --moe-router-topk = {k}: top-K must pick "
                                  "whole groups of slices to preserve the dense function")
        if ffn_hidden_size % g:
            raise ConversionError(f"--granularity = {g} does not divide the dense FFN width {ffn_hidden_size}")
        if self.expert_noise < 0:
            raise ConversionError(f"--expert-noise = {self.expert_noise}; must not be negative")
        if self.router_init_std is not None and self.router_init_std < 0:
            raise ConversionError(f"--router-init-std = {self.router_init_std}; must not be negative")


def moe_config(dense: Config, opts: UpcycleOptions) -> Config:
    """The MoE Config of the upcycled model: the dense one with every FFN an MoE layer.

    Routing is set to what preserves the dense function: top-K softmax, renormalised, no logit
    normalisation. Other ``moe`` settings of ``dense`` (balance loss, coefficients...) are kept.
    """
    cfg = copy.deepcopy(dense)
    ffn = dense.model.dense_ffn_size
    opts.validate(ffn)
    e = cfg.moe
    e.num_experts, e.topk = opts.num_experts, opts.topk
    e.expert_ffn_hidden_size = ffn // opts.granularity
    e.layer_freq, e.first_k_dense = 1, 0
    e.router, e.renormalize, e.logit_norm = "topk", True, False
    cfg.model.ffn_hidden_size = ffn
    try:
        cfg.validate()
    except ConfigError as err:
        raise ConversionError(f"upcycled configuration is invalid: {err}") from None
    return cfg


def upcycle_ffn(w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, opts: UpcycleOptions,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expert weights from a dense SwiGLU FFN.

    Args:
        w1, w3: dense gate/up weights [F, H] (nn.Linear layout); w2: down weight [H, F].
        opts: E, G and noise.
        generator: source of the noise.

    Returns:
        (w1, w3) [E, H, F/G] and w2 [E, F/G, H]: expert e holds slice ``e mod G`` (w2 scaled by G).
    """
    e, g = opts.num_experts, opts.granularity
    f = w1.shape[0]
    if w3.shape != w1.shape or w2.shape != (w1.shape[1], f):
        raise ConversionError(f"dense FFN shapes do not match: w1 {tuple(w1.shape)}, w3 {tuple(w3.shape)}, "
                              f"w2 {tuple(w2.shape)}")
    sl = f // g
    w1t, w3t, w2t = w1.t(), w3.t(), w2.t() * g  # [H, F], [H, F], [F, H]
    slices = [e_ % g for e_ in range(e)]
    out1 = torch.stack([w1t[:, s * sl:(s + 1) * sl] for s in slices]).contiguous()
    out3 = torch.stack([w3t[:, s * sl:(s + 1) * sl] for s in slices]).contiguous()
    out2 = torch.stack([w2t[s * sl:(s + 1) * sl] for s in slices]).contiguous()
    if opts.expert_noise > 0:
        for dense, out in ((w1, out1), (w3, out3), (w2 * g, out2)):
            rms = dense.pow(2).mean().sqrt()
            out.add_(torch.randn(out.shape, generator=generator) * (opts.expert_noise * rms))
    return out1, out3, out2


def init_router(num_experts: int, hidden: int, granularity: int, std: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Gate weight [E, H] ~ N(0, std^2): E/G distinct rows, each repeated for G consecutive experts."""
    rows = torch.randn(num_experts // granularity, hidden, generator=generator) * std
    return rows.repeat_interleave(granularity, dim=0).contiguous()


def upcycle(source: ModelSource, opts: UpcycleOptions) -> tuple[Config, dict[str, torch.Tensor]]:
    """Upcycle the dense ``source`` into (MoE config, MoE state dict with the names of ``MoETransformer``).

    Tensors are read from the source one at a time. Raises ConversionError on inconsistent input, or
    when the dense FFN has biases (``model.add_bias_linear``): the experts have none.
    """
    require_dense(source)
    source.check()
    ffn_biases = sorted(n for n in source.loaders if ".feed_forward." in n and n.endswith(".bias"))
    if ffn_biases:
        raise ConversionError(f"{source.origin}: the dense FFN has biases (model.add_bias_linear = true; Megatron-LM's "
                              f"add_bias_linear, i.e. trained without --disable-bias-linear; e.g. {ffn_biases[0]}) but "
                              "the experts have none, so upcycling would drop them and change the function; import "
                              "it without --num-experts to keep the dense model")
    cfg = moe_config(source.cfg, opts)
    generator = torch.Generator().manual_seed(opts.seed)
    std = cfg.model.init_std if opts.router_init_std is None else opts.router_init_std
    state: dict[str, torch.Tensor] = {}
    for name in source.loaders:
        if ".feed_forward." not in name:
            state[name] = source.get(name)
    for i in range(cfg.model.num_layers + cfg.model.mtp_num_layers):  # multi-token prediction's blocks too
        p = f"layers.{i}.feed_forward."
        w1, w3, w2 = (source.get(p + f"{w}.weight") for w in ("w1", "w3", "w2"))
        state[p + "router.gate.weight"] = init_router(opts.num_experts, cfg.model.hidden_size, opts.granularity,
                                                      std, generator)
        state[p + "experts.w1"], state[p + "experts.w3"], state[p + "experts.w2"] = upcycle_ffn(
            w1, w3, w2, opts, generator)
    want = expected_shapes(cfg)
    if set(want) != set(state):
        raise ConversionError(f"upcycled weights do not match the MoE model: missing "
                              f"{sorted(set(want) - set(state))[:4]}, extra {sorted(set(state) - set(want))[:4]}")
    for name, shape in want.items():
        if tuple(state[name].shape) != shape:
            raise ConversionError(f"upcycled {name} has shape {tuple(state[name].shape)}, the model expects {shape}")
    return cfg, state


@torch.no_grad()
def max_logit_difference(model_a: torch.nn.Module, model_b: torch.nn.Module, vocab_size: int,
                         batch: int = 2, seq_len: int = 32, seed: int = 0) -> float:
    """Largest |logit difference| of two models on the same random tokens [batch, seq_len]."""
    tokens = torch.randint(0, vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    return (main_logits(model_a(tokens)).float() - main_logits(model_b(tokens)).float()).abs().max().item()
