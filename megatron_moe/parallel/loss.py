"""The LM loss used by every layout: masked next-token cross entropy, vocabulary-parallel under TP.

Labels at masked positions are replaced by ``IGNORE_INDEX`` (:func:`loss_target`), so the loss of a
micro-batch is ``sum(ce over unmasked) / max(1, number unmasked)`` (the mean over unmasked positions
for a 0/1 mask). Logits may be a DTensor sharded on the vocabulary dimension (TP): the cross entropy
then runs under :func:`torch.distributed.tensor.parallel.loss_parallel` and never gathers full logits.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

IGNORE_INDEX = -100


def loss_target(labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """int64 [B, S]: ``labels`` with masked positions set to ``IGNORE_INDEX``."""
    return labels.masked_fill(loss_mask == 0, IGNORE_INDEX)


def lm_loss_from_target(logits: torch.Tensor, target: torch.Tensor,
                        normalizer: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross entropy (nats, fp32 scalar, plain tensor) of logits [B, S, V] against target [B, S];
    with ``normalizer`` the summed cross entropy divided by it instead of by this target's token count
    (a loss per token of the whole global batch: :func:`global_token_normalizer`)."""
    ce = F.cross_entropy(
        logits.float().flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    if isinstance(ce, DTensor):  # replicated scalar under loss_parallel
        ce = ce.to_local()
    if normalizer is not None:
        return ce / normalizer
    count = (target != IGNORE_INDEX).sum().clamp_min(1).to(ce.dtype)
    return ce / count


def global_token_normalizer(target: torch.Tensor, dp_group, dp: int) -> torch.Tensor:
    """Megatron-LM's --calculate-per-token-loss: the unmasked tokens of this rank's ``target`` (all its
    micro-batches) summed over the data-parallel group, divided by ``dp`` (float32 scalar, at least 1/dp).

    Each micro-batch's summed cross entropy divided by this, summed over micro-batches, then averaged
    over dp (as the gradient reduction averages), is the sum over the global batch's tokens / their count.
    """
    count = (target != IGNORE_INDEX).sum().float()
    if dp_group is not None:
        dist.all_reduce(count, group=dp_group)
    return count.clamp_min(1) / dp


def loss_context(tensor_parallel: bool):
    """``loss_parallel()`` when logits are vocabulary-sharded DTensors, else a no-op context."""
    return loss_parallel() if tensor_parallel else contextlib.nullcontext()
