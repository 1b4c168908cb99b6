"""Read a Megatron-LM GPT checkpoint as a :class:`ModelSource`: dense in the legacy torch format or torch_dist,
MoE in torch_dist.

Layout on disk (Megatron-LM ``--ckpt-format torch``)::

    <save>/latest_checkpointed_iteration.txt      "100" or "release"
    <save>/iter_0000100/mp_rank_00/model_optim_rng.pt    tensor-parallel rank 0
    <save>/iter_0000100/mp_rank_01/model_optim_rng.pt    tensor-parallel rank 1 ...

``--input`` may be the save directory, an ``iter_*``/``release`` directory or a single ``.pt`` file.
Pipeline-parallel checkpoints (``mp_rank_XX_YYY``) are refused: merge them to PP=1 with Megatron-LM's
``tools/checkpoint/convert.py`` first.

The models read: dense GPTs with SwiGLU (``--swiglu``) and rotary embeddings, ``--normalization RMSNorm`` or
``LayerNorm`` (weight and bias; -> ``model.normalization``), with or without ``--apply-layernorm-1p`` (the stored
zero-centred weights w are kept as they are, -> ``model.apply_layernorm_1p``: both scale by 1 + w), with or
without biases: megatron-core gives ``linear_qkv`` a bias with ``add_bias_linear`` (Megatron-LM's default, off
with ``--disable-bias-linear``) or ``add_qkv_bias``, and ``linear_proj``, ``linear_fc1`` and ``linear_fc2`` one
with ``add_bias_linear``; so ``add_bias_linear`` -> ``model.add_bias_linear`` and ``model.add_qkv_bias``, and
``add_qkv_bias`` alone -> ``model.add_qkv_bias``. The biases and norm biases found must be those the arguments
imply (ConversionError naming the tensor and the argument otherwise: a surplus one is never dropped). Query/key norms
(``--qk-layernorm``: ``self_attention.q_layernorm`` / ``k_layernorm``, weight and with LayerNorm bias, over the head
dimension, replicated over TP) -> ``model.qk_layernorm``; a head dimension of its own (``kv_channels`` other than
hidden / heads, Qwen3's) -> ``model.kv_channels``; ``--use-rope-scaling`` -> llama3 rope scaling. Refused,
naming the argument: other MLPs and position embeddings, other normalizations, interleaved or partial rotary.

MoE models (``num_experts``; torch_dist only: the legacy format's expert layout depends on the expert
implementation and the parallelism that wrote it) map onto ``moe.*`` (:func:`_moe_from_megatron_args`):
experts, top-K, softmax scores renormalised unless ``moe_router_pre_softmax`` or sigmoid scores with
``moe_router_enable_expert_bias`` and ``moe_router_topk_scaling_factor``, ``moe_layer_freq`` (an integer or
a per-layer list), a shared expert with its gate, token dropping. megatron-core saves them as global tensors
(tested with its SequentialMLP experts at TP = 2 and EP = 2; not checked here for its grouped-GEMM experts):
``mlp.router.weight`` ``[E, H]``,
``mlp.router.expert_bias`` ``[E]``, ``mlp.experts.experts.linear_fc1.weight`` ``[E, 2F, H]`` (``[gate; up]``)
and ``linear_fc2.weight`` ``[E, H, F]``, ``mlp.shared_experts.linear_fc1`` / ``linear_fc2`` / ``gate_weight``
(with a leading layer dimension when every layer is alike). Group-limited routing (``moe_router_num_groups``
with ``moe_router_group_topk``) is read too. Expert biases (``add_bias_linear`` on an MoE model), Sinkhorn
routing, probabilities applied on the expert input and latent experts are refused. Upcycling a model with FFN
biases is refused by :func:`megatron_moe.convert.upcycle.upcycle` (the experts have none).

Multi-latent attention (``multi_latent_attention``; torch_dist only) maps onto ``model.multi_latent_attention``
with ``q_lora_rank`` (None: 0), ``kv_lora_rank``, ``qk_head_dim``, ``qk_pos_emb_head_dim``, ``v_head_dim`` and
``qk_layernorm`` (the latent norms): ``self_attention.linear_q_proj`` or ``linear_q_down_proj`` / ``q_layernorm``
/ ``linear_q_up_proj``, ``linear_kv_down_proj`` ``[kv_lora_rank + rope, H]`` (split into our ``wkv_down`` and
``wk_rope``), ``kv_layernorm``, ``linear_kv_up_proj``, ``linear_proj`` (Transformer Engine fuses the latent norms
into the up-projections: ``linear_*_up_proj.layer_norm_weight``). megatron-core rotates each head's rotary channels
as interleaved pairs, as DeepSeek does; they are reordered to halves. Its default YaRN is read at
``rotary_scaling_factor`` 1 (plain RoPE); other factors are refused.

Multi-token prediction (``mtp_num_layers``; torch_dist only) maps onto ``model.mtp_num_layers``: depth k's
``mtp.layers.k.enorm`` / ``hnorm`` / ``eh_proj`` / ``final_layernorm`` onto ``mtp.k.embedding_norm`` /
``hidden_norm`` / ``proj`` / ``norm``, and its ``mtp.layers.k.transformer_layer.*`` (``mtp_model_layer.*`` from
megatron-core 0.19 on) read as decoder layer ``num_layers + k``.

Both model layouts are read: megatron-core (``decoder.layers.N.self_attention.linear_qkv.weight`` / ``.bias``,
Transformer Engine fused norms ``...linear_qkv.layer_norm_weight`` / ``layer_norm_bias`` and
``...linear_fc1.layer_norm_weight`` / ``layer_norm_bias``, or the local spec's ``input_layernorm`` /
``pre_mlp_layernorm`` ``.weight`` / ``.bias``; ``decoder.final_layernorm.weight`` / ``.bias``) and the older
``language_model.encoder.layers.N.`` one (``self_attention.query_key_value``, ``self_attention.dense``,
``mlp.dense_h_to_4h``, ``mlp.dense_4h_to_h`` weights and biases; ``input_(layer)norm``,
``post_attention_(layer)norm``, ``final_(layer)norm`` weights and biases).

Tensor layouts (per tensor-parallel shard, then concatenated over shards):

- fused QKV ``[groups_per_shard * (heads_per_group + 2) * head_dim, hidden]``: for each query group,
  its query heads, then its key head, then its value head (Megatron's interleaved GQA layout); its bias
  has the same rows and is split the same way;
- fc1 (SwiGLU) ``[2 * ffn / tp, hidden]`` and its bias ``[2 * ffn / tp]``: this shard's gate rows then its
  up rows, so the halves are split per shard before concatenating over shards;
- column-parallel (QKV, fc1 and their biases, embedding, output layer) concatenate along dim 0; row-parallel
  (attention output ``linear_proj``/``dense``, ``linear_fc2``/``dense_4h_to_h``) along dim 1, their biases
  replicated; norm weights and biases are replicated (replicated tensors are checked equal across shards).

Megatron-LM ``--ckpt-format torch_dist`` (its default; megatron-core ``dist_checkpointing``)::

    <save>/latest_checkpointed_iteration.txt
    <save>/iter_0000100/.metadata  __*_*.distcp  common.pt  metadata.json ("sharded_backend": "torch_dist")

is a torch.distributed.checkpoint (DCP) checkpoint of global tensors, whatever the tensor/pipeline layout
that wrote it: megatron-core stacks the layers of a homogeneous decoder into one tensor per weight with a
leading layer dimension (``decoder.layers.self_attention.linear_qkv.weight`` ``[num_layers, rows, hidden]``,
biases ``[num_layers, rows]``; per-layer keys ``decoder.layers.N....`` of a non-homogeneous decoder are read
too), names the norms (weights and biases) by Transformer Engine's fused names even for the local spec, and
stores SwiGLU's fc1 weight and bias as ``[gate of all ranks; up of all ranks]`` (so the halves are split once,
not per shard). One layer is read at a time. ``common.pt`` holds ``args``; newer megatron-core (0.19 seen)
writes no ``common.pt`` and stores the same common state as one bytes entry of the DCP files
(``common_state/shard_0_1``, ``torch.save([state])``), read the same way.
megatron-core's own loader is not used: it unpickles ``.metadata`` and pickled objects without restriction.

Loading runs no pickled code: ``torch.load(weights_only=True)`` with ``argparse.Namespace`` allowed
(Megatron stores its arguments as one) and every other non-tensor global of the file (numpy RNG
state, Megatron enums inside ``args``...) replaced by an inert placeholder that only records its
arguments. The architecture comes from ``args``; a checkpoint without it needs ``overrides`` (the
CLI's ``--megatron-args FILE.json``: a JSON object of Megatron argument names, which also override
fields of ``args``). Files are memory-mapped (``mmap=True``). A torch_dist ``.metadata`` is read with the
training checkpoints' restricted unpickler (:mod:`megatron_moe.training.checkpoint`), ``common.pt`` (or its
bytes entry) as above, and otherwise only tensor entries are read (with ``weights_only=True``); other pickled
entries (Transformer Engine extra state, RNG state) are never read.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import pickle
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_moe.config import Config
from megatron_moe.convert.hf_tensors import interleaved_rope_rows
from megatron_moe.convert.source import ConversionError, DenseSource, ModelSource
from megatron_moe.model.transformer import is_moe_block, is_moe_layer
from megatron_moe.training.checkpoint_files import _SafeUnpickler

TRACKER = "latest_checkpointed_iteration.txt"
SHARD_FILE = "model_optim_rng.pt"
DIST_COMMON = "common.pt"
DIST_METADATA = ".metadata"
DIST_CONFIG = "metadata.json"
# Newer megatron-core (0.19 seen; 0.16 writes common.pt) keeps the common state as one DCP bytes entry instead.
DIST_COMMON_ENTRY = "common_state/shard_0_1"
_MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.", "mtp.")  # megatron-core GPTModel's sharded keys


class OpaqueObject:
    """Stands in for any non-allowed global found in a checkpoint: stores its constructor arguments and
    state, runs nothing. ``qualname`` says what it replaced."""

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args = args
        return obj

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<opaque {self.qualname}{self.args!r}>"


def _placeholder(qualname: str) -> type:
    return type("Opaque_" + re.sub(r"\W", "_", qualname), (OpaqueObject,), {"qualname": qualname})


def safe_torch_load(file: Path | bytes, name: str = "") -> Any:
    """``torch.load`` a Megatron checkpoint file (or the bytes of one, called ``name`` in errors) without
    executing pickled code (see module docstring)."""
    def source():  # a fresh stream each time: torch.load reads it from the start
        return io.BytesIO(file) if isinstance(file, bytes) else str(file)

    name = name or str(file)
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(source())
    except Exception as e:
        raise ConversionError(f"{name}: not a readable torch checkpoint: {e}") from None
    allowed: list = []
    for qualname in unsafe:
        if qualname == "argparse.Namespace":
            allowed.append(argparse.Namespace)
        else:
            allowed.append((_placeholder(qualname), qualname))
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(source(), map_location="cpu", weights_only=True, mmap=not isinstance(file, bytes))
    except Exception as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "unrecognized" in ln or "Unsupported" in ln or "Can only" in ln),
                      lines[0] if lines else type(e).__name__)
        raise ConversionError(f"{name}: cannot be loaded without running pickled code: {detail}") from None


def _checkpoint_dir(path: Path) -> Path:
    """The directory holding mp_rank_* subdirectories for input ``path``."""
    tracker = path / TRACKER
    if tracker.is_file():
        text = tracker.read_text().strip()
        sub = path / ("release" if text == "release" else f"iter_{int(text):07d}")
        if not sub.is_dir():
            raise ConversionError(f"{tracker} says {text!r} but {sub} is missing")
        return sub
    return path


def megatron_checkpoint_dir(path: str | Path) -> Path | None:
    """The iteration directory of the Megatron-LM checkpoint ``path`` names (a save directory with its
    tracker file, or an ``iter_*``/``release`` directory holding ``mp_rank_*`` or torch_dist's ``common.pt`` /
    ``metadata.json``), or None when ``path`` is something else (this project's checkpoints have none of
    these). ConversionError when the tracker names a missing directory."""
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / TRACKER).is_file():
        return _checkpoint_dir(path)
    if (path / DIST_COMMON).is_file() or (path / DIST_CONFIG).is_file() or any(path.glob("mp_rank_*")):
        return path
    return None


def shard_files(path: str | Path) -> list[Path]:
    """The tensor-parallel shard files of a Megatron checkpoint, rank order; ConversionError if gaps."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ConversionError(f"{path}: no such Megatron checkpoint file or directory")
    ckpt = _checkpoint_dir(path)
    ranks = sorted(p for p in ckpt.iterdir() if p.is_dir() and p.name.startswith("mp_rank_"))
    if not ranks:
        found = sorted(p.name for p in ckpt.iterdir())[:6]
        raise ConversionError(f"{ckpt}: neither mp_rank_* directories (--ckpt-format torch) nor {DIST_METADATA} + "
                              f"{DIST_COMMON} (torch_dist) found (it holds {found}); not a Megatron checkpoint")
    if any(len(p.name.split("_")) > 3 for p in ranks):
        raise ConversionError(f"{ckpt}: pipeline-parallel shards ({ranks[0].name}...) are not supported; merge to "
                              "pipeline size 1 with Megatron-LM tools/checkpoint/convert.py first")
    found = {int(p.name.split("_")[2]): p for p in ranks}
    files = []
    for r in range(len(found)):
        if r not in found:
            raise ConversionError(f"{ckpt}: tensor-parallel shard mp_rank_{r:02d} is missing "
                                  f"(found {sorted(found)})")
        file = found[r] / SHARD_FILE
        if not file.is_file():
            raise ConversionError(f"{found[r]}: {SHARD_FILE} is missing")
        files.append(file)
    return files


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


