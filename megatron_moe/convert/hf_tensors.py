"""Tensor names and layouts: this project's parameters <-> a Hugging Face checkpoint's on-disk tensors.

One :class:`Link` per group of tensors that convert together, so import and export read the same
table. On-disk names are those of the released checkpoints (and of ``save_pretrained``, which
writes the original layout): ``model.layers.N.block_sparse_moe.experts.E.w1.weight`` for
Mixtral/PhiMoE experts, ``model.layers.N.mlp.experts.E.gate_proj.weight`` and the router
``mlp.gate.weight`` for Qwen3-MoE and Qwen2-MoE (and its ``mlp.shared_expert.gate_proj`` /
``up_proj`` / ``down_proj`` and ``mlp.shared_expert_gate``), ``self_attn.q_norm`` / ``k_norm`` for
Qwen3's query/key norms, fused ``qkv_proj`` / ``gate_up_proj`` for Phi-3.

Link kinds:

- ``same``: one parameter, one tensor, identical.
- ``rows``: several parameters stacked along dim 0 in one tensor (Phi-3: q, k, v rows in
  ``qkv_proj``; gate then up rows in ``gate_up_proj``).
- ``experts``: one stacked expert parameter ``[E, a, b]`` <-> E tensors ``[b, a]`` (expert ``e``'s
  nn.Linear weight is ``param[e].T``: ours store ``x @ W``, transformers' ``W @ x``).

GLM-4-MoE (``glm4_moe``) has Qwen3's attention names (q/k/v biases with ``attention_bias``, ``q_norm`` / ``k_norm``
with ``use_qk_norm``) and DeepSeek-V3's MoE and multi-token prediction names below (:data:`DEEPSEEK_MOE_FORMATS`).

DeepSeek-V3's multi-token prediction depth k (``num_nextn_predict_layers``) is layer ``num_hidden_layers + k``: its
block under the usual names, ``enorm``, ``hnorm``, ``eh_proj``, ``shared_head.norm`` (our ``mtp.k.*``), and copies of
the embedding and output layer (``embed_tokens``, ``shared_head.head``: written on export, not read on import).

DeepSeek-V3 (multi-latent attention): ``q_proj`` or ``q_a_proj`` / ``q_a_layernorm`` / ``q_b_proj``,
``kv_a_proj_with_mqa`` (the kv latent's rows, then the rotary key's: ``wkv_down`` and ``wk_rope`` stacked),
``kv_a_layernorm``, ``kv_b_proj``; the router's ``mlp.gate.e_score_correction_bias`` is ``expert_bias``, the
shared experts ``mlp.shared_experts.*``. Its checkpoints lay each head's rotary channels out in interleaved
pairs ``(x0, x1), (x2, x3), ...`` (``rope_interleave``); this model rotates the halves ``(y_j, y_{j + r/2})``, so
a link's ``rope = (group, r)`` reorders the last ``r`` rows of every ``group`` rows of the HF tensor:
``y = [x0, x2, ..., x1, x3, ...]`` on import and back on export. Attention scores are unchanged, since q
and k are reordered alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_moe.convert.source import ConversionError

_ATTN = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
_MLP = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_NORMS = {"attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_GLOBAL = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
_QK_NORMS = {"q_norm": "q_norm", "k_norm": "k_norm"}
# Per MoE format: the feed-forward module's name and the experts' projection names.
_QWEN_EXPERT = ("mlp", {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"})
_MOE_NAMES = {"qwen3_moe": _QWEN_EXPERT, "qwen2_moe": _QWEN_EXPERT, "deepseek_v3": _QWEN_EXPERT,
              "glm4_moe": _QWEN_EXPERT}
# Formats with DeepSeek-V3's MoE layer (``mlp.shared_experts.*``, the router's ``e_score_correction_bias``, both kept
# in float32 by transformers) and multi-token prediction layers
DEEPSEEK_MOE_FORMATS = ("deepseek_v3", "glm4_moe")
# DeepSeek-V3's multi-token prediction depth k: layer num_hidden_layers + k holds the block and these (besides copies
# of the embedding and output layer: MTP_COPIES)
_MTP = {"embedding_norm": "enorm", "hidden_norm": "hnorm", "proj": "eh_proj", "norm": "shared_head.norm"}
MTP_COPIES = {"embed_tokens.weight": "model.embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"}
_LATENT = {"wq_down": "q_a_proj", "q_latent_norm": "q_a_layernorm", "kv_latent_norm": "kv_a_layernorm",
           "wkv": "kv_b_proj", "wo": "o_proj"}
_MIXTRAL_MOE_NAMES = ("block_sparse_moe", {"w1": "w1", "w3": "w3", "w2": "w2"})


@dataclass(frozen=True)
class Link:
    """Parameters ``native`` <-> tensors ``hf``, converted as ``kind`` (module docstring)."""

    kind: str
    native: tuple[str, ...]
    hf: tuple[str, ...]
    rope: tuple[int, int] | None = None  # (group, r): the HF tensor's rotary rows are interleaved (docstring)


def _layer_link(name: str, arch: str, num_experts: int) -> Link | tuple[str, str] | None:
    """The link of layer parameter ``name`` (``layers.N.<rest>``); a (group key, hf name) pair for
    the members of a fused Phi-3 tensor; None if ``arch`` has no place for it."""
    _, idx, rest = name.split(".", 2)
    hf = f"model.layers.{idx}."
    module, _, leaf = rest.rpartition(".")
    if arch == "deepseek_v3" and module.startswith("attention."):
        return _latent_link(name, module[len("attention."):], leaf, hf)
    if module in _NORMS:
        return Link("same", (name,), (hf + f"{_NORMS[module]}.{leaf}",))
    if module.startswith("attention.") and module[len("attention."):] in _ATTN:
        proj = module[len("attention."):]
        if arch == "phi3" and proj != "wo":
            return (hf + "self_attn.qkv_proj." + leaf, name)
        return Link("same", (name,), (hf + f"self_attn.{_ATTN[proj]}.{leaf}",))
    if module.startswith("attention.") and module[len("attention."):] in _QK_NORMS:
        return Link("same", (name,), (hf + f"self_attn.{_QK_NORMS[module[len('attention.'):]]}.{leaf}",))
    moe_module, expert_names = _MOE_NAMES.get(arch, _MIXTRAL_MOE_NAMES)
    if arch == "qwen2_moe" and module.startswith("feed_forward.shared_expert."):  # nn.Linear weights as they are
        proj = module[len("feed_forward.shared_expert."):]
        return Link("same", (name,), (hf + f"mlp.shared_expert.{expert_names[proj]}.{leaf}",))
    if arch == "qwen2_moe" and module == "feed_forward.shared_gate":
        return Link("same", (name,), (hf + f"mlp.shared_expert_gate.{leaf}",))
    if arch in DEEPSEEK_MOE_FORMATS and module.startswith("feed_forward.shared_expert."):
        proj = module[len("feed_forward.shared_expert."):]
        return Link("same", (name,), (hf + f"mlp.shared_experts.{expert_names[proj]}.{leaf}",))
    if arch in DEEPSEEK_MOE_FORMATS and name.endswith("feed_forward.router.expert_bias"):
        return Link("same", (name,), (hf + "mlp.gate.e_score_correction_bias",))
    if module == "feed_forward.router.gate" and leaf == "weight":
        return Link("same", (name,), (hf + f"{moe_module}.gate.weight",))
    if module == "feed_forward.experts" and leaf in ("w1", "w2", "w3"):
        return Link("experts", (name,), tuple(hf + f"{moe_module}.experts.{e}.{expert_names[leaf]}.weight"
                                              for e in range(num_experts)))
    if module.startswith("feed_forward.") and module[len("feed_forward."):] in _MLP:
        proj = module[len("feed_forward."):]
        if arch == "phi3" and proj != "w2":
            return (hf + "mlp.gate_up_proj." + leaf, name)
        return Link("same", (name,), (hf + f"mlp.{_MLP[proj]}.{leaf}",))
    return None


def interleaved_rope(cfg, rope_interleave: bool = True) -> tuple[int, int] | None:
    """:func:`tensor_links`'s ``interleaved_rope`` for a DeepSeek-V3 checkpoint of the model ``cfg`` (a Config)
    whose config says ``rope_interleave`` (transformers' default: true)."""
    m = cfg.model
    if not (m.multi_latent_attention and rope_interleave):
        return None
    return (m.qk_head_dim + m.qk_pos_emb_head_dim, m.qk_pos_emb_head_dim)


def _latent_link(name: str, proj: str, leaf: str, hf: str) -> Link | tuple[str, str] | None:
    """DeepSeek-V3's name of a multi-latent attention parameter (``wq`` is ``q_proj`` without a query latent,
    ``q_b_proj`` with one: told apart in :func:`tensor_links`); the kv latent and rotary key share a tensor."""
    if proj in ("wkv_down", "wk_rope"):
        return (hf + "self_attn.kv_a_proj_with_mqa." + leaf, name)
    if proj == "wq":
        return Link("same", (name,), (hf + "self_attn.q_proj." + leaf,))
    if proj in _LATENT:
        return Link("same", (name,), (hf + f"self_attn.{_LATENT[proj]}.{leaf}",))
    return None


def tensor_links(shapes: dict[str, tuple[int, ...]], arch: str, num_experts: int,
                 interleaved_rope: tuple[int, int] | None = None) -> list[Link]:
    """The links covering every parameter in ``shapes`` (names of MoETransformer) for HF ``arch``.

    ``interleaved_rope``: (q/k head width, rotary channels r) when the HF tensors lay rotary channels out in
    interleaved pairs (DeepSeek-V3's ``rope_interleave``; module docstring). Raises ConversionError naming a
    parameter the architecture has no tensor for.
    """
    links: list[Link] = []
    fused: dict[str, list[str]] = {}
    depths = {name.split(".")[1] for name in shapes if name.startswith("mtp.")}
    main_layers = len({name.split(".")[1] for name in shapes if name.startswith("layers.")}) - len(depths)
    for name in shapes:
        module, _, leaf = name.rpartition(".")
        if module in _GLOBAL:
            links.append(Link("same", (name,), (f"{_GLOBAL[module]}.{leaf}",)))
            continue
        if name.startswith("mtp.") and arch in DEEPSEEK_MOE_FORMATS:
            _, depth, part, leaf = name.split(".")
            links.append(Link("same", (name,), (f"model.layers.{main_layers + int(depth)}.{_MTP[part]}.{leaf}",)))
            continue
        link = _layer_link(name, arch, num_experts) if name.startswith("layers.") else None
        if link is None:
            raise ConversionError(f"parameter {name} has no counterpart in the {arch} format")
        if isinstance(link, tuple):
            fused.setdefault(link[0], []).append(link[1])
        else:
            links.append(link)
    order = ("wq", "wk", "wv", "w1", "w3", "wkv_down", "wk_rope")
    for hf_name, members in fused.items():
        members.sort(key=lambda n: order.index(n.split(".")[-2]))
        rope = None
        if interleaved_rope and hf_name.endswith("kv_a_proj_with_mqa.weight"):
            rope = (sum(shapes[n][0] for n in members), interleaved_rope[1])
        links.append(Link("rows", tuple(members), (hf_name,), rope))
    if arch == "deepseek_v3":
        links = [_query_link(link, shapes, interleaved_rope) for link in links]
    return links


def _query_link(link: Link, shapes: dict[str, tuple[int, ...]], interleaved_rope: tuple[int, int] | None) -> Link:
    """DeepSeek-V3's query projection: ``q_b_proj`` after a query latent (``wq_down`` present), with the rotary
    rows of each head interleaved when ``interleaved_rope``."""
    name = link.native[0]
    if not name.endswith("attention.wq.weight"):
        return link
    hf = link.hf[0]
    if name.replace(".wq.", ".wq_down.") in shapes:
        hf = hf.replace(".q_proj.", ".q_b_proj.")
    return Link(link.kind, link.native, (hf,), interleaved_rope)


def interleaved_rope_rows(t: torch.Tensor, rope: tuple[int, int] | None, to_interleaved: bool) -> torch.Tensor:
    """Reorder the last r of every ``group`` rows of ``t`` (``rope = (group, r)``; None: ``t`` as it is): rotary
    channels as interleaved pairs -> halves (``to_interleaved`` false: reading DeepSeek's or megatron-core's
    latent attention) or back (module docstring)."""
    if rope is None:
        return t
    group, r = rope
    if t.shape[0] % group:
        raise ConversionError(f"a tensor of {t.shape[0]} rows does not hold whole heads of {group} rows")
    halves = torch.cat([torch.arange(0, r, 2), torch.arange(1, r, 2)])  # position j of the halves <- interleaved
    order = torch.argsort(halves) if to_interleaved else halves
    rows = torch.cat([torch.arange(group - r), group - r + order])
    grouped = t.reshape(t.shape[0] // group, group, *t.shape[1:])
    return grouped[:, rows].reshape(t.shape)


def to_hf(link: Link, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The HF tensors of ``link`` from the project ``state``."""
    if link.kind == "same":
        return {link.hf[0]: interleaved_rope_rows(state[link.native[0]], link.rope, to_interleaved=True)}
    if link.kind == "rows":
        return {link.hf[0]: interleaved_rope_rows(torch.cat([state[n] for n in link.native], dim=0), link.rope,
                                                    to_interleaved=True)}
    stacked = state[link.native[0]]
    return {name: stacked[e].t() for e, name in enumerate(link.hf)}


def from_hf(link: Link, read, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The project parameters of ``link``, reading HF tensors with ``read(name)``; ``shapes`` gives the
    row counts of fused tensors."""
    if link.kind == "same":
        return {link.native[0]: interleaved_rope_rows(read(link.hf[0]), link.rope, to_interleaved=False)}
    if link.kind == "rows":
        fused = interleaved_rope_rows(read(link.hf[0]), link.rope, to_interleaved=False)
        rows = [shapes[n][0] for n in link.native]
        if fused.shape[0] != sum(rows):
            raise ConversionError(f"{link.hf[0]} has {fused.shape[0]} rows; the config implies {sum(rows)} "
                                  f"({' + '.join(map(str, rows))})")
        return dict(zip(link.native, torch.split(fused, rows, dim=0), strict=True))
    return {link.native[0]: torch.stack([read(name).t() for name in link.hf])}
