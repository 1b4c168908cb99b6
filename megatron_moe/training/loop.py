"""Pretraining loop: data, AdamW + schedule, adaptive aux coefficients, validation, metrics.

The forward/backward, gradient reductions and the optimizer step of every layout (single process =
tp = pp = dp = 1) go through :class:`megatron_moe.parallel.engine.ParallelEngine`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from megatron_moe.config import Config, ConfigError, default_ffn_hidden_size
from megatron_moe.data.datasets import MicroBatchIterator, build_gpt_datasets
from megatron_moe.data.tokenizer import SentencePieceTokenizer
from megatron_moe.model.expert_similarity import expert_gram, mean_pairwise_cosine
from megatron_moe.model.moe import MoELayer
from megatron_moe.model.transformer import padded_vocab_size
from megatron_moe.parallel.data import split_param_groups_by_mesh
from megatron_moe.parallel.engine import ParallelEngine, StepResult, init_distributed_from_env, load_fractions
from megatron_moe.parallel.loss import lm_loss_from_target, loss_target
from megatron_moe.routing.adaptive import AdaptiveAuxLossCoefficients, ConstantAuxLossCoefficients
from megatron_moe.training.checkpoint import (
    CheckpointError,
    read_meta,
    resolve_checkpoint,
    save_checkpoint,
    write_text_atomic,
)
from megatron_moe.training.metrics import MetricsWriter
from megatron_moe.training.optim import build_optimizer, learning_rate, set_learning_rate
from megatron_moe.training.signals import StopRequest
from megatron_moe.training.state import check_compatible, load_model_only, load_training_state, training_state


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy (nats) over unmasked positions. logits [B,S,V], labels/0-1 mask [B,S]."""
    return lm_loss_from_target(logits, loss_target(labels, loss_mask))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("training.device = 'cuda' but no CUDA device is available")
    return torch.device(name)


def resolve_vocab_size(cfg: Config, tokenizer_vocab: int, tp_size: int = 1) -> None:
    """Fill model.vocab_size from the tokenizer (padded as Megatron-LM does) or check it is large enough."""
    m = cfg.model
    if m.vocab_size == 0:
        m.vocab_size = padded_vocab_size(tokenizer_vocab, m.make_vocab_size_divisible_by, tp_size)
    elif m.vocab_size < tokenizer_vocab:
        raise ValueError(
            f"model.vocab_size = {m.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({tokenizer_vocab} in {cfg.data.tokenizer_model!r})"
        )


def build_aux_coefficients(cfg: Config, num_layers: int, device: torch.device):
    """Skywork adaptive per-layer coefficients, or constant ones (both expose .coefficients/.update)."""
    e = cfg.moe
    if e.adaptive_aux:
        return AdaptiveAuxLossCoefficients(
            num_layers,
            xi=e.adaptive_xi,
            alpha_max=e.adaptive_alpha_max,
            beta=e.adaptive_beta,
            alpha_0=None if e.adaptive_alpha_0 < 0 else e.adaptive_alpha_0,
            device=device,
        )
    return ConstantAuxLossCoefficients(num_layers, e.aux_loss_coeff, device=device)


def push_coefficients(layers: list[tuple[int, MoELayer]], coefficients: torch.Tensor) -> None:
    """Copy each (global MoE index, layer) pair's coefficient into the layer (this rank's layers only)."""
    for idx, layer in layers:
        layer.aux_coeff.copy_(coefficients[idx])


def _single_process_engine(model: nn.Module, autocast) -> ParallelEngine:
    if dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError("train_step/evaluate(model, ...) are single-process helpers; use ParallelEngine")
    engine = ParallelEngine(model.cfg, device=next(model.parameters()).device, autocast=autocast)
    engine.build_model(model=model, seed_rng=False)
    return engine


def train_step(model: nn.Module, batches: list[dict], optimizer, clip_grad: float, autocast) -> StepResult:
    """One optimizer step of a single-process ``model`` over ``batches`` (the engine's degenerate layout)."""
    return _single_process_engine(model, autocast).train_step(batches, optimizer, clip_grad)


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[dict], autocast) -> dict:
    """Mean LM loss and perplexity over ``batches``; per-layer expert load fractions (single process)."""
    return _single_process_engine(model, autocast).evaluate(batches)