# Megatron key (regex) -> role; a group captures the layer number of per-layer keys. Roles: emb, out,
# final_norm, norm1, norm2, qnorm, knorm, qkv, proj, fc1, fc2 (weights) and the same with "_b" (their biases:
# the norms' with LayerNorm, qkv's with add_bias_linear or add_qkv_bias, the others' with add_bias_linear).
_OLD = r"language_model\.(?:encoder|transformer)\."  # the older layout's prefix
_LAYER = r"decoder\.layers\.(\d+)\."
_OLD_LAYER = _OLD + r"layers\.(\d+)\."
_WEIGHT_ONLY = [
    (r"embedding\.word_embeddings\.weight", "emb"),
    (r"language_model\.embedding\.word_embeddings\.weight", "emb"),
    (r"output_layer\.weight", "out"),
    (r"language_model\.output_layer\.weight", "out"),
]
# (weight key, bias key, role): the bias's role is the weight's with "_b".
_WEIGHT_AND_BIAS = [
    (r"decoder\.final_layernorm\.weight", r"decoder\.final_layernorm\.bias", "final_norm"),
    (_OLD + r"final_(?:layer)?norm\.weight", _OLD + r"final_(?:layer)?norm\.bias", "final_norm"),
    # megatron-core: Transformer Engine fuses the norms into the following linear; the local spec has modules
    (_LAYER + r"self_attention\.linear_qkv\.layer_norm_weight", _LAYER + r"self_attention\.linear_qkv\.layer_norm_bias",
     "norm1"),
    (_LAYER + r"input_layernorm\.weight", _LAYER + r"input_layernorm\.bias", "norm1"),
    (_LAYER + r"mlp\.linear_fc1\.layer_norm_weight", _LAYER + r"mlp\.linear_fc1\.layer_norm_bias", "norm2"),
    (_LAYER + r"pre_mlp_layernorm\.weight", _LAYER + r"pre_mlp_layernorm\.bias", "norm2"),
    (_LAYER + r"self_attention\.q_layernorm\.weight", _LAYER + r"self_attention\.q_layernorm\.bias", "qnorm"),
    (_LAYER + r"self_attention\.k_layernorm\.weight", _LAYER + r"self_attention\.k_layernorm\.bias", "knorm"),
    *((_LAYER + module + r"\.weight", _LAYER + module + r"\.bias", role) for module, role in (
        (r"self_attention\.linear_qkv", "qkv"), (r"self_attention\.linear_proj", "proj"),
        (r"mlp\.linear_fc1", "fc1"), (r"mlp\.linear_fc2", "fc2"))),
    *((_OLD_LAYER + module + r"\.weight", _OLD_LAYER + module + r"\.bias", role) for module, role in (
        (r"input_(?:layer)?norm", "norm1"), (r"post_attention_(?:layer)?norm", "norm2"),
        (r"self_attention\.query_key_value", "qkv"), (r"self_attention\.dense", "proj"),
        (r"mlp\.dense_h_to_4h", "fc1"), (r"mlp\.dense_4h_to_h", "fc2"))),
]
# Multi-latent attention (torch_dist only): the projections (no biases), the latent norms under the local spec's
# names or fused into the up-projections (Transformer Engine).
_LATENT_ROLES = [(_LAYER + r"self_attention\." + module + r"\.weight", role) for module, role in (
    ("linear_q_proj", "mla_q"), ("linear_q_down_proj", "mla_q_down"), ("linear_q_up_proj", "mla_q_up"),
    ("linear_kv_down_proj", "mla_kv_down"), ("linear_kv_up_proj", "mla_kv_up"))]
