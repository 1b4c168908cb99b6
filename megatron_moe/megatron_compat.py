"""Megatron-LM command-line flags without a setting of their own here (tables read by ``config.parse_args``).

Flags that map onto a setting are in :data:`megatron_moe.config.MEGATRON_FLAGS`. The rest fall into:
- :data:`STATES`: flags that state what this model always is; accepted when they agree;
- :data:`NO_EFFECT`: flags that tune Megatron-LM's own kernels or machinery; accepted with a note;
- :data:`REFUSED`: features this framework deliberately lacks; refused with the reason (a value
  that asks for nothing, such as ``--expert-model-parallel-size 1``, is accepted);
- :data:`VALUE_MAPS`: flags whose Megatron-LM values map onto this project's values of a setting;
- :data:`DERIVED`: flags that restate a size the other settings imply; checked against it.
Names, values and meanings follow Megatron-LM's ``megatron/training/arguments.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# flag -> (the value it must have, or None for a switch; what this model always is)
STATES: dict[str, tuple[str | None, str]] = {
    "swiglu": (None, "the MLPs and experts are SwiGLU"),
    "position-embedding-type": ("rope", "positions are rotary embeddings"),
    "use-rotary-position-embeddings": (None, "positions are rotary embeddings"),
    "no-position-embedding": (None, "there is no learned position embedding"),
    "group-query-attention": (None, "attention is grouped-query with --num-query-groups KV heads"),
    "attention-dropout": ("0", "there is no dropout"),
    "hidden-dropout": ("0", "there is no dropout"),
    "sequence-parallel": (None, "tensor parallelism always shards the sequence between blocks"),
    "overlap-grad-reduce": (None, "data-parallel gradients are always reduced during backward"),
    "accumulate-allreduce-grads-in-fp32": (None, "gradients are accumulated and reduced in fp32"),
    "attention-softmax-in-fp32": (None, "attention and router softmaxes run in fp32"),
    "ckpt-format": ("torch_dist", "checkpoints are torch.distributed.checkpoint directories"),
    # training, optimizer and MoE routing: what this framework always does
    "optimizer": ("adam", "the optimizer is AdamW (Megatron-LM's adam: decoupled weight decay)"),
    "exit-signal-handler": (None, "SIGTERM and SIGINT always save a checkpoint and stop"),
    "recompute-method": ("uniform", "full recompute checkpoints every transformer block on its own"),
    "recompute-num-layers": ("1", "full recompute checkpoints every transformer block on its own"),
    "moe-router-dtype": ("fp32", "the router runs in fp32"),
    "moe-token-drop-policy": ("probs", "with a capacity factor, each expert keeps its highest-probability tokens"),
    "dataloader-type": ("single", "the data is read once in the order megatron-core's GPTDataset shuffles it"),
    "weight-decay-incr-style": ("constant", "weight decay is constant (--weight-decay)"),
    "main-grads-dtype": ("fp32", "gradients are accumulated and reduced in fp32"),
    "main-params-dtype": ("fp32", "master weights are fp32"),
}

# flag -> why it has no effect here
NO_EFFECT: dict[str, str] = {
    "use-mcore-models": "there is one model implementation",
    "moe-grouped-gemm": "the experts always run as one grouped GEMM",
    "no-masked-softmax-fusion": "attention is torch's SDPA",
    "no-bias-swiglu-fusion": "bias and SwiGLU are separate ops (fused by --compile when asked)",
    "no-bias-dropout-fusion": "there is no dropout to fuse a bias with",
    "no-rope-fusion": "RoPE is fused by --compile when asked",
    "use-flash-attn": "SDPA picks the flash kernel where the GPU has it",
    "moe-permute-fusion": "tokens are permuted by one argsort and gather",
    "moe-token-dispatcher-type": "without expert parallelism there is no token dispatch",
    "moe-shared-expert-overlap": "without expert parallelism there is no token dispatch to overlap the shared "
                                 "expert with",
    "cross-entropy-loss-fusion": "the cross entropy is always fused (vocabulary-parallel under TP)",
    "no-gradient-accumulation-fusion": "gradients accumulate through autograd or FSDP2",
    "transformer-impl": "the model is this project's PyTorch code (Transformer Engine is not used)",
    "distributed-backend": "NCCL on GPUs, gloo on CPU, chosen by the device",
    "use-distributed-optimizer": "optimizer state is sharded over data parallel with --use-torch-fsdp2",
    "overlap-param-gather": "FSDP2 prefetches parameters itself with --use-torch-fsdp2",
    "num-workers": "batches are read in the training process",
    "no-create-attention-mask-in-dataloader": "attention is causal SDPA, no mask is built",
    "manual-gc": "Python's garbage collector is left alone",
    "manual-gc-interval": "Python's garbage collector is left alone",
    "logging-level": "this framework prints its own progress lines",
    "enable-experimental": "there are no experimental switches here",
    "no-bias-gelu-fusion": "there is no GeLU: the MLPs are SwiGLU",
    "moe-flex-dispatcher-backend": "without expert parallelism there is no token dispatch",
    "trust-remote-code": "tokenizers are read by sentencepiece or the tokenizers library, which run no code",
    "use-megatron-fsdp": "data-parallel sharding is torch's FSDP2: --data-parallel-sharding-strategy "
                         "optim_grads_params or --use-torch-fsdp2",
    "use-nccl-ub": "FSDP2 and NCCL manage their own buffers",
    "fsdp-double-buffer": "FSDP2 and NCCL manage their own buffers",
    "fsdp-manual-registration": "FSDP2 and NCCL manage their own buffers",
    "log-throughput": "tokens/s is always logged",
    "log-timers-to-tensorboard": "there are no Megatron timers",
    "timing-log-level": "there are no Megatron timers",
    "distributed-timeout-minutes": "torch.distributed's default timeout is used",
    "max-position-embeddings": "rotary tables are computed for --seq-length",
    "no-mmap-bin-files": "the .bin files are memory-mapped by megatron-core either way; the data read is the same",
    "test-data-path": "there is no test-set evaluation; validation uses --valid-data-path or --split",
    "no-check-for-nan-in-loss-and-grad": "a non-finite loss or gradient is always caught (training.nonfinite_loss)",
    "log-validation-ppl-to-tensorboard": "validation perplexity is always logged",
    "log-progress": "progress is printed every --log-interval steps",
    "log-memory-to-tensorboard": "memory is not logged",
    "log-world-size-to-tensorboard": "the layout is printed at start",
    "log-loss-scale-to-tensorboard": "there is no loss scale: bf16 needs none",
    "tensorboard-log-interval": "TensorBoard gets every record of --log-interval",
    "tensorboard-queue-size": "TensorBoard's writer is left at its default queue",
    "empty-unused-memory-level": "torch's caching allocator is left alone",
    "moe-per-layer-logging": "per-layer MoE statistics are always logged",
    "moe-pad-expert-input-to-capacity": "padding to capacity would add zero rows only; the grouped GEMM needs none",
    "moe-router-fusion": "the router is a few torch ops",
    "no-async-tensor-model-parallel-allreduce": "tensor-parallel communication is torch's DTensor",
    "tp-comm-overlap": "tensor-parallel communication is torch's DTensor",
    "ddp-bucket-size": "FSDP2 reduces one bucket per transformer block",
    "ddp-num-buckets": "FSDP2 reduces one bucket per transformer block",
    "ddp-average-in-collective": "data-parallel gradients are averaged in fp32",
    "no-align-param-gather": "FSDP2 gathers parameters itself",
    "use-cpu-initialization": "parameters are initialised from --seed on the host or the meta device",
    "attention-backend": "attention is torch's SDPA, which picks its kernel",
    "no-persist-layer-norm": "the norms are torch's RMSNorm / LayerNorm",
    "num-dataset-builder-threads": "the datasets are built in the training process",
    "no-save-optim": "checkpoints always hold the optimizer (resumable); export weights with upcycle_checkpoint.py",
    "no-save-rng": "checkpoints always hold the random state",
    "auto-detect-ckpt-format": "--load reads this framework's checkpoints and, converted, Megatron-LM's",
    "ckpt-fully-parallel-save": "torch.distributed.checkpoint writes each rank's shards in parallel",
    "no-ckpt-fully-parallel-save": "torch.distributed.checkpoint writes each rank's shards in parallel",
    "ckpt-fully-parallel-load": "torch.distributed.checkpoint reads each rank's shards in parallel",
    "dist-ckpt-strictness": "checkpoint keys are always checked strictly",
    "use-checkpoint-opt_param-scheduler": "the schedule is a function of the step; it resumes with the step",
    "use-checkpoint-opt-param-scheduler": "the schedule is a function of the step; it resumes with the step",
    "override-opt_param-scheduler": "the schedule always follows the current command line",
    "override-opt-param-scheduler": "the schedule always follows the current command line",
    "tokenizer-hf-no-use-fast": "Hugging Face tokenizers are read by the tokenizers library",
    "profile": "there is no built-in profiler (wrap a run in torch.profiler or nsys)",
    "profile-step-start": "there is no built-in profiler (wrap a run in torch.profiler or nsys)",
    "profile-step-end": "there is no built-in profiler (wrap a run in torch.profiler or nsys)",
    "profile-ranks": "there is no built-in profiler (wrap a run in torch.profiler or nsys)",
    "loss-scale": "there is no loss scaling: bf16 needs none (fp16 is not supported)",
    "initial-loss-scale": "there is no loss scaling: bf16 needs none (fp16 is not supported)",
    "min-loss-scale": "there is no loss scaling: bf16 needs none (fp16 is not supported)",
    "loss-scale-window": "there is no loss scaling: bf16 needs none (fp16 is not supported)",
    "hysteresis": "there is no loss scaling: bf16 needs none (fp16 is not supported)",
}

# flag -> (a value that asks for nothing and is accepted, or None; why it is refused)
REFUSED: dict[str, tuple[str | None, str]] = {
    "expert-model-parallel-size": ("1", "no expert parallelism by design: every expert is sharded over "
                                        "--tensor-model-parallel-size"),
    "context-parallel-size": ("1", "context parallelism is not implemented"),
    "fp16": (None, "fp16 training is not supported: use --bf16"),
    "use-legacy-models": (None, "Megatron's legacy models are not part of this framework"),
    "num-experts-per-tok": (None, "use --moe-router-topk"),
    "rampup-batch-size": (None, "the global batch size is fixed (--global-batch-size)"),
    "step-batch-size-schedule": (None, "the global batch size is fixed (--global-batch-size)"),
    "start-weight-decay": (None, "weight decay is constant (--weight-decay)"),
    "end-weight-decay": (None, "weight decay is constant (--weight-decay)"),
    "mock-data": (None, "training needs real .bin/.idx data (--data-path)"),
    "moe-layer-recompute": (None, "use --recompute-granularity selective --recompute-modules core_attn moe"),
    "moe-use-upcycling": (None, "upcycle a dense checkpoint with upcycle_checkpoint.py, then --load it"),
    "pretrained-checkpoint": (None, "pass the checkpoint to --load (with --finetune to start at step 0)"),
    "use-checkpoint-args": (None, "settings come from the command line and --config, not from the checkpoint"),
    "exit-on-missing-checkpoint": (None, "--load on a directory without checkpoints starts from scratch"),
    "fp8-format": (None, "fp8 training is not supported: use --bf16"),
    "fp8-param-gather": (None, "fp8 training is not supported: use --bf16"),
    "num-layers-per-virtual-pipeline-stage": (None, "use --virtual-pipeline-model-parallel-size"),
    "fp8-amax-history-len": (None, "fp8 training is not supported: use --bf16"),
    "fp8-amax-compute-algo": (None, "fp8 training is not supported: use --bf16"),
    "vocab-file": (None, "GPT-2 BPE vocab/merge files are not read: use a SentencePiece model or a Hugging Face "
                         "tokenizer.json (--tokenizer-type HuggingFaceTokenizer --tokenizer-model)"),
    "merge-file": (None, "GPT-2 BPE vocab/merge files are not read: use a SentencePiece model or a Hugging Face "
                         "tokenizer.json (--tokenizer-type HuggingFaceTokenizer --tokenizer-model)"),
    "tiktoken-pattern": (None, "TikToken tokenizers are not supported"),
    "reset-position-ids": (None, "positions run over the whole sequence; document-level resets are not implemented"),
    "reset-attention-mask": (None, "attention is causal over the whole sequence; document masks are not implemented"),
    "moe-router-force-load-balancing": (None, "benchmark-only random routing is not implemented"),
    "rotary-interleaved": (None, "rotary embeddings rotate the two halves of each head, not interleaved pairs"),
    "no-rope-freq": (None, "every layer uses rotary embeddings"),
    "rotary-seq-len-interpolation-factor": (None, "rotary position interpolation is not implemented"),
    "squared-relu": (None, "the MLPs and experts are SwiGLU"),
    "window-size": (None, "attention is causal over the whole sequence (no sliding window)"),
    **dict.fromkeys(("enable-gpt-oss", "quick-geglu", "glu-linear-offset", "activation-func-clamp-value",
                     "softmax-type", "window-attn-skip-freq"), (None, "the gpt-oss architecture is not implemented")),
}

# flag -> (setting, Megatron value -> this project's value, or None: accepted, the setting left as it is); other
# values are refused, naming these
VALUE_MAPS: dict[str, tuple[str, dict[str, str | None]]] = {
    "moe-router-load-balancing-type": ("moe.balance_loss", {"aux_loss": "switch", "seq_aux_loss": "sequence",
                                                            "none": "none"}),
    # Megatron-FSDP's strategies: full sharding (ZeRO-3) is FSDP2's; optim / optim_grads (ZeRO-1/2) do not exist here
    # (no_shard, its default, asks for nothing: --use-torch-fsdp2 elsewhere on the line still counts)
    "data-parallel-sharding-strategy": ("parallel.data_parallel_shard", {"optim_grads_params": "true",
                                                                         "no_shard": None}),
    # Megatron-FSDP's precisions: gradients reduced in bf16 (--grad-reduce-in-bf16) or fp32; master weights and
    # gradient accumulation are always fp32 here ("auto": the framework's choice)
    "megatron-fsdp-grad-comm-dtype": ("parallel.grad_reduce_in_bf16", {"bf16": "true", "fp32": "false",
                                                                       "auto": None}),
    "megatron-fsdp-main-grads-dtype": ("parallel.grad_reduce_in_bf16", {"fp32": None, "auto": None}),
    "megatron-fsdp-main-params-dtype": ("training.bf16", {"fp32": None, "auto": None}),
    # Megatron-LM's tokenizer classes that read a SentencePiece model or a Hugging Face tokenizer; training
    # reads only the end-of-document id and the vocabulary size from them, which the classes agree on.
    "tokenizer-type": ("data.tokenizer_type", {"GPTSentencePieceTokenizer": "sentencepiece",
                                               "SentencePieceTokenizer": "sentencepiece",
                                               "Llama2Tokenizer": "sentencepiece",
                                               "HuggingFaceTokenizer": "huggingface"}),
}


# Megatron-LM's YaRN flags, read together once the attention is known (config._apply_megatron_yarn): YaRN for latent
# attention (its default rope type) at --rotary-scaling-factor other than 1
YARN_FLAGS = ("rotary-scaling-factor", "mscale", "mscale-all-dim", "rope-type")

# (flag, value) of VALUE_MAPS refused with a reason rather than "not available here"
VALUE_REFUSALS: dict[tuple[str, str], str] = {
    ("moe-router-load-balancing-type", "global_aux_loss"):
        "Megatron-LM averages the data-parallel token counts over the step's micro-batches so far; the global "
        "balance here (GRIN §3.3) sums each micro-batch's over the data-parallel group: "
        "--moe-router-load-balancing-type aux_loss --moe.balance_scope global",
    ("moe-router-load-balancing-type", "sinkhorn"): "Sinkhorn routing is not implemented",
}


# flag -> (the value this configuration implies, what it is): accepted when equal, checked after every flag
DERIVED: dict[str, tuple[Callable[[Any], int], str]] = {
    "expert-tensor-parallel-size": (lambda cfg: cfg.parallel.tensor_model_parallel_size,
                                    "no separate expert sharding: the experts' tensor-parallel size is "
                                    "--tensor-model-parallel-size"),
}


def same_value(given: str, required: str) -> bool:
    """Whether a flag's value is the one it must have (numbers compared as numbers: 0 == 0.0)."""
    try:
        return float(given) == float(required)
    except ValueError:
        return given == required