def layer_records(coefficients: torch.Tensor, stats: list) -> list[dict]:
    """Per-layer metrics entries (host values) for metrics.jsonl; ``coefficients`` [num MoE layers]."""
    records = []
    coeffs = coefficients.tolist()
    for layer_idx, s in enumerate(stats):
        load = load_fractions(s.counts)
        n = max(1, s.num_micro_batches)
        records.append(
            {
                "layer": layer_idx,
                "aux_loss": (s.aux_loss / n).item(),
                "aux_coeff": coeffs[layer_idx],
                "drop_rate": (s.drop_rate / n).item(),
                "entropy": (s.entropy / n).item(),
                "load": [round(v, 5) for v in load],
                "load_max_over_mean": max(load) * len(load) if load else 0.0,
            }
        )
    return records


def _progress_line(rec: dict) -> str:
    line = (
        f"step {rec['step']:>6} | loss {rec['loss']:.4f} | lm {rec['lm_loss']:.4f}"
        f" | aux {rec['aux_loss']:.4f} | lr {rec['lr']:.2e} | gnorm {rec['grad_norm']:.3f}"
        f" | {rec['tokens_per_sec']:.0f} tok/s"
    )
    if rec["moe"]:
        moe = rec["moe"]
        drop = sum(r["drop_rate"] for r in moe) / len(moe)
        spread = max(r["load_max_over_mean"] for r in moe)
        coeff = sum(r["aux_coeff"] for r in moe) / len(moe)
        line += f" | drop {drop:.3f} | max/mean load {spread:.2f} | alpha {coeff:.2e}"
    return line


def expert_similarity_all_layers(engine: ParallelEngine) -> list[float]:
    """Mean pairwise expert cosine similarity (ROUTING_SPEC 6) of every MoE layer, on every rank."""
    sims = torch.zeros(engine.num_moe_layers, dtype=torch.float64, device=engine.device)
    holders = torch.zeros_like(sims)
    for idx, layer in engine.local_moe:
        sims[idx] += mean_pairwise_cosine(expert_gram(layer.experts))
        holders[idx] += 1
    if dist.is_initialized() and engine.sizes.world > 1:  # pipeline stages hold different layers
        dist.all_reduce(sims)
        dist.all_reduce(holders)
    return (sims / holders.clamp_min(1)).tolist()