_WEIGHT_AND_BIAS += [
    (_LAYER + r"self_attention\.linear_q_up_proj\.layer_norm_weight",
     _LAYER + r"self_attention\.linear_q_up_proj\.layer_norm_bias", "qnorm"),
    (_LAYER + r"self_attention\.kv_layernorm\.weight", _LAYER + r"self_attention\.kv_layernorm\.bias", "kvnorm"),
    (_LAYER + r"self_attention\.linear_kv_up_proj\.layer_norm_weight",
     _LAYER + r"self_attention\.linear_kv_up_proj\.layer_norm_bias", "kvnorm"),
]
# MoE layers (torch_dist only): the router, its expert bias (--moe-router-enable-expert-bias), the experts as
# [experts, rows, cols] global tensors, the shared expert and its gate.
_MOE_ROLES = [(_LAYER + module, role) for module, role in (
    (r"mlp\.router\.weight", "router"), (r"mlp\.router\.expert_bias", "router_bias"),
    (r"mlp\.experts\.experts\.linear_fc1\.weight", "exp_fc1"),
    (r"mlp\.experts\.experts\.linear_fc2\.weight", "exp_fc2"),
    (r"mlp\.shared_experts\.linear_fc1\.weight", "sh_fc1"), (r"mlp\.shared_experts\.linear_fc2\.weight", "sh_fc2"),
    (r"mlp\.shared_experts\.gate_weight", "sh_gate"))]
# Multi-token prediction (torch_dist only; megatron-core's MultiTokenPredictionLayer k, our ``mtp.k``): its norms of
# the embedding and the hidden state, the [2H -> H] projection, its final norm. Its transformer layer
# (``mtp.layers.k.transformer_layer.*``, ``mtp_model_layer`` in newer megatron-core) reads as the decoder layer
# num_layers + k (:func:`_mtp_block_key`).
_MTP = r"mtp\.layers\.(\d+)\."
_WEIGHT_ONLY.append((_MTP + r"eh_proj\.weight", "mtp_proj"))
_WEIGHT_AND_BIAS += [(_MTP + module + r"\.weight", _MTP + module + r"\.bias", role) for module, role in (
    ("enorm", "mtp_enorm"), ("hnorm", "mtp_hnorm"), ("final_layernorm", "mtp_norm"))]
_KEY_PATTERNS = _WEIGHT_ONLY + _LATENT_ROLES + _MOE_ROLES + [pair for weight, bias, role in _WEIGHT_AND_BIAS
                                             for pair in ((weight, role), (bias, role + "_b"))]
_COMPILED = [(re.compile(p + r"$"), role) for p, role in _KEY_PATTERNS]


def _mtp_block_key(key: str, num_layers: int) -> str:
    """A multi-token prediction depth's transformer layer key as the decoder layer it is here:
    ``mtp.layers.k.transformer_layer.X`` (megatron-core 0.16; ``mtp_model_layer`` from 0.19 on) ->
    ``decoder.layers.{num_layers + k}.X``; other keys unchanged."""
    m = re.match(r"mtp\.layers\.(\d+)\.(?:transformer_layer|mtp_model_layer)\.", key)
    return f"decoder.layers.{num_layers + int(m.group(1))}.{key[m.end():]}" if m else key


def _classify(key: str) -> tuple[str, int | None] | None:
    for pattern, role in _COMPILED:
        m = pattern.match(key)
        if m:
            return role, (int(m.group(1)) if m.groups() else None)
    return None


def _arg(args: dict[str, Any], name: str, default: Any = None) -> Any:
    value = args.get(name, default)
    return default if value is None else value


def config_from_megatron_args(args: dict[str, Any], where: str) -> Config:
    """Map Megatron-LM arguments (a dict of ``args``' fields) to a dense project Config.

    Raises ConversionError naming the Megatron argument when the architecture is not representable.
    """
    required = ("hidden_size", "num_layers", "num_attention_heads")
    for name in required:
        if not isinstance(args.get(name), int):
            raise ConversionError(f"{where}: Megatron argument {name} is missing; pass it with "
                                  "upcycle_checkpoint.py --megatron-args FILE.json")
    checks = [
        ("swiglu", True, "only SwiGLU MLPs are supported"),
        ("position_embedding_type", "rope", "only rotary position embeddings are supported"),
        ("rotary_interleaved", False, "interleaved rotary embeddings are not supported"),
    ]
    defaults = {"swiglu": False, "position_embedding_type": "learned_absolute", "rotary_interleaved": False}
    for name, want, why in checks:
        got = _arg(args, name, defaults[name])
        if name == "position_embedding_type" and args.get("use_rotary_position_embeddings"):
            got = "rope"
        if got != want:
            raise ConversionError(f"{where}: Megatron argument {name} = {got!r}; {why} (need {want!r})")
    if _arg(args, "qk_l2_norm", False):
        raise ConversionError(f"{where}: Megatron argument qk_l2_norm = True: L2-normalised queries and keys are not "
                              "implemented")
    normalization = _arg(args, "normalization", "LayerNorm")  # Megatron-LM's default
    if normalization not in ("LayerNorm", "RMSNorm"):
        raise ConversionError(f"{where}: Megatron argument normalization = {normalization!r}; only 'LayerNorm' and "
                              "'RMSNorm' are supported")
    if _arg(args, "rotary_seq_len_interpolation_factor") not in (None, 1):
        raise ConversionError(f"{where}: Megatron argument rotary_seq_len_interpolation_factor is set; rope "
                              "scaling is not supported")
    hidden, heads = args["hidden_size"], args["num_attention_heads"]
    latent = bool(_arg(args, "multi_latent_attention", False))
    kv_channels = 0 if latent else _arg(args, "kv_channels", 0)  # hidden / heads when not given; MLA ignores it
    if not latent and (not isinstance(kv_channels, int) or kv_channels < 0 or (not kv_channels and hidden % heads)):
        raise ConversionError(f"{where}: Megatron argument kv_channels = {kv_channels!r} with hidden_size = "
                              f"{hidden} and num_attention_heads = {heads}; expected a positive head dimension")
    if int(_arg(args, "pipeline_model_parallel_size", 1)) != 1:
        raise ConversionError(f"{where}: pipeline_model_parallel_size = {args['pipeline_model_parallel_size']}; "
                              "merge to pipeline size 1 with Megatron-LM tools/checkpoint/convert.py first")
    cfg = Config()
    m = cfg.model
    m.hidden_size, m.num_layers, m.num_attention_heads = hidden, args["num_layers"], heads
    m.kv_channels = 0 if kv_channels * heads == hidden else kv_channels
    m.qk_layernorm = bool(_arg(args, "qk_layernorm", False))
    m.num_query_groups = int(_arg(args, "num_query_groups", heads)) if args.get("group_query_attention") else heads
    m.ffn_hidden_size = int(_arg(args, "ffn_hidden_size", 4 * hidden))
    m.rope_theta = float(_arg(args, "rotary_base", 10000))
    m.norm_eps = float(_arg(args, "norm_epsilon", 1e-5))
    m.tie_embeddings = not bool(_arg(args, "untie_embeddings_and_output_weights", False))
    m.init_std = float(_arg(args, "init_method_std", m.init_std))
    m.normalization = normalization
    m.apply_layernorm_1p = bool(_arg(args, "apply_layernorm_1p", False))  # both store w and scale by 1 + w
    # megatron-core rotates the first kv_channels x rotary_percent channels of each head
    m.rotary_percent = float(_arg(args, "rotary_percent", 1.0))
    if latent and m.rotary_percent != 1.0:
        raise ConversionError(f"{where}: Megatron argument rotary_percent = {m.rotary_percent} with "
                              "multi_latent_attention: megatron-core then rotates part of the qk_pos_emb_head_dim "
                              "channels, which this model does not")
    if _arg(args, "use_rope_scaling", False):
        # megatron-core's RotaryEmbedding(rope_scaling=True): Llama 3.1's scaling with --rope-scaling-factor and
        # its fixed low/high frequency factors 1 and 4 over an original context of 8192 (our defaults)
        m.rope_scaling, m.rope_scaling_factor = "llama3", float(_arg(args, "rope_scaling_factor", 8.0))
        m.rope_low_freq_factor, m.rope_high_freq_factor, m.rope_original_max_position = 1.0, 4.0, 8192
    # megatron-core: linear_qkv has a bias with add_bias_linear or add_qkv_bias; linear_proj, linear_fc1 and
    # linear_fc2 with add_bias_linear (Megatron-LM's default, off with --disable-bias-linear).
    bias_linear = bool(_arg(args, "add_bias_linear", True))
    m.add_bias_linear = bias_linear
    m.add_qkv_bias = bias_linear or bool(_arg(args, "add_qkv_bias", False))
    if latent:
        _latent_attention_from_megatron_args(m, args, where)
    vocab = args.get("padded_vocab_size")
    if vocab:
        m.vocab_size = int(vocab)
        m.make_vocab_size_divisible_by = math.gcd(m.vocab_size, 128)
    cfg.moe.num_experts = 0
    if _arg(args, "num_experts", 0):
        _moe_from_megatron_args(cfg, args, where)
    cfg.data.seq_length = int(_arg(args, "seq_length", cfg.data.seq_length))
    return cfg


