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
_MOE_NAMES = {"qwen3_moe": _QWEN_EXPERT, "qwen2_moe": _QWEN_EXPERT}
_MIXTRAL_MOE_NAMES = ("block_sparse_moe", {"w1": "w1", "w3": "w3", "w2": "w2"})


@dataclass(frozen=True)
class Link:
    """Parameters ``native`` <-> tensors ``hf``, converted as ``kind`` (module docstring)."""

    kind: str
    native: tuple[str, ...]
    hf: tuple[str, ...]


def _layer_link(name: str, arch: str, num_experts: int) -> Link | tuple[str, str] | None:
    """The link of layer parameter ``name`` (``layers.N.<rest>``); a (group key, hf name) pair for
    the members of a fused Phi-3 tensor; None if ``arch`` has no place for it."""
    _, idx, rest = name.split(".", 2)
    hf = f"model.layers.{idx}."
    module, _, leaf = rest.rpartition(".")
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


def tensor_links(shapes: dict[str, tuple[int, ...]], arch: str, num_experts: int) -> list[Link]:
    """The links covering every parameter in ``shapes`` (names of MoETransformer) for HF ``arch``.

    Raises ConversionError naming a parameter the architecture has no tensor for.
    """
    links: list[Link] = []
    fused: dict[str, list[str]] = {}
    for name in shapes:
        module, _, leaf = name.rpartition(".")
        if module in _GLOBAL:
            links.append(Link("same", (name,), (f"{_GLOBAL[module]}.{leaf}",)))
            continue
        link = _layer_link(name, arch, num_experts) if name.startswith("layers.") else None
        if link is None:
            raise ConversionError(f"parameter {name} has no counterpart in the {arch} format")
        if isinstance(link, tuple):
            fused.setdefault(link[0], []).append(link[1])
        else:
            links.append(link)
    order = ("wq", "wk", "wv", "w1", "w3")
    for hf_name, members in fused.items():
        members.sort(key=lambda n: order.index(n.split(".")[-2]))
        links.append(Link("rows", tuple(members), (hf_name,)))
    return links


def to_hf(link: Link, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The HF tensors of ``link`` from the project ``state``."""
    if link.kind == "same":
        return {link.hf[0]: state[link.native[0]]}
    if link.kind == "rows":
        return {link.hf[0]: torch.cat([state[n] for n in link.native], dim=0)}
    stacked = state[link.native[0]]
    return {name: stacked[e].t() for e, name in enumerate(link.hf)}


def from_hf(link: Link, read, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The project parameters of ``link``, reading HF tensors with ``read(name)``; ``shapes`` gives the
    row counts of fused tensors."""
    if link.kind == "same":
        return {link.native[0]: read(link.hf[0])}
    if link.kind == "rows":
        fused = read(link.hf[0])
        rows = [shapes[n][0] for n in link.native]
        if fused.shape[0] != sum(rows):
            raise ConversionError(f"{link.hf[0]} has {fused.shape[0]} rows; the config implies {sum(rows)} "
                                  f"({' + '.join(map(str, rows))})")
        return dict(zip(link.native, torch.split(fused, rows, dim=0), strict=True))
    return {link.native[0]: torch.stack([read(name).t() for name in link.hf])}
