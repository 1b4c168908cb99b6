"""Megatron-LM command-line flags without a setting of their own here (tables read by ``config.parse_args``).

Flags that map onto a setting are in :data:`megatron_moe.config.MEGATRON_FLAGS`. The rest fall into:
- :data:`STATES`: flags that state what this model always is; accepted when they agree;
- :data:`NO_EFFECT`: flags that tune Megatron-LM's own kernels or machinery; accepted with a note;
- :data:`REFUSED`: features this framework deliberately lacks; refused with the reason (a value
  that asks for nothing, such as ``--expert-model-parallel-size 1``, is accepted).
Names, values and meanings follow Megatron-LM's ``megatron/training/arguments.py``.
"""

from __future__ import annotations

# flag -> (the value it must have, or None for a switch; what this model always is)
STATES: dict[str, tuple[str | None, str]] = {
    "swiglu": (None, "the MLPs and experts are SwiGLU"),
    "position-embedding-type": ("rope", "positions are rotary embeddings"),
    "use-rotary-position-embeddings": (None, "positions are rotary embeddings"),
    "no-position-embedding": (None, "there is no learned position embedding"),
    "group-query-attention": (None, "attention is grouped-query with --num-query-groups KV heads"),
    "attention-dropout": ("0", "there is no dropout"),
    "hidden-dropout": ("0", "there is no dropout"),
    "rotary-percent": ("1.0", "rotary embeddings cover the whole head dimension"),
    "sequence-parallel": (None, "tensor parallelism always shards the sequence between blocks"),
    "overlap-grad-reduce": (None, "data-parallel gradients are always reduced during backward"),
    "accumulate-allreduce-grads-in-fp32": (None, "gradients are accumulated and reduced in fp32"),
    "attention-softmax-in-fp32": (None, "attention and router softmaxes run in fp32"),
    "ckpt-format": ("torch_dist", "checkpoints are torch.distributed.checkpoint directories"),
}

# flag -> why it has no effect here
NO_EFFECT: dict[str, str] = {
    "use-mcore-models": "there is one model implementation",
    "moe-grouped-gemm": "the experts always run as one grouped GEMM",
    "no-masked-softmax-fusion": "attention is torch's SDPA",
    "no-bias-swiglu-fusion": "there are no biases to fuse",
    "no-bias-dropout-fusion": "there is no bias or dropout to fuse",
    "no-rope-fusion": "RoPE is fused by --compile when asked",
    "use-flash-attn": "SDPA picks the flash kernel where the GPU has it",
    "moe-permute-fusion": "tokens are permuted by one argsort and gather",
    "moe-token-dispatcher-type": "without expert parallelism there is no token dispatch",
    "cross-entropy-loss-fusion": "the loss is torch's cross entropy (vocabulary-parallel under TP)",
    "no-gradient-accumulation-fusion": "gradients accumulate through autograd or FSDP2",
    "transformer-impl": "the model is this project's PyTorch code (Transformer Engine is not used)",
    "distributed-backend": "NCCL on GPUs, gloo on CPU, chosen by the device",
    "use-distributed-optimizer": "optimizer state is sharded over data parallel with --use-torch-fsdp2",
    "overlap-param-gather": "FSDP2 prefetches parameters itself with --use-torch-fsdp2",
    "num-workers": "batches are read in the training process",
    "no-create-attention-mask-in-dataloader": "attention is causal SDPA, no mask is built",
    "manual-gc": "Python's garbage collector is left alone",
    "log-throughput": "tokens/s is always logged",
    "log-timers-to-tensorboard": "there are no Megatron timers",
    "timing-log-level": "there are no Megatron timers",
    "distributed-timeout-minutes": "torch.distributed's default timeout is used",
    "max-position-embeddings": "rotary tables are computed for --seq-length",
}

# flag -> (a value that asks for nothing and is accepted, or None; why it is refused)
REFUSED: dict[str, tuple[str | None, str]] = {
    "expert-model-parallel-size": ("1", "no expert parallelism by design: every expert is sharded over "
                                        "--tensor-model-parallel-size"),
    "expert-tensor-parallel-size": (None, "experts are sharded over --tensor-model-parallel-size like the rest"),
    "context-parallel-size": ("1", "context parallelism is not implemented"),
    "fp16": (None, "fp16 training is not supported: use --bf16"),
    "use-legacy-models": (None, "Megatron's legacy models are not part of this framework"),
    "moe-shared-expert-intermediate-size": (None, "shared experts are not implemented"),
    "num-experts-per-tok": (None, "use --moe-router-topk"),
}

# flag -> (setting, Megatron value -> this project's value); other values are refused, naming these
VALUE_MAPS: dict[str, tuple[str, dict[str, str]]] = {
    "moe-router-load-balancing-type": ("moe.balance_loss", {"aux_loss": "switch", "none": "none"}),
}


def same_value(given: str, required: str) -> bool:
    """Whether a flag's value is the one it must have (numbers compared as numbers: 0 == 0.0)."""
    try:
        return float(given) == float(required)
    except ValueError:
        return given == required