def _latent_attention_from_megatron_args(m, args: dict[str, Any], where: str) -> None:
    """model.* of multi-latent attention (``multi_latent_attention``): Megatron-LM's defaults for the widths,
    ``qk_layernorm`` -> the latent norms, a key and value per head whatever ``num_query_groups`` says and no
    biases on the projections (megatron-core builds them so). megatron-core gives it YaRN by default
    (``rope_type``) with ``rotary_scaling_factor``, ``mscale``, ``mscale_all_dim`` and MLATransformerConfig's
    original context 4096 and betas 32 / 1 (Megatron-LM has no arguments of those names); at factor 1 it is
    the plain rotary embedding."""
    rope_type, factor = _arg(args, "rope_type", "yarn"), float(_arg(args, "rotary_scaling_factor", 1.0))
    mscale, mscale_all_dim = float(_arg(args, "mscale", 1.0)), float(_arg(args, "mscale_all_dim", 0.0))
    if rope_type not in ("rope", "yarn"):
        raise ConversionError(f"{where}: Megatron argument rope_type = {rope_type!r}; expected 'rope' or 'yarn'")
    if rope_type == "rope" and factor != 1.0 and mscale_all_dim:
        raise ConversionError(f"{where}: Megatron arguments rope_type = 'rope' with rotary_scaling_factor = "
                              f"{factor:g} and mscale_all_dim = {mscale_all_dim:g}: megatron-core then scales the "
                              "softmax as YaRN does without YaRN's frequencies, which is not implemented")
    if m.rope_scaling == "llama3":
        raise ConversionError(f"{where}: Megatron argument use_rope_scaling with multi_latent_attention: "
                              "megatron-core's latent attention does not apply it")
    if rope_type == "yarn" and factor != 1.0:
        m.rope_scaling, m.rope_scaling_factor = "yarn", factor
        m.rope_yarn_mscale, m.rope_yarn_mscale_all_dim = mscale, mscale_all_dim
    m.multi_latent_attention, m.num_query_groups, m.add_qkv_bias = True, m.num_attention_heads, False
    m.q_lora_rank = int(_arg(args, "q_lora_rank", 0))
    m.kv_lora_rank = int(_arg(args, "kv_lora_rank", 32))
    m.qk_head_dim = int(_arg(args, "qk_head_dim", 128))
    m.qk_pos_emb_head_dim = int(_arg(args, "qk_pos_emb_head_dim", 64))
    m.v_head_dim = int(_arg(args, "v_head_dim", 128))


def _moe_from_megatron_args(cfg: Config, args: dict[str, Any], where: str) -> None:
    """The MoE settings of an MoE checkpoint's arguments: experts, router (softmax top-K, renormalised unless
    ``moe_router_pre_softmax``, or sigmoid scores with the expert bias and scaling factor), layer placement
    (``moe_layer_freq``: an integer f, an MoE layer where i % f == 0, or a per-layer list), the shared expert,
    token dropping (``moe_expert_capacity_factor``, which megatron-core applies in evaluation too) and input
    jitter, group-limited routing. Balance losses are training recipe, set by the run. Refused, naming the
    argument: expert biases (``add_bias_linear``), the deprecated ``moe_router_topk_limited_devices``, Sinkhorn
    routing, probabilities applied to the expert input, latent experts, the position drop policy, other layer
    patterns."""
    from megatron_moe.config import ConfigError, moe_layer_pattern, moe_layer_spacing

    e, layers = cfg.moe, cfg.model.num_layers
    e.num_experts, e.topk = int(args["num_experts"]), int(_arg(args, "moe_router_topk", 2))
    e.expert_ffn_hidden_size = int(_arg(args, "moe_ffn_hidden_size", cfg.model.dense_ffn_size))
    if cfg.model.add_bias_linear:
        raise ConversionError(f"{where}: Megatron argument add_bias_linear = True on an MoE model gives the experts "
                              "biases, which this project's experts do not have (Megatron-LM trains MoE models with "
                              "--disable-bias-linear)")
    if _arg(args, "moe_router_topk_limited_devices"):
        raise ConversionError(f"{where}: Megatron argument moe_router_topk_limited_devices (deprecated): give its "
                              "group-limited routing as moe_router_num_groups / moe_router_group_topk "
                              "(--megatron-args)")
    if _arg(args, "moe_router_group_topk"):  # without it, megatron-core routes plain top-K whatever num_groups says
        e.router_num_groups = int(_arg(args, "moe_router_num_groups", 0))
        e.router_group_topk = int(args["moe_router_group_topk"])
        if not e.router_num_groups:
            raise ConversionError(f"{where}: Megatron argument moe_router_group_topk = {e.router_group_topk} without "
                                  "moe_router_num_groups (megatron-core refuses it too)")
    balancing = _arg(args, "moe_router_load_balancing_type", "aux_loss")
    if "sinkhorn" in ([balancing] if isinstance(balancing, str) else list(balancing)):
        raise ConversionError(f"{where}: Megatron argument moe_router_load_balancing_type = {balancing!r}: Sinkhorn "
                              "routing is not implemented")
    for name, why in (("moe_apply_probs_on_input", "routing probabilities applied to the expert input"),
                      ("moe_latent_size", "latent experts")):
        if _arg(args, name):
            raise ConversionError(f"{where}: Megatron argument {name} = {args[name]!r}: {why} are not implemented")
    if _arg(args, "moe_expert_capacity_factor") is not None:  # megatron-core drops in evaluation too
        if _arg(args, "moe_token_drop_policy", "probs") != "probs":
            raise ConversionError(f"{where}: Megatron argument moe_token_drop_policy = "
                                  f"{args['moe_token_drop_policy']!r}; only 'probs' is implemented")
        e.capacity_factor, e.dropless = float(args["moe_expert_capacity_factor"]), False
    e.input_jitter_eps = float(_arg(args, "moe_input_jitter_eps", 0.0))
    e.score_function = _arg(args, "moe_router_score_function", "softmax")
    if e.score_function not in ("softmax", "sigmoid"):
        raise ConversionError(f"{where}: Megatron argument moe_router_score_function = {e.score_function!r}; "
                              "expected 'softmax' or 'sigmoid'")
    # megatron-core: softmax then top-K (pre-softmax: weights not renormalised) or top-K logits then softmax
    # (renormalised); sigmoid scores are always normalised over the K picked (K > 1)
    e.renormalize = e.score_function == "sigmoid" or not _arg(args, "moe_router_pre_softmax", False)
    e.expert_bias = bool(_arg(args, "moe_router_enable_expert_bias", False))
    e.topk_scaling_factor = float(_arg(args, "moe_router_topk_scaling_factor", 0) or 1.0)  # falsy: no scaling
    e.shared_expert_ffn_hidden_size = int(_arg(args, "moe_shared_expert_intermediate_size", 0))
    # megatron-core builds the gate only with a shared expert
    e.shared_expert_gate = bool(_arg(args, "moe_shared_expert_gate", False)) and bool(e.shared_expert_ffn_hidden_size)
    freq = _arg(args, "moe_layer_freq", 1)
    try:
        pattern = moe_layer_pattern(freq) if isinstance(freq, str) else freq
    except ConfigError as err:
        raise ConversionError(f"{where}: Megatron argument moe_layer_freq: {err}") from None
    if isinstance(pattern, int):
        moe_layers = [i for i in range(layers) if i % pattern == 0] if pattern > 0 else []
    elif isinstance(pattern, list | tuple) and len(pattern) == layers:
        moe_layers = [i for i, v in enumerate(pattern) if v]
    else:
        raise ConversionError(f"{where}: Megatron argument moe_layer_freq = {freq!r} with num_layers = {layers}; "
                              "expected an integer or one 0/1 entry per layer")
    spacing = moe_layer_spacing(moe_layers, layers) if moe_layers else None
    if spacing is None:
        raise ConversionError(f"{where}: Megatron argument moe_layer_freq = {freq!r} makes layers {moe_layers} MoE; "
                              "only k dense layers followed by an MoE layer every f are supported")
    e.first_k_dense, e.layer_freq = spacing


