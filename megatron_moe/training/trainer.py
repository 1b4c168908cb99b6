"""Pretraining: :func:`train` builds a :class:`Trainer` from the configuration and runs it.

The trainer wires components that each have one job:
- :class:`~megatron_moe.parallel.engine.ParallelEngine`: mesh, this rank's model parts, one
  optimizer step (forward/backward of every micro-batch, gradient reductions, clipping);
- :class:`~megatron_moe.training.checkpointing.CheckpointManager`: resume, save, keep-last;
- :class:`~megatron_moe.training.evaluator.Evaluator`: validation loss and expert statistics;
- :class:`~megatron_moe.training.metrics.MetricsWriter`: metrics.jsonl, wandb, TensorBoard;
- the aux-loss coefficients (:mod:`megatron_moe.routing.adaptive`, docs/routing.md §5).
The step loop (:meth:`Trainer.fit`) only sequences them. docs/architecture.md follows one step
through the modules.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_moe.config import Config, ConfigError, adopt_checkpoint_architecture
from megatron_moe.data.datasets import MicroBatchIterator, build_gpt_datasets
from megatron_moe.data.tokenizer import load_tokenizer
from megatron_moe.parallel.engine import ParallelEngine, StepResult, init_distributed_from_env
from megatron_moe.parallel.mesh import export_launch_environment
from megatron_moe.routing.adaptive import AdaptiveAuxLossCoefficients, ConstantAuxLossCoefficients
from megatron_moe.training.checkpoint import CheckpointError, make_directory, write_text_atomic
from megatron_moe.training.checkpointing import (
    CheckpointManager,
    ResumePoint,
    check_tokenizer,
    open_checkpoint,
    refuse_megatron_save_dir,
    resolve_vocab_size,
    tokenizer_identity,
)
from megatron_moe.training.evaluator import Evaluator
from megatron_moe.training.metrics import (
    MetricsWriter,
    nonfinite_report,
    progress_line,
    step_record,
    validation_record,
)
from megatron_moe.training.optim import build_optimizer, set_learning_rate
from megatron_moe.training.signals import StopRequest


def resolve_device(name: str) -> torch.device:
    """``training.device`` as a torch device (``auto``: CUDA when present; ``cuda:LOCAL_RANK`` under torchrun)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device = 'cuda' but no CUDA device is available")
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


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


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any rank (one tiny all-reduce)."""
    value = torch.tensor(1.0 if flag else 0.0, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


@dataclass
class _Throughput:
    """Tokens per second over the steps since the last log line."""

    tokens_per_step: int
    start: float = 0.0
    steps: int = 0

    def __post_init__(self):
        self.start = time.perf_counter()

    def tick(self) -> None:
        self.steps += 1

    def pop(self) -> float:
        now = time.perf_counter()
        rate = self.steps * self.tokens_per_step / (now - self.start)
        self.start, self.steps = now, 0
        return rate


def architecture_summary(cfg: Config) -> str:
    """One line naming what the model is, including what Megatron-LM's defaults would make otherwise
    (GeLU, learned positions, LayerNorm with biases, tied embeddings) when a command line leaves them out."""
    m, e = cfg.model, cfg.moe
    biases = [name for name, on in (("qkv", m.add_qkv_bias), ("linear", m.add_bias_linear), ("lm-head", m.lm_head_bias))
              if on]
    parts = [f"{m.normalization}{' (1p)' if m.apply_layernorm_1p else ''}", "SwiGLU",
             f"RoPE theta {m.rope_theta:g}" + ("" if m.rope_scaling == "none" else f" + {m.rope_scaling} scaling"),
             f"{'biases: ' + ', '.join(biases) if biases else 'no biases'}",
             *([("latent norms" if m.multi_latent_attention else "QK norm")] if m.qk_layernorm else []),
             "tied embeddings" if m.tie_embeddings else "untied embeddings", _attention_summary(m)]
    if e.num_experts:
        every = "every layer" if e.layer_freq == 1 else f"every {e.layer_freq} layers"
        start = f" from layer {e.first_k_dense}" if e.first_k_dense else ""  # 0-based, as is_moe_layer
        scores = ", sigmoid scores" if e.score_function == "sigmoid" else ""
        scores += ", expert bias" if e.expert_bias else ""
        parts.append(f"{e.num_experts} experts top-{e.topk} ({e.router} router{scores}) {every}{start}")
        if e.shared_expert_ffn_hidden_size:
            gate = " (sigmoid-gated)" if e.shared_expert_gate else ""
            parts.append(f"a shared expert of {e.shared_expert_ffn_hidden_size}{gate}")
    if m.mtp_num_layers:
        parts.append(f"multi-token prediction of depth {m.mtp_num_layers}")
    return ", ".join(parts)


def _attention_summary(m) -> str:
    if not m.multi_latent_attention:
        partial = f" ({m.rotary_dim} rotary)" if m.rotary_dim != m.head_dim else ""
        return f"{m.num_attention_heads} heads / {m.num_kv_heads} KV heads of {m.head_dim}{partial}"
    query = f"q latent {m.q_lora_rank}, " if m.q_lora_rank else ""
    return (f"latent attention: {m.num_attention_heads} heads of {m.qk_head_dim} + {m.qk_pos_emb_head_dim} rotary "
            f"(values {m.v_head_dim}), {query}kv latent {m.kv_lora_rank}")


class Trainer:
    """One run's components, built by :meth:`build`; :meth:`fit` trains, :meth:`evaluate_checkpoint` evaluates.

    Every rank builds and runs a Trainer; only global rank 0 prints and writes metrics.
    """

    def __init__(self, cfg: Config, device: torch.device, eval_only: bool = False, given: set[str] | None = None):
        torch.manual_seed(cfg.training.seed)
        if not cfg.data.tokenizer_model:
            raise ConfigError("data.tokenizer_model (--tokenizer-model) is required")
        if not cfg.data.data_path and not cfg.data.train_data_path:
            raise ConfigError("data.data_path (--data-path) or data.train_data_path (--train-data-path) is required")
        self.loaded = open_checkpoint(cfg.checkpoint.load, start_if_absent=not eval_only)
        if given is not None:
            loaded = self.loaded
            cfg = adopt_checkpoint_architecture(cfg, loaded.saved_config if loaded else {}, given,
                                                f"checkpoint {loaded.path}" if loaded else "--load")
        if eval_only and self.loaded is None:
            raise ConfigError("--eval-only needs a checkpoint to evaluate: pass --load DIR")
        if eval_only and not cfg.training.eval_iters:
            raise ConfigError("--eval-only with training.eval_iters = 0 (--eval-iters) evaluates nothing")
        tokenizer = load_tokenizer(cfg.data.tokenizer_model, cfg.data.tokenizer_type)  # "auto": told from the file
        tokenizer_id = tokenizer_identity(tokenizer.vocab_size, tokenizer.unique_identifiers["model_sha256"])
        check_tokenizer(self.loaded, tokenizer_id, cfg)
        self.cfg = cfg = resolve_vocab_size(cfg, tokenizer.vocab_size, self.loaded)
        self.device = device
        self.engine = engine = ParallelEngine(cfg, device=device)  # validates the layout before any work
        self.log = engine.is_logging_rank
        self.module = engine.build_model(meta_init=cfg.training.meta_init)
        self._print_model_summary()
        self._build_data(tokenizer)
        self.checkpoints = CheckpointManager(cfg, engine, tokenizer_id, self.log)
        if cfg.checkpoint.save:
            refuse_megatron_save_dir(cfg.checkpoint.save)  # also for --eval-only (Megatron's --save X --load X)
            if self.log:  # metrics.jsonl goes there from the start
                make_directory(cfg.checkpoint.save, "--save")
        self.writer = MetricsWriter(cfg.checkpoint.save, self.log, cfg.logging.wandb_project, cfg.logging.wandb_mode,
                                    cfg.logging.run_name, cfg.to_dict(), cfg.logging.tensorboard_dir,
                                    cfg.logging.wandb_save_dir, cfg.logging.wandb_entity)

    def _print_model_summary(self) -> None:
        if not self.log:
            return
        params, s = self.engine.param_counts, self.engine.sizes
        print(f"model: {params['total'] / 1e6:.2f}M parameters, {params['active'] / 1e6:.2f}M active per token")
        print(f"architecture: {architecture_summary(self.cfg)}")
        print(f"layout: tp={s.tp} pp={s.pp} dp={s.dp} ({s.world} ranks), {s.num_microbatches} micro-batches "
              f"per rank and step, bf16={self.cfg.training.bf16}", flush=True)

    def _build_data(self, tokenizer) -> None:
        t, d = self.cfg.training, self.cfg.data
        eval_samples = max(1, t.eval_iters) * t.global_batch_size
        common = {"blend_cache_dir": d.cache_dir or None, "eod_mask_loss": d.eod_mask_loss}
        if d.train_data_path:  # Megatron-LM's per-split paths: all of it trains
            self.train_ds, valid_ds = build_gpt_datasets(d.train_data_path, "1,0,0", tokenizer, d.seq_length, t.seed,
                                                         (t.run_samples, 0), **common)
        else:
            self.train_ds, valid_ds = build_gpt_datasets(
                d.data_path, d.split, tokenizer, d.seq_length, t.seed, (t.run_samples, eval_samples), **common)
        if d.eval_data_path:  # evaluate on other data: all of it is validation
            _, valid_ds = build_gpt_datasets(d.eval_data_path, "0,1,0", tokenizer, d.seq_length, t.seed,
                                             (0, eval_samples), **common)
        num_micro = self.engine.sizes.num_microbatches
        self.evaluator = Evaluator(self.engine, valid_ds, t.eval_iters * num_micro, t.micro_batch_size)

    # ------------------------------------------------------------------ evaluation only
    def evaluate_checkpoint(self) -> dict:
        """Evaluate the loaded checkpoint; rank 0 prints the results and writes eval.json
        (:meth:`_write_eval_report`)."""
        loaded, cfg = self.loaded, self.cfg
        self.checkpoints.load_model(loaded)
        result = self.evaluator.evaluate()
        report = {
            "checkpoint": str(loaded.path),
            "step": loaded.meta.get("step", 0),
            "data_path": cfg.data.eval_data_path or cfg.data.data_path,
            "num_batches": len(self.evaluator.batches) * self.engine.sizes.dp,
            "tokens": self.evaluator.tokens,
            **result,
        }
        if self.log:
            sims = " ".join(f"{v:.3f}" for v in result["expert_similarity"])
            print(f"eval | {loaded.path} (step {report['step']}) | loss {result['loss']:.4f} | ppl {result['ppl']:.2f}"
                  f" | {report['tokens']} tokens | expert similarity per layer: {sims or '-'}", flush=True)
        self.writer.close()
        if self.log:
            self._write_eval_report(report)
        return {"valid": [result], "eval": report}

    def _write_eval_report(self, report: dict) -> None:
        """eval.json into ``--save``, else beside the weights of one of our checkpoints. A Megatron-LM
        checkpoint's directory is never written into (its ``iter_*`` layout is Megatron's): without
        ``--save`` the results are printed only. Written after they are printed, so a directory that
        cannot be written loses nothing but the file, and the run still fails naming it."""
        loaded = self.loaded
        if not self.cfg.checkpoint.save and loaded.megatron is not None:
            print(f"eval.json not written: {loaded.path} is a Megatron-LM checkpoint, whose directory is left "
                  "as it is; pass --save DIR to keep the report", flush=True)
            return
        out = Path(self.cfg.checkpoint.save or loaded.path) / "eval.json"
        try:
            write_text_atomic(out, json.dumps(report, indent=1))
        except OSError as e:
            raise CheckpointError(f"cannot write the evaluation report {out} ({e.strerror or e}); the results are "
                                  "printed above; pass --save DIR (a writable directory) to keep eval.json") from None
        print(f"wrote {out}", flush=True)

    # ------------------------------------------------------------------ training
    def fit(self) -> dict:
        """Train from the checkpoint's step (or 0) to ``training.train_iters``; returns a summary.

        The save directory is this run's while it trains (:meth:`CheckpointManager.claim`)."""
        error = None
        try:
            self.checkpoints.claim(self.loaded)
        except CheckpointError as e:
            error = e
        if _any_rank(error is not None, self.device):  # every rank stops, not only the one that failed
            raise error or CheckpointError(f"--save {self.cfg.checkpoint.save}: rank 0 could not claim it")
        try:
            return self._train()
        finally:
            self.checkpoints.release()

    def _train(self) -> dict:
        cfg, t, engine = self.cfg, self.cfg.training, self.engine
        optimizer = build_optimizer(self.module, cfg.optimizer)
        coefficients = build_aux_coefficients(cfg, engine.num_moe_layers, self.device)
        resume = self.checkpoints.restore(self.loaded, optimizer, coefficients) if self.loaded else ResumePoint()
        if resume.step > t.train_iters:
            raise ConfigError(f"checkpoint {self.loaded.path} is at step {resume.step}, beyond training.train_iters = "
                             f"{t.train_iters} (--train-iters): nothing to train; raise --train-iters to continue")
        if resume.step == t.train_iters and self.log:
            print(f"checkpoint {self.loaded.path} is at step {resume.step} = training.train_iters: "
                  "training is complete, nothing to do", flush=True)
        engine.moe.set_coefficients(coefficients.coefficients)
        train_iter = MicroBatchIterator(self.train_ds, t.micro_batch_size, consumed_samples=resume.consumed_samples,
                                        dp_rank=engine.dp_rank, dp_size=engine.sizes.dp)
        self.summary: dict = {"valid": []}
        validate_every = t.eval_interval if t.eval_iters else 0  # eval_iters = 0: no validation (as Megatron-LM)
        if validate_every and resume.step == 0:
            self._validate(0)
        self._start = start = time.perf_counter()
        throughput = _Throughput(t.global_batch_size * cfg.data.seq_length)
        with StopRequest() as stop:
            for step in range(resume.step + 1, t.train_iters + 1):
                lr = set_learning_rate(optimizer, step - 1, cfg)
                self.module.train()
                result = engine.train_step([next(train_iter) for _ in range(engine.sizes.num_microbatches)],
                                           optimizer, cfg.optimizer.clip_grad)
                throughput.tick()
                applied = self._check_finite(step, result)
                if applied and engine.num_moe_layers:  # drop rates: means over micro-batches and dp ranks
                    coefficients.update(torch.stack([s.mean("drop_rate") for s in result.layer_stats]))
                    engine.moe.set_coefficients(coefficients.coefficients)
                if applied and (step % cfg.logging.log_interval == 0 or step == t.train_iters):
                    record = step_record(step, lr, result, coefficients.coefficients, throughput.pop(),
                                         cfg.training.mtp_loss_scaling_factor)
                    self.writer.log(record, progress_line(record) if self.log else None)
                if validate_every and (step % validate_every == 0 or step == t.train_iters):
                    self._validate(step)
                if self._save_and_maybe_stop(step, stop, optimizer, train_iter.consumed_samples, coefficients):
                    break
        self.checkpoints.finish()
        self.summary["wall_time_s"] = time.perf_counter() - start
        self.writer.close()
        self._print_done(resume.step)
        return self.summary

    def _check_finite(self, step: int, result: StepResult) -> bool:
        """Whether the step's update was applied. The engine never applies a non-finite loss or gradient;
        then the run stops (``training.nonfinite_loss = 'stop'``, no checkpoint of it) or goes on
        ('skip'). One host sync per step."""
        if bool(result.finite):
            return True
        report = nonfinite_report(step, result)
        if self.cfg.training.nonfinite_loss == "stop":
            raise FloatingPointError(report + "\n(no checkpoint written for this step; "
                                     "training.nonfinite_loss = 'skip' drops such steps instead)")
        if self.log:
            print(report + "\n  -> optimizer step skipped (training.nonfinite_loss = 'skip')", flush=True)
        return False

    def _validate(self, step: int) -> None:
        result = self.evaluator.evaluate()
        self.summary["valid"].append({"step": step, "loss": result["loss"]})
        console = f"validation | step {step:>6} | loss {result['loss']:.4f} | ppl {result['ppl']:.2f}"
        self.writer.log(validation_record(step, result, self.engine.num_moe_layers > 0), console if self.log else None)

    def _save_and_maybe_stop(self, step: int, stop: StopRequest, optimizer, consumed: int, coefficients) -> bool:
        """Checkpoint when due (interval, last step, a signal, ``exit_interval``, ``exit_duration_in_mins``);
        True to stop after it."""
        t, c = self.cfg.training, self.cfg.checkpoint
        by_signal = _any_rank(stop.requested, self.device)
        by_exit_interval = bool(t.exit_interval) and step % t.exit_interval == 0 and step < t.train_iters
        if t.exit_duration_in_mins and step < t.train_iters:  # every rank decides alike (clocks differ)
            elapsed = time.perf_counter() - self._start
            by_exit_interval |= _any_rank(elapsed >= 60 * t.exit_duration_in_mins, self.device)
        due = (c.save_interval and step % c.save_interval == 0) or step == t.train_iters
        if c.save and (due or by_signal or by_exit_interval):
            self.checkpoints.save(step, optimizer, consumed, coefficients)
        if by_signal or by_exit_interval:
            self.summary["stopped_at"] = step
            if self.log:
                reason = "signal" if by_signal else "training.exit_interval / exit_duration_in_mins"
                print(f"stopping at step {step} ({reason})", flush=True)
        return by_signal or by_exit_interval

    def _print_done(self, start_step: int) -> None:
        valid = self.summary["valid"]
        if valid and self.log:
            steps = self.summary.get("stopped_at", self.cfg.training.train_iters) - start_step
            print(f"done: {steps} steps in {self.summary['wall_time_s']:.1f}s; "
                  f"validation loss {valid[0]['loss']:.4f} -> {valid[-1]['loss']:.4f}")


def train(cfg: Config, eval_only: bool = False, given: set[str] | None = None) -> dict:
    """Run pretraining (or, with ``eval_only``, evaluate ``--load``) as configured, single process or
    under torchrun (any tp x pp x dp layout). Returns a summary with the validation losses (identical
    on every rank); ``cfg`` itself is not changed.

    ``given``: the settings the user set (``parse_args``' ``extras["given"]``); the architecture
    settings not among them are taken from the ``--load`` checkpoint
    (:func:`~megatron_moe.config.adopt_checkpoint_architecture`). None: ``cfg`` is used as it is.
    """
    if cfg.training.num_threads:
        torch.set_num_threads(cfg.training.num_threads)
    export_launch_environment()  # slurm's one task per GPU becomes torchrun's variables; bad launches refused
    device = resolve_device(cfg.training.device)
    owns_group = not dist.is_initialized() and init_distributed_from_env(device.type, cfg.training.bf16)
    try:
        trainer = Trainer(cfg, device, eval_only, given)
        return trainer.evaluate_checkpoint() if eval_only else trainer.fit()
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()
