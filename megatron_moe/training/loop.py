"""Pretraining loop: gradient accumulation up to the global batch, AdamW, aux losses, validation, metrics."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megatron_moe.config import Config, check_batch_sizes
from megatron_moe.data.datasets import MicroBatchIterator, build_gpt_datasets
from megatron_moe.data.tokenizer import SentencePieceTokenizer
from megatron_moe.model.moe import MoELayer, moe_layers
from megatron_moe.model.transformer import build_model, count_parameters, padded_vocab_size
from megatron_moe.routing.adaptive import AdaptiveAuxLossCoefficients, ConstantAuxLossCoefficients
from megatron_moe.training.metrics import MetricsWriter
from megatron_moe.training.optim import build_optimizer, learning_rate, set_learning_rate


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy (nats) over unmasked positions. logits [B,S,V], labels/mask [B,S]."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
    mask = loss_mask.flatten().to(ce.dtype)
    return (ce * mask).sum() / mask.sum().clamp_min(1.0)


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


def push_coefficients(layers: list[MoELayer], coefficients: torch.Tensor) -> None:
    for layer, coeff in zip(layers, coefficients, strict=True):
        layer.aux_coeff.copy_(coeff)


@dataclass
class StepResult:
    """Device tensors of one optimizer step (read on the host only when logging)."""

    lm_loss: torch.Tensor
    aux_loss: torch.Tensor
    grad_norm: torch.Tensor
    layer_stats: list  # MoEStats per MoE layer


def train_step(model: nn.Module, batches: list[dict], optimizer, clip_grad: float, autocast) -> StepResult:
    """Forward/backward over ``batches`` (the micro-batches of one global batch), then an optimizer step."""
    layers = moe_layers(model)
    num_micro = len(batches)
    for layer in layers:
        layer.aux_loss_scale = 1.0 / num_micro
    device = next(model.parameters()).device
    total_lm = torch.zeros((), device=device)
    for batch in batches:
        with autocast():
            logits = model(batch["tokens"].to(device))
        loss = lm_loss(logits, batch["labels"].to(device), batch["loss_mask"].to(device))
        (loss / num_micro).backward()
        total_lm += loss.detach()
    if clip_grad > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    else:
        grad_norm = torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])
        )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    stats = [layer.reset_stats() for layer in layers]
    aux = sum((s.aux_loss / s.num_micro_batches for s in stats), torch.zeros((), device=device))
    return StepResult(total_lm / num_micro, aux, grad_norm.detach(), stats)


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[dict], autocast) -> dict:
    """Mean LM loss and perplexity over ``batches``; per-layer expert load fractions."""
    was_training = model.training
    model.eval()
    layers = moe_layers(model)
    for layer in layers:
        layer.reset_stats()
    device = next(model.parameters()).device
    total = torch.zeros((), device=device)
    for batch in batches:
        with autocast():
            logits = model(batch["tokens"].to(device))
        total += lm_loss(logits, batch["labels"].to(device), batch["loss_mask"].to(device))
    loss = (total / max(1, len(batches))).item()
    loads = [_load_fractions(layer.reset_stats().counts) for layer in layers]
    model.train(was_training)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "expert_load": loads}


def _load_fractions(counts: torch.Tensor) -> list[float]:
    return (counts / counts.sum().clamp_min(1.0)).tolist()


def layer_records(layers: list[MoELayer], stats: list) -> list[dict]:
    """Per-layer metrics entries (host values) for metrics.jsonl."""
    records = []
    for layer_idx, (layer, s) in enumerate(zip(layers, stats, strict=True)):
        load = _load_fractions(s.counts)
        n = max(1, s.num_micro_batches)
        records.append(
            {
                "layer": layer_idx,
                "aux_loss": (s.aux_loss / n).item(),
                "aux_coeff": layer.aux_coeff.item(),
                "drop_rate": (s.drop_rate / n).item(),
                "entropy": (s.entropy / n).item(),
                "load": [round(v, 5) for v in load],
                "load_max_over_mean": max(load) * len(load) if load else 0.0,
            }
        )
    return records


def _progress_line(rec: dict) -> str:
    line = (
        f"step {rec['step']:>6} | loss {rec['loss']:.4f} | lm {rec['lm_loss']:.4f} | aux {rec['aux_loss']:.4f}"
        f" | lr {rec['lr']:.2e} | gnorm {rec['grad_norm']:.3f} | {rec['tokens_per_sec']:.0f} tok/s"
    )
    if rec["moe"]:
        moe = rec["moe"]
        drop = sum(r["drop_rate"] for r in moe) / len(moe)
        spread = max(r["load_max_over_mean"] for r in moe)
        coeff = sum(r["aux_coeff"] for r in moe) / len(moe)
        line += f" | drop {drop:.3f} | max/mean load {spread:.2f} | alpha {coeff:.2e}"
    return line


def train(cfg: Config, eval_only: bool = False) -> dict:
    """Run pretraining (single process) as configured; returns a summary with first/last validation loss."""
    if cfg.training.num_threads:
        torch.set_num_threads(cfg.training.num_threads)
    device = resolve_device(cfg.training.device)
    torch.manual_seed(cfg.training.seed)
    if not cfg.data.tokenizer_model:
        raise ValueError("data.tokenizer_model (--tokenizer-model) is required")
    if not cfg.data.data_path:
        raise ValueError("data.data_path (--data-path) is required")
    tokenizer = SentencePieceTokenizer(cfg.data.tokenizer_model)
    resolve_vocab_size(cfg, tokenizer.vocab_size)
    num_micro = check_batch_sizes(cfg, data_parallel_size=1)
    t = cfg.training

    model = build_model(cfg, device)
    params = count_parameters(model)
    print(f"model: {params['total'] / 1e6:.2f}M parameters, {params['active'] / 1e6:.2f}M active per token")

    train_ds, valid_ds = build_gpt_datasets(
        cfg.data.data_path,
        cfg.data.split,
        tokenizer,
        cfg.data.seq_length,
        t.seed,
        (t.train_iters * t.global_batch_size, max(1, t.eval_iters) * t.global_batch_size),
        blend_cache_dir=cfg.data.cache_dir or None,
    )
    valid_iter = MicroBatchIterator(valid_ds, t.micro_batch_size)
    valid_batches = [next(valid_iter) for _ in range(t.eval_iters * num_micro)]
    use_bf16 = t.bf16
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext

    run_dir = cfg.checkpoint.save
    writer = MetricsWriter(run_dir, True, cfg.logging.wandb_project, cfg.logging.wandb_mode,
                           cfg.logging.run_name, cfg.to_dict())
    summary: dict = {"valid": []}
    if eval_only:
        result = evaluate(model, valid_batches, autocast)
        print(f"eval | loss {result['loss']:.4f} | ppl {result['ppl']:.2f}")
        writer.close()
        return {"valid": [result]}

    optimizer = build_optimizer(model, cfg.optimizer, device.type)
    layers = moe_layers(model)
    coefficients = build_aux_coefficients(cfg, len(layers), device)
    push_coefficients(layers, coefficients.coefficients)
    train_iter = MicroBatchIterator(train_ds, t.micro_batch_size)
    tokens_per_step = t.global_batch_size * cfg.data.seq_length

    def run_eval(step: int) -> None:
        result = evaluate(model, valid_batches, autocast)
        summary["valid"].append({"step": step, "loss": result["loss"]})
        writer.log({"step": step, "valid_loss": result["loss"], "valid_ppl": result["ppl"]})
        print(f"validation | step {step:>6} | loss {result['loss']:.4f} | ppl {result['ppl']:.2f}")

    if t.eval_interval:
        run_eval(0)
    start = time.perf_counter()
    interval_start, interval_steps = start, 0
    for step in range(1, t.train_iters + 1):
        lr = learning_rate(step - 1, cfg.optimizer, t.train_iters)
        set_learning_rate(optimizer, lr)
        batches = [next(train_iter) for _ in range(num_micro)]
        model.train()
        result = train_step(model, batches, optimizer, cfg.optimizer.clip_grad, autocast)
        if layers:
            drop_rates = torch.stack([s.drop_rate / s.num_micro_batches for s in result.layer_stats])
            coefficients.update(drop_rates)
            push_coefficients(layers, coefficients.coefficients)
        interval_steps += 1
        if step % cfg.logging.log_interval == 0 or step == t.train_iters:
            now = time.perf_counter()
            lm, aux = result.lm_loss.item(), result.aux_loss.item()
            if not math.isfinite(lm + aux):
                raise FloatingPointError(f"non-finite loss at step {step}: lm_loss={lm}, aux_loss={aux}")
            record = {
                "step": step,
                "loss": lm + aux,
                "lm_loss": lm,
                "aux_loss": aux,
                "lr": lr,
                "grad_norm": result.grad_norm.item(),
                "tokens_per_sec": interval_steps * tokens_per_step / (now - interval_start),
                "moe": layer_records(layers, result.layer_stats),
            }
            writer.log(record)
            print(_progress_line(record), flush=True)
            interval_start, interval_steps = now, 0
        if t.eval_interval and (step % t.eval_interval == 0 or step == t.train_iters):
            run_eval(step)
    summary["wall_time_s"] = time.perf_counter() - start
    writer.close()
    if summary["valid"]:
        first, last = summary["valid"][0]["loss"], summary["valid"][-1]["loss"]
        wall = summary["wall_time_s"]
        print(f"done: {t.train_iters} steps in {wall:.1f}s; validation loss {first:.4f} -> {last:.4f}")
    return summary