def _split_qkv(qkv: torch.Tensor, heads: int, groups: int, head_dim: int, where: str):
    """Fused interleaved QKV weight [groups * (heads/groups + 2) * head_dim, hidden] (or its bias, the same rows
    without the hidden dimension) -> q, k, v weights (biases)."""
    per = heads // groups
    if qkv.shape[0] != groups * (per + 2) * head_dim:
        raise ConversionError(f"{where}: fused QKV has {qkv.shape[0]} rows; expected {groups} groups x "
                              f"({per} + 2) heads x {head_dim}")
    rest = tuple(qkv.shape[1:])
    grouped = qkv.reshape(groups, per + 2, head_dim, *rest)
    q = grouped[:, :per].reshape(heads * head_dim, *rest)
    k = grouped[:, per].reshape(groups * head_dim, *rest)
    v = grouped[:, per + 1].reshape(groups * head_dim, *rest)
    return q, k, v


# Optional roles (biases, query/key norms): what they are and the Megatron arguments that decide whether a
# checkpoint has them.
_OPTIONAL_ROLES = {
    "qnorm": ("query norm (q_layernorm)", "qk_layernorm"), "knorm": ("key norm (k_layernorm)", "qk_layernorm"),
    "kvnorm": ("kv latent norm (kv_layernorm)", "qk_layernorm"), "kvnorm_b": ("kv latent norm bias", "normalization"),
    "router_bias": ("router expert bias", "moe_router_enable_expert_bias"),
    "sh_fc1": ("shared expert", "moe_shared_expert_intermediate_size"),
    "sh_fc2": ("shared expert", "moe_shared_expert_intermediate_size"),
    "sh_gate": ("shared expert gate", "moe_shared_expert_gate"),
    "final_norm_b": ("final norm bias", "normalization"), "norm1_b": ("input norm bias", "normalization"),
    "norm2_b": ("pre-MLP norm bias", "normalization"), "qnorm_b": ("query norm bias", "normalization"),
    "knorm_b": ("key norm bias", "normalization"), "qkv_b": ("QKV bias", "add_bias_linear / add_qkv_bias"),
    "proj_b": ("attention output (linear_proj) bias", "add_bias_linear"),
    "fc1_b": ("MLP linear_fc1 bias", "add_bias_linear"), "fc2_b": ("MLP linear_fc2 bias", "add_bias_linear"),
    "mtp_enorm_b": ("multi-token prediction enorm bias", "normalization"),
    "mtp_hnorm_b": ("multi-token prediction hnorm bias", "normalization"),
    "mtp_norm_b": ("multi-token prediction final_layernorm bias", "normalization"),
}


def _expected_roles(cfg: Config) -> set[str]:
    """The roles a checkpoint of config ``cfg`` holds (besides ``emb`` and, untied, ``out``)."""
    m, e = cfg.model, cfg.moe
    moe = [is_moe_layer(cfg, i) for i in range(m.num_layers)]
    roles = {"final_norm", "norm1", "norm2", "proj"}
    if m.multi_latent_attention:
        roles |= {"mla_kv_down", "mla_kv_up"} | ({"mla_q_down", "mla_q_up"} if m.q_lora_rank else {"mla_q"})
    else:
        roles.add("qkv")
    if not all(moe):
        roles |= {"fc1", "fc2"}
    if any(moe):
        roles |= {"router", "exp_fc1", "exp_fc2"}
        roles |= {"router_bias"} if e.expert_bias else set()
        roles |= {"sh_fc1", "sh_fc2"} if e.shared_expert_ffn_hidden_size else set()
        roles |= {"sh_gate"} if e.shared_expert_gate else set()
    norms = set()
    if m.qk_layernorm:  # latent attention: the kv latent's, and the query latent's when there is one
        norms = ({"kvnorm"} | ({"qnorm"} if m.q_lora_rank else set())) if m.multi_latent_attention else {"qnorm",
                                                                                                         "knorm"}
    roles |= norms
    if m.normalization == "LayerNorm":
        roles |= {"final_norm_b", "norm1_b", "norm2_b"} | {n + "_b" for n in norms}
        roles |= {"mtp_enorm_b", "mtp_hnorm_b", "mtp_norm_b"} if m.mtp_num_layers else set()
    if m.add_qkv_bias:
        roles.add("qkv_b")
    if m.add_bias_linear:
        roles |= {"proj_b", "fc1_b", "fc2_b"}
    return roles


def _check_optional_roles(found: dict[tuple[str, int | None], str], cfg: Config, args: dict[str, Any],
                          where: str) -> None:
    """ConversionError when the checkpoint's biases and query/key norms (``found``: (role, layer) -> key) disagree
    with what the Megatron arguments ``args`` (mapped into the model config ``m``) say it has: a tensor too many
    would be dropped, one too few is missing."""
    m, e = cfg.model, cfg.moe
    bias_linear, qkv_bias = _arg(args, "add_bias_linear", True), _arg(args, "add_qkv_bias", False)
    settings = {"normalization": f"normalization = {m.normalization!r}",
                "qk_layernorm": f"qk_layernorm = {m.qk_layernorm}",
                "moe_router_enable_expert_bias": f"moe_router_enable_expert_bias = {e.expert_bias}",
                "moe_shared_expert_intermediate_size":
                    f"moe_shared_expert_intermediate_size = {e.shared_expert_ffn_hidden_size or None}",
                "moe_shared_expert_gate": f"moe_shared_expert_gate = {e.shared_expert_gate}",
                "add_bias_linear": f"add_bias_linear = {bias_linear}",
                "add_bias_linear / add_qkv_bias": f"add_bias_linear = {bias_linear}, add_qkv_bias = {qkv_bias}"}
    want = _expected_roles(cfg)
    for (role, _), key in sorted(found.items(), key=lambda item: item[1]):
        if role in _OPTIONAL_ROLES and role not in want:
            what, arg = _OPTIONAL_ROLES[role]
            raise ConversionError(f"{where}: holds {key} (a {what}) but the Megatron arguments say there is none "
                                  f"({settings[arg]}); correct them with upcycle_checkpoint.py --megatron-args")
    have = {role for role, _ in found}
    for role in sorted(want & set(_OPTIONAL_ROLES) - have):
        what, arg = _OPTIONAL_ROLES[role]
        raise ConversionError(f"{where}: has no {what} but the Megatron arguments say it has one "
                              f"({settings[arg]}); correct them with upcycle_checkpoint.py --megatron-args")


