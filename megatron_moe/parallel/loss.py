"""The LM loss used by every layout: masked next-token cross entropy, vocabulary-parallel under TP.

Labels at masked positions are replaced by ``IGNORE_INDEX`` (:func:`loss_target`), so the loss of a
micro-batch is ``sum(ce over unmasked) / max(1, number unmasked)`` (the mean over unmasked positions
for a 0/1 mask). Logits may be a DTensor sharded on the vocabulary dimension (TP): the cross entropy
then runs under :func:`torch.distributed.tensor.parallel.loss_parallel` and never gathers full logits.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

IGNORE_INDEX = -100


def loss_target(labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """int64 [B, S]: ``labels`` with masked positions set to ``IGNORE_INDEX``."""
    return labels.masked_fill(loss_mask == 0, IGNORE_INDEX)


def lm_loss_from_target(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy (nats, fp32 scalar, plain tensor) of logits [B, S, V] against target [B, S]."""
    ce = F.cross_entropy(
        logits.float().flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    if isinstance(ce, DTensor):  # replicated scalar under loss_parallel
        ce = ce.to_local()
    count = (target != IGNORE_INDEX).sum().clamp_min(1).to(ce.dtype)
    return ce / count


def loss_context(tensor_parallel: bool):
    """``loss_parallel()`` when logits are vocabulary-sharded DTensors, else a no-op context."""
    return loss_parallel() if tensor_parallel else contextlib.nullcontext()
