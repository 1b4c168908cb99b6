"""What a training checkpoint holds, keyed so that any parallel layout can load it.

- ``model``: parameters by their fully-qualified name in the single-device model
  (``layers.3.attention.wq.weight``): pipeline stages keep the global layer index, tensor-parallel
  shards are DTensors, so DCP reshards on load;
- ``optimizer``: AdamW's ``exp_avg``, ``exp_avg_sq`` and ``step`` per parameter, under the
  parameter's name (the learning rate is a function of the step and is not stored);
- ``train_state``: step, consumed training samples, the per-layer auxiliary coefficients;
- ``rng``: every rank's generator states under ``rank{R}``, restored only into the same layout
  (SparseMixer-v2 then draws exactly the samples of the uninterrupted run).

Non-tensor facts (config, layout, step) live in the checkpoint's meta.json.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from megatron_moe.training.checkpoint import checkpoint_keys, load_checkpoint


def model_state(parts: list[nn.Module]) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers of this rank's model parts, by single-device name."""
    state: dict[str, torch.Tensor] = {}
    for part in parts:
        for name, tensor in part.state_dict().items():
            if name in state:
                raise ValueError(f"parameter {name} appears in two model parts")
            state[name] = tensor
    return state


_WRAPPER_PREFIX = "_checkpoint_wrapped_module."  # torch's checkpoint_wrapper (activation recompute)


def canonical_name(name: str) -> str:
    """A parameter's single-device name, whatever wrappers the layout added (e.g. activation recompute)."""
    return name.replace(_WRAPPER_PREFIX, "")


def _new_adam_state(p: torch.Tensor, group: dict) -> dict[str, torch.Tensor]:
    on_device = group.get("fused") or group.get("capturable")
    return {
        "step": torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu"),
        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
    }


def optimizer_state(parts: list[nn.Module], optimizer: torch.optim.Optimizer, create: bool = False) -> dict:
    """AdamW state per parameter name; ``create`` allocates zero state first (the targets of a load)."""
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    state: dict[str, dict[str, torch.Tensor]] = {}
    for part in parts:
        for name, p in part.named_parameters():
            if id(p) not in group_of:
                continue
            if create and p not in optimizer.state:
                optimizer.state[p] = _new_adam_state(p, group_of[id(p)])
            if p in optimizer.state:
                state[canonical_name(name)] = optimizer.state[p]
    return state


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def training_state(parts, optimizer, step: int, consumed_samples: int, aux_coefficients: torch.Tensor | None,
                   rank: int, device: torch.device, create_optimizer_state: bool = False) -> dict:
    """The nested tensor dict a training checkpoint saves (and, as targets, loads into)."""
    train = {"step": torch.tensor(step, dtype=torch.int64),
             "consumed_samples": torch.tensor(consumed_samples, dtype=torch.int64)}
    if aux_coefficients is not None:
        train["aux_coefficients"] = aux_coefficients.detach().to("cpu", copy=True)
    return {
        "model": model_state(parts),
        "optimizer": optimizer_state(parts, optimizer, create=create_optimizer_state),
        "train_state": train,
        "rng": {f"rank{rank}": rng_state(device)},
    }


def load_training_state(checkpoint, parts, optimizer, num_moe_layers: int, rank: int, device: torch.device,
                        same_layout: bool, group=None, load_optimizer: bool = True, load_rng: bool = True) -> dict:
    """Load a training checkpoint into ``parts`` and ``optimizer`` in place.

    Returns ``{"step", "consumed_samples", "aux_coefficients" (tensor or None), "rng_restored"}``.
    RNG states are restored only when ``load_rng`` and ``same_layout`` (rank r of the same layout saved
    them); without ``load_optimizer`` the optimizer keeps its fresh state (Megatron-LM's --no-load-optim).
    """
    stored = checkpoint_keys(checkpoint)
    state = training_state(parts, optimizer, 0, 0, torch.zeros(num_moe_layers) if num_moe_layers else None,
                           rank, device, create_optimizer_state=load_optimizer)
    if not load_optimizer:
        del state["optimizer"]
    rng = state["rng"][f"rank{rank}"]
    for name in list(rng):  # e.g. a CPU-saved checkpoint resumed on a GPU has no CUDA generator state
        if f"rng.rank{rank}.{name}" not in stored:
            del rng[name]
    restore_rng = load_rng and same_layout and "cpu" in rng
    if not restore_rng:
        del state["rng"]
    _without_absent_expert_biases(state["model"], stored)
    load_checkpoint(checkpoint, state, group=group)
    if restore_rng:
        set_rng_state(state["rng"][f"rank{rank}"], device)
    train = state["train_state"]
    return {
        "step": int(train["step"]),
        "consumed_samples": int(train["consumed_samples"]),
        "aux_coefficients": train.get("aux_coefficients"),
        "rng_restored": restore_rng,
    }


def load_model_only(checkpoint, parts, group=None) -> None:
    """Load just the model weights (an upcycled / converted checkpoint, or evaluation)."""
    state = model_state(parts)
    _without_absent_expert_biases(state, checkpoint_keys(checkpoint))
    load_checkpoint(checkpoint, {"model": state}, group=group)


def _without_absent_expert_biases(state: dict[str, torch.Tensor], stored: Collection[str]) -> None:
    """Drop from the load targets the routers' expert biases (docs/routing.md §1b) a checkpoint does not hold:
    a model saved without auxiliary-loss-free balancing (an upcycled or imported one, a softmax run) starts
    its biases at zero. Every other missing tensor stays an error."""
    for name in [n for n in state if n.endswith("router.expert_bias") and f"model.{n}" not in stored]:
        del state[name]