def _model_loaders(cfg: Config, *, whole, vocab_parallel, row_parallel, qkv_part, fc1_part) -> dict:
    """Our model's tensor names -> loaders (callables returning the full tensor), from a reader's
    loader factories by Megatron role: ``whole(role, layer)`` (norms, row-parallel biases, and the global
    tensors of MoE layers: one tensor), ``vocab_parallel(role)`` (embedding, output layer),
    ``row_parallel(role, layer)`` (linear_proj, linear_fc2 weights), ``qkv_part(layer, which, role)`` (q, k
    or v of the fused QKV's weight or bias), ``fc1_part(layer, which, role)`` (gate or up half of fc1's
    weight or bias)."""
    m = cfg.model
    loaders = {"tok_embeddings.weight": vocab_parallel("emb"), "norm.weight": whole("final_norm", None)}
    if not m.tie_embeddings:
        loaders["output.weight"] = vocab_parallel("out")
    layer_norm = m.normalization == "LayerNorm"
    if layer_norm:
        loaders["norm.bias"] = whole("final_norm_b", None)
    for k in range(m.mtp_num_layers):  # the depths' own parts; their blocks are layers num_layers + k below
        p = f"mtp.{k}."
        for role, name in (("mtp_enorm", "embedding_norm"), ("mtp_hnorm", "hidden_norm"), ("mtp_norm", "norm")):
            loaders[p + f"{name}.weight"] = whole(role, k)
            if layer_norm:
                loaders[p + f"{name}.bias"] = whole(role + "_b", k)
        loaders[p + "proj.weight"] = whole("mtp_proj", k)
    for i in range(m.num_layers + m.mtp_num_layers):
        p = f"layers.{i}."
        loaders[p + "attention_norm.weight"] = whole("norm1", i)
        loaders[p + "ffn_norm.weight"] = whole("norm2", i)
        if m.multi_latent_attention:
            loaders.update(_latent_attention_loaders(cfg, i, whole))
        else:
            for which, name in enumerate(("wq", "wk", "wv")):
                loaders[p + f"attention.{name}.weight"] = qkv_part(i, which)
        loaders[p + "attention.wo.weight"] = row_parallel("proj", i)
        if is_moe_block(cfg, i):
            loaders.update(_moe_loaders(cfg, i, whole))
        else:
            loaders[p + "feed_forward.w1.weight"] = fc1_part(i, 0)
            loaders[p + "feed_forward.w3.weight"] = fc1_part(i, 1)
            loaders[p + "feed_forward.w2.weight"] = row_parallel("fc2", i)
        if m.qk_layernorm:  # over head_dim (or a latent), the same weights for every head: whole on every TP rank
            for role, name in _attention_norms(m):
                loaders[p + f"attention.{name}.weight"] = whole(role, i)
                if layer_norm:
                    loaders[p + f"attention.{name}.bias"] = whole(role + "_b", i)
        if layer_norm:
            loaders[p + "attention_norm.bias"] = whole("norm1_b", i)
            loaders[p + "ffn_norm.bias"] = whole("norm2_b", i)
        if m.add_qkv_bias:
            for which, name in enumerate(("wq", "wk", "wv")):
                loaders[p + f"attention.{name}.bias"] = qkv_part(i, which, "qkv_b")
        if m.add_bias_linear:  # row-parallel biases (linear_proj, linear_fc2) are whole on every TP rank
            loaders[p + "attention.wo.bias"] = whole("proj_b", i)
            loaders[p + "feed_forward.w1.bias"] = fc1_part(i, 0, "fc1_b")
            loaders[p + "feed_forward.w3.bias"] = fc1_part(i, 1, "fc1_b")
            loaders[p + "feed_forward.w2.bias"] = whole("fc2_b", i)
    return loaders


def _attention_norms(m) -> list[tuple[str, str]]:
    """(Megatron role, our module) of the attention's norms under ``qk_layernorm``: the query/key norms, or the
    latent attention's latent norms."""
    if not m.multi_latent_attention:
        return [("qnorm", "q_norm"), ("knorm", "k_norm")]
    return [("kvnorm", "kv_latent_norm")] + ([("qnorm", "q_latent_norm")] if m.q_lora_rank else [])


def _latent_attention_loaders(cfg: Config, i: int, whole) -> dict:
    """Loaders of layer ``i``'s latent attention projections from megatron-core's global tensors: the query
    projection (or the query latent's down and up), the kv down-projection ``[kv_lora_rank + rope, H]`` split
    into ours and the rotary key, the kv up-projection. megatron-core takes each head's rotary channels as
    interleaved pairs (``apply_rotary_pos_emb`` with ``multi_latent_attention``), as DeepSeek does: they are
    reordered to halves, as the Hugging Face reader does (:func:`.hf_tensors.interleaved_rope_rows`)."""
    m, p = cfg.model, f"layers.{i}.attention."
    rope, head = m.qk_pos_emb_head_dim, m.qk_head_dim + m.qk_pos_emb_head_dim
    query = whole("mla_q_up" if m.q_lora_rank else "mla_q", i)
    out = {p + "wq.weight": lambda: interleaved_rope_rows(query(), (head, rope), to_interleaved=False),
           p + "wkv.weight": whole("mla_kv_up", i)}
    if m.q_lora_rank:
        out[p + "wq_down.weight"] = whole("mla_q_down", i)

    def kv_down(which: int) -> torch.Tensor:
        t = whole("mla_kv_down", i)()
        if t.shape[0] != m.kv_lora_rank + rope:
            raise ConversionError(f"layer {i} linear_kv_down_proj has {t.shape[0]} rows; kv_lora_rank + "
                                  f"qk_pos_emb_head_dim = {m.kv_lora_rank + rope}")
        latent, rotary = t.split([m.kv_lora_rank, rope])
        return latent if which == 0 else interleaved_rope_rows(rotary, (rope, rope), to_interleaved=False)

    out[p + "wkv_down.weight"] = lambda: kv_down(0)
    out[p + "wk_rope.weight"] = lambda: kv_down(1)
    return out


def _gate_up(t: torch.Tensor, which: int, where: str, dim: int = 0) -> torch.Tensor:
    """Gate (0) or up (1) half of a SwiGLU fc1 weight's or bias's rows along ``dim`` (``[gate; up]``: a legacy
    shard's, or torch_dist's global layout whatever the tensor-parallel size; dim 1 for stacked experts)."""
    if t.shape[dim] % 2:
        raise ConversionError(f"{where} has an odd number of rows ({t.shape[dim]}); expected [gate; up] for SwiGLU")
    return t.chunk(2, dim=dim)[which]


def _moe_loaders(cfg: Config, i: int, whole) -> dict:
    """Loaders of MoE layer ``i``'s tensors from megatron-core's global ones (``whole(role, layer)``): the router
    ``[E, H]`` as it is; experts' fc1 ``[E, 2F, H]`` split into w1 / w3 and fc2 ``[E, H, F]``, transposed to our
    stacked ``[E, H, F]`` / ``[E, F, H]``; the shared expert's fc1 ``[2F, H]`` split, fc2 and gate as they are."""
    e, p = cfg.moe, f"layers.{i}.feed_forward."
    where = f"layer {i}"
    out = {
        p + "router.gate.weight": whole("router", i),
        p + "experts.w1": lambda: _gate_up(whole("exp_fc1", i)(), 0, f"{where} experts' fc1", 1).transpose(1, 2),
        p + "experts.w3": lambda: _gate_up(whole("exp_fc1", i)(), 1, f"{where} experts' fc1", 1).transpose(1, 2),
        p + "experts.w2": lambda: whole("exp_fc2", i)().transpose(1, 2),
    }
    if e.expert_bias:
        out[p + "router.expert_bias"] = whole("router_bias", i)
    if e.shared_expert_ffn_hidden_size:
        out[p + "shared_expert.w1.weight"] = lambda: _gate_up(whole("sh_fc1", i)(), 0, f"{where} shared fc1")
        out[p + "shared_expert.w3.weight"] = lambda: _gate_up(whole("sh_fc1", i)(), 1, f"{where} shared fc1")
        out[p + "shared_expert.w2.weight"] = whole("sh_fc2", i)
    if e.shared_expert_gate:
        out[p + "shared_gate.weight"] = whole("sh_gate", i)
    return out


