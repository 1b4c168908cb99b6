"""AdamW and Megatron-LM's learning-rate schedule (linear warmup, then constant / linear / cosine /
inverse-square-root / WSD decay), step for step as its ``OptimizerParamScheduler``."""

from __future__ import annotations

import math

import torch
from torch import nn

from megatron_moe.config import Config, OptimizerConfig
from megatron_moe.parallel.data import split_param_groups_by_mesh


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm scales are not decayed, as in Megatron-LM).

    Uses torch's fused kernel (one pass over each parameter, on CUDA and on CPU); param groups are
    split by device mesh (:func:`~megatron_moe.parallel.data.split_param_groups_by_mesh`). Groups of
    the input and output layers' parameters carry ``decoupled = True`` (their own learning-rate
    bounds with ``optimizer.decoupled_lr``: :func:`set_learning_rate`).
    """
    input_output = _input_output_parameters(model)
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or name.endswith("norm.weight")
        groups.setdefault((no_decay, id(p) in input_output), []).append(p)
    param_groups = [{"params": params, "weight_decay": 0.0 if no_decay else cfg.weight_decay, "decoupled": decoupled}
                    for (no_decay, decoupled), params in sorted(groups.items())]
    optimizer = torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_eps, fused=True)
    return split_param_groups_by_mesh(optimizer)


def _input_output_parameters(model: nn.Module) -> set[int]:
    """ids of the embedding's and the output head's parameters (Megatron-LM's "input and output layer")."""
    from megatron_moe.model.transformer import MoETransformer

    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, MoETransformer):
            for layer in (module.tok_embeddings, module.output):
                if layer is not None:
                    ids.update(id(p) for p in layer.parameters())
    return ids


def learning_rate(step: int, cfg: Config, decoupled: bool = False) -> float:
    """Learning rate of the optimizer step after ``step`` completed steps: Megatron-LM's
    ``OptimizerParamScheduler.get_lr`` at ``step x global_batch_size`` consumed samples. ``decoupled``:
    the input and output layers' rate, between the bounds of ``OptimizerConfig.lr_bounds`` (``lr`` and
    ``min_lr`` below stand for those bounds).

    Lengths come from :meth:`~megatron_moe.config.Config.lr_schedule_samples`. Warmup goes linearly
    from ``lr_warmup_init`` (step 0) to ``lr`` (reached at the end of the warmup, inclusive); then the
    decay style runs from ``lr`` to ``min_lr`` over the rest of the decay length, and ``min_lr`` holds
    after it. WSD keeps ``lr`` until its annealing phase, the last ``lr_wsd_decay_*`` of the decay.
    """
    o = cfg.optimizer
    top, bottom = o.lr_bounds(decoupled)
    warmup, decay, wsd = cfg.lr_schedule_samples()
    samples = step * cfg.training.global_batch_size
    if warmup > 0 and samples <= warmup:
        return o.lr_warmup_init + (top - o.lr_warmup_init) * samples / warmup
    if o.lr_decay_style == "constant":
        return top
    if samples > decay:
        return bottom
    if o.lr_decay_style == "inverse-square-root":
        return max(bottom, top * math.sqrt(max(warmup, 1)) / math.sqrt(max(samples, 1)))
    progress = (samples - warmup) / (decay - warmup)
    if o.lr_decay_style == "linear":
        factor = 1.0 - progress
    elif o.lr_decay_style == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # WSD: stable at lr, then anneal over the last `wsd` samples of the decay
        anneal = (samples - (decay - wsd)) / wsd
        factor = 1.0 if anneal <= 0 else _wsd_anneal(anneal, o.lr_wsd_decay_style)
    return bottom + (top - bottom) * factor


def _wsd_anneal(progress: float, style: str) -> float:
    """WSD's annealing factor, 1 -> 0 as ``progress`` goes 0 -> 1 (one of LR_WSD_DECAY_STYLES)."""
    if style == "linear":
        return 1.0 - progress
    if style == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if style == "exponential":
        return 2.0 * 0.5**progress - 1.0
    return 1.0 - math.sqrt(progress)  # minus_sqrt


def set_learning_rate(optimizer: torch.optim.Optimizer, step: int, cfg: Config) -> float:
    """Set every param group's rate for the optimizer step after ``step`` completed steps (the input
    and output layers' groups on their decoupled bounds); returns the main rate (the one logged)."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(step, cfg, group.get("decoupled", False))
    return learning_rate(step, cfg)
