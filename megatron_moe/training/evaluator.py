"""Validation: the same batches at every evaluation, LM loss / perplexity, expert load and similarity."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_moe.data.datasets import MicroBatchIterator
from megatron_moe.model.expert_similarity import expert_gram, mean_pairwise_cosine


class Evaluator:
    """Evaluates the engine's model on a fixed list of this rank's validation micro-batches.

    Args:
        engine: the :class:`~megatron_moe.parallel.engine.ParallelEngine`.
        dataset: the validation dataset (megatron-core), read in Megatron's dp order.
        num_batches: micro-batches per rank (``eval_iters`` x micro-batches per step).
        micro_batch_size: sequences per micro-batch.
    """

    def __init__(self, engine, dataset, num_batches: int, micro_batch_size: int):
        self.engine = engine
        batches = MicroBatchIterator(dataset, micro_batch_size, dp_rank=engine.dp_rank, dp_size=engine.sizes.dp)
        # The same validation batches at every evaluation, so successive losses are comparable.
        self.batches = [next(batches) for _ in range(num_batches)]
        self.tokens = num_batches * engine.sizes.dp * micro_batch_size * (
            self.batches[0]["tokens"].shape[1] if self.batches else 0
        )

    def evaluate(self) -> dict:
        """``{"loss", "ppl", "expert_load" [layer][expert], "expert_similarity" [layer]}``, equal on every rank."""
        result = self.engine.evaluate(self.batches)
        result["expert_similarity"] = expert_similarity_all_layers(self.engine)
        return result


def expert_similarity_all_layers(engine) -> list[float]:
    """Mean pairwise expert cosine similarity (docs/routing.md §6) of every MoE layer, on every rank."""
    sims = torch.zeros(engine.num_moe_layers, dtype=torch.float64, device=engine.device)
    holders = torch.zeros_like(sims)
    for idx, layer in engine.moe:
        sims[idx] += mean_pairwise_cosine(expert_gram(layer.experts))
        holders[idx] += 1
    if dist.is_initialized() and engine.sizes.world > 1:  # pipeline stages hold different layers
        dist.all_reduce(sims)
        dist.all_reduce(holders)
    return (sims / holders.clamp_min(1)).tolist()
