"""Pipeline schedules as the planner needs them: micro-batches in flight per rank and the bubble.

The counts follow torch.distributed.pipelining's schedules, which the engine runs
(:mod:`megatron_moe.parallel.pipeline`), with ``p`` pipeline ranks, ``m`` micro-batches per step
and ``v`` model chunks (virtual stages) per rank:

- no pipeline (p = 1): micro-batches run forward and backward one after the other: 1 in flight;
- GPipe: every forward before any backward: ``m`` in flight;
- 1F1B: rank ``r`` runs ``p - 1 - r`` warm-up forwards, then alternates: ``min(p - r, m)`` in flight;
- interleaved 1F1B (``ScheduleInterleaved1F1B``): ``(v - 1) * m_round + 2 * (p - 1 - r)`` warm-up
  chunk-forwards (capped at ``v * m``), ``m_round = m / max(1, m // p)`` micro-batches per round,
  walking the local chunks round by round; in flight: the warm-up forwards plus one, per chunk.

Bubble (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters",
section 2.2): idle time / ideal time = ``(p - 1) / m`` for GPipe and 1F1B, ``(p - 1) / (v m)``
interleaved; reported as the fraction of the step, ``(p - 1) / (v m + p - 1)``.
"""

from __future__ import annotations


def in_flight(schedule: str, pp: int, pp_rank: int, num_micro: int, virtual: int = 1) -> list[int]:
    """Micro-batches whose activations a rank holds at its peak, per local chunk (``virtual`` entries)."""
    if pp == 1:
        return [1]
    if schedule == "gpipe":
        return [num_micro]
    if schedule == "1f1b":
        return [min(pp - pp_rank, num_micro)]
    per_round = num_micro // max(1, num_micro // pp)
    warmup = min((virtual - 1) * per_round + 2 * (pp - 1 - pp_rank), num_micro * virtual)
    counts = [0] * virtual
    for step in range(min(warmup + 1, num_micro * virtual)):
        counts[(step // per_round) % virtual] += 1
    return counts


def bubble_fraction(pp: int, num_micro: int, virtual: int = 1) -> float:
    """Share of a step the pipeline ranks sit idle: ``(p - 1) / (v m + p - 1)`` (module docstring)."""
    return (pp - 1) / (virtual * num_micro + pp - 1)
