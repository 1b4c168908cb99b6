"""Loss / gradient parity of every (tp, pp, dp) layout with the single-process run (real gloo ranks).

One spawn per world size runs every variant of every layout of that size (both routers, 1F1B and
interleaved 1F1B when pp > 1, plus a few layout-specific extras); the single-process references are
computed once in the parent. Tolerances and their justification: tests/parallel/helpers.py.

The released-model options (LayerNorm with bias, q/k/v, attention-output, dense-MLP and LM-head
biases, llama3 RoPE: :data:`RELEASED`) run on the layouts whose code they touch: tp2 (biases
sharded with column-parallel weights, replicated and added once after row-parallel reductions,
sequence-parallel LayerNorm; also with --apply-layernorm-1p's zero-centred scales), pp2, dp2 with
FSDP2, tp2 x pp2. Biases start at zero, so the first
step checks their gradients (parameters after it) and the second their forward (its loss). A
checkpoint of that model with nonzero biases, written by one process, loads resharded into tp2
(DCP names of the biases and their shards) and gives the single-process logits.

Every variant logs the parameter norm after each step and the gradient's zero count
(--log-params-norm, --log-num-zeros-in-grad): each parameter element is counted once whatever the
layout (tp-replicated norms and routers, dp replicas, FSDP2 shards, pipeline stages), so the norm
agrees to 1e-6 relative and the count exactly (the zeros are structural: embedding rows of token ids
absent from the batch, identical in every layout).
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
import torch.distributed as dist

from megatron_moe.config import ParallelConfig
from megatron_moe.testing import run_distributed
from tests.builders import RELEASED_OPTIONS, tiny_config
from tests.parallel.helpers import LOSS_RTOL, PARAM_ATOL, compare, make_batches, run_steps, set_deterministic_routing

STEP_BATCHES = [make_batches(seed=0), make_batches(seed=1)]
# Layer 0 dense (first_k_dense = 1) so that the dense MLP's biases are there too.
RELEASED = {**RELEASED_OPTIONS, "first_k_dense": 1}
RELEASED_LAYOUTS = {(2, 1, 1): {}, (1, 2, 1): {}, (1, 1, 2): {"data_parallel_shard": True}, (2, 2, 1): {}}
GLOBAL_BALANCE_BATCHES = [make_batches(num=2, seed=2, full_mask=True)]
# DeepSeek-V3's multi-latent attention, small: 4 heads of 6 + 4 rotary channels, values 5 wide, a kv latent of 10
MLA = {"router": "topk", "multi_latent_attention": True, "num_query_groups": 0, "kv_lora_rank": 10, "qk_head_dim": 6,
       "qk_pos_emb_head_dim": 4, "v_head_dim": 5}
VALIDATE_FIRST = "validate_first"  # a variant option that is not a ParallelConfig field: see run_steps
# Parameters agree to PARAM_ATOL (1e-6) absolute; the norm of all of them (~17) so to ~1e-7 relative.
PARAMS_NORM_RTOL = 1e-6


def _config(model: str, tp: int = 1, pp: int = 1):
    """The tiny model with router ``model`` ("topk", "sparsemixer"), or "released": :data:`RELEASED`
    ("released-1p": with zero-centred norm scales, --apply-layernorm-1p), "sequence-balance" (top-K with
    the sequence-wise balance loss) or "qk-norm" (Qwen3's attention: LayerNorm query/key norms on heads of
    12, not hidden / heads = 8, via model.kv_channels), "shared-expert" (Qwen2-MoE's sigmoid-gated shared
    expert beside top-K), "mla" / "mla-direct-q" (DeepSeek-V3's multi-latent attention with / without the query
    latent and the latent norms), "mtp" (DeepSeek-V3's multi-token prediction, two depths), "tied" / "tied-mtp"
    (the output layer tied to the embedding; with one depth) or "expert-bias"
    (DeepSeek-V3's sigmoid routing with an expert bias, moved after every step by the global loads: a large
    rate, so that the second step routes by it; group-limited); parameter norms and gradient zero counts
    logged."""
    settings = {"released": RELEASED, "released-1p": {**RELEASED, "apply_layernorm_1p": True},
                "sequence-balance": {"router": "topk", "balance_loss": "sequence"},
                "qk-norm": {"router": "topk", "qk_layernorm": True, "normalization": "LayerNorm",
                            "kv_channels": 12},
                "shared-expert": {"router": "topk", "shared_expert_ffn_hidden_size": 24,
                                  "shared_expert_gate": True},
                "mla": {**MLA, "q_lora_rank": 12, "qk_layernorm": True},
                "mla-direct-q": MLA,
                "mtp": {"router": "topk", "mtp_num_layers": 2},
                "tied": {"router": "topk", "tie_embeddings": True},
                "tied-mtp": {"router": "topk", "tie_embeddings": True, "mtp_num_layers": 1},
                "expert-bias": {"router": "topk", "score_function": "sigmoid", "expert_bias": True,
                                "expert_bias_update_rate": 0.05, "topk_scaling_factor": 2.5, "router_num_groups": 2,
                                "router_group_topk": 1},
                }.get(model, {"router": model})
    return tiny_config(tp=tp, pp=pp, log_params_norm=True, log_num_zeros_in_grad=True, **settings)


@functools.cache
def reference(model: str) -> dict:
    return run_steps(_config(model), STEP_BATCHES)


@functools.cache
def global_balance_reference() -> dict:
    """Single process, ONE micro-batch of 4 sequences = both dp ranks' micro-batches, local scope."""
    cfg = tiny_config(micro=4, global_batch=4)
    merged = [{k: torch.cat([b[k] for b in GLOBAL_BALANCE_BATCHES[0]]) for k in GLOBAL_BALANCE_BATCHES[0][0]}]
    return run_steps(cfg, [merged])


def _variants(tp: int, pp: int, dp: int) -> list[tuple[str, str, dict]]:
    """(model of :func:`_config`, name, parallel settings) of every variant of a layout."""
    schedules = [{}]
    if pp > 1:
        schedules.append({"pipeline_schedule": "interleaved_1f1b", "virtual_pipeline_stages": 2})
    default = ParallelConfig().pipeline_schedule
    out = [(r, f"{r}/{o.get('pipeline_schedule', default)}", o) for r in ("topk", "sparsemixer") for o in schedules]
    if (tp, pp, dp) == (1, 2, 1):
        out.append(("topk", "topk/gpipe", {"pipeline_schedule": "gpipe"}))
        # Megatron-LM's uneven pipeline (--decoder-first/last-pipeline-num-layers): stages of 1 and 3 layers
        out.append(("topk", "topk/uneven-1-3", {"pipeline_first_stage_layers": 1, "pipeline_last_stage_layers": 3}))
        # validation before the first training step (a fresh run's step 0): the schedule's first call is
        # then forward-only (torch 2.11 made receive buffers without requires_grad then)
        for o in schedules:
            out.append(("topk", f"topk/{o.get('pipeline_schedule', default)}+validation-first",
                        {**o, VALIDATE_FIRST: True}))
    if dp > 1 and (tp, pp, dp) != (2, 2, 2):
        out.append(("topk", "topk/fsdp2", {"data_parallel_shard": True}))
    if (tp, pp, dp) == (2, 2, 1):
        out.append(("sparsemixer", "sparsemixer/1f1b+checkpointing", {"recompute_granularity": "full"}))
    if (tp, pp, dp) in ((2, 1, 1), (1, 2, 1)):  # under TP the MoE layer's sequence gathers are recomputed too
        out.append(("sparsemixer", "sparsemixer/selective-recompute", {"recompute_granularity": "selective",
                                                                       "recompute_modules": ["core_attn", "moe"]}))
    if (tp, pp, dp) in RELEASED_LAYOUTS:
        out.append(("released", "layernorm+biases+llama3", RELEASED_LAYOUTS[(tp, pp, dp)]))
    if (tp, pp, dp) == (2, 1, 1):  # sequence-parallel norms scaling by 1 + w
        out.append(("released-1p", "layernorm-1p+biases+llama3", {}))
        # the sequence-wise balance loss needs whole sequences: the MoE layer gathers the sequence shards first
        out.append(("sequence-balance", "topk/sequence-balance", {}))
    if (tp, pp, dp) in ((2, 1, 1), (2, 2, 1)):  # query/key norms over each rank's heads: Partial weight grads
        out.append(("qk-norm", "topk/qk-layernorm+kv-channels", {}))
    if (tp, pp, dp) in ((2, 1, 1), (2, 1, 2)):  # the shared expert sharded like the experts; its gate like the router
        out.append(("shared-expert", "topk/gated-shared-expert", {}))
    if (tp, pp, dp) in ((2, 1, 1), (2, 2, 1), (2, 1, 2)):  # sequence-parallel latents, heads split, rope key gathered
        out.append(("mla", "topk/latent-attention", {}))
    if (tp, pp, dp) == (2, 1, 1):  # queries straight from the (gathered) hidden state
        out.append(("mla-direct-q", "topk/latent-attention-direct-q", {}))
    if (tp, pp, dp) in ((2, 1, 1), (1, 1, 2), (2, 1, 2), (1, 2, 1), (2, 2, 1), (1, 2, 2)):
        # depths' parts on sequence shards, their blocks as all; under pp on the last stage with its embedding copy
        out.append(("mtp", "topk/multi-token-prediction", {"data_parallel_shard": dp > 1}))
    if (tp, pp, dp) == (1, 2, 1):  # Megatron-LM's layouts: a first stage of the embedding alone, a last stage of the
        # depths and the loss alone (4 virtual stages)
        out += [("mtp", "topk/multi-token-prediction/layout-E|t*4mmL", {"pipeline_layout": "E|t*4mmL"}),
                ("mtp", "topk/multi-token-prediction/layout-Ett|t|t|mmL",
                 {"pipeline_layout": "Ett|t|t|mmL", "virtual_pipeline_stages": 2,
                  "pipeline_schedule": "interleaved_1f1b"})]
    if (tp, pp, dp) in ((1, 2, 1), (1, 2, 2)):  # the output layer on the last stage reads the embedding's copy
        out += [("tied", f"topk/tied-embeddings/{o.get('pipeline_schedule', default)}", o) for o in schedules]
    if (tp, pp, dp) in ((2, 1, 1), (2, 1, 2)):  # the tied output layer reads the vocabulary-parallel embedding
        out.append(("tied", "topk/tied-embeddings", {"data_parallel_shard": dp > 1}))
    if (tp, pp, dp) == (2, 2, 1):  # ... and its copy on the last stage, sharded as the first stage's
        out.append(("tied-mtp", "topk/tied-embeddings+multi-token-prediction", {}))
    if (tp, pp, dp) in ((1, 1, 2), (1, 2, 1), (2, 1, 1)):  # loads summed over dp; each stage moves its layers' biases
        out.append(("expert-bias", "sigmoid/expert-bias", {}))
    return out


def _tp_ranks_draw_same_routing(mesh) -> bool:
    """SparseMixer-v2 in TRAINING mode (sampled routing): TP ranks must route identically."""
    from megatron_moe.parallel.engine import ParallelEngine
    from megatron_moe.routing.router import Router

    cfg = tiny_config(tp=mesh["tp"].size(), router="sparsemixer")
    cfg.moe.input_jitter_eps = 0.01
    engine = ParallelEngine(cfg, mesh=mesh)
    module = engine.build_model()
    module.train()
    picked = []
    for m in module.modules():
        if isinstance(m, Router):
            m.register_forward_hook(lambda mod, args, out: picked.append(out.indices.clone()))
    optimizer = torch.optim.SGD(engine.parameters(), lr=0.1)
    for batches in STEP_BATCHES:
        engine.train_step(batches, optimizer, 1.0)
    mine = torch.cat([p.flatten() for p in picked])
    gathered = [None] * mesh["tp"].size()
    dist.all_gather_object(gathered, mine.tolist(), group=mesh["tp"].get_group())
    return all(g == gathered[0] for g in gathered)


def _meta_init_trains(mesh, tp: int, pp: int) -> bool:
    """Big-model path: construct on meta, allocate only this rank's stages; one finite training step."""
    import math

    from megatron_moe.parallel.engine import ParallelEngine

    engine = ParallelEngine(tiny_config(tp=tp, pp=pp), mesh=mesh)
    module = engine.build_model(meta_init=True)
    if any(p.is_meta for p in module.parameters()):
        return False
    res = engine.train_step(STEP_BATCHES[0], torch.optim.SGD(engine.parameters(), lr=0.1), 1.0)
    if not (math.isfinite(res.lm_loss.item()) and math.isfinite(res.grad_norm.item())):
        return False
    # Stages initialised from their own seeds: the last stage's copy of the embedding still starts as the first's.
    engine = ParallelEngine(_config("tied-mtp", tp, pp), mesh=mesh)
    (part,) = engine.build_model(meta_init=True)
    embeddings = [None] * pp
    dist.all_gather_object(embeddings, part.tok_embeddings.weight.detach().clone(), group=mesh["pp"].get_group())
    return torch.equal(embeddings[0], embeddings[-1]) and bool(embeddings[0].abs().sum() > 0)


def _train_and_evaluate_alternately(mesh=None) -> list[float]:
    """AdamW steps (lr 1e-2: the parameters move) each followed by an evaluation: the losses of both. FSDP2 on
    pipeline stages keeps parameters gathered after a forward; an evaluation must not leave stale ones for the next
    step (nor a step for the next evaluation)."""
    from megatron_moe.parallel.engine import ParallelEngine

    cfg = tiny_config(pp=mesh["pp"].size() if mesh is not None else 1, router="topk", data_parallel_shard=True)
    engine = ParallelEngine(cfg, mesh=mesh)
    module = engine.build_model()
    optimizer = torch.optim.AdamW(engine.parameters(), lr=1e-2)
    dp, r = engine.sizes.dp, engine.dp_rank
    out = []
    for batches in STEP_BATCHES:
        set_deterministic_routing(module)
        out.append(engine.train_step(batches[r::dp], optimizer, 1.0).lm_loss.item())
        out.append(engine.evaluate(STEP_BATCHES[0][r::dp])["loss"])
    return out


def _released_checkpoint_logit_diff(mesh, ckpt: str, tokens: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest |logit difference| of the checkpoint at ``ckpt`` loaded into this tp layout vs ``ref``."""
    from megatron_moe.parallel.engine import ParallelEngine
    from megatron_moe.training.state import load_model_only

    engine = ParallelEngine(_config("released", tp=mesh["tp"].size()), mesh=mesh)
    module = engine.build_model(seed=99)  # other weights, overwritten by the load
    load_model_only(ckpt, engine.parts)
    with torch.no_grad():
        logits = module.eval()[0](tokens)
    return (logits.full_tensor() - ref).abs().max().item()


def _save_released_checkpoint(path) -> tuple[str, torch.Tensor, torch.Tensor]:
    """A model-only checkpoint of the released-options model with random biases; (path, tokens, logits)."""
    from megatron_moe.convert.native import save_model_checkpoint
    from megatron_moe.model.transformer import build_model

    cfg = _config("released")
    model = build_model(cfg, seed=5).eval()
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1, generator=g)
        tokens = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=g)
        ref = model(tokens)
    return str(save_model_checkpoint(path, cfg, model.state_dict(), "test")), tokens, ref


def _layouts_body(rank, world, layouts, refs, gb_ref, released_ckpt=None, alternating=None):
    """Every variant of every layout in ``layouts`` (all of this world size) in one spawn."""
    from torch.distributed.device_mesh import init_device_mesh

    results = {}
    for tp, pp, dp in layouts:
        mesh = init_device_mesh("cpu", (pp, dp, tp), mesh_dim_names=("pp", "dp", "tp"))
        prefix = f"tp{tp}-pp{pp}-dp{dp}"
        for model, name, parallel in _variants(tp, pp, dp):
            cfg = _config(model, tp, pp)
            parallel = dict(parallel)
            validate_first = parallel.pop(VALIDATE_FIRST, False)
            cfg.parallel = dataclasses.replace(cfg.parallel, **parallel)
            run = run_steps(cfg, STEP_BATCHES, mesh, validate_first=validate_first)
            results[f"{prefix} {name}"] = compare(run, refs[model])
        if (tp, pp, dp) == (2, 1, 1):
            results[f"{prefix} tp_same_sparsemixer_samples"] = _tp_ranks_draw_same_routing(mesh)
            results[f"{prefix} released_checkpoint_logit_abs"] = _released_checkpoint_logit_diff(
                mesh, *released_ckpt)
        if (tp, pp, dp) == (1, 2, 1):
            results[f"{prefix} meta_init_trains"] = _meta_init_trains(mesh, tp, pp)
        if (tp, pp, dp) == (2, 2, 1):  # four stages: the embedding's group is the first and last rank, not pp
            pp4 = init_device_mesh("cpu", (4, 1, 1), mesh_dim_names=("pp", "dp", "tp"))
            results["tp1-pp4-dp1 topk/tied-embeddings+multi-token-prediction"] = compare(
                run_steps(_config("tied-mtp", 1, 4), STEP_BATCHES, pp4), refs["tied-mtp"])
        if (tp, pp, dp) == (1, 2, 2):
            results[f"{prefix} fsdp2_train_eval_alternating_rel"] = max(
                abs(a - b) / abs(b) for a, b in zip(_train_and_evaluate_alternately(mesh), alternating, strict=True))
        if (tp, pp, dp) == (1, 1, 2):
            cfg = tiny_config(micro=2, global_batch=4)
            cfg.moe.balance_scope = "global"
            results[f"{prefix} global_balance"] = compare(
                run_steps(cfg, GLOBAL_BALANCE_BATCHES, mesh=mesh), gb_ref
            )
    return results


LAYOUTS = [(2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1), (2, 1, 2), (1, 2, 2), (2, 2, 2)]
WORLDS = sorted({t * p * d for t, p, d in LAYOUTS})


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS, ids=[f"world{w}" for w in WORLDS])
def test_layouts_match_single_process(world, tmp_path):
    """Layouts (tp, pp, dp) of this world size: losses, grad norms and parameters after a step."""
    layouts = [lay for lay in LAYOUTS if lay[0] * lay[1] * lay[2] == world]
    refs = {m: reference(m) for m in ("topk", "sparsemixer", "released", "released-1p", "sequence-balance",
                                      "qk-norm", "shared-expert", "expert-bias", "mla", "mla-direct-q", "mtp", "tied",
                                      "tied-mtp")}
    gb_ref = global_balance_reference() if (1, 1, 2) in layouts else None
    released_ckpt = _save_released_checkpoint(tmp_path / "released") if (2, 1, 1) in layouts else None
    alternating = _train_and_evaluate_alternately() if (1, 2, 2) in layouts else None
    results = run_distributed(_layouts_body, world, (layouts, refs, gb_ref, released_ckpt, alternating), timeout=400)
    expected = {f"tp{t}-pp{p}-dp{d} {name}" for t, p, d in layouts for _, name, _ in _variants(t, p, d)}
    for rank, res in enumerate(results):
        assert expected <= set(res), f"rank {rank}: missing variants {expected - set(res)}"
        for name, r in res.items():
            if isinstance(r, bool):  # tp_same_sparsemixer_samples, meta_init_trains
                assert r, f"rank {rank}: {name} failed"
                continue
            if isinstance(r, float):  # released_checkpoint_logit_abs, fsdp2_train_eval_alternating_rel: fp32 sums in
                # another order
                assert r <= 1e-5, f"rank {rank} {name}: {r:.2e}"
                continue
            assert r["num_params"] > 0, (rank, name)
            assert r["loss_rel"] <= LOSS_RTOL, (
                f"rank {rank} {name}: loss/grad-norm rel diff {r['loss_rel']:.2e}"
            )
            assert r["param_abs"] <= PARAM_ATOL, f"rank {rank} {name}: param abs diff {r['param_abs']:.2e}"
            if "pnorm_rel" in r:  # every element once whatever the layout (module docstring)
                assert r["pnorm_rel"] <= PARAMS_NORM_RTOL, f"rank {rank} {name}: params norm {r['pnorm_rel']:.2e}"
                assert r["zeros_diff"] == 0, f"rank {rank} {name}: {r['zeros_diff']} more or fewer zeros in grad"
