"""AdamW and the learning-rate schedule (linear warmup, then cosine / linear / constant decay)."""

from __future__ import annotations

import math

import torch
from torch import nn

from megatron_moe.config import OptimizerConfig
from megatron_moe.parallel.data import split_param_groups_by_mesh


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm scales are not decayed, as in Megatron-LM).

    Uses torch's fused kernel (one pass over each parameter, on CUDA and on CPU); param groups are
    split by device mesh (:func:`~megatron_moe.parallel.data.split_param_groups_by_mesh`).
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith("norm.weight") else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                  fused=True)
    return split_param_groups_by_mesh(optimizer)


def learning_rate(step: int, cfg: OptimizerConfig, train_iters: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): warmup to ``lr``, then decay to ``min_lr``."""
    if cfg.lr_warmup_iters and step < cfg.lr_warmup_iters:
        return cfg.lr * (step + 1) / cfg.lr_warmup_iters
    decay_iters = (cfg.lr_decay_iters or train_iters) - cfg.lr_warmup_iters
    if cfg.lr_decay_style == "constant" or decay_iters <= 0:
        return cfg.lr
    progress = min(1.0, (step - cfg.lr_warmup_iters) / decay_iters)
    if cfg.lr_decay_style == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * factor


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