def read_megatron(path: str | Path, overrides: dict[str, Any] | None = None) -> ModelSource:
    """A :class:`ModelSource` for a Megatron-LM checkpoint, legacy torch (all TP shards merged; dense models only:
    a :class:`DenseSource`) or torch_dist (dense or MoE).

    The shards are loaded memory-mapped (legacy) or one layer at a time (torch_dist); the merged tensors are
    computed on demand.
    """
    dist_dir = torch_dist_dir(path)
    if dist_dir is not None:
        return read_megatron_torch_dist(dist_dir, overrides)
    files = shard_files(path)
    shards = [safe_torch_load(f) for f in files]
    where = str(files[0])
    first = shards[0]
    if not isinstance(first, dict) or "model" not in first:
        extra = " (virtual pipeline stages: model0, model1...)" if isinstance(first, dict) and "model0" in first else ""
        raise ConversionError(f"{where}: no 'model' entry{extra}; not a supported Megatron GPT checkpoint")
    version = first.get("checkpoint_version", 3.0)
    if version is not None and float(version) < 3.0:
        raise ConversionError(f"{where}: checkpoint_version = {version}; versions before 3.0 store QKV in an "
                              "older layout that is not supported")
    args_obj = first.get("args")
    args = dict(vars(args_obj)) if isinstance(args_obj, argparse.Namespace) else {}
    args.update(overrides or {})
    cfg = config_from_megatron_args(args, where)
    if cfg.model.multi_latent_attention:
        raise ConversionError(f"{where}: a multi-latent attention checkpoint in the legacy torch format; such "
                              "checkpoints are read in torch_dist format (Megatron-LM's default --ckpt-format; "
                              "convert with --ckpt-convert-format torch_dist)")
    if cfg.moe.num_experts:
        raise ConversionError(f"{where}: an MoE checkpoint (num_experts = {cfg.moe.num_experts}) in the legacy torch "
                              "format, whose expert layout depends on the expert implementation and parallelism; MoE "
                              "checkpoints are read in torch_dist format (Megatron-LM's default --ckpt-format; "
                              "convert with --ckpt-convert-format torch_dist)")
    tp = len(files)
    declared_tp = int(_arg(args, "tensor_model_parallel_size", tp))
    if declared_tp != tp:
        raise ConversionError(f"{files[0].parent.parent}: args say tensor_model_parallel_size = {declared_tp} but "
                              f"{tp} mp_rank_* shards were found")

    roles: list[dict[tuple[str, int | None], torch.Tensor]] = []
    for file, shard in zip(files, shards, strict=True):
        table: dict[tuple[str, int | None], torch.Tensor] = {}
        keys: dict[tuple[str, int | None], str] = {}
        for key, value in _flatten(shard["model"]).items():
            if key.endswith("_extra_state") or not isinstance(value, torch.Tensor):
                continue
            if key.startswith("mtp."):
                raise ConversionError(f"{file}: {key} is a multi-token prediction layer in the legacy torch format; "
                                      "they are read from torch_dist checkpoints (Megatron-LM's default --ckpt-format; "
                                      "convert with --ckpt-convert-format torch_dist)")
            found = _classify(key)
            if found is None:
                raise ConversionError(f"{file}: tensor {key} has no counterpart in this project's model")
            table[found], keys[found] = value, key
        _check_optional_roles(keys, cfg, args, str(file))
        roles.append(table)
    m = cfg.model
    if not m.vocab_size:
        emb_rows = sum(t[("emb", None)].shape[0] for t in roles if ("emb", None) in t)
        m.vocab_size = emb_rows
        m.make_vocab_size_divisible_by = math.gcd(max(emb_rows, 1), 128)
    head_dim, groups = m.head_dim, m.num_kv_heads

    def shard_list(role: str, layer: int | None) -> list[torch.Tensor]:
        out = []
        for file, table in zip(files, roles, strict=True):
            if (role, layer) not in table:
                name = role if layer is None else f"layer {layer} {role}"
                raise ConversionError(f"{file}: no tensor for {name}")
            out.append(table[(role, layer)])
        return out

    def replicated(role: str, layer: int | None):
        def load() -> torch.Tensor:
            parts = shard_list(role, layer)
            for r, p in enumerate(parts[1:], 1):
                if not torch.equal(p, parts[0]):
                    raise ConversionError(f"{files[r]}: replicated tensor {role} (layer {layer}) differs from rank 0")
            return parts[0]
        return load

    def cat(role: str, layer: int | None, dim: int):
        return lambda: torch.cat(shard_list(role, layer), dim=dim)

    def qkv_part(layer: int, which: int, role: str = "qkv"):
        def load() -> torch.Tensor:  # column-parallel: the shards' rows concatenated, then split per group
            full = torch.cat(shard_list(role, layer), dim=0)
            return _split_qkv(full, m.num_attention_heads, groups, head_dim, f"{where} layer {layer} {role}")[which]
        return load

    def fc1_part(layer: int, which: int, role: str = "fc1"):
        def load() -> torch.Tensor:  # each shard: [its gate rows; its up rows]
            return torch.cat([_gate_up(p, which, f"{file}: layer {layer} {role}")
                              for file, p in zip(files, shard_list(role, layer), strict=True)], dim=0)
        return load

    loaders = _model_loaders(cfg, whole=replicated, vocab_parallel=lambda role: cat(role, None, 0),
                             row_parallel=lambda role, i: cat(role, i, 1), qkv_part=qkv_part,
                             fc1_part=fc1_part)
    layers_found = {layer for table in roles for (_, layer) in table if layer is not None}
    beyond = sorted(x for x in layers_found if x >= m.num_layers)
    if beyond:
        raise ConversionError(f"{where}: holds layer {beyond[0]} but args say num_layers = {m.num_layers}")
    source = DenseSource(cfg, loaders, f"megatron:{path}", extra={"megatron_args": sorted(args)})
    source.check()
    return source


# ---- torch_dist (megatron-core dist_checkpointing) ----

def torch_dist_dir(path: str | Path) -> Path | None:
    """The checkpoint directory of a torch_dist checkpoint at ``path`` (a save directory with its tracker
    file, or an ``iter_*`` directory), or None when ``path`` is not one."""
    path = Path(path)
    if path.is_file() and path.name in (DIST_COMMON, DIST_METADATA, DIST_CONFIG):
        return path.parent
    if not path.is_dir():
        return None
    ckpt = _checkpoint_dir(path)
    if (ckpt / DIST_METADATA).is_file() or (ckpt / DIST_CONFIG).is_file():
        return ckpt
    return None


def _read_dist_metadata(ckpt: Path) -> Metadata:
    config = ckpt / DIST_CONFIG
    if config.is_file():
        try:
            backend = json.loads(config.read_text()).get("sharded_backend")
        except (OSError, ValueError, AttributeError) as e:
            raise ConversionError(f"{config}: unreadable ({e})") from None
        if backend != "torch_dist":
            raise ConversionError(f"{config}: sharded_backend {backend!r}; only 'torch_dist' is read (convert a "
                                  "zarr checkpoint with Megatron-LM --ckpt-convert-format torch_dist first)")
    path = ckpt / DIST_METADATA
    if not path.is_file():
        raise ConversionError(f"{ckpt}: {DIST_METADATA} is missing; an incomplete torch_dist checkpoint")
    try:
        with open(path, "rb") as f:
            metadata = _SafeUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, ImportError) as e:
        raise ConversionError(f"{path}: cannot be loaded without running pickled code, or not DCP metadata: "
                              f"{e}") from None
    if not isinstance(metadata, Metadata):
        raise ConversionError(f"{path}: does not hold torch.distributed.checkpoint metadata")
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    return metadata


class _MetadataReader(FileSystemReader):
    """DCP's file reader, given metadata already read safely (it would otherwise unpickle it itself)."""

    def __init__(self, path: Path, metadata: Metadata):
        super().__init__(str(path))
        self._safe_metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        self._safe_metadata.storage_meta.load_id = self.load_id
        return self._safe_metadata


class _BytesPlanner(LoadPlanner):
    """Reads the raw bytes of one DCP bytes entry (``key``) into ``self.data``; nothing is unpickled here."""

    def __init__(self, key: str):
        self.key, self.data = key, None

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        pass

    def create_local_plan(self) -> LoadPlan:
        index = MetadataIndex(self.key)
        return LoadPlan([ReadItem(LoadItemType.BYTE_IO, index, torch.Size([0]), index, torch.Size([0]),
                                  torch.Size([0]))])

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, new_plan):
        return new_plan

    def load_bytes(self, read_item, value) -> None:
        self.data = value.read()

    def resolve_tensor(self, read_item) -> torch.Tensor:
        raise ConversionError(f"{self.key}: a bytes entry was expected")

    def commit_tensor(self, read_item, tensor) -> None:
        pass


def _dcp_read(ckpt: Path, metadata: Metadata, planner: LoadPlanner, key: str) -> None:
    """Run one DCP read of ``planner``'s entry ``key``; a failure (a lost ``.distcp`` file...) is a
    ConversionError naming the entry and the first cause."""
    try:
        dcp.load({}, storage_reader=_MetadataReader(ckpt, metadata), planner=planner, no_dist=True)
    except ConversionError:
        raise
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        cause = next(iter(getattr(e, "failures", {}).values()), e)  # DCP: rank -> (exception, frames)
        cause = cause[0] if isinstance(cause, tuple) else cause
        raise ConversionError(f"{ckpt}: reading {key} failed: {type(cause).__name__}: {cause}") from None