def check_grouped_gemm_shapes(cfg: Config, tp: int, device: torch.device) -> None:
    """On CUDA, torch._grouped_mm needs 16-byte-aligned rows: hidden and per-rank expert FFN sizes
    must be multiples of 8 (bf16). Fail before any work instead of deep inside the first forward."""
    if device.type != "cuda" or not cfg.moe.num_experts:
        return
    ffn = cfg.moe.expert_ffn_hidden_size or cfg.model.ffn_hidden_size or default_ffn_hidden_size(cfg.model.hidden_size)
    for name, size in (("model.hidden_size", cfg.model.hidden_size),
                       (f"moe.expert_ffn_hidden_size / tensor parallel size ({ffn} / {tp})", ffn // tp)):
        if size % 8:
            raise ConfigError(f"{name} = {size}: the grouped expert GEMM on CUDA needs a multiple of 8")


def _stop_requested(stop: StopRequest, device: torch.device) -> bool:
    """True on every rank if any rank received SIGTERM/SIGINT (one tiny all-reduce per step)."""
    flag = torch.tensor(1.0 if stop.requested else 0.0, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _nonfinite_report(step: int, result: StepResult) -> str:
    lines = [f"non-finite loss or gradient at step {step}: lm_loss={result.lm_loss.item()}, "
             f"aux_loss={result.aux_loss.item()}, grad_norm={result.grad_norm.item()}"]
    for i, st in enumerate(result.layer_stats):
        n = max(1, st.num_micro_batches)
        lines.append(f"  MoE layer {i}: aux_loss={(st.aux_loss / n).item():.4g} "
                     f"drop_rate={(st.drop_rate / n).item():.4g} entropy={(st.entropy / n).item():.4g} "
                     f"max/mean load={(st.counts.max() / st.counts.mean().clamp_min(1e-9)).item():.3g}")
    return "\n".join(lines)


def train(cfg: Config, eval_only: bool = False) -> dict:
    """Run pretraining as configured, single process or under torchrun (any tp x pp x dp layout).

    Every rank runs this; only global rank 0 prints and writes metrics. Returns a summary with the
    first/last validation loss (identical on every rank).
    """
    if cfg.training.num_threads:
        torch.set_num_threads(cfg.training.num_threads)
    device = resolve_device(cfg.training.device)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    owns_group = not dist.is_initialized() and init_distributed_from_env(device.type)
    try:
        return _train(cfg, eval_only, device)
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: Config, eval_only: bool, device: torch.device) -> dict:
    torch.manual_seed(cfg.training.seed)
    if not cfg.data.tokenizer_model:
        raise ValueError("data.tokenizer_model (--tokenizer-model) is required")
    if not cfg.data.data_path:
        raise ValueError("data.data_path (--data-path) is required")
    load_path, load_meta = None, None
    if cfg.checkpoint.load:
        load_path = resolve_checkpoint(cfg.checkpoint.load)
        load_meta = read_meta(load_path)
        check_compatible(load_meta.get("config", {}), cfg, load_path)
    elif eval_only:
        raise ValueError("--eval-only needs a checkpoint to evaluate: pass --load DIR")
    tokenizer = SentencePieceTokenizer(cfg.data.tokenizer_model)
    tokenizer_id = {"vocab_size": tokenizer.vocab_size, "sha256": tokenizer.unique_identifiers["model_sha256"]}
    saved_tokenizer = (load_meta or {}).get("tokenizer")
    if saved_tokenizer and saved_tokenizer != tokenizer_id and not cfg.checkpoint.allow_tokenizer_change:
        raise CheckpointError(
            f"tokenizer {cfg.data.tokenizer_model!r} (vocab {tokenizer_id['vocab_size']}, sha256 "
            f"{tokenizer_id['sha256'][:12]}...) is not the one checkpoint {load_path} was trained with (vocab "
            f"{saved_tokenizer['vocab_size']}, sha256 {saved_tokenizer['sha256'][:12]}...); pass that tokenizer, "
            "or --checkpoint.allow_tokenizer_change true on purpose"
        )
    resolve_vocab_size(cfg, tokenizer.vocab_size, cfg.parallel.tensor_model_parallel_size)
    engine = ParallelEngine(cfg, device=device)  # validates the layout before any work
    check_grouped_gemm_shapes(cfg, engine.sizes.tp, device)
    log = engine.is_logging_rank
    sizes = engine.sizes
    num_micro = sizes.num_microbatches
    t = cfg.training

    module = engine.build_model(meta_init=t.meta_init)
    params = engine.param_counts
    if log:
        print(
            f"model: {params['total'] / 1e6:.2f}M parameters, {params['active'] / 1e6:.2f}M active per token"
        )
        print(
            f"layout: tp={sizes.tp} pp={sizes.pp} dp={sizes.dp} ({sizes.world} ranks), "
            f"{num_micro} micro-batches per rank and step, bf16={t.bf16}",
            flush=True,
        )

    train_ds, valid_ds = build_gpt_datasets(
        cfg.data.data_path,
        cfg.data.split,
        tokenizer,
        cfg.data.seq_length,
        t.seed,
        (t.train_iters * t.global_batch_size, max(1, t.eval_iters) * t.global_batch_size),
        blend_cache_dir=cfg.data.cache_dir or None,
    )
    if cfg.data.eval_data_path:  # evaluate on other data: all of it is validation
        _, valid_ds = build_gpt_datasets(
            cfg.data.eval_data_path, "0,1,0", tokenizer, cfg.data.seq_length, t.seed,
            (0, max(1, t.eval_iters) * t.global_batch_size), blend_cache_dir=cfg.data.cache_dir or None,
        )
    # The same validation batches at every evaluation, so successive losses are comparable.
    valid_iter = MicroBatchIterator(valid_ds, t.micro_batch_size, dp_rank=engine.dp_rank, dp_size=sizes.dp)
    valid_batches = [next(valid_iter) for _ in range(t.eval_iters * num_micro)]
    layout = {"tp": sizes.tp, "pp": sizes.pp, "dp": sizes.dp, "virtual_stages": sizes.virtual_stages}

    run_dir = cfg.checkpoint.save
    writer = MetricsWriter(
        run_dir, log, cfg.logging.wandb_project, cfg.logging.wandb_mode, cfg.logging.run_name, cfg.to_dict()
    )
    summary: dict = {"valid": []}
    if eval_only:
        load_model_only(load_path, engine.parts)
        result = engine.evaluate(valid_batches)
        result["expert_similarity"] = expert_similarity_all_layers(engine)
        report = {
            "checkpoint": str(load_path),
            "step": load_meta.get("step", 0),
            "data_path": cfg.data.eval_data_path or cfg.data.data_path,
            "num_batches": len(valid_batches) * sizes.dp,
            "tokens": len(valid_batches) * sizes.dp * t.micro_batch_size * cfg.data.seq_length,
            **result,
        }
        if log:
            out = Path(cfg.checkpoint.save or load_path) / "eval.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(out, json.dumps(report, indent=1))
            sims = " ".join(f"{v:.3f}" for v in result["expert_similarity"])
            print(f"eval | {load_path} (step {report['step']}) | loss {result['loss']:.4f} | ppl {result['ppl']:.2f}"
                  f" | {report['tokens']} tokens | expert similarity per layer: {sims or '-'}")
            print(f"wrote {out}", flush=True)
        writer.close()
        return {"valid": [result], "eval": report}

    optimizer = split_param_groups_by_mesh(build_optimizer(module, cfg.optimizer, device.type))
    coefficients = build_aux_coefficients(cfg, engine.num_moe_layers, device)
    start_step, consumed = 0, 0
    if load_path is not None:
        if "optimizer" in load_meta.get("contents", []):
            info = load_training_state(load_path, engine.parts, optimizer, engine.num_moe_layers, engine.rank,
                                       device, same_layout=load_meta.get("layout") == layout)
            start_step, consumed = info["step"], info["consumed_samples"]
            saved_samples = load_meta.get("train_samples")
            if log and saved_samples not in (None, t.train_iters * t.global_batch_size):
                print(f"warning: training.train_iters x global_batch_size changed since the checkpoint "
                      f"({saved_samples} -> {t.train_iters * t.global_batch_size} samples): megatron-core "
                      "shuffles over all epochs, so the sample order after the resume point may differ", flush=True)
            saved_aux = load_meta.get("aux_coefficients", {})
            if info["aux_coefficients"] is not None and saved_aux.get("kind") == coefficients.kind:
                coefficients.load_state_dict(saved_aux | {"coefficients": info["aux_coefficients"]}, strict=False)
            if not info["rng_restored"]:  # another layout: a deterministic, step-dependent reseed
                torch.manual_seed(t.seed + engine.dp_rank + 1_000_003 * start_step)
            if log:
                print(f"resumed from {load_path} at step {start_step} ({consumed} samples consumed; "
                      f"RNG {'restored' if info['rng_restored'] else 'reseeded: different layout'})", flush=True)
        else:
            load_model_only(load_path, engine.parts)
            if log:
                print(f"loaded model weights from {load_path}; starting a new run at step 0", flush=True)
    push_coefficients(engine.local_moe, coefficients.coefficients)
    train_iter = MicroBatchIterator(train_ds, t.micro_batch_size, consumed_samples=consumed,
                                    dp_rank=engine.dp_rank, dp_size=sizes.dp)

    def save(step: int) -> None:
        state = training_state(engine.parts, optimizer, step, train_iter.consumed_samples,
                               coefficients.coefficients if engine.num_moe_layers else None, engine.rank, device)
        aux_settings = {k: v for k, v in coefficients.state_dict().items() if not isinstance(v, torch.Tensor)}
        meta = {"config": cfg.to_dict(), "contents": ["model", "optimizer", "train_state"], "layout": layout,
                "tokenizer": tokenizer_id, "train_samples": t.train_iters * t.global_batch_size,
                "consumed_samples": train_iter.consumed_samples, "aux_coefficients": aux_settings}
        finish_pending_save()
        result = save_checkpoint(cfg.checkpoint.save, step, state, meta, keep_last=cfg.checkpoint.keep_last,
                                 async_save=cfg.checkpoint.async_save)
        if cfg.checkpoint.async_save:
            pending_save.append(result)
        elif log:
            print(f"saved checkpoint {result}", flush=True)

    pending_save: list = []

    def finish_pending_save() -> None:
        while pending_save:
            path = pending_save.pop().wait()
            if log:
                print(f"saved checkpoint {path} (asynchronously)", flush=True)
    tokens_per_step = t.global_batch_size * cfg.data.seq_length

    def run_eval(step: int) -> None:
        result = engine.evaluate(valid_batches)
        summary["valid"].append({"step": step, "loss": result["loss"]})
        record = {"step": step, "valid_loss": result["loss"], "valid_ppl": result["ppl"]}
        if engine.num_moe_layers:
            record["expert_similarity"] = [round(v, 6) for v in expert_similarity_all_layers(engine)]
        writer.log(record)
        if log:
            print(
                f"validation | step {step:>6} | loss {result['loss']:.4f} | ppl {result['ppl']:.2f}",
                flush=True,
            )

    if t.eval_interval and start_step == 0:
        run_eval(0)
    start = time.perf_counter()
    interval_start, interval_steps = start, 0
    skip_nonfinite = t.nonfinite_loss == "skip"
    with StopRequest() as stop:
        for step in range(start_step + 1, t.train_iters + 1):
            lr = learning_rate(step - 1, cfg.optimizer, t.train_iters)
            set_learning_rate(optimizer, lr)
            batches = [next(train_iter) for _ in range(num_micro)]
            module.train()
            result = engine.train_step(batches, optimizer, cfg.optimizer.clip_grad, skip_nonfinite=skip_nonfinite)
            # One host sync per step: a non-finite loss must never reach a checkpoint.
            skipped = result.skipped or not bool(torch.isfinite(result.lm_loss + result.aux_loss))
            if skipped:
                report = _nonfinite_report(step, result)
                if not skip_nonfinite:
                    raise FloatingPointError(report + "\n(no checkpoint written for this step; "
                                             "training.nonfinite_loss = 'skip' drops such steps instead)")
                if log:
                    print(report + "\n  -> optimizer step skipped (training.nonfinite_loss = 'skip')", flush=True)
            elif engine.num_moe_layers:
                # Drop rates averaged over micro-batches and dp ranks: the same on every rank.
                drop_rates = torch.stack([s.drop_rate / max(1, s.num_micro_batches) for s in result.layer_stats])
                coefficients.update(drop_rates)
                push_coefficients(engine.local_moe, coefficients.coefficients)
            interval_steps += 1
            if not skipped and (step % cfg.logging.log_interval == 0 or step == t.train_iters):
                now = time.perf_counter()
                lm, aux = result.lm_loss.item(), result.aux_loss.item()
                record = {
                    "step": step,
                    "loss": lm + aux,
                    "lm_loss": lm,
                    "aux_loss": aux,
                    "lr": lr,
                    "grad_norm": result.grad_norm.item(),
                    "tokens_per_sec": interval_steps * tokens_per_step / (now - interval_start),
                    "moe": layer_records(coefficients.coefficients, result.layer_stats),
                }
                writer.log(record)
                if log:
                    print(_progress_line(record), flush=True)
                interval_start, interval_steps = now, 0
            if t.eval_interval and (step % t.eval_interval == 0 or step == t.train_iters):
                run_eval(step)
            stop_now = _stop_requested(stop, device)
            exit_now = bool(t.exit_interval) and step % t.exit_interval == 0 and step < t.train_iters
            interval_save = cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0
            if cfg.checkpoint.save and (interval_save or step == t.train_iters or stop_now or exit_now):
                save(step)
            if stop_now or exit_now:
                summary["stopped_at"] = step
                if log:
                    print(f"stopping at step {step} ({'signal' if stop_now else 'training.exit_interval'})",
                          flush=True)
                break
    finish_pending_save()
    summary["wall_time_s"] = time.perf_counter() - start
    writer.close()
    if summary["valid"] and log:
        first, last = summary["valid"][0]["loss"], summary["valid"][-1]["loss"]
        wall = summary["wall_time_s"]
        steps = summary.get("stopped_at", t.train_iters) - start_step
        print(f"done: {steps} steps in {wall:.1f}s; validation loss {first:.4f} -> {last:.4f}")
    return summary
