"""Global-scope switch balance loss over 2 gloo ranks (docs/routing.md §4, GRIN 3.3).

Each rank holds half of a batch; logits = x_r @ W with W a replicated (data-parallel) router weight.
Counts are summed over ranks with AsyncAllReduce; P stays local. Data-parallel training averages the
ranks' gradients, so the test checks

    mean_r d/dW switch(P_r, f_global)  ==  d/dW switch(P_global_batch, f_global_batch)

with no extra factor. megatron-core 0.16's global aux loss is off by a factor of the data-parallel
size here (NVIDIA/Megatron-LM issue 3672): a factor would break this equality. The local scope on
an imbalanced split (the two halves favour different experts) must give a different gradient, so the
test can tell the scopes apart.
"""

import torch
import torch.distributed as dist

from megatron_moe.routing import (
    AsyncAllReduce,
    expert_counts,
    switch_balance_loss,
    topk_softmax_routing,
)
from megatron_moe.testing import run_distributed

E, K, H, T = 6, 2, 5, 48


def _rank_body(rank: int, world_size: int, x_full: torch.Tensor, w_init: torch.Tensor):
    x = x_full.chunk(world_size)[rank]
    w = w_init.clone().requires_grad_()
    logits = x @ w
    probs = torch.softmax(logits, -1)
    _, idx = topk_softmax_routing(logits, K)
    local = expert_counts(idx, E)
    handle = AsyncAllReduce.start(local, dist.group.WORLD)
    # ... the expert computation would overlap here ...
    global_counts = handle.wait()
    (grad_global,) = torch.autograd.grad(switch_balance_loss(probs, global_counts), w, retain_graph=True)
    (grad_local,) = torch.autograd.grad(switch_balance_loss(probs, local), w)
    return {"grad_global": grad_global, "grad_local": grad_local, "local": local, "global": global_counts}


def test_global_scope_gradient_equals_global_batch_gradient():
    g = torch.Generator().manual_seed(0)
    x_full = torch.randn(T, H, generator=g, dtype=torch.float64)
    x_full[: T // 2, 0] += 3.0  # the two halves (ranks) favour different experts
    x_full[T // 2 :, 0] -= 3.0
    w_init = torch.randn(H, E, generator=g, dtype=torch.float64)

    results = run_distributed(_rank_body, world_size=2, args=(x_full, w_init))

    # single-process reference on the concatenated batch
    w = w_init.clone().requires_grad_()
    logits = x_full @ w
    _, idx = topk_softmax_routing(logits, K)
    counts = expert_counts(idx, E)
    (ref_grad,) = torch.autograd.grad(switch_balance_loss(torch.softmax(logits, -1), counts), w)

    # the all-reduce summed the counts and left the local input untouched
    torch.testing.assert_close(results[0]["global"], counts)
    torch.testing.assert_close(results[1]["global"], counts)
    torch.testing.assert_close(results[0]["local"] + results[1]["local"], counts)
    assert not torch.equal(results[0]["local"], results[1]["local"]), "split must be imbalanced"

    mean_global = (results[0]["grad_global"] + results[1]["grad_global"]) / 2
    torch.testing.assert_close(mean_global, ref_grad, rtol=1e-10, atol=1e-12)  # float64: exact up to rounding

    # local scope differs on this imbalanced split ...
    mean_local = (results[0]["grad_local"] + results[1]["grad_local"]) / 2
    assert (mean_local - ref_grad).abs().max() > 1e-3 * ref_grad.abs().max()
    # ... and so would a Megatron-LM #3672-style extra factor of the data-parallel size
    assert (2 * mean_global - ref_grad).abs().max() > 0.5 * ref_grad.abs().max()