def _read_common_state(ckpt: Path, metadata: Metadata) -> tuple[dict[str, Any], str]:
    """Megatron-LM's common state of a torch_dist checkpoint (``args``, ``iteration``, ...) and where it was
    read: ``common.pt``, or the ``common_state`` bytes entry newer megatron-core writes into the DCP files
    (``torch.save([state])``); both are read without running pickled code. ({}, path) when neither exists."""
    common_file = ckpt / DIST_COMMON
    if common_file.is_file():
        return safe_torch_load(common_file), str(common_file)
    where = f"{ckpt} (entry {DIST_COMMON_ENTRY})"
    if not isinstance(metadata.state_dict_metadata.get(DIST_COMMON_ENTRY), BytesStorageMetadata):
        return {}, str(common_file)
    planner = _BytesPlanner(DIST_COMMON_ENTRY)
    _dcp_read(ckpt, metadata, planner, DIST_COMMON_ENTRY)
    state = safe_torch_load(planner.data or b"", where)
    if not (isinstance(state, list) and len(state) == 1):
        raise ConversionError(f"{where}: expected megatron-core's [common state] list")
    return state[0], where


class _ChunkPlanner(LoadPlanner):
    """Loads one region (``offsets``, ``buffer.shape``) of one checkpoint tensor into ``buffer``, reading only
    the saved chunks that overlap it; never reads a pickled entry."""

    def __init__(self, key: str, offsets: tuple[int, ...], buffer: torch.Tensor):
        self.key, self.offsets, self.buffer = key, offsets, buffer
        self.covered = 0

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        chunk = ChunkStorageMetadata(offsets=torch.Size(self.offsets), sizes=self.buffer.shape)
        items = create_read_items_for_chunk_list(self.key, self.metadata.state_dict_metadata[self.key], [chunk])
        self.covered = sum(math.prod(item.lengths) for item in items)
        return LoadPlan(items)

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, new_plan):
        return new_plan

    def load_bytes(self, read_item, value) -> None:
        raise ConversionError(f"refusing to unpickle checkpoint entry {read_item.dest_index.fqn}")

    def resolve_tensor(self, read_item) -> torch.Tensor:
        region = self.buffer
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths, strict=True)):
            region = region.narrow(dim, start, length)
        return region

    def commit_tensor(self, read_item, tensor) -> None:
        pass


def _mtp_depths(metadata: Metadata, args: dict[str, Any], where: str) -> int:
    """The multi-token prediction depths of a torch_dist checkpoint: those its ``mtp.layers.k.*`` tensors hold,
    which Megatron-LM's ``mtp_num_layers`` argument must agree with."""
    held = {int(m.group(1)) for key in metadata.state_dict_metadata
            if (m := re.match(r"mtp\.layers\.(\d+)\.", key))}
    depths = max(held) + 1 if held else 0
    said = int(_arg(args, "mtp_num_layers", 0))
    if held != set(range(depths)) or said != depths:
        raise ConversionError(f"{where}: Megatron argument mtp_num_layers = {said}, but the checkpoint holds "
                              f"multi-token prediction layers {sorted(held)} (mtp.layers.k.*); correct the arguments "
                              "with upcycle_checkpoint.py --megatron-args")
    return depths


def read_megatron_torch_dist(ckpt: str | Path, overrides: dict[str, Any] | None = None) -> ModelSource:
    """A :class:`ModelSource` (a :class:`DenseSource` for a dense model) for the torch_dist checkpoint directory
    ``ckpt`` (see the module docstring)."""
    ckpt = Path(ckpt)
    metadata = _read_dist_metadata(ckpt)
    if not any(key.startswith(_MODEL_PREFIXES) for key in metadata.state_dict_metadata):
        keys = sorted(metadata.state_dict_metadata)[:4]
        raise ConversionError(f"{ckpt}: no megatron-core model tensors (embedding.*, decoder.*, output_layer.*) in "
                              f"{DIST_METADATA}, only e.g. {keys}; --ckpt-format torch_dcp / fsdp_dtensor checkpoints "
                              "are not read")
    common, where = _read_common_state(ckpt, metadata)
    if not isinstance(common, dict):
        raise ConversionError(f"{where}: expected a dict of Megatron's common state")
    version = common.get("checkpoint_version", 3.0)
    if version is not None and float(version) < 3.0:
        raise ConversionError(f"{where}: checkpoint_version = {version}; versions before 3.0 are not supported")
    args_obj = common.get("args")
    args = dict(vars(args_obj)) if isinstance(args_obj, argparse.Namespace) else {}
    args.update(overrides or {})
    # The tensors are global: whatever tensor/pipeline layout wrote them reads as one model.
    cfg = config_from_megatron_args({**args, "pipeline_model_parallel_size": 1}, where)
    m = cfg.model
    m.mtp_num_layers = _mtp_depths(metadata, args, where)

    table: dict[tuple[str, int | None], tuple[str, int | None]] = {}  # (role, layer) -> (key, stacked index)
    for key, entry in metadata.state_dict_metadata.items():
        if not key.startswith(_MODEL_PREFIXES) or not isinstance(entry, TensorStorageMetadata):
            continue  # optimizer state, RNG state, Transformer Engine extra state
        per_layer = re.match(r"decoder\.layers\.\d+\.", key)
        stacked = key.startswith("decoder.layers.") and not per_layer
        found = _classify("decoder.layers.0." + key[len("decoder.layers."):] if stacked
                          else _mtp_block_key(key, m.num_layers))
        if found is None:
            raise ConversionError(f"{ckpt}: tensor {key} has no counterpart in this project's model")
        role, layer = found
        if not stacked:
            table[(role, layer)] = (key, None)
            continue
        if entry.size[0] != m.num_layers:
            raise ConversionError(f"{ckpt}: {key} stacks {entry.size[0]} layers but args say num_layers = "
                                  f"{m.num_layers}")
        for i in range(m.num_layers):
            table[(role, i)] = (key, i)
    _check_optional_roles({role: key for role, (key, _) in table.items()}, cfg, args, str(ckpt))
    if not m.vocab_size:
        emb = table.get(("emb", None))
        if emb is None:
            raise ConversionError(f"{ckpt}: no embedding.word_embeddings.weight")
        m.vocab_size = int(metadata.state_dict_metadata[emb[0]].size[0])
        m.make_vocab_size_divisible_by = math.gcd(max(m.vocab_size, 1), 128)

    def get(role: str, layer: int | None) -> torch.Tensor:
        if (role, layer) not in table:
            raise ConversionError(f"{ckpt}: no tensor for {role if layer is None else f'layer {layer} {role}'}")
        key, index = table[(role, layer)]
        entry = metadata.state_dict_metadata[key]
        size = tuple(entry.size)
        offsets, shape = ((0,) * len(size), size) if index is None else ((index,) + (0,) * (len(size) - 1),
                                                                         (1, *size[1:]))
        buffer = torch.empty(shape, dtype=entry.properties.dtype)
        planner = _ChunkPlanner(key, offsets, buffer)
        _dcp_read(ckpt, metadata, planner, key)
        if planner.covered != buffer.numel():
            raise ConversionError(f"{ckpt}: the saved chunks of {key} cover {planner.covered} of the "
                                  f"{buffer.numel()} values asked for; the checkpoint is incomplete")
        return buffer if index is None else buffer[0]

    def plain(role: str, layer: int | None = None):
        return lambda: get(role, layer)

    def qkv_part(layer: int, which: int, role: str = "qkv"):
        return lambda: _split_qkv(get(role, layer), m.num_attention_heads, m.num_kv_heads, m.head_dim,
                                  f"{ckpt} layer {layer} {role}")[which]

    def fc1_part(layer: int, which: int, role: str = "fc1"):
        # [gate of all ranks; up of all ranks]
        return lambda: _gate_up(get(role, layer), which, f"{ckpt}: layer {layer} {role}")

    loaders = _model_loaders(cfg, whole=plain, vocab_parallel=plain, row_parallel=plain, qkv_part=qkv_part,
                             fc1_part=fc1_part)
    beyond = sorted(layer for (role, layer) in table if layer is not None and not role.startswith("mtp_")
                    and layer >= m.num_layers + m.mtp_num_layers)
    if beyond:
        raise ConversionError(f"{ckpt}: holds layer {beyond[0]} but args say num_layers = {m.num_layers}")
    kind = ModelSource if cfg.moe.num_experts else DenseSource
    source = kind(cfg, loaders, f"megatron:{ckpt}", extra={"megatron_args": sorted(args),
                                                            "megatron_format": "torch_dist"})
    source.check()
    return source
