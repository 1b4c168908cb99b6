"""The distributed engine the training loop drives: mesh, parallelized model parts, train / eval steps.

One code path for every layout; a single process is the degenerate case tp = pp = dp = 1 (no
process group needed, every collective is skipped). Per optimizer step on each rank:

1. the rank's ``num_microbatches = global / (micro x dp)`` micro-batches run forward/backward,
   through the pipelining schedule when pp > 1, else one after the other;
2. gradients: averaged over dp by FSDP2's ``replicate`` / ``fully_shard`` during backward, one
   bucket per block (:mod:`.data`); sequence-parallel partial sums made whole
   (:func:`.data.materialize_partial_grads`); the MoE layers need nothing more under TP
   (:class:`.tensor.MoETensorParallel` keeps their router gradients whole);
3. grad norm over the whole model (every element once; with ``logging.log_num_zeros_in_grad`` the
   gradient's zeros counted in the same all-reduce), clipping, optimizer step; with
   ``logging.log_params_norm`` the parameter norm after the step (one more all-reduce);
4. LM loss (mean over the global batch's micro-batches, as the single process) and per-layer MoE
   statistics (summed over micro-batches and dp ranks) are all-reduced so that EVERY rank sees the
   same values: the adaptive aux-loss coefficients are updated identically everywhere.

Precision: fp32 parameters, gradients and optimizer state; with ``training.bf16`` the parameters the
optimizer owns stay fp32 (master weights) and FSDP2's mixed-precision policy computes with bf16
copies and reduces gradients in fp32 (:mod:`.data`; needs a process group, 1 rank is fine).

Initialisation: the full model is built on CPU from the seed on every rank, then cut into stages
and sharded, so every layout starts from exactly the single-process weights (small and medium
models). ``build_model(meta_init=True)`` constructs on the meta device and allocates only this
rank's stages (each still unsharded over TP before sharding).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from megatron_moe.config import Config, ConfigError
from megatron_moe.data.errors import DataError
from megatron_moe.model.moe import MoELayer, MoELayerSet, MoEStats
from megatron_moe.model.transformer import MoETransformer, build_model, count_parameters, materialize
from megatron_moe.parallel.data import (
    apply_data_parallel,
    clip_gradients,
    global_grad_norm,
    global_params_norm,
    materialize_partial_grads,
    set_micro_batch,
)
from megatron_moe.parallel.loss import global_token_normalizer, lm_loss_from_target, loss_target, mtp_target
from megatron_moe.parallel.mesh import ParallelSizes, build_mesh, check_grouped_gemm_shapes, parallel_sizes
from megatron_moe.parallel.pipeline import (
    Pipeline,
    SharedEmbedding,
    build_stage_module,
    embedding_group,
    last_stage_needs_embedding,
    pipeline_layers,
    stage_indices,
)
from megatron_moe.parallel.tensor import apply_tensor_parallel


@dataclass
class StepResult:
    """Device tensors of one optimizer step, identical on every rank (read on the host only when logging)."""

    lm_loss: torch.Tensor
    aux_loss: torch.Tensor
    grad_norm: torch.Tensor
    layer_stats: list  # MoEStats per MoE layer of the whole model, summed over micro-batches and dp
    finite: torch.Tensor  # bool: losses and gradient norm finite, so the update was applied
    # logging.log_params_norm: L2 norm of all parameters after the step (Megatron-LM's params-norm)
    params_norm: torch.Tensor | None = None
    # logging.log_num_zeros_in_grad: gradient elements exactly 0, after reduction and before clipping (num-zeros)
    num_zeros_in_grad: torch.Tensor | None = None
    # model.mtp_num_layers: the mean over depths of the multi-token prediction cross entropies (unscaled)
    mtp_loss: torch.Tensor | None = None


def step_if_finite(optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> None:
    """``optimizer.step()`` that leaves parameters and optimizer state unchanged unless ``finite``.

    torch's fused Adam/AdamW skip on the device through ``found_inf`` (as ``GradScaler`` drives them):
    no host synchronisation. Other optimizers are stepped after a host check.
    """
    if getattr(optimizer, "defaults", {}).get("fused"):
        optimizer.grad_scale, optimizer.found_inf = None, (~finite).to(torch.float32)
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    elif bool(finite):
        optimizer.step()


def init_distributed_from_env(device_type: str, single_process: bool = False) -> bool:
    """Initialise the default process group from torchrun's environment (WORLD_SIZE > 1); True if initialised.

    NCCL on CUDA (and ``cuda:LOCAL_RANK`` becomes the current device), gloo on CPU. Without torchrun,
    ``single_process`` makes a 1-rank group (an in-memory store, no network) for the features that
    work through torch.distributed even alone (bf16 master weights).
    """
    if dist.is_initialized():
        return True
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not single_process:
        return False
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # cpu:gloo beside NCCL: DCP's asynchronous checkpoint save needs a CPU backend.
    backend = "cuda:nccl,cpu:gloo" if device_type == "cuda" else "gloo"
    if world <= 1:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    else:
        dist.init_process_group(backend)
    return True


def seed_runtime_rng(seed: int, dp_rank: int) -> None:
    """Seed the default generators for run-time sampling (SparseMixer, input jitter).

    TP and PP ranks of one data-parallel replica share the seed (TP ranks route the same tokens and
    so draw the same samples); dp replicas differ. dp rank 0 uses ``seed`` itself (= single process).
    """
    torch.manual_seed(seed + dp_rank)


class ParallelEngine:
    """Mesh + this rank's model parts + train/eval steps. See the module docstring.

    Args:
        cfg: the run configuration (``model.vocab_size`` resolved); the layout is ``cfg.parallel``.
        device: this rank's device (default CPU).
        mesh: an existing (pp, dp, tp) mesh of the right shape to reuse (default: built here).

    Raises ConfigError before any communication if the layout does not fit.
    """

    def __init__(
        self,
        cfg: Config,
        device: torch.device | None = None,
        mesh: DeviceMesh | None = None,
    ):
        self.cfg = cfg
        self._num_micro = 1
        self._token_normalizer: torch.Tensor | None = None  # per-token loss: global_token_normalizer
        # per-token loss with multi-token prediction: main / depth k token counts, so that the logged mtp_loss is
        # each depth's loss per token of its own (its gradient stays megatron-core's: per main token)
        self._mtp_log_scales: torch.Tensor | None = None
        self._mtp_total: torch.Tensor | None = None  # model.mtp_num_layers: the step's multi-token prediction loss
        self.param_counts: dict[str, int] = {}
        world = dist.get_world_size() if dist.is_initialized() else 1
        cfg.parallel.validate()
        self.sizes: ParallelSizes = parallel_sizes(cfg, world)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        check_grouped_gemm_shapes(cfg, self.sizes.tp, self.device.type)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        if mesh is not None and tuple(mesh.shape) != (self.sizes.pp, self.sizes.dp, self.sizes.tp):
            raise ConfigError(f"mesh of shape {tuple(mesh.shape)} does not match the layout {self.sizes}")
        if mesh is None and dist.is_initialized():
            mesh = build_mesh(self.sizes, self.device.type)
        self.mesh = mesh
        s = self.sizes
        if self.mesh is None and (s.dp > 1 or cfg.training.bf16):
            raise ConfigError("training.bf16 (fp32 master weights, bf16 compute through FSDP2's mixed precision) "
                              "needs an initialised process group; a 1-rank group is enough")

        def group(name: str, size: int):
            return self.mesh[name].get_group() if self.mesh is not None and size > 1 else None

        self.pp_group, self.dp_group, self.tp_group = group("pp", s.pp), group("dp", s.dp), group("tp", s.tp)
        self.pp_rank = self.mesh["pp"].get_local_rank() if self.mesh is not None else 0
        self.dp_rank = self.mesh["dp"].get_local_rank() if self.mesh is not None else 0
        self.parts: list[nn.Module] = []
        self.module = nn.ModuleList()
        self.pipeline: Pipeline | None = None
        self.shared_embedding: SharedEmbedding | None = None  # pp > 1 with a tied output or multi-token prediction
        self._lm_total: torch.Tensor | None = None  # the step's LM loss on a last pipeline stage
        self._counting = True  # False while a pipeline schedule infers shapes on placeholder inputs
        self.moe = MoELayerSet()

    @property
    def num_moe_layers(self) -> int:
        """MoE layers in the whole model (this rank holds those of its pipeline stages)."""
        return self.moe.num_total

    @property
    def is_logging_rank(self) -> bool:
        """Only global rank 0 prints progress and writes metrics (it sees the reduced values)."""
        return self.rank == 0

    # ------------------------------------------------------------------ model
    def build_model(
        self,
        seed: int | None = None,
        model: MoETransformer | None = None,
        seed_rng: bool = True,
        meta_init: bool = False,
    ):
        """Keep and parallelize this rank's parts of the full model; returns them as an ``nn.ModuleList``.

        The full model is ``model`` if given (e.g. loaded or upcycled weights, identical on every
        rank; with tp = pp = 1 it is used in place, not copied), else built on CPU from ``seed``
        (default training.seed): every layout then starts from the single-process weights.
        ``meta_init`` (big models): the full model is only constructed on the meta device and each
        stage is allocated on ``device`` and initialised from ``seed + stage index`` (same scheme,
        different random stream than the single process; identical on the TP/dp ranks of a stage).
        ``seed_rng`` re-seeds the run-time generators (:func:`seed_runtime_rng`).
        Give the returned module to the optimizer.
        """
        cfg, s, o = self.cfg, self.sizes, self.cfg.parallel
        seed = cfg.training.seed if seed is None else seed
        if model is not None:
            full = model
        elif meta_init:
            with torch.device("meta"):
                full = MoETransformer(cfg)
        else:
            full = build_model(cfg, "cpu", seed)
        self.param_counts = count_parameters(full)
        moe_names = [name for name, block in full.layers.items() if isinstance(block.feed_forward, MoELayer)]
        moe_index = {name: i for i, name in enumerate(moe_names)}
        num_stages = s.pp * s.virtual_stages
        if num_stages == 1:
            parts, indices = [full], [0]
        else:
            split = pipeline_layers(cfg)
            indices = stage_indices(self.pp_rank, s.pp, s.virtual_stages)
            parts = [build_stage_module(full, split[i], i == 0, i == num_stages - 1) for i in indices]
            del full
        local_moe = []
        for part, index in zip(parts, indices, strict=True):
            if meta_init and model is None:
                materialize(part, self.device, seed + index)
            part.to(self.device)
            for name, block in part.layers.items():
                if isinstance(block.feed_forward, MoELayer):
                    local_moe.append((moe_index[name], block.feed_forward))
            if s.tp > 1:
                apply_tensor_parallel(part, self.mesh["tp"])
            apply_activation_checkpointing(part, o.recompute_granularity, o.recompute_modules)
            if cfg.training.compile:
                compile_blocks(part, tensor_parallel=s.tp > 1)
            if s.dp > 1 or cfg.training.bf16:
                apply_data_parallel(part, self.mesh["dp"], o.data_parallel_shard, cfg.training.bf16,
                                    o.grad_reduce_in_bf16, pipelined=num_stages > 1)
        if num_stages > 1 and last_stage_needs_embedding(cfg.model):
            self.shared_embedding = self._share_embedding(parts, indices, num_stages)
        self.moe = MoELayerSet(local_moe, len(moe_names), cfg.moe.num_experts)
        self.moe.set_balance_group(self.dp_group)  # TP ranks route the same tokens: dp is the whole batch
        self.parts = parts
        self.module = nn.ModuleList(parts)
        if seed_rng:
            seed_runtime_rng(cfg.training.seed, self.dp_rank)
        if s.pp > 1:
            self.pipeline = Pipeline(
                parts,
                indices,
                num_stages,
                self.pp_group,
                self.device,
                o.pipeline_schedule,
                s.num_microbatches,
                self._objective,
                self._muted,
            )
        return self.module

    def _share_embedding(self, parts: list[nn.Module], indices: list[int], num_stages: int) -> SharedEmbedding:
        """The first and the last stage's embedding kept equal (:class:`.pipeline.SharedEmbedding`), its copy on
        the last stage set to the first stage's weights (they differ after per-stage initialisation)."""
        group = embedding_group(self.mesh)
        weight, is_copy = None, False
        for part, index in zip(parts, indices, strict=True):
            if index in (0, num_stages - 1):
                weight, is_copy = part.tok_embeddings.weight, index != 0
        shared = SharedEmbedding(weight, is_copy, group)
        shared.sync_weights()
        return shared

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def _norm_parameters(self) -> list[nn.Parameter]:
        """The parameters whose elements the norms count: all but a pipeline stage's copy of the embedding."""
        params = self.parameters()
        return params if self.shared_embedding is None else self.shared_embedding.norm_parameters(params)

    def _set_num_micro(self, n: int) -> None:
        """Every loss of a step, LM and auxiliary, is averaged over its ``n`` micro-batches."""
        if n < 1 or (self.pipeline is not None and n != self.sizes.num_microbatches):
            raise ValueError(
                f"got {n} micro-batches; the pipeline schedule runs {self.sizes.num_microbatches} "
                "(global batch / (micro batch x dp))"
            )
        self._num_micro = n
        self.moe.set_aux_loss_scale(1.0 / n)

    def _loss_fn(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self._token_normalizer is not None:  # training.calculate_per_token_loss
            return lm_loss_from_target(logits, target, self._token_normalizer)
        return lm_loss_from_target(logits, target) / self._num_micro

    def _mtp_losses(self, predictions: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """Each depth's loss [D] (as :meth:`_loss_fn`, against :func:`mtp_target`)."""
        return torch.stack([self._loss_fn(logits, mtp_target(target, k))
                            for k, logits in enumerate(predictions, start=1)])

    def _objective(self, output, target: torch.Tensor) -> torch.Tensor:
        """A micro-batch's objective from the model's output: its LM loss (:meth:`_loss_fn`), plus with
        multi-token prediction lambda x the mean of :meth:`_mtp_losses` (DeepSeek-V3 eq. 25). Adds the detached LM
        and MTP losses to the step's totals (the MTP one per token of each depth's own with per-token loss)."""
        logits, predictions = (output[0], output[1:]) if isinstance(output, tuple) else (output, ())
        loss = objective = self._loss_fn(logits, target)
        if predictions:
            losses = self._mtp_losses(predictions, target)
            objective = loss + self.cfg.training.mtp_loss_scaling_factor * losses.mean()
            if self._counting:
                scales = 1.0 if self._mtp_log_scales is None else self._mtp_log_scales
                self._mtp_total += (losses.detach() * scales).mean()
        if self._counting:
            self._lm_total += loss.detach()
        return objective

    @contextlib.contextmanager
    def _muted(self):
        """Neither the MoE statistics nor the step's losses count what runs inside (a pipeline schedule's shape
        inference on placeholder inputs)."""
        self._counting = False
        try:
            with self.moe.muted_stats():
                yield
        finally:
            self._counting = True

    # ------------------------------------------------------------------ steps
    def _stack(self, batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.cat([b["tokens"] for b in batches])
        target = torch.cat([loss_target(b["labels"], b["loss_mask"]) for b in batches])
        vocab = self.cfg.model.vocab_size
        for ids in (tokens, target):  # labels too: the fused cross entropy does not bounds-check its targets
            if ids.device.type == "cpu" and ids.numel() and int(ids.max()) >= vocab:  # host data: no sync
                raise DataError(f"the data holds token id {int(ids.max())}, but model.vocab_size is {vocab}: was "
                                 "it tokenized with another, larger vocabulary than --tokenizer-model?")
        return tokens.to(self.device), target.to(self.device)

    def _forward_backward(self, batches: list[dict], train: bool) -> torch.Tensor | None:
        """Sum over micro-batches of their losses (each loss / num_microbatches, or with per-token loss its summed
        cross entropy / global_token_normalizer); None on ranks without the last stage."""
        tokens, target = self._stack(batches)
        if self.cfg.training.calculate_per_token_loss:
            depths = [mtp_target(target, k) for k in range(1, self.cfg.model.mtp_num_layers + 1)]
            counts = global_token_normalizer([target, *depths], self.dp_group, self.sizes.dp)
            self._token_normalizer, self._mtp_log_scales = counts[0], (counts[0] / counts[1:] if depths else None)
        self._lm_total = torch.zeros((), device=self.device)
        self._mtp_total = torch.zeros((), device=self.device) if self.cfg.model.mtp_num_layers else None
        if self.pipeline is not None:  # the schedule sets the data-parallel sync of each micro-batch itself
            self.pipeline.run(tokens, target, train)
            return self._lm_total if self.pipeline.has_last else None
        (part,) = self.parts
        b = batches[0]["tokens"].shape[0]
        for i in range(len(batches)):
            if train:
                set_micro_batch(self.parts, last=i == len(batches) - 1, shard=self.cfg.parallel.data_parallel_shard)
            objective = self._objective(part(tokens[i * b : (i + 1) * b]), target[i * b : (i + 1) * b])
            if train:
                objective.backward()
        return self._lm_total

    def train_step(self, batches: list[dict], optimizer: torch.optim.Optimizer, clip_grad: float) -> StepResult:
        """One optimizer step over this rank's ``num_microbatches`` micro-batches (dicts of [B, S] tensors).

        The update is applied only if the losses and the gradient norm are finite (``StepResult.finite``);
        otherwise parameters and optimizer state stay as they were. Runs the modules in their current
        mode (the caller sets ``module.train()``).
        """
        s = self.sizes
        self._set_num_micro(len(batches))
        total = self._forward_backward(batches, train=True)
        params = self.parameters()
        materialize_partial_grads(params)
        if self.shared_embedding is not None:
            self.shared_embedding.reduce_grads()
        log = self.cfg.logging
        grad_norm, num_zeros = global_grad_norm(self._norm_parameters(), s.pp, self.device,
                                                count_zeros=log.log_num_zeros_in_grad)
        lm = self._reduce_loss(total)
        mtp = self._reduce_loss(self._mtp_total) if self.cfg.model.mtp_num_layers else None
        stats = self._reduce_stats()
        aux = sum((st.mean("aux_loss") for st in stats), torch.zeros((), device=self.device))
        # Reduced values, identical on every rank: every rank takes the same decision.
        finite = torch.isfinite(grad_norm) & torch.isfinite(lm) & torch.isfinite(aux)
        if mtp is not None:
            finite &= torch.isfinite(mtp)
        if clip_grad > 0:
            clip_gradients(params, clip_grad, grad_norm)
        step_if_finite(optimizer, finite)
        if self.cfg.moe.expert_bias:  # aux-loss-free balancing: the step's global loads move the biases
            loads = torch.stack([st.counts for st in stats])
            self.moe.update_expert_biases(loads, self.cfg.moe.expert_bias_update_rate, finite)
        optimizer.zero_grad(set_to_none=True)
        params_norm = global_params_norm(self._norm_parameters(), s.pp, self.device) if log.log_params_norm else None
        return StepResult(lm, aux, grad_norm.detach(), stats, finite, params_norm, num_zeros, mtp)

    @torch.no_grad()
    def evaluate(self, batches: list[dict]) -> dict:
        """Mean LM loss / perplexity over this rank's ``batches`` and dp; per-layer expert load fractions."""
        was_training = self.module.training
        self.module.eval()
        self.moe.reset_stats()
        n = self.sizes.num_microbatches if self.pipeline is not None else len(batches)
        if len(batches) % n:
            raise ValueError(f"evaluate needs a multiple of {n} micro-batches under pipeline parallelism")
        chunks = [batches[i : i + n] for i in range(0, len(batches), n)]
        total = None
        for chunk in chunks:
            self._set_num_micro(len(chunk))
            part_total = self._forward_backward(chunk, train=False)  # mean over the chunk
            if part_total is not None:
                total = part_total if total is None else total + part_total
        if total is not None:
            total = total / len(chunks)
        loss = self._reduce_loss(total).item()
        loads = [st.load_fractions() for st in self._reduce_stats()]
        self.module.train(was_training)
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "expert_load": loads}

    # ------------------------------------------------------------------ reductions
    def _reduce_loss(self, total: torch.Tensor | None) -> torch.Tensor:
        """Mean over dp of the last stage's loss, on every rank."""
        value = torch.zeros((), device=self.device) if total is None else total.detach().float().clone()
        if dist.is_initialized() and self.sizes.world > 1:
            dist.all_reduce(value)
            value /= self.sizes.dp * self.sizes.tp
        return value

    def _reduce_stats(self) -> list[MoEStats]:
        """Per-layer MoE statistics of the whole model, summed over micro-batches and dp, on every rank."""
        rows = self.moe.pop_stats_rows(self.device)
        if dist.is_initialized() and self.sizes.world > 1:
            dist.all_reduce(rows)
            rows /= self.sizes.tp  # TP ranks hold identical copies
        return [MoEStats.unpack(row) for row in rows]


def apply_activation_checkpointing(part: nn.Module, granularity: str, modules: Sequence[str] = ("core_attn",)) -> None:
    """Recompute activations of ``part`` in backward (torch's ``checkpoint_wrapper``: non-reentrant, RNG
    state restored, so SparseMixer draws the same samples again; as torchtitan applies it).

    ``granularity``: "full" wraps every transformer block (if a recompute reaches the end of an MoE
    layer its statistics are accumulated again together with the micro-batch count, so their means
    are unchanged); "selective" wraps the ``modules`` of every block (Megatron-LM's selective recompute
    and --recompute-modules): "core_attn" the attention core, softmax(QK^T)V, whose activations are
    O(S^2) per head without a fused kernel and cheap to recompute; "mlp" a dense MLP; "moe" an MoE layer
    (router, dispatch, experts; its statistics are not counted again while it is recomputed); "none" does
    nothing. Parameter names gain the wrapper's prefix; :func:`megatron_moe.training.state.canonical_name`
    removes it.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for name, block in list(part.layers.items()):
        if granularity == "full":
            part.layers[name] = checkpoint_wrapper(block)
        elif granularity == "selective":
            if "core_attn" in modules:
                block.attention.core = checkpoint_wrapper(block.attention.core)
            ff = block.feed_forward
            if isinstance(ff, MoELayer) and "moe" in modules:
                block.feed_forward = checkpoint_wrapper(
                    ff, context_fn=lambda ff=ff: (contextlib.nullcontext(), ff.muted_stats()))
            elif not isinstance(ff, MoELayer) and "mlp" in modules:
                block.feed_forward = checkpoint_wrapper(ff)


def compile_blocks(part: nn.Module, tensor_parallel: bool) -> None:
    """``torch.compile`` every transformer block in place (parameter names unchanged), after TP and
    recompute and before data parallelism, as torchtitan does. Blocks share code, so one compilation
    serves them all; fp32 grouped expert GEMMs run eagerly (see :mod:`megatron_moe.model.moe`).

    Under TP only the parts on plain tensors are compiled: the attention core (RoPE + SDPA) and the MoE
    layers (their TP hooks run eagerly); the DTensor modules (sequence-parallel norms, column/row-
    parallel linears) stay eager. Compiled, torch 2.13 gives them wrong gradients on CPU (measured:
    5% off in the grad norm for a compiled sequence-parallel norm or attention; a whole compiled
    block fails in ``Redistribute.backward``).
    """
    for block in part.layers.values():
        if not tensor_parallel:
            block.compile()
            continue
        block.attention.core.compile()
        if isinstance(block.feed_forward, MoELayer):
            block.feed_forward.compile()