def load_full_state(parts, tensors: Mapping[str, Callable[[], torch.Tensor]], model_names: Collection[str],
                    checkpoint) -> None:
    """Copy a full (unsharded, single-device) model state into this rank's ``parts``, in place, with no
    communication: how a checkpoint of another framework (Megatron-LM) loads into any layout.

    ``tensors``: parameter or persistent buffer name -> a function returning its full tensor, called once
    for each name this rank holds (one full tensor in memory at a time). ``model_names``: the names of
    the whole model (every pipeline stage), which ``tensors`` must provide exactly. A DTensor
    (tensor-parallel or FSDP2 shard) takes its own slice of the full tensor, cut locally as
    ``distribute_tensor(..., src_data_rank=None)`` cuts it (on the shard's device); a plain tensor
    is copied whole. Raises CheckpointError naming ``checkpoint`` for missing or extra names or a
    shape that differs.
    """
    from megatron_moe.training.checkpoint import CheckpointError

    local = model_state(parts)
    missing = sorted((set(model_names) | set(local)) - set(tensors))
    extra = sorted(set(tensors) - set(model_names))
    if missing or extra:
        raise CheckpointError(f"checkpoint {checkpoint} does not hold this model's tensors: missing "
                              f"{len(missing)} (e.g. {missing[:3]}), extra {len(extra)} (e.g. {extra[:3]})")
    with torch.no_grad():
        for name, target in local.items():
            full = tensors[name]()
            if tuple(full.shape) != tuple(target.shape):  # a DTensor's shape is the global one
                raise CheckpointError(f"checkpoint {checkpoint}: {name} has shape {tuple(full.shape)}, the model "
                                      f"expects {tuple(target.shape)}")
            if isinstance(target, DTensor):
                full = distribute_tensor(full.to(target.dtype), target.device_mesh, target.placements,
                                         src_data_rank=None).to_local()
                target = target.to_local()
            target.copy_(full)


# Settings that decide the shapes and names of the model's tensors: a checkpoint only fits a model
# that agrees on all of them. (Routing and balancing settings may change between runs.)
ARCHITECTURE_SETTINGS = (
    "model.vocab_size", "model.hidden_size", "model.num_layers", "model.num_attention_heads",
    "model.num_query_groups", "model.ffn_hidden_size", "model.tie_embeddings", "model.rope_theta",
    "moe.num_experts", "moe.topk", "moe.expert_ffn_hidden_size", "moe.layer_freq", "moe.first_k_dense",
    "model.normalization", "model.apply_layernorm_1p", "model.add_qkv_bias", "model.add_bias_linear",
    "model.lm_head_bias",
    "model.rope_scaling", "model.rope_scaling_factor", "model.rope_low_freq_factor", "model.rope_high_freq_factor",
    "model.rope_original_max_position", "model.kv_channels", "model.qk_layernorm", "model.rotary_percent",
    "moe.shared_expert_ffn_hidden_size", "moe.shared_expert_gate", "model.multi_latent_attention",
    "model.q_lora_rank", "model.kv_lora_rank", "model.qk_head_dim", "model.qk_pos_emb_head_dim", "model.v_head_dim",
    "model.latent_norm_eps", "model.mtp_num_layers", "model.rope_yarn_original_max_position",
    "model.rope_yarn_beta_fast", "model.rope_yarn_beta_slow", "model.rope_yarn_mscale",
    "model.rope_yarn_mscale_all_dim",
)


def check_compatible(saved_config: dict, cfg, checkpoint, input_format: str = "native") -> None:
    """Raise CheckpointError naming every architecture setting where ``cfg`` differs from the checkpoint
    (for MoE settings on a dense checkpoint, how to upcycle it: ``upcycle_checkpoint.py --input-format
    input_format``).

    ``cfg`` is not changed (its ``model.vocab_size`` is resolved first:
    :func:`~megatron_moe.training.checkpointing.resolve_vocab_size`).
    """
    from megatron_moe.training.checkpoint import CheckpointError

    diffs = []
    for dotted in ARCHITECTURE_SETTINGS:
        group, key = dotted.split(".")
        if key not in saved_config.get(group, {}):
            continue
        saved, mine = saved_config[group][key], getattr(getattr(cfg, group), key)
        if dotted == "model.kv_channels":  # 0 means hidden / heads: compare head dimensions
            heads = saved_config["model"].get("num_attention_heads", cfg.model.num_attention_heads)
            saved = saved or saved_config["model"].get("hidden_size", cfg.model.hidden_size) // heads
            mine = cfg.model.head_dim
        if dotted == "model.latent_norm_eps":  # 0 means norm_eps: compare the eps the latent norms use
            saved = saved or saved_config["model"].get("norm_eps", cfg.model.norm_eps)
            mine = mine or cfg.model.norm_eps
        if saved != mine:
            diffs.append(f"{dotted}: checkpoint {saved!r}, config {mine!r}")
    if diffs:
        experts = cfg.moe.num_experts
        upcycle = (f"; a dense checkpoint starts an MoE model by upcycling it: python upcycle_checkpoint.py --input "
                   f"{checkpoint} --input-format {input_format} --num-experts {experts} --output DIR, then --load DIR"
                   if saved_config.get("moe", {}).get("num_experts") == 0 and experts else "")
        raise CheckpointError(f"checkpoint {checkpoint} was saved from a different model configuration: "
                              + "; ".join(diffs) + upcycle)
