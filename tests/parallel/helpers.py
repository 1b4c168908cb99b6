"""Shared pieces of the multi-rank parity tests: tiny config, fixed data, the run that is compared.

Tolerance (fp32): the distributed runs compute the same sums in another order (TP partial matmuls
reduced by all-reduce / reduce-scatter, dp averages, pipeline stages); each reordering changes a
result by a few ulp, ~1e-7 relative. We allow 1e-5 relative on losses and grad norms and 1e-6
absolute on parameters after one SGD step with lr = 1 (so the parameter difference IS the
gradient difference; gradients here are O(1e-2..1e-1)). Observed: losses equal to ~1e-7 relative,
parameters to <= 2e-8 absolute. Every bug this guards against (aux-loss gradient counted tp times,
lost partial gate gradients, a missing 1/num_microbatches, wrong dp average) shifts gradients by
>= 1e-3 relative.
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_moe.config import Config
from megatron_moe.routing.router import Router

LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-6
LR = 1.0
CLIP = 1.0


def make_batches(
    num: int = 4, batch: int = 2, seq: int = 16, seed: int = 0, full_mask: bool = False
) -> list[dict]:
    """``num`` micro-batches of random tokens (single-process order); ~20% of the loss mask is 0."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        t = torch.randint(0, 128, (batch, seq + 1), generator=g)
        mask = torch.ones(batch, seq) if full_mask else (torch.rand(batch, seq, generator=g) > 0.2).float()
        out.append({"tokens": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous(), "loss_mask": mask})
    return out


def set_deterministic_routing(module: torch.nn.Module) -> None:
    """Training mode everywhere except the routers (SparseMixer-v2's eval path is deterministic)."""
    module.train()
    for m in module.modules():
        if isinstance(m, Router):
            m.eval()


def run_steps(cfg: Config, step_batches: list[list[dict]], mesh=None, validate_first: bool = False) -> dict:
    """Train len(step_batches) SGD steps through the engine; this rank's dp share of each global batch.
    With ``validate_first`` the engine evaluates the first batch before training (as a run does at step 0).

    Returns losses / aux / grad norms per step (and the parameter norms and gradient zero counts when
    ``cfg.logging`` asks for them) and the full values of this rank's parameters (and expert biases)
    after the first step (names without the part prefix), as numpy arrays.
    """
    from megatron_moe.parallel.engine import ParallelEngine
    from megatron_moe.training.state import canonical_name

    engine = ParallelEngine(cfg, mesh=mesh)
    module = engine.build_model()
    set_deterministic_routing(module)
    optimizer = torch.optim.SGD(engine.parameters(), lr=LR)
    dp, r = engine.sizes.dp, engine.dp_rank
    out: dict = {"lm": [], "aux": [], "gnorm": [], "params": {}}
    if validate_first:
        engine.evaluate(step_batches[0][r::dp])
        set_deterministic_routing(module)  # evaluate() ends by putting every module, routers too, in train mode
    for i, batches in enumerate(step_batches):
        res = engine.train_step(batches[r::dp], optimizer, CLIP)  # Megatron's order: rank r takes every dp-th
        out["lm"].append(res.lm_loss.item())
        out["aux"].append(res.aux_loss.item())
        out["gnorm"].append(res.grad_norm.item())
        if res.params_norm is not None:
            out.setdefault("pnorm", []).append(res.params_norm.item())
        if res.num_zeros_in_grad is not None:
            out.setdefault("zeros", []).append(res.num_zeros_in_grad.item())
        if res.mtp_loss is not None:
            out.setdefault("mtp", []).append(res.mtp_loss.item())
        if i == 0:
            for name, p in module.named_parameters():
                full = p.full_tensor() if hasattr(p, "full_tensor") else p
                out["params"][canonical_name(name.split(".", 1)[1])] = full.detach().numpy().copy()
            for name, b in module.named_buffers():  # DeepSeek-V3's expert biases move with the step's loads
                if name.endswith("expert_bias"):
                    out["params"][canonical_name(name.split(".", 1)[1])] = b.detach().numpy().copy()
    return out


def compare(run: dict, ref: dict) -> dict:
    """Largest relative loss / grad-norm difference and largest absolute parameter difference; with
    parameter norms and zero counts in both runs, their largest relative / absolute differences too."""
    rel = 0.0
    for key in ("lm", "aux", "gnorm", "mtp"):
        if key not in ref and key not in run:
            continue
        for a, b in zip(run[key], ref[key], strict=True):
            rel = max(rel, abs(a - b) / max(abs(b), 1e-12))
    missing = [n for n in run["params"] if n not in ref["params"]]
    if missing:
        raise KeyError(f"parameters not in the reference: {missing}")
    param = max(float(np.abs(v - ref["params"][n]).max()) for n, v in run["params"].items())
    out = {"loss_rel": rel, "param_abs": param, "num_params": len(run["params"])}
    if "pnorm" in ref:
        out["pnorm_rel"] = max(abs(a - b) / b for a, b in zip(run["pnorm"], ref["pnorm"], strict=True))
        out["zeros_diff"] = max(abs(a - b) for a, b in zip(run["zeros"], ref["zeros"], strict=True))
    return out
