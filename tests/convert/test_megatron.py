"""Megatron-LM checkpoints -> our model: legacy torch (written here, TP=1 and TP=2, mcore and old layouts) and
torch_dist (written by megatron-core's own GPTModel.sharded_state_dict + dist_checkpointing.save, TP=2)."""

from __future__ import annotations

import argparse
import enum
import math
import pathlib
import random
import re

import numpy as np
import pytest
import torch

import upcycle_checkpoint
from megatron_moe.convert.megatron_format import read_megatron
from megatron_moe.convert.native import load_model
from megatron_moe.convert.source import ConversionError
from megatron_moe.model.transformer import is_moe_layer
from tests.convert.helpers import save_native, tiny_config, tokens


class AttnBackend(enum.Enum):  # stands for Megatron's enums stored inside `args`
    auto = 5


class Evil:
    """Would create a file when unpickled by a loader that runs pickled code."""

    def __init__(self, target: pathlib.Path):
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.touch, (self.target,))


def megatron_args(cfg, tp: int, **overrides) -> argparse.Namespace:
    m = cfg.model
    args = dict(
        hidden_size=m.hidden_size, num_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        group_query_attention=True, num_query_groups=m.num_query_groups, ffn_hidden_size=m.ffn_hidden_size,
        kv_channels=m.head_dim, padded_vocab_size=m.vocab_size, seq_length=64,
        swiglu=True, normalization=m.normalization, apply_layernorm_1p=m.apply_layernorm_1p,
        position_embedding_type="rope", add_bias_linear=m.add_bias_linear, add_qkv_bias=m.add_qkv_bias,
        rotary_interleaved=False, rotary_percent=m.rotary_percent, rotary_base=int(m.rope_theta),
        norm_epsilon=m.norm_eps, untie_embeddings_and_output_weights=not m.tie_embeddings, qk_layernorm=m.qk_layernorm,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, num_experts=cfg.moe.num_experts or None,
        attention_backend=AttnBackend.auto, params_dtype=torch.float32, mtp_num_layers=m.mtp_num_layers or None,
    )
    if m.multi_latent_attention:  # Megatron-LM's DeepSeek-V3 arguments, at the plain rotary embedding or YaRN
        args.update(multi_latent_attention=True, q_lora_rank=m.q_lora_rank or None, kv_lora_rank=m.kv_lora_rank,
                    qk_head_dim=m.qk_head_dim, qk_pos_emb_head_dim=m.qk_pos_emb_head_dim, v_head_dim=m.v_head_dim,
                    group_query_attention=False, **megatron_rope(m))
    if cfg.moe.num_experts:  # megatron-core's arguments of an MoE model (first_k_dense / layer_freq as a list)
        e = cfg.moe
        args.update(moe_router_topk=e.topk, moe_ffn_hidden_size=cfg.expert_ffn_size, moe_router_pre_softmax=False,
                    moe_layer_freq=[int(is_moe_layer(cfg, i)) for i in range(m.num_layers)],
                    moe_router_score_function=e.score_function, moe_router_enable_expert_bias=e.expert_bias,
                    moe_router_topk_scaling_factor=None if e.topk_scaling_factor == 1.0 else e.topk_scaling_factor,
                    moe_shared_expert_intermediate_size=e.shared_expert_ffn_hidden_size or None,
                    moe_shared_expert_gate=e.shared_expert_gate, moe_grouped_gemm=False,
                    moe_router_num_groups=e.router_num_groups or None,
                    moe_router_group_topk=e.router_group_topk or None, moe_aux_loss_coeff=0.0)
    args.update(overrides)
    return argparse.Namespace(**args)


def megatron_rope(m) -> dict:
    """Megatron-LM's rope arguments of a latent attention model: YaRN at its factor and mscales (the original
    context and betas at megatron-core's defaults), or the plain rotary embedding."""
    if m.rope_scaling != "yarn":
        return dict(rope_type="rope", rotary_scaling_factor=1.0)
    return dict(rope_type="yarn", rotary_scaling_factor=m.rope_scaling_factor, mscale=m.rope_yarn_mscale,
                mscale_all_dim=m.rope_yarn_mscale_all_dim)


def fused_qkv(state, i, cfg, kind: str = "weight") -> torch.Tensor:
    """Megatron's interleaved layout: per query group, its q heads, then k, then v (the bias's rows likewise)."""
    m = cfg.model
    hd, groups = m.head_dim, m.num_query_groups
    per = m.num_attention_heads // groups
    q = state[f"layers.{i}.attention.wq.{kind}"].reshape(groups, per * hd, -1)
    k = state[f"layers.{i}.attention.wk.{kind}"].reshape(groups, hd, -1)
    v = state[f"layers.{i}.attention.wv.{kind}"].reshape(groups, hd, -1)
    fused = torch.cat([q, k, v], dim=1)
    return fused.reshape(-1, m.hidden_size) if kind == "weight" else fused.reshape(-1)


def moe_shard(state, p: str, rows, cols, experts: tuple[int, int] | None = None) -> dict:
    """One MoE layer (our names under ``p``) as megatron-core's modules on one tensor-parallel rank: the router
    weight and expert bias whole, every local expert's fc1 as [this shard's gate; its up] and fc2 by columns
    (SequentialMLP, experts sharded over TP like the dense MLP), the shared expert likewise, its gate whole.
    ``experts`` (first, count): under expert parallelism the rank's experts, numbered from 0 locally."""
    out = {"mlp.router.weight": state[p + "router.gate.weight"].clone()}
    if p + "router.expert_bias" in state:
        out["mlp.router.expert_bias"] = state[p + "router.expert_bias"].clone()
    w1, w3, w2 = (state[p + f"experts.{n}"] for n in ("w1", "w3", "w2"))  # [E, H, F], [E, H, F], [E, F, H]
    first, count = experts or (0, w1.shape[0])
    for local, e in enumerate(range(first, first + count)):
        out[f"mlp.experts.local_experts.{local}.linear_fc1.weight"] = torch.cat([rows(w1[e].t()), rows(w3[e].t())])
        out[f"mlp.experts.local_experts.{local}.linear_fc2.weight"] = cols(w2[e].t())
    if p + "shared_expert.w1.weight" in state:
        s1, s3 = state[p + "shared_expert.w1.weight"], state[p + "shared_expert.w3.weight"]
        out["mlp.shared_experts.linear_fc1.weight"] = torch.cat([rows(s1), rows(s3)])
        out["mlp.shared_experts.linear_fc2.weight"] = cols(state[p + "shared_expert.w2.weight"])
    if p + "shared_gate.weight" in state:
        out["mlp.shared_experts.gate_weight"] = state[p + "shared_gate.weight"].clone()
    return out


def to_interleaved_rope(t: torch.Tensor, group: int, r: int) -> torch.Tensor:
    """Rows of ``t`` in groups of ``group`` whose last ``r`` hold rotary channels as halves (ours) -> as interleaved
    pairs (megatron-core's and DeepSeek's latent attention): pair j = (half one's j, half two's j)."""
    g = t.reshape(-1, group, *t.shape[1:])
    first, second = g[:, group - r: group - r // 2], g[:, group - r // 2:]
    pairs = torch.stack([first, second], dim=2).reshape(g.shape[0], r, *t.shape[1:])
    return torch.cat([g[:, :group - r], pairs], dim=1).reshape(t.shape)


def latent_attention_shard(state, p: str, m, rows) -> dict:
    """Layer ``p``'s latent attention as megatron-core's local-spec modules on one tensor-parallel rank: every
    projection a column-parallel linear (the down-projections too: their rows are gathered in forward), rotary
    channels interleaved, the latent norms whole."""
    head, rope = m.qk_head_dim + m.qk_pos_emb_head_dim, m.qk_pos_emb_head_dim
    query = to_interleaved_rope(state[p + "wq.weight"], head, rope)
    kv_down = torch.cat([state[p + "wkv_down.weight"], to_interleaved_rope(state[p + "wk_rope.weight"], rope, rope)])
    out = {"self_attention.linear_kv_down_proj.weight": rows(kv_down),
           "self_attention.linear_kv_up_proj.weight": rows(state[p + "wkv.weight"]),
           "self_attention.kv_layernorm.weight": state[p + "kv_latent_norm.weight"].clone()}
    if m.q_lora_rank:
        out.update({"self_attention.linear_q_down_proj.weight": rows(state[p + "wq_down.weight"]),
                    "self_attention.linear_q_up_proj.weight": rows(query),
                    "self_attention.q_layernorm.weight": state[p + "q_latent_norm.weight"].clone()})
    else:
        out["self_attention.linear_q_proj.weight"] = rows(query)
    return out


def shard_model(state, cfg, tp: int, r: int, layout: str, experts: tuple[int, int] | None = None) -> dict:
    """Rank r's Megatron model dict (mcore flat keys, or the old nested language_model layout), with the norm
    biases of LayerNorm (the old layout then names the norms ``*_layernorm``), the QKV bias (``add_qkv_bias``)
    and the linear_proj / fc1 / fc2 biases (``add_bias_linear``) of ``cfg``: column-parallel ones (QKV, fc1 as
    [this shard's gate; its up]) split over ``tp``, row-parallel ones and norms replicated."""
    m = cfg.model

    def rows(t):
        n = t.shape[0] // tp
        return t[r * n:(r + 1) * n].clone()

    def cols(t):
        n = t.shape[1] // tp
        return t[:, r * n:(r + 1) * n].clone()

    layers, moe_keys = {}, {}
    for i in range(m.num_layers + m.mtp_num_layers):  # multi-token prediction's blocks after the layers
        p = f"layers.{i}."
        layers[i] = dict(proj=cols(state[p + "attention.wo.weight"]), norm1=state[p + "attention_norm.weight"].clone(),
                         norm2=state[p + "ffn_norm.weight"].clone())
        if m.multi_latent_attention:
            moe_keys[i] = latent_attention_shard(state, p + "attention.", m, rows)
        else:
            layers[i]["qkv"] = rows(fused_qkv(state, i, cfg))
        if p + "feed_forward.router.gate.weight" in state:  # an MoE layer: megatron-core's local expert modules
            moe_keys[i] = moe_keys.get(i, {}) | moe_shard(state, p + "feed_forward.", rows, cols, experts)
        else:
            w1, w3 = state[p + "feed_forward.w1.weight"], state[p + "feed_forward.w3.weight"]
            layers[i].update(fc1=torch.cat([rows(w1), rows(w3)]), fc2=cols(state[p + "feed_forward.w2.weight"]))
        if m.normalization == "LayerNorm":
            layers[i].update(norm1_b=state[p + "attention_norm.bias"].clone(),
                             norm2_b=state[p + "ffn_norm.bias"].clone())
        if m.qk_layernorm and not m.multi_latent_attention:  # megatron-core only; replicated over TP
            layers[i].update({role: state[p + f"attention.{name}_norm.{kind}"].clone()
                              for role, name, kind in (("qnorm", "q", "weight"), ("knorm", "k", "weight"),
                                                       ("qnorm_b", "q", "bias"), ("knorm_b", "k", "bias"))
                              if p + f"attention.{name}_norm.{kind}" in state})
        if m.add_qkv_bias:
            layers[i]["qkv_b"] = rows(fused_qkv(state, i, cfg, "bias"))
        if m.add_bias_linear:
            b1, b3 = state[p + "feed_forward.w1.bias"], state[p + "feed_forward.w3.bias"]
            layers[i].update(proj_b=state[p + "attention.wo.bias"].clone(), fc1_b=torch.cat([rows(b1), rows(b3)]),
                             fc2_b=state[p + "feed_forward.w2.bias"].clone())
    emb, final = rows(state["tok_embeddings.weight"]), state["norm.weight"].clone()
    final_b = state["norm.bias"].clone() if m.normalization == "LayerNorm" else None
    out = None if m.tie_embeddings else rows(state["output.weight"])
    if layout == "mcore":  # Transformer Engine names: norms fused into the following linear
        model = {"embedding.word_embeddings.weight": emb, "decoder.final_layernorm.weight": final}
        names = {"qkv": "self_attention.linear_qkv.weight", "norm1": "self_attention.linear_qkv.layer_norm_weight",
                 "proj": "self_attention.linear_proj.weight", "fc1": "mlp.linear_fc1.weight",
                 "norm2": "mlp.linear_fc1.layer_norm_weight", "fc2": "mlp.linear_fc2.weight",
                 "norm1_b": "self_attention.linear_qkv.layer_norm_bias", "qkv_b": "self_attention.linear_qkv.bias",
                 "proj_b": "self_attention.linear_proj.bias", "norm2_b": "mlp.linear_fc1.layer_norm_bias",
                 "fc1_b": "mlp.linear_fc1.bias", "fc2_b": "mlp.linear_fc2.bias",
                 "qnorm": "self_attention.q_layernorm.weight", "knorm": "self_attention.k_layernorm.weight",
                 "qnorm_b": "self_attention.q_layernorm.bias", "knorm_b": "self_attention.k_layernorm.bias"}
        for i, t in layers.items():
            d = f"decoder.layers.{i}." if i < m.num_layers else f"mtp.layers.{i - m.num_layers}.transformer_layer."
            model.update({d + names[role]: tensor for role, tensor in t.items()})
            model.update({d + key: tensor for key, tensor in moe_keys.get(i, {}).items()})
            if not m.multi_latent_attention:
                model[d + "self_attention.linear_qkv._extra_state"] = None
        if final_b is not None:
            model["decoder.final_layernorm.bias"] = final_b
        if out is not None:
            model["output_layer.weight"] = out
        for k in range(m.mtp_num_layers):  # megatron-core's MultiTokenPredictionLayer: eh_proj column-parallel
            for ours, theirs in (("embedding_norm", "enorm"), ("hidden_norm", "hnorm"), ("norm", "final_layernorm")):
                for kind in ("weight", "bias"):
                    if f"mtp.{k}.{ours}.{kind}" in state:
                        model[f"mtp.layers.{k}.{theirs}.{kind}"] = state[f"mtp.{k}.{ours}.{kind}"].clone()
            model[f"mtp.layers.{k}.eh_proj.weight"] = rows(state[f"mtp.{k}.proj.weight"])
        return model
    norm = "layernorm" if m.normalization == "LayerNorm" else "norm"
    encoder = {f"final_{norm}.weight": final}
    if final_b is not None:
        encoder[f"final_{norm}.bias"] = final_b
    names = {"norm1": f"input_{norm}.weight", "qkv": "self_attention.query_key_value.weight",
             "proj": "self_attention.dense.weight", "norm2": f"post_attention_{norm}.weight",
             "fc1": "mlp.dense_h_to_4h.weight", "fc2": "mlp.dense_4h_to_h.weight",
             "norm1_b": f"input_{norm}.bias", "qkv_b": "self_attention.query_key_value.bias",
             "proj_b": "self_attention.dense.bias", "norm2_b": f"post_attention_{norm}.bias",
             "fc1_b": "mlp.dense_h_to_4h.bias", "fc2_b": "mlp.dense_4h_to_h.bias"}
    for i, t in layers.items():
        encoder.update({f"layers.{i}.{names[role]}": tensor for role, tensor in t.items()})
    lm = {"embedding": {"word_embeddings": {"weight": emb}}, "encoder": encoder}
    if out is not None:
        lm["output_layer"] = {"weight": out}
    return {"language_model": lm}


def write_megatron(root: pathlib.Path, state, cfg, tp: int, layout: str = "mcore", evil_target=None, **arg_overrides):
    """A Megatron save dir: tracker file + iter_0000010/mp_rank_0R/model_optim_rng.pt for R < tp."""
    root.mkdir(parents=True)
    (root / "latest_checkpointed_iteration.txt").write_text("10")
    for r in range(tp):
        d = root / "iter_0000010" / f"mp_rank_{r:02d}"
        d.mkdir(parents=True)
        ckpt = {
            "args": megatron_args(cfg, tp, **arg_overrides), "checkpoint_version": 3.0, "iteration": 10,
            "model": shard_model(state, cfg, tp, r, layout),
            "rng_state": [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
                           "torch_rng_state": torch.get_rng_state()}],
        }
        if evil_target is not None:
            ckpt["evil"] = Evil(evil_target)
        torch.save(ckpt, d / "model_optim_rng.pt")
    return root


@pytest.fixture
def reference(tmp_path):
    cfg = tiny_config(num_experts=0)
    model = save_native(tmp_path / "native_dense", cfg, seed=3)
    return cfg, {k: v.detach().clone() for k, v in model.state_dict().items()}, model


@pytest.mark.parametrize("layout", ["mcore", "legacy"])
def test_tp2_and_tp1_convert_to_the_same_model(tmp_path, reference, layout):
    cfg, state, _ = reference
    one = read_megatron(write_megatron(tmp_path / "tp1", state, cfg, 1, layout))
    two = read_megatron(write_megatron(tmp_path / "tp2", state, cfg, 2, layout))
    assert one.cfg.model == two.cfg.model
    assert (two.cfg.model.num_query_groups, two.cfg.model.ffn_hidden_size, two.cfg.model.vocab_size) == (2, 64, 96)
    a, b = one.state_dict(), two.state_dict()
    assert set(a) == set(b) == set(state)
    for name in state:  # bit-exact: the hand-built reference, TP=1 and TP=2 agree
        assert torch.equal(a[name], state[name]), name
        assert torch.equal(b[name], state[name]), name


# ---- LayerNorm, biases (add_bias_linear / add_qkv_bias) and apply_layernorm_1p ----

BIASED = dict(normalization="LayerNorm", add_bias_linear=True, add_qkv_bias=True)  # Megatron's add_bias_linear


@pytest.fixture
def biased(tmp_path):
    """A dense model with LayerNorm and every bias of Megatron's add_bias_linear (norm weights and all biases
    randomised by save_native, so a dropped or misplaced one shows)."""
    cfg = tiny_config(num_experts=0, **BIASED)
    model = save_native(tmp_path / "native_biased", cfg, seed=5)
    return cfg, {k: v.detach().clone() for k, v in model.state_dict().items()}, model


@pytest.mark.parametrize("layout", ["mcore", "legacy"])
def test_layernorm_and_biases_tp2_and_tp1_convert_to_the_same_model(tmp_path, biased, layout):
    """LayerNorm (weight and bias) with add_bias_linear: the QKV bias (interleaved per query group) and the fc1
    bias ([gate; up] per shard) split over TP like their weights, linear_proj / linear_fc2 and norm biases
    replicated; TP=1 and TP=2, mcore (Transformer Engine names) and old layout, read back bit-exactly."""
    cfg, state, _ = biased
    one = read_megatron(write_megatron(tmp_path / "tp1", state, cfg, 1, layout))
    two = read_megatron(write_megatron(tmp_path / "tp2", state, cfg, 2, layout))
    m = two.cfg.model
    assert (m.normalization, m.add_bias_linear, m.add_qkv_bias, m.apply_layernorm_1p) == ("LayerNorm", True, True,
                                                                                          False)
    assert one.cfg.model == m
    biases = [name for name in state if name.endswith(".bias")]
    assert len(biases) == 1 + 2 * 9  # final norm; per layer 2 norms, q, k, v, wo, w1, w3, w2
    assert all(state[name].abs().min() > 0 for name in biases)
    a, b = one.state_dict(), two.state_dict()
    assert set(a) == set(b) == set(state)
    for name in state:
        assert torch.equal(a[name], state[name]), name
        assert torch.equal(b[name], state[name]), name


def test_megatron_norm_and_bias_arguments_must_match_the_tensors(tmp_path, biased, reference):
    """Unknown normalization; a bias the args rule out (it would be dropped); a bias the args promise but the
    checkpoint lacks; a replicated bias that differs between TP shards: each named."""
    cfg, state, _ = biased
    with pytest.raises(ConversionError, match=r"normalization = 'L2Norm'; only 'LayerNorm' and 'RMSNorm'"):
        read_megatron(write_megatron(tmp_path / "a", state, cfg, 1, normalization="L2Norm"))
    root = write_megatron(tmp_path / "b", state, cfg, 2, "legacy", add_bias_linear=False, add_qkv_bias=True)
    with pytest.raises(ConversionError, match=r"mp_rank_00.*: holds language_model\.encoder\.layers\.0\.mlp\."
                                              r"dense_4h_to_h\.bias \(a MLP linear_fc2 bias\) but the Megatron "
                                              r"arguments say there is none \(add_bias_linear = False\); correct"):
        read_megatron(root)
    plain_cfg, plain_state, _ = reference
    with pytest.raises(ConversionError, match=r"has no final norm bias but the Megatron arguments say it has one "
                                              r"\(normalization = 'LayerNorm'\)"):
        read_megatron(write_megatron(tmp_path / "c", plain_state, plain_cfg, 1, normalization="LayerNorm"))
    root = write_megatron(tmp_path / "d", state, cfg, 2)
    shard = root / "iter_0000010" / "mp_rank_01" / "model_optim_rng.pt"
    ckpt = torch.load(shard, weights_only=False)
    ckpt["model"]["decoder.layers.1.self_attention.linear_proj.bias"] += 1
    torch.save(ckpt, shard)
    source = read_megatron(root)
    with pytest.raises(ConversionError, match=r"mp_rank_01.*replicated tensor proj_b \(layer 1\) differs from rank 0"):
        source.get("layers.1.attention.wo.bias")


# ---- query/key norms (--qk-layernorm) and a head dimension of its own (--kv-channels): Qwen3's attention ----

QWEN3_ATTENTION = dict(qk_layernorm=True, kv_channels=12)  # hidden 32 / 4 heads would give 8


@pytest.mark.parametrize("normalization", ["RMSNorm", "LayerNorm"])
def test_qk_layernorm_and_kv_channels_tp2_and_tp1_convert_to_the_same_model(tmp_path, normalization):
    """q_layernorm / k_layernorm (weights, and biases with LayerNorm; random, different for q and k) replicated
    over TP, and fused QKV rows of 12-wide heads on a hidden size of 32: TP=1 and TP=2 read back bit-exactly,
    with model.kv_channels = 12 and model.qk_layernorm from the arguments."""
    cfg = tiny_config(num_experts=0, normalization=normalization, **QWEN3_ATTENTION)
    state = {k: v.detach().clone() for k, v in save_native(tmp_path / "native", cfg, seed=4).state_dict().items()}
    assert not torch.equal(state["layers.0.attention.q_norm.weight"], state["layers.0.attention.k_norm.weight"])
    one = read_megatron(write_megatron(tmp_path / "tp1", state, cfg, 1))
    two = read_megatron(write_megatron(tmp_path / "tp2", state, cfg, 2))
    m = two.cfg.model
    assert (m.kv_channels, m.head_dim, m.qk_layernorm, m.normalization) == (12, 12, True, normalization)
    assert one.cfg.model == m
    a, b = one.state_dict(), two.state_dict()
    assert set(a) == set(b) == set(state)
    for name in state:
        assert torch.equal(a[name], state[name]), name
        assert torch.equal(b[name], state[name]), name


def test_qk_layernorm_argument_must_match_the_tensors(tmp_path, reference):
    """Query/key norm tensors with qk_layernorm = False would be dropped, and qk_layernorm = True without them
    leaves the norms unread: both refused naming the argument; a kv_channels that is no head size is named."""
    cfg = tiny_config(num_experts=0, **QWEN3_ATTENTION)
    state = {k: v.detach().clone() for k, v in save_native(tmp_path / "native", cfg, seed=4).state_dict().items()}
    with pytest.raises(ConversionError, match=r"holds decoder\.layers\.0\.self_attention\.k_layernorm\.weight \(a "
                                              r"key norm \(k_layernorm\)\) but the Megatron arguments say there is "
                                              r"none \(qk_layernorm = False\)"):
        read_megatron(write_megatron(tmp_path / "a", state, cfg, 2, qk_layernorm=False))
    plain_cfg, plain_state, _ = reference
    with pytest.raises(ConversionError, match=r"has no key norm \(k_layernorm\) but the Megatron arguments say it "
                                              r"has one \(qk_layernorm = True\)"):
        read_megatron(write_megatron(tmp_path / "b", plain_state, plain_cfg, 1, qk_layernorm=True))
    with pytest.raises(ConversionError, match=r"fused QKV has 96 rows; expected 2 groups x \(2 \+ 2\) heads x 16"):
        read_megatron(write_megatron(tmp_path / "c", state, cfg, 1, kv_channels=16)).state_dict()
    with pytest.raises(ConversionError, match=r"kv_channels = -4 with hidden_size = 32"):
        read_megatron(write_megatron(tmp_path / "d", state, cfg, 1, kv_channels=-4))


@pytest.mark.parametrize(("normalization", "layout"), [("LayerNorm", "legacy"), ("RMSNorm", "mcore")])
def test_apply_layernorm_1p_keeps_the_zero_centred_weights(tmp_path, normalization, layout):
    """--apply-layernorm-1p (written by hand: megatron-core's CPU norms cannot do it): the stored zero-centred norm
    weights w load unchanged with model.apply_layernorm_1p = true, and that model's logits equal, bit for bit,
    those of the same model with plain norms holding w + 1 (and differ from plain norms holding w)."""
    import copy

    from megatron_moe.convert.native import model_from_state
    from megatron_moe.model.transformer import build_model

    cfg = tiny_config(num_experts=0, normalization=normalization, apply_layernorm_1p=True)
    state = build_model(cfg, "cpu", seed=4).state_dict()
    generator = torch.Generator().manual_seed(1)
    for name, t in state.items():  # the norms start at w = 0 (and bias 0): randomise them around 0
        if name.split(".")[-2].endswith("norm"):
            t.uniform_(-0.5, 0.5, generator=generator)
    source = read_megatron(write_megatron(tmp_path / "m", state, cfg, 2, layout))
    assert source.cfg.model.apply_layernorm_1p and source.cfg.model.normalization == normalization
    got = source.state_dict()
    assert set(got) == set(state)
    for name in state:
        assert torch.equal(got[name], state[name]), name
    plain = copy.deepcopy(source.cfg)
    plain.model.apply_layernorm_1p = False
    shifted = {name: t + 1 if name.endswith("norm.weight") else t for name, t in got.items()}
    x = tokens()
    with torch.no_grad():
        one_p = model_from_state(source.cfg, got)(x)
        assert torch.equal(one_p, model_from_state(plain, shifted)(x))
        assert (one_p - model_from_state(plain, got)(x)).abs().max() > 1e-2


def test_upcycling_refuses_ffn_biases_and_keeps_qkv_biases(tmp_path, capsys, biased):
    """add_bias_linear (FFN biases): upcycling stops with an error naming the setting (the experts have none) and
    writes nothing; the same checkpoint imports as a dense model with every bias. add_qkv_bias alone with
    LayerNorm: upcycles, the biases and norms kept, and the MoE computes the dense function (1e-5)."""
    from megatron_moe.convert.upcycle import UpcycleOptions, upcycle

    cfg, state, _ = biased
    root = write_megatron(tmp_path / "meg", state, cfg, 2)
    rc = upcycle_checkpoint.main(["--input", str(root), "--input-format", "megatron", "--num-experts", "4",
                                  "--output", str(tmp_path / "moe")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert ("the dense FFN has biases (model.add_bias_linear = true; Megatron-LM's add_bias_linear, i.e. trained "
            "without --disable-bias-linear; e.g. layers.0.feed_forward.w1.bias) but the experts have none") in err
    assert "import it without --num-experts to keep the dense model" in err
    assert not (tmp_path / "moe").exists()
    with pytest.raises(ConversionError, match=r"megatron:.*the dense FFN has biases \(model.add_bias_linear = true"):
        upcycle(read_megatron(root), UpcycleOptions(4))
    rc = upcycle_checkpoint.main(["--input", str(root), "--input-format", "megatron", "--output",
                                  str(tmp_path / "dense")])
    assert rc == 0, capsys.readouterr().err
    model, _ = load_model(tmp_path / "dense")
    assert model.cfg.model.add_bias_linear and all(torch.equal(t, state[n]) for n, t in model.state_dict().items())

    qkv_cfg = tiny_config(num_experts=0, normalization="LayerNorm", add_qkv_bias=True)
    dense = save_native(tmp_path / "qkv_native", qkv_cfg, seed=6)
    qkv_state = {k: v.detach().clone() for k, v in dense.state_dict().items()}
    qkv_root = write_megatron(tmp_path / "qkv", qkv_state, qkv_cfg, 2, "legacy")
    m = read_megatron(qkv_root).cfg.model
    assert (m.normalization, m.add_bias_linear, m.add_qkv_bias) == ("LayerNorm", False, True)
    rc = upcycle_checkpoint.main(["--input", str(qkv_root), "--input-format", "megatron", "--num-experts", "4",
                                  "--output", str(tmp_path / "qkv_moe")])
    assert rc == 0, capsys.readouterr().err
    moe, _ = load_model(tmp_path / "qkv_moe")
    got = moe.state_dict()
    for name in [n for n in qkv_state if n.endswith(".bias")]:  # q, k, v and the norms' biases
        assert torch.equal(got[name], qkv_state[name]), name
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(moe(x), dense(x), atol=1e-5, rtol=0)


def test_upcycle_megatron_tp2_keeps_the_function(tmp_path, capsys, reference):
    cfg, state, dense = reference
    write_megatron(tmp_path / "meg", state, cfg, 2)
    rc = upcycle_checkpoint.main(["--input", str(tmp_path / "meg"), "--input-format", "megatron", "--num-experts",
                                  "4", "--output", str(tmp_path / "moe"), "--verify"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    moe, meta = load_model(tmp_path / "moe")
    assert meta["source"].startswith("upcycled from megatron:")
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(moe(x), dense(x), atol=1e-5, rtol=0)


def test_import_megatron_without_upcycling_keeps_the_dense_model(tmp_path, capsys, reference):
    """Without --num-experts a Megatron checkpoint is imported as it is (for pretrain_moe.py --load): bit-exact."""
    cfg, state, _ = reference
    rc = upcycle_checkpoint.main(["--input", str(write_megatron(tmp_path / "meg", state, cfg, 2)), "--input-format",
                                  "megatron", "--output", str(tmp_path / "dense")])
    assert rc == 0, capsys.readouterr().err
    model, _ = load_model(tmp_path / "dense")
    got = model.state_dict()
    assert set(got) == set(state) and model.cfg.moe.num_experts == 0
    for name in state:
        assert torch.equal(got[name], state[name]), name
    rc = upcycle_checkpoint.main(["--input", str(tmp_path / "meg"), "--input-format", "megatron", "--output",
                                  str(tmp_path / "v"), "--verify"])
    assert rc == 2 and "--input-format hf only" in capsys.readouterr().err


def test_pickled_code_is_never_run(tmp_path, reference):
    """Enums and numpy RNG state inside a checkpoint load as inert placeholders; a call is refused."""
    cfg, state, _ = reference
    evil = tmp_path / "pwned"
    root = write_megatron(tmp_path / "m", state, cfg, 1, evil_target=evil)
    with pytest.raises(ConversionError, match="cannot be loaded without running pickled code.*getattr"):
        read_megatron(root)
    assert not evil.exists(), "loading ran pickled code"
    with pytest.raises(ConversionError, match="not a readable torch checkpoint"):
        (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
        read_megatron(tmp_path / "junk.pt")


def test_megatron_bad_inputs(tmp_path, reference):
    cfg, state, _ = reference
    root = write_megatron(tmp_path / "a", state, cfg, 2)
    (root / "iter_0000010" / "mp_rank_01" / "model_optim_rng.pt").unlink()
    with pytest.raises(ConversionError, match="mp_rank_01.*model_optim_rng.pt is missing"):
        read_megatron(root)
    root = write_megatron(tmp_path / "b", state, cfg, 2)
    import shutil

    shutil.rmtree(root / "iter_0000010" / "mp_rank_00")
    with pytest.raises(ConversionError, match="mp_rank_00 is missing"):
        read_megatron(root)
    with pytest.raises(ConversionError, match="swiglu = False"):
        read_megatron(write_megatron(tmp_path / "c", state, cfg, 1, swiglu=False))
    with pytest.raises(ConversionError, match=r"has no QKV bias but the Megatron arguments say it has one "
                                              r"\(add_bias_linear = False, add_qkv_bias = True\)"):
        read_megatron(write_megatron(tmp_path / "d", state, cfg, 1, add_qkv_bias=True))
    with pytest.raises(ConversionError, match="tensor_model_parallel_size = 4"):
        read_megatron(write_megatron(tmp_path / "e", state, cfg, 2, tensor_model_parallel_size=4))
    root = write_megatron(tmp_path / "f", state, cfg, 1)
    (root / "iter_0000010" / "mp_rank_00").rename(root / "iter_0000010" / "mp_rank_00_000")
    with pytest.raises(ConversionError, match="pipeline-parallel"):
        read_megatron(root)


def test_megatron_rope_scaling_reads_as_llama3_scaling_equal_to_megatron_cores(tmp_path, reference):
    """--use-rope-scaling (Llama 3.1 checkpoints) reads as model.rope_scaling = llama3 with --rope-scaling-factor,
    and the scaled frequencies equal megatron-core's own RotaryEmbedding(rope_scaling=True) (float32: 1e-6)."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megatron_moe.model.transformer import rope_scaling_of

    cfg, state, _ = reference
    m = read_megatron(write_megatron(tmp_path / "m", state, cfg, 1, use_rope_scaling=True,
                                     rope_scaling_factor=32.0)).cfg.model
    assert (m.rope_scaling, m.rope_scaling_factor) == ("llama3", 32.0)
    assert read_megatron(write_megatron(tmp_path / "n", state, cfg, 1)).cfg.model.rope_scaling == "none"
    head_dim, theta = 128, 500000.0
    ours = rope_scaling_of(m).apply(
        1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    theirs = RotaryEmbedding(head_dim, 1.0, rotary_base=int(theta), rope_scaling=True, rope_scaling_factor=32.0,
                             use_cpu_initialization=True).inv_freq
    torch.testing.assert_close(ours.float(), theirs.float().cpu(), rtol=1e-6, atol=0)
    assert not torch.allclose(ours.float(), (1.0 / theta ** (torch.arange(0, head_dim, 2) / head_dim)).float())


def test_megatron_args_override_file(tmp_path, capsys, reference):
    """A checkpoint whose args lack the architecture is converted with --megatron-args."""
    cfg, state, _ = reference
    root = write_megatron(tmp_path / "m", state, cfg, 1, swiglu=False)
    (tmp_path / "args.json").write_text('{"swiglu": true}')
    rc = upcycle_checkpoint.main(["--input", str(root), "--input-format", "megatron", "--megatron-args",
                                  str(tmp_path / "args.json"), "--num-experts", "2", "--output", str(tmp_path / "o")])
    assert rc == 0, capsys.readouterr().err


# ---- torch_dist: written by megatron-core's own GPTModel.sharded_state_dict + dist_checkpointing.save ----

def _megatron_gpt_save(rank: int, world: int, state: dict, cfg, root: str, tokens_in: torch.Tensor, corpus: dict,
                       legacy: str, runs: str):
    """:func:`_megatron_core_save`, then, as the ranks are up, :func:`_train_layouts` of the ``legacy``
    checkpoint (one start of the ranks for both). Returns (megatron-core's logits, the layouts' results)."""
    return _megatron_core_save(rank, world, state, cfg, root, tokens_in), _train_layouts(corpus, legacy, runs)


class _MlaCoreAttention(torch.nn.Module):
    """Causal softmax(q k^T * softmax_scale) v for megatron-core 0.16.1's latent attention, whose local-spec core
    attention (DotProductAttention) takes no separate key and value widths: Transformer Engine's does, and is
    not on a CPU machine. q/k [s, b, heads, d_k], v [s, b, heads, d_v] -> [s, b, heads * d_v]; the scale is
    the one megatron-core passes (1 / sqrt(qk_head_dim + qk_pos_emb_head_dim) without YaRN)."""

    def __init__(self, *args, softmax_scale=None, **kwargs):  # megatron-core builds it twice: the second counts
        super().__init__()
        self.scale = softmax_scale

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, packed_seq_params=None, **_):
        scores = torch.einsum("sbhd,tbhd->bhst", query, key) * self.scale
        seq = scores.shape[-1]
        scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
        out = torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), value)
        return out.reshape(out.shape[0], out.shape[1], -1)


def _megatron_core_save(rank: int, world: int, state: dict, cfg, root: str, tokens_in: torch.Tensor,
                        expert_parallel: bool = False):
    """One tensor-parallel rank (TP = world; with ``expert_parallel`` TP = 1 and EP = world, each rank holding
    its share of the experts): megatron-core's GPTModel (local spec, built on CPU) with
    ``cfg.model``'s normalization and biases, holding ``state`` split as Megatron splits it, saved with
    dist_checkpointing.save into ``root/iter_0000010`` with Megatron-LM's common state (``args``, ...) and an
    RNG ShardedObject holding pickled code that must never run. Returns megatron-core's own logits for
    ``tokens_in`` (gathered over TP ranks); with multi-token prediction (``model.mtp_num_layers``) a tuple of them
    and each depth's logits (megatron-core computes those only with labels, then returns losses: its output
    layer's outputs are taken, the depths' first, copied: the gathered logits live in a buffer it reuses).

    megatron-core 0.16.1 on a CPU-only torch, in this (spawned) process only: its torch_dist writer calls
    torch.cuda.synchronize() / current_device() even for CPU tensors, and its attention enters the CUDA RNG
    tracker for dropout (0 here): those three are replaced by no-ops.
    """
    import contextlib

    import torch.nn.functional as F
    from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *a, **k: None
        torch.cuda.current_device = lambda: "cpu"
        tensor_parallel.get_cuda_rng_tracker = lambda: type("NoRng", (), {"fork": contextlib.nullcontext})()
    tp, ep = (1, world) if expert_parallel else (world, 1)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                                             expert_tensor_parallel_size=tp)
    m, e = cfg.model, cfg.moe
    moe_kwargs = {}
    if e.num_experts:  # local experts (SequentialMLP) sharded over TP; the all-gather dispatcher runs on CPU
        import megatron.core.transformer.moe.moe_utils as moe_utils

        moe_utils.te_general_gemm = None  # megatron-core 0.16.1's router refers to it without Transformer Engine
        moe_kwargs = dict(
            num_moe_experts=e.num_experts, moe_router_topk=e.topk, moe_ffn_hidden_size=cfg.expert_ffn_size,
            moe_token_dispatcher_type="allgather", moe_grouped_gemm=False,
            moe_layer_freq=[int(is_moe_layer(cfg, i)) for i in range(m.num_layers)],
            moe_router_score_function=e.score_function, moe_router_enable_expert_bias=e.expert_bias,
            moe_router_topk_scaling_factor=None if e.topk_scaling_factor == 1.0 else e.topk_scaling_factor,
            moe_shared_expert_intermediate_size=e.shared_expert_ffn_hidden_size or None,
            moe_shared_expert_gate=e.shared_expert_gate, expert_model_parallel_size=ep, expert_tensor_parallel_size=tp,
            moe_router_num_groups=e.router_num_groups or None, moe_router_group_topk=e.router_group_topk or None)
    latent = {}
    if m.multi_latent_attention:  # Megatron-LM's DeepSeek-V3 settings at the plain rotary embedding
        latent = dict(q_lora_rank=m.q_lora_rank or None, kv_lora_rank=m.kv_lora_rank, qk_head_dim=m.qk_head_dim,
                      qk_pos_emb_head_dim=m.qk_pos_emb_head_dim, v_head_dim=m.v_head_dim, rotary_base=m.rope_theta,
                      **megatron_rope(m))
    config = (MLATransformerConfig if latent else TransformerConfig)(
        **latent, num_layers=m.num_layers, hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_kv_heads, ffn_hidden_size=m.ffn_hidden_size, gated_linear_unit=True,
        activation_func=F.silu, normalization=m.normalization, layernorm_epsilon=m.norm_eps,
        add_bias_linear=m.add_bias_linear, add_qkv_bias=m.add_qkv_bias, bias_activation_fusion=False,
        kv_channels=m.head_dim, qk_layernorm=m.qk_layernorm, **moe_kwargs,
        bias_dropout_fusion=False, tensor_model_parallel_size=tp, use_cpu_initialization=True,
        params_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0, mtp_num_layers=m.mtp_num_layers or None)
    spec = (get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization=m.normalization)
            if e.num_experts or m.multi_latent_attention else
            get_gpt_layer_local_spec(normalization=m.normalization, qk_layernorm=m.qk_layernorm))
    if m.multi_latent_attention:
        import megatron.core.transformer.multi_latent_attention as mla

        if not isinstance(mla.TELinear, type):  # without Transformer Engine a placeholder 0.16.1 isinstance()s
            mla.TELinear = type("NoTransformerEngineLinear", (), {})
        from megatron.core.transformer.identity_op import IdentityOp

        for layer_spec in spec.layer_specs:
            layer_spec.submodules.self_attention.submodules.core_attention = _MlaCoreAttention
            if not m.q_lora_rank:  # no query latent, so no norm of it (megatron-core 0.19 refuses one given)
                layer_spec.submodules.self_attention.submodules.q_layernorm = IdentityOp
    mtp_spec = None
    if m.mtp_num_layers:  # the depths' layers built from the decoder's last layer spec, as Megatron-LM does
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

        mtp_spec = get_gpt_mtp_block_spec(config, spec, use_transformer_engine=False)
    model = GPTModel(config, spec, vocab_size=m.vocab_size,
                     max_sequence_length=64, position_embedding_type="rope", rotary_base=int(m.rope_theta),
                     rotary_percent=m.rotary_percent, share_embeddings_and_output_weights=m.tie_embeddings,
                     parallel_output=False,
                     mtp_block_spec=mtp_spec).eval()
    te_names = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
                "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
                "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
                "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias"}
    mine = {}
    experts = (rank * e.num_experts // ep, e.num_experts // ep) if expert_parallel else None
    # megatron-core 0.19 names a depth's transformer layer mtp_model_layer (0.16: transformer_layer)
    mtp_layer = "mtp_model_layer" if any(".mtp_model_layer." in n for n, _ in model.named_parameters()) else None
    for key, value in shard_model(state, cfg, tp, rank % tp, "mcore", experts).items():
        for te, local in te_names.items():
            key = key.replace(te, local)
        mine[key.replace(".transformer_layer.", f".{mtp_layer}.") if mtp_layer else key] = value
    with torch.no_grad():
        params = dict(model.named_parameters())
        buffers = {k: b for k, b in model.named_buffers() if k.endswith("expert_bias")}
        assert set(params) | set(buffers) == {k for k, v in mine.items() if v is not None}, sorted(
            (set(params) | set(buffers)) ^ set(mine))
        for name, p in {**params, **buffers}.items():
            p.copy_(mine[name])
        seq = tokens_in.shape[1]
        causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]  # True: masked
        if m.mtp_num_layers:
            heads = []
            hook = model.output_layer.register_forward_hook(
                lambda _m, _a, out: heads.append(out[0].transpose(0, 1).clone()))
            model(tokens_in, torch.arange(seq).expand_as(tokens_in), causal, labels=tokens_in)
            hook.remove()
            logits = (heads[-1], *heads[:-1])
        else:
            logits = model(tokens_in, torch.arange(seq).expand_as(tokens_in), causal)
    ckpt = pathlib.Path(root) / "iter_0000010"
    if rank == 0:
        ckpt.mkdir(parents=True)
        (pathlib.Path(root) / "latest_checkpointed_iteration.txt").write_text("10")
    torch.distributed.barrier()
    evil = Evil(pathlib.Path(root) / "pwned")
    sharded = {
        "args": megatron_args(cfg, tp, ckpt_format="torch_dist", expert_model_parallel_size=ep),
        "checkpoint_version": 3.0, "iteration": 10,
        "model": model.sharded_state_dict(),
        "rng_state": ShardedObject("rng_state", [evil], (world,), (rank,), replica_id=0),
    }
    dist_checkpointing.save(sharded, str(ckpt))
    return tuple(t.detach() for t in logits) if isinstance(logits, tuple) else logits.detach()


@pytest.fixture(scope="module")
def megatron_dist(tmp_path_factory, loop_corpus):
    """A TP=2 torch_dist save of a random dense model written by megatron-core (2 gloo ranks on CPU), the
    model, and megatron-core's own logits on ``tokens()``; built once (about 15 s of CPU).

    Also the same model as a legacy TP=2 checkpoint (``legacy``) and the 1-step run of ``pretrain_moe.py
    --load`` on it (:func:`_megatron_run`), trained in this process first (which builds the data cache the
    ranks then only read; its console in ``single_log``) and by the same ranks after the save in 2-rank
    layouts: ``runs`` name -> (validation losses at steps 0 and 1, first step's training loss).
    """
    import contextlib
    import io

    from megatron_moe.testing import run_distributed

    pytest.importorskip("psutil", reason="megatron-core's torch_dist writer needs psutil (in the test extra)")
    root = tmp_path_factory.mktemp("megatron_dist")
    cfg = tiny_config(num_experts=0, vocab_size=320)  # >= the vocabulary of loop_corpus's tokenizer (300)
    dense = save_native(root / "native_dense", cfg, seed=3)
    state = {k: v.detach().clone() for k, v in dense.state_dict().items()}
    x = tokens()
    legacy = write_megatron(root / "legacy", state, cfg, 2)
    with contextlib.redirect_stdout(io.StringIO()) as log:
        runs = _train_layouts(loop_corpus, legacy, root / "runs", layouts={"single": {}})
    (logits, layouts), _ = run_distributed(_megatron_gpt_save, 2, (state, cfg, str(root / "dist"), x, loop_corpus,
                                                                   str(legacy), str(root / "runs")))
    return {"root": root / "dist", "cfg": cfg, "state": state, "dense": dense, "tokens": x, "logits": logits,
            "legacy": legacy, "runs": runs | layouts, "single_log": log.getvalue()}


@pytest.mark.slow
def test_torch_dist_checkpoint_of_megatron_core_upcycles_like_the_legacy_format(tmp_path, capsys, megatron_dist):
    """A TP=2 torch_dist checkpoint written by megatron-core itself reads back bit-exactly into the dense
    model; megatron-core's own logits equal the dense model's (fp32, tolerance 1e-5: the same sums in
    another order); the upcycled model's logits equal the legacy-format upcycle's bit for bit; nothing
    pickled in the checkpoint ran."""
    cfg, state, dense, x = (megatron_dist[k] for k in ("cfg", "state", "dense", "tokens"))
    with torch.no_grad():
        torch.testing.assert_close(megatron_dist["logits"], dense(x), atol=1e-5, rtol=0)
    source = read_megatron(megatron_dist["root"])
    assert source.extra["megatron_format"] == "torch_dist"
    assert source.cfg.model == read_megatron(write_megatron(tmp_path / "legacy", state, cfg, 2)).cfg.model
    got = source.state_dict()
    assert set(got) == set(state)
    for name in state:
        assert torch.equal(got[name], state[name]), name
    outputs = {}
    for name, path in (("dist", megatron_dist["root"]), ("legacy", tmp_path / "legacy")):
        rc = upcycle_checkpoint.main(["--input", str(path), "--input-format", "megatron", "--num-experts", "4",
                                      "--output", str(tmp_path / f"moe_{name}")])
        assert rc == 0, capsys.readouterr().err
        moe, _ = load_model(tmp_path / f"moe_{name}")
        with torch.no_grad():
            outputs[name] = moe(x)
    assert torch.equal(outputs["dist"], outputs["legacy"])
    assert not (megatron_dist["root"] / "pwned").exists()


def _common_state(ckpt: pathlib.Path) -> dict:
    """Megatron-LM's common state of a torch_dist iteration directory (a trusted read): common.pt, or else as
    megatron-core reads it from the DCP files in the releases that put it there."""
    if (ckpt / "common.pt").is_file():
        return torch.load(ckpt / "common.pt", weights_only=False)
    from megatron.core.dist_checkpointing import load_common_state_dict

    return load_common_state_dict(str(ckpt))


def _rewrite_torch_dist(src: pathlib.Path, dst: pathlib.Path, layout: str, common: dict | None = None,
                        extra: dict | None = None) -> pathlib.Path:
    """The torch_dist checkpoint ``src`` (a save directory) rewritten into the save directory ``dst``: its tensors
    (and ``extra`` ones), and its common state (or ``common``) in ``common.pt`` (``layout="file"``, megatron-core
    0.16) or as the DCP bytes entry newer megatron-core writes instead (``layout="entry"``). Returns the iteration
    directory."""

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from megatron_moe.convert.megatron_format import DIST_COMMON_ENTRY

    src_iter, dst_iter = src / "iter_0000010", dst / "iter_0000010"
    common = _common_state(src_iter) if common is None else common
    metadata = dcp.FileSystemReader(str(src_iter)).read_metadata()
    state = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in metadata.state_dict_metadata.items()
             if isinstance(v, TensorStorageMetadata)}
    dcp.load(state, checkpoint_id=str(src_iter), no_dist=True)
    state.update(extra or {})
    if layout == "entry":  # DCP's default planner torch.saves a non-tensor value: megatron-core's bytes
        state[DIST_COMMON_ENTRY] = [common]
    # unflattened: the list is one entry, as megatron-core's planner writes it
    dcp.save(state, checkpoint_id=str(dst_iter), no_dist=True, planner=dcp.DefaultSavePlanner(flatten_state_dict=False))
    if layout == "file":
        torch.save(common, dst_iter / "common.pt")
    (dst_iter / "metadata.json").write_text('{"sharded_backend": "torch_dist", "sharded_backend_version": 1}')
    (dst / "latest_checkpointed_iteration.txt").write_text("10")
    return dst_iter


@pytest.mark.slow
def test_torch_dist_common_state_in_common_pt_or_in_the_dcp_files(tmp_path, megatron_dist):
    """megatron-core 0.16 writes Megatron-LM's common state (``args``...) to common.pt, newer releases (0.19 seen)
    into the DCP files as one bytes entry: both layouts of megatron-core's own save read the same architecture
    and the same tensors, bit-exactly."""
    state = megatron_dist["state"]
    for layout in ("file", "entry"):
        ckpt = _rewrite_torch_dist(megatron_dist["root"], tmp_path / layout, layout)
        assert (ckpt / "common.pt").is_file() == (layout == "file")
        source = read_megatron(tmp_path / layout)
        assert source.cfg.model == read_megatron(megatron_dist["legacy"]).cfg.model, layout
        got = source.state_dict()
        assert set(got) == set(state)
        for name in state:
            assert torch.equal(got[name], state[name]), (layout, name)


@pytest.mark.slow
def test_torch_dist_multi_token_prediction_layers_must_agree_with_the_arguments(tmp_path, megatron_dist):
    """Megatron-LM's --mtp-num-layers saves its depths under ``mtp.layers.k.``, read into model.mtp_num_layers
    (megatron-core's own save of one: the deepseek-mla case of test_torch_dist_moe_checkpoint_of_megatron_core_reads
    _with_its_logits). Depths in the tensors that the arguments do not state, or the reverse, are named; a depth
    missing a tensor fails naming it when it is read."""
    common = _common_state(megatron_dist["root"] / "iter_0000010")
    extra = {"mtp.layers.0.eh_proj.weight": torch.zeros(32, 64), "mtp.layers.0.enorm.weight": torch.ones(32)}
    _rewrite_torch_dist(megatron_dist["root"], tmp_path / "unsaid", "file", common, extra)
    with pytest.raises(ConversionError, match=re.escape("mtp_num_layers = 0, but the checkpoint holds multi-token "
                                                        "prediction layers [0]")):
        read_megatron(tmp_path / "unsaid")
    common["args"].mtp_num_layers = 2
    _rewrite_torch_dist(megatron_dist["root"], tmp_path / "more", "file", common, extra)
    with pytest.raises(ConversionError, match=re.escape("mtp_num_layers = 2, but the checkpoint holds multi-token "
                                                        "prediction layers [0]")):
        read_megatron(tmp_path / "more")
    common["args"].mtp_num_layers = 1
    _rewrite_torch_dist(megatron_dist["root"], tmp_path / "partial", "file", common, extra)
    source = read_megatron(tmp_path / "partial")
    assert source.cfg.model.mtp_num_layers == 1
    with pytest.raises(ConversionError, match="no tensor for layer 0 mtp_hnorm"):
        source.state_dict()
    _rewrite_torch_dist(megatron_dist["root"], tmp_path / "biased", "file", common,
                        {**extra, "mtp.layers.0.enorm.bias": torch.zeros(32)})  # an RMSNorm model: no norm biases
    with pytest.raises(ConversionError, match=re.escape("holds mtp.layers.0.enorm.bias (a multi-token prediction "
                                                        "enorm bias) but the Megatron arguments say there is none")):
        read_megatron(tmp_path / "biased")
    legacy = write_megatron(tmp_path / "legacy", megatron_dist["state"], megatron_dist["cfg"], 1)
    shard = legacy / "iter_0000010" / "mp_rank_00" / "model_optim_rng.pt"
    saved = torch.load(shard, weights_only=False)
    saved["model"]["mtp.layers.0.eh_proj.weight"] = torch.zeros(32, 64)
    torch.save(saved, shard)
    with pytest.raises(ConversionError, match="multi-token prediction layer in the legacy torch format"):
        read_megatron(legacy)


@pytest.mark.slow
def test_torch_dist_bad_inputs(tmp_path, megatron_dist):
    """Pickled code in .metadata, common.pt or the common-state entry of newer megatron-core is refused without
    running; a lost shard file, another backend and an empty iteration directory are named."""
    import pickle
    import shutil

    def copy(name):
        return pathlib.Path(shutil.copytree(megatron_dist["root"], tmp_path / name))

    evil = tmp_path / "pwned"
    root = copy("meta")
    (root / "iter_0000010" / ".metadata").write_bytes(pickle.dumps(Evil(evil)))
    with pytest.raises(ConversionError, match=r"\.metadata: cannot be loaded without running pickled code"):
        read_megatron(root)
    hostile = {**_common_state(megatron_dist["root"] / "iter_0000010"), "evil": Evil(evil)}
    _rewrite_torch_dist(megatron_dist["root"], tmp_path / "common", "file", hostile)
    with pytest.raises(ConversionError, match="common.pt: cannot be loaded without running pickled code"):
        read_megatron(tmp_path / "common")
    _rewrite_torch_dist(megatron_dist["root"], tmp_path / "entry", "entry", hostile)
    with pytest.raises(ConversionError, match=r"\(entry common_state/shard_0_1\): cannot be loaded without running"):
        read_megatron(tmp_path / "entry")
    assert not evil.exists(), "loading ran pickled code"
    root = copy("lost")
    next((root / "iter_0000010").glob("*.distcp")).unlink()
    with pytest.raises(ConversionError, match="reading .* failed"):
        read_megatron(root).state_dict()
    root = copy("zarr")
    (root / "iter_0000010" / "metadata.json").write_text('{"sharded_backend": "zarr"}')
    with pytest.raises(ConversionError, match="sharded_backend 'zarr'; only 'torch_dist'"):
        read_megatron(root)
    (tmp_path / "empty" / "iter_0000010").mkdir(parents=True)
    (tmp_path / "empty" / "latest_checkpointed_iteration.txt").write_text("10")
    with pytest.raises(ConversionError, match="nor .metadata \\+ common.pt \\(torch_dist\\)"):
        read_megatron(tmp_path / "empty")


def test_torch_dist_per_layer_keys(tmp_path, reference):
    """megatron-core's layout for a non-homogeneous decoder (``decoder.layers.N.`` keys, one tensor per
    layer, no layer dimension), written with torch.distributed.checkpoint directly; read bit-exactly."""
    import torch.distributed.checkpoint as dcp

    cfg, state, _ = reference
    flat = shard_model(state, cfg, 1, 0, "mcore")  # TP=1: the global tensors under Megatron's names
    ckpt = tmp_path / "m" / "iter_0000010"
    dcp.save({k: v for k, v in flat.items() if v is not None}, checkpoint_id=str(ckpt), no_dist=True)
    torch.save({"args": megatron_args(cfg, 4, pipeline_model_parallel_size=2), "checkpoint_version": 3.0,
                "iteration": 10}, ckpt / "common.pt")
    (tmp_path / "m" / "latest_checkpointed_iteration.txt").write_text("10")
    got = read_megatron(tmp_path / "m").state_dict()  # any TP/PP of the args: the tensors are global
    assert set(got) == set(state)
    for name in state:
        assert torch.equal(got[name], state[name]), name
    assert read_megatron(ckpt / "common.pt").cfg.model == read_megatron(tmp_path / "m").cfg.model
    other = tmp_path / "dcp" / "iter_0000010"  # DCP, but not megatron-core's names (--ckpt-format torch_dcp)
    dcp.save({"model.module.weight": torch.zeros(2)}, checkpoint_id=str(other), no_dist=True)
    with pytest.raises(ConversionError, match=r"no megatron-core model tensors .* e.g. \['model.module.weight'\]"):
        read_megatron(other)


@pytest.fixture(scope="module")
def megatron_dist_biased(tmp_path_factory):
    """megatron-core's GPTModel (local spec) with LayerNorm, add_bias_linear (biases on linear_qkv, linear_proj,
    linear_fc1, linear_fc2), SwiGLU and rope holding a random dense model of ours, TP=2 (2 gloo ranks on CPU),
    saved as torch_dist; with megatron-core's own logits on ``tokens()``."""
    from megatron_moe.testing import run_distributed

    pytest.importorskip("psutil", reason="megatron-core's torch_dist writer needs psutil (in the test extra)")
    root = tmp_path_factory.mktemp("megatron_dist_biased")
    cfg = tiny_config(num_experts=0, vocab_size=320, **BIASED)  # >= the vocabulary of loop_corpus's tokenizer
    dense = save_native(root / "native_dense", cfg, seed=5)
    state = {k: v.detach().clone() for k, v in dense.state_dict().items()}
    x = tokens()
    logits, _ = run_distributed(_megatron_core_save, 2, (state, cfg, str(root / "dist"), x))
    return {"root": root / "dist", "cfg": cfg, "state": state, "tokens": x, "logits": logits}


@pytest.fixture(scope="module")
def megatron_dist_qwen3_attention(tmp_path_factory):
    """megatron-core's GPTModel (local spec, RMSNorm) with --qk-layernorm and --kv-channels 12 on hidden 32 / 4
    heads holding a random dense model of ours (random, distinct q and k norm weights), TP=2 (2 gloo ranks on
    CPU), saved as torch_dist; with megatron-core's own logits on ``tokens()``."""
    from megatron_moe.testing import run_distributed

    pytest.importorskip("psutil", reason="megatron-core's torch_dist writer needs psutil (in the test extra)")
    root = tmp_path_factory.mktemp("megatron_dist_qwen3")
    cfg = tiny_config(num_experts=0, **QWEN3_ATTENTION)
    dense = save_native(root / "native_dense", cfg, seed=6)
    state = {k: v.detach().clone() for k, v in dense.state_dict().items()}
    x = tokens()
    logits, _ = run_distributed(_megatron_core_save, 2, (state, cfg, str(root / "dist"), x))
    return {"root": root / "dist", "cfg": cfg, "state": state, "tokens": x, "logits": logits}


@pytest.mark.slow
def test_torch_dist_qk_layernorm_and_kv_channels_of_megatron_core(megatron_dist_qwen3_attention):
    """megatron-core's own TP=2 torch_dist save with query/key norms (stacked ``q_layernorm`` / ``k_layernorm``
    weights [layers, head_dim]) and 12-wide heads on hidden 32 reads back bit-exactly, and the model's logits equal
    megatron-core's (fp32, 1e-5: the same sums in another order): its norms sit where megatron-core applies them."""
    from megatron_moe.convert.megatron_format import _read_dist_metadata
    from megatron_moe.convert.native import model_from_state

    run = megatron_dist_qwen3_attention
    root, state, x = run["root"], run["state"], run["tokens"]
    keys = set(_read_dist_metadata(root / "iter_0000010").state_dict_metadata)
    assert {f"decoder.layers.self_attention.{n}_layernorm.weight" for n in "qk"} <= keys
    source = read_megatron(root)
    m = source.cfg.model
    assert (m.kv_channels, m.qk_layernorm, m.hidden_size, m.num_attention_heads) == (12, True, 32, 4)
    got = source.state_dict()
    assert set(got) == set(state)
    for name in state:
        assert torch.equal(got[name], state[name]), name
    with torch.no_grad():
        ours = model_from_state(source.cfg, got)(x)
        torch.testing.assert_close(run["logits"], ours, atol=1e-5, rtol=0)
        swapped = {**got, "layers.0.attention.q_norm.weight": got["layers.0.attention.k_norm.weight"],
                   "layers.0.attention.k_norm.weight": got["layers.0.attention.q_norm.weight"]}
        assert (model_from_state(source.cfg, swapped)(x) - run["logits"]).abs().max() > 1e-4


# MoE checkpoints of megatron-core (torch_dist): Mixtral's layout (softmax top-2, renormalised, every layer MoE:
# stacked layer tensors) and a DeepSeek-V3-like one (sigmoid scores with an expert bias and scaling factor,
# group-limited routing, a sigmoid-gated shared expert, a dense first layer: per-layer tensors) with Qwen3's
# attention and GLM-4.5's partial rotary embedding (--rotary-percent 0.5).
MEGATRON_MOE = {
    "mixtral": dict(num_experts=4, topk=2),
    "mixtral-ep2": dict(num_experts=4, topk=2),  # TP = 1, EP = 2: each rank holds 2 experts
    "deepseek-like": dict(num_experts=4, topk=2, first_k_dense=1, score_function="sigmoid", expert_bias=True,
                          topk_scaling_factor=2.5, shared_expert_ffn_hidden_size=40, shared_expert_gate=True,
                          qk_layernorm=True, kv_channels=12, expert_ffn_hidden_size=24, router_num_groups=2,
                          router_group_topk=1, rotary_percent=0.5),
    # DeepSeek-V3's attention too: multi-latent attention with a query latent and the latent norms; a depth of
    # multi-token prediction
    "deepseek-mla": dict(num_experts=4, topk=2, first_k_dense=1, score_function="sigmoid", expert_bias=True,
                         topk_scaling_factor=2.5, shared_expert_ffn_hidden_size=40, expert_ffn_hidden_size=24,
                         multi_latent_attention=True, num_query_groups=0, q_lora_rank=16, kv_lora_rank=12,
                         qk_head_dim=6, qk_pos_emb_head_dim=4, v_head_dim=5, qk_layernorm=True, mtp_num_layers=1),
    # and with DeepSeek-V3's YaRN (factor 40, mscales 1: the softmax scaled by (0.1 ln 40 + 1)^2), no query latent
    "deepseek-mla-yarn": dict(num_experts=4, topk=2, score_function="sigmoid", expert_bias=True,
                              expert_ffn_hidden_size=24, multi_latent_attention=True, num_query_groups=0,
                              kv_lora_rank=12, qk_head_dim=6, qk_pos_emb_head_dim=8, v_head_dim=5, qk_layernorm=True,
                              rope_scaling="yarn", rope_scaling_factor=40.0, rope_yarn_mscale=1.0,
                              rope_yarn_mscale_all_dim=1.0),
}


@pytest.fixture(scope="module", params=sorted(MEGATRON_MOE))
def megatron_dist_moe(request, tmp_path_factory):
    """megatron-core's GPTModel with MoE layers (SequentialMLP experts, all-gather dispatcher, local spec) holding a
    random model of ours (random expert biases), TP=2 (experts sharded over TP as well) or, "-ep2", expert parallel
    (EP = 2, TP = 1), saved as torch_dist; with megatron-core's own logits on ``tokens()``."""
    from megatron_moe.testing import run_distributed

    pytest.importorskip("psutil", reason="megatron-core's torch_dist writer needs psutil (in the test extra)")
    root = tmp_path_factory.mktemp(f"megatron_moe_{request.param}")
    cfg = tiny_config(vocab_size=320, **MEGATRON_MOE[request.param])
    state = {k: v.detach().clone() for k, v in save_native(root / "native", cfg, seed=7).state_dict().items()}
    g = torch.Generator().manual_seed(8)
    for name in [n for n in state if n.endswith("expert_bias")]:
        state[name] = torch.randn(state[name].shape, generator=g) * 0.3
    x = tokens()
    logits, _ = run_distributed(_megatron_core_save, 2, (state, cfg, str(root / "dist"), x,
                                                        request.param.endswith("-ep2")))
    return {"name": request.param, "root": root / "dist", "cfg": cfg, "state": state, "tokens": x, "logits": logits}


@pytest.mark.slow
def test_torch_dist_moe_checkpoint_of_megatron_core_reads_with_its_logits(megatron_dist_moe):
    """An MoE torch_dist save of megatron-core (TP=2) reads back bit-exactly (router, expert biases, experts' fc1
    split into w1 / w3 and transposed, fc2, shared expert and gate) with the MoE settings of its arguments, and the
    model's logits equal megatron-core's (fp32, 1e-5): routing, bias, scaling and shared expert as megatron-core's."""
    from megatron_moe.convert.megatron_format import _read_dist_metadata
    from megatron_moe.convert.native import model_from_state

    run = megatron_dist_moe
    keys = set(_read_dist_metadata(run["root"] / "iter_0000010").state_dict_metadata)
    assert any(k.endswith("mlp.experts.experts.linear_fc1.weight") for k in keys), sorted(keys)
    source = read_megatron(run["root"])
    want, got_cfg = run["cfg"], source.cfg
    for key in ("num_experts", "topk", "first_k_dense", "layer_freq", "score_function", "expert_bias",
                "topk_scaling_factor", "shared_expert_ffn_hidden_size", "shared_expert_gate", "renormalize",
                "router_num_groups", "router_group_topk"):
        assert getattr(got_cfg.moe, key) == getattr(want.moe, key), key
    assert got_cfg.expert_ffn_size == want.expert_ffn_size
    for key in ("head_dim", "rotary_percent", "qk_layernorm", "multi_latent_attention", "q_lora_rank", "kv_lora_rank",
                "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "rope_scaling", "rope_scaling_factor",
                "rope_yarn_mscale", "rope_yarn_mscale_all_dim", "rope_yarn_original_max_position"):
        assert getattr(got_cfg.model, key) == getattr(want.model, key), key
    got = source.state_dict()
    assert set(got) == set(run["state"])
    for name, tensor in run["state"].items():
        assert torch.equal(got[name], tensor), name
    with torch.no_grad():
        ours = model_from_state(got_cfg, got).eval()(run["tokens"])
    if got_cfg.model.mtp_num_layers:  # each depth's logits too, but at the last positions: megatron-core's rolled
        # tokens end in id 0 there, ours wrap around; neither has a target there
        assert got_cfg.model.mtp_num_layers == want.model.mtp_num_layers and len(ours) == len(run["logits"])
        s = run["tokens"].shape[1]
        for k, (mine, theirs) in enumerate(zip(ours, run["logits"], strict=True)):
            torch.testing.assert_close(mine[:, : s - k], theirs[:, : s - k], atol=1e-5, rtol=0)
    else:
        torch.testing.assert_close(ours, run["logits"], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_load_megatron_moe_checkpoint_takes_its_architecture_and_weights(tmp_path, loop_corpus, megatron_dist_moe):
    """pretrain_moe.py's --load (eval-only) of megatron-core's MoE save: the run's model is the checkpoint's MoE
    architecture (from its arguments) and holds every weight and expert bias bit-exactly."""
    from megatron_moe.training.trainer import Trainer

    cfg = _megatron_run(loop_corpus, megatron_dist_moe["root"], tmp_path / "run")
    trainer = Trainer(cfg, torch.device("cpu"), eval_only=True, given=set())
    report = trainer.evaluate_checkpoint()["eval"]
    moe = trainer.cfg.moe
    assert moe.num_experts == 4 and moe.score_function == megatron_dist_moe["cfg"].moe.score_function
    _assert_run_holds(trainer, megatron_dist_moe["state"], report)


def test_megatron_moe_arguments_that_cannot_be_read_are_named(tmp_path, reference):
    """Expert biases (Megatron-LM's add_bias_linear default on an MoE model), group_topk without num_groups, the
    deprecated topk_limited_devices, Sinkhorn routing, probabilities applied on the expert input, latent experts,
    L2 query/key norms, the position drop policy, a layer pattern other than k dense then every f, and an MoE
    checkpoint in the legacy format: each named. Read as megatron-core means them: a capacity factor drops (in
    evaluation too), num_groups without group_topk is plain top-K, a scaling factor of 0 is none, a shared-expert
    gate without a shared expert is none."""
    from megatron_moe.convert.megatron_format import config_from_megatron_args

    cfg = tiny_config(num_experts=4, topk=2)
    args = vars(megatron_args(cfg, 1))
    for overrides, needle in [({"add_bias_linear": True}, "add_bias_linear = True on an MoE model"),
                              ({"moe_router_group_topk": 1}, "moe_router_group_topk = 1 without moe_router_num_groups"),
                              ({"moe_layer_freq": [0, 0]}, "makes layers [] MoE"),
                              ({"moe_router_topk_limited_devices": 2}, "moe_router_topk_limited_devices (deprecated)"),
                              ({"moe_router_load_balancing_type": ["aux_loss", "sinkhorn"]}, "Sinkhorn routing"),
                              ({"moe_apply_probs_on_input": True}, "moe_apply_probs_on_input = True: routing"),
                              ({"moe_latent_size": 16}, "moe_latent_size = 16: latent experts"),
                              ({"qk_l2_norm": True, "num_experts": None}, "qk_l2_norm = True"),  # dense too
                              ({"moe_expert_capacity_factor": 1.0, "moe_token_drop_policy": "position"},
                               "moe_token_drop_policy = 'position'"),
                              ({"moe_layer_freq": [1, 1, 1]}, "expected an integer or one 0/1 entry per layer"),
                              ({"multi_latent_attention": True, "rope_type": "rope", "rotary_scaling_factor": 40.0,
                                "mscale_all_dim": 1.0}, "scales the softmax as YaRN does without YaRN's frequencies"),
                              ({"multi_latent_attention": True, "use_rope_scaling": True},
                               "use_rope_scaling with multi_latent_attention"),
                              ({"multi_latent_attention": True, "rotary_percent": 0.5},
                               "rotary_percent = 0.5 with multi_latent_attention")]:
        with pytest.raises(ConversionError, match=re.escape(needle)):
            config_from_megatron_args({**args, **overrides}, "args")
    assert config_from_megatron_args({**args, "moe_layer_freq": 2}, "args").moe.layer_freq == 2
    grouped = config_from_megatron_args({**args, "moe_router_num_groups": 2, "moe_router_group_topk": 1}, "args").moe
    assert (grouped.router_num_groups, grouped.router_group_topk) == (2, 1)
    read = config_from_megatron_args({**args, "moe_expert_capacity_factor": 1.25, "moe_router_num_groups": 2,
                                      "moe_router_topk_scaling_factor": 0.0, "moe_shared_expert_gate": True,
                                      "moe_input_jitter_eps": 0.01}, "args").moe
    assert (read.capacity_factor, read.dropless, read.topk_scaling_factor, read.shared_expert_gate,
            read.input_jitter_eps) == (1.25, False, 1.0, False, 0.01)
    assert config_from_megatron_args({**args, "moe_router_pre_softmax": True}, "args").moe.renormalize is False
    _, state, _ = reference
    with pytest.raises(ConversionError, match="MoE checkpoints are read in torch_dist format"):
        read_megatron(write_megatron(tmp_path / "legacy", state, reference[0], 1, num_experts=4))
    with pytest.raises(ConversionError, match="multi-latent attention checkpoint in the legacy torch format"):
        read_megatron(write_megatron(tmp_path / "legacy-mla", state, reference[0], 1, multi_latent_attention=True,
                                     add_bias_linear=False))
    # megatron-core's latent attention: yarn at factor 1 is plain RoPE; kv_channels and num_query_groups ignored
    mla = config_from_megatron_args({**args, "multi_latent_attention": True, "rope_type": "yarn", "kv_channels": 16,
                                     "q_lora_rank": None, "kv_lora_rank": 512}, "args").model
    assert (mla.multi_latent_attention, mla.q_lora_rank, mla.kv_lora_rank, mla.kv_channels, mla.num_kv_heads,
            mla.qk_head_dim, mla.qk_pos_emb_head_dim, mla.v_head_dim) == (True, 0, 512, 0, 4, 128, 64, 128)


@pytest.mark.slow
def test_torch_dist_layernorm_and_biases_of_megatron_core(megatron_dist_biased):
    """megatron-core's own TP=2 torch_dist save of a LayerNorm + add_bias_linear GPT (stacked layer tensors; the
    local spec's input_layernorm / pre_mlp_layernorm saved under Transformer Engine's names linear_qkv.layer_norm_*
    / linear_fc1.layer_norm_*; fc1's bias as [gate of all ranks; up of all ranks]) reads back bit-exactly, and the
    loaded model's logits equal megatron-core's (fp32, tolerance 1e-5: the same sums in another order)."""
    from megatron_moe.convert.megatron_format import DIST_METADATA, _read_dist_metadata
    from megatron_moe.convert.native import model_from_state

    root, state, x = (megatron_dist_biased[k] for k in ("root", "state", "tokens"))
    keys = set(_read_dist_metadata(root / "iter_0000010").state_dict_metadata)
    for key in ("decoder.final_layernorm.bias", "decoder.layers.self_attention.linear_qkv.layer_norm_bias",
                "decoder.layers.mlp.linear_fc1.layer_norm_bias", "decoder.layers.self_attention.linear_qkv.bias",
                "decoder.layers.self_attention.linear_proj.bias", "decoder.layers.mlp.linear_fc1.bias",
                "decoder.layers.mlp.linear_fc2.bias"):
        assert key in keys, f"{key} not in megatron-core's {DIST_METADATA}: {sorted(keys)}"
    source = read_megatron(root)
    m = source.cfg.model
    assert (m.normalization, m.add_bias_linear, m.add_qkv_bias, m.apply_layernorm_1p) == ("LayerNorm", True, True,
                                                                                          False)
    got = source.state_dict()
    assert set(got) == set(state)
    for name in state:
        assert torch.equal(got[name], state[name]), name
    with torch.no_grad():
        torch.testing.assert_close(megatron_dist_biased["logits"], model_from_state(source.cfg, got)(x), atol=1e-5,
                                   rtol=0)
    assert not (root / "pwned").exists()


@pytest.mark.slow
def test_load_megatron_layernorm_and_biases_holds_the_weights(tmp_path, loop_corpus, megatron_dist_biased, capsys):
    """pretrain_moe.py's --load (eval-only) of that LayerNorm + add_bias_linear torch_dist save: the run's model
    takes LayerNorm and both bias settings from the saved arguments and holds every weight and bias bit-exactly;
    without --save its report is printed, and nothing in the Megatron-LM directory changes."""
    from megatron_moe.training.checkpoint import CheckpointError
    from megatron_moe.training.trainer import Trainer

    root = megatron_dist_biased["root"]
    cfg = _megatron_run(loop_corpus, root, tmp_path / "run")
    cfg.checkpoint.save = ""  # no --save: the Megatron-LM checkpoint's directory is not written into
    before = sorted((p, p.stat().st_mtime_ns) for p in root.rglob("*"))
    trainer = Trainer(cfg, torch.device("cpu"), eval_only=True, given=set())
    report = trainer.evaluate_checkpoint()["eval"]
    assert sorted((p, p.stat().st_mtime_ns) for p in root.rglob("*")) == before
    assert "eval.json not written" in capsys.readouterr().out
    cfg.checkpoint.save = str(root)  # Megatron-LM's usual --save X --load X: refused before anything is written
    with pytest.raises(CheckpointError, match="holds a Megatron-LM checkpoint"):
        Trainer(cfg, torch.device("cpu"), eval_only=True, given=set())
    assert sorted((p, p.stat().st_mtime_ns) for p in root.rglob("*")) == before
    m = trainer.cfg.model
    assert (m.normalization, m.add_bias_linear, m.add_qkv_bias) == ("LayerNorm", True, True)
    _assert_run_holds(trainer, megatron_dist_biased["state"], report)


def test_torch_dist_per_layer_keys_with_layernorm_and_biases(tmp_path, biased):
    """Per-layer torch_dist keys with Transformer Engine's fused norm names (``linear_qkv.layer_norm_bias``,
    ``linear_fc1.layer_norm_bias``) and every bias: read bit-exactly; args that rule a present bias out are
    refused by name."""
    import torch.distributed.checkpoint as dcp

    cfg, state, _ = biased
    flat = shard_model(state, cfg, 1, 0, "mcore")
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_bias" in flat
    ckpt = tmp_path / "m" / "iter_0000010"
    dcp.save({k: v for k, v in flat.items() if v is not None}, checkpoint_id=str(ckpt), no_dist=True)
    torch.save({"args": megatron_args(cfg, 2), "checkpoint_version": 3.0, "iteration": 10}, ckpt / "common.pt")
    got = read_megatron(ckpt).state_dict()
    assert set(got) == set(state)
    for name in state:
        assert torch.equal(got[name], state[name]), name
    torch.save({"args": megatron_args(cfg, 2, normalization="RMSNorm"), "checkpoint_version": 3.0}, ckpt / "common.pt")
    with pytest.raises(ConversionError, match=r"iter_0000010: holds decoder\.final_layernorm\.bias \(a final norm "
                                              r"bias\) but the Megatron arguments say there is none \(normalization = "
                                              r"'RMSNorm'\)"):
        read_megatron(ckpt)


# ---- pretrain_moe.py --load <Megatron-LM checkpoint>: a weights-only start in any layout ----

def _megatron_run(corpus: dict, load, run_dir, **layout):
    """loop_config's 1-step run (validation at steps 0 and 1) loading ``load``; no architecture given, so the
    checkpoint's is taken (train(..., given=set()))."""
    from tests.builders import loop_config

    cfg = loop_config(corpus, run_dir, tp=layout.pop("tp", 1), pp=layout.pop("pp", 1))
    cfg.checkpoint.load = str(load)
    cfg.training.train_iters, cfg.training.eval_interval = 1, 1
    cfg.optimizer.lr, cfg.optimizer.lr_warmup_iters = 1e-2, 0  # the first step trains at 1e-2
    for name, value in layout.items():
        setattr(cfg.parallel, name, value)
    return cfg


def _assert_run_holds(trainer, want: dict, report: dict) -> None:
    """The run's model holds every tensor of ``want`` bit-exactly, and its evaluation of the step-10 checkpoint
    gave a finite loss."""
    from megatron_moe.training.state import model_state

    got = model_state(trainer.engine.parts)
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert report["step"] == 10 and math.isfinite(report["loss"])


def _train_layouts(corpus: dict, load, runs, layouts: dict | None = None) -> dict:
    """Train :func:`_megatron_run` from ``load`` in each layout (default: the 2-rank tp2, pp2 and FSDP2 ones);
    name -> (validation losses, the first step's training loss from metrics.jsonl) on global rank 0."""
    import json

    from megatron_moe.training.trainer import train

    layouts = layouts or {"tp2": {"tp": 2}, "pp2": {"pp": 2}, "fsdp2": {"data_parallel_shard": True}}
    out = {}
    for name, layout in layouts.items():
        run_dir = pathlib.Path(runs) / name
        summary = train(_megatron_run(corpus, load, run_dir, **layout), given=set())
        if (run_dir / "metrics.jsonl").is_file():  # rank 0's
            records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            step = next(r["lm_loss"] for r in records if r.get("step") == 1 and "lm_loss" in r)
            out[name] = ([v["loss"] for v in summary["valid"]], step)
    return out


@pytest.mark.slow
def test_load_megatron_torch_dist_holds_the_dense_weights_bit_exactly(tmp_path, capsys, loop_corpus, megatron_dist):
    """--eval-only --load on megatron-core's TP=2 torch_dist save: the architecture comes from its args and every
    parameter of the run's model equals the dense model it was written from, bit for bit."""
    from megatron_moe.training.trainer import Trainer

    cfg = _megatron_run(loop_corpus, megatron_dist["root"], tmp_path / "run")
    trainer = Trainer(cfg, torch.device("cpu"), eval_only=True, given=set())
    report = trainer.evaluate_checkpoint()["eval"]
    assert (trainer.cfg.model.num_layers, trainer.cfg.moe.num_experts, trainer.cfg.model.vocab_size) == (2, 0, 320)
    _assert_run_holds(trainer, megatron_dist["state"], report)
    assert not (megatron_dist["root"] / "pwned").exists()


@pytest.mark.slow
def test_load_megatron_legacy_trains_alike_in_tp2_pp2_and_fsdp2(megatron_dist):
    """A legacy TP=2 checkpoint loaded by a single process and by 2-rank tp2, pp2 and FSDP2 (dp2) runs: the
    validation losses before and after the first step and the first step's training loss agree to 1e-5
    relative (fp32, other summation orders); the run says it starts at step 1 with a fresh optimizer."""
    log, runs = megatron_dist["single_log"], megatron_dist["runs"]
    assert "Megatron-LM checkpoint" in log and "(iteration 10)" in log and "starts at step 1" in log, log
    valid, step = runs["single"]
    assert len(valid) == 2 and valid[1] < valid[0]  # the first step trained
    assert sorted(runs) == ["fsdp2", "pp2", "single", "tp2"]
    for name, (other_valid, other_step) in runs.items():
        assert other_valid == pytest.approx(valid, rel=1e-5), name
        assert other_step == pytest.approx(step, rel=1e-5), name


def test_pretrain_cli_loads_megatron_and_says_to_upcycle_for_moe_settings(tmp_path, capsys, loop_corpus):
    """pretrain_moe.py --load <Megatron dir> with only data and training flags trains its model (Megatron's
    --finetune, --no-load-optim, --no-load-rng accepted: it is a weights-only start anyway); --num-experts 8
    on it stops (exit 3) with the upcycle_checkpoint.py command; a --save into the Megatron directory is refused
    (its iter_* names would collide) and leaves it as it was; a vocabulary smaller than the tokenizer's is
    refused (exit 2)."""
    import pretrain_moe
    from megatron_moe.model.transformer import build_model

    cfg = tiny_config(num_experts=0, vocab_size=320)
    load = write_megatron(tmp_path / "meg", build_model(cfg, "cpu", seed=0).state_dict(), cfg, 1)
    before = sorted(p.name for p in load.rglob("*"))
    argv = ["--load", str(load), "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "2",
            "--train-iters", "1", "--eval-interval", "0", "--training.device", "cpu",
            "--data-path", loop_corpus["prefix"], "--tokenizer-model", loop_corpus["tokenizer"], "--split", "90,10,0",
            "--data.cache_dir", str(loop_corpus["root"] / "cache")]
    finetune = ["--finetune", "--no-load-optim", "--no-load-rng"]
    assert pretrain_moe.main(argv + finetune + ["--save", str(tmp_path / "run")]) == 0, capsys.readouterr().err
    assert "loaded the model weights of Megatron-LM checkpoint" in capsys.readouterr().out
    assert pretrain_moe.main(argv + ["--num-experts", "8", "--save", str(tmp_path / "moe")]) == 3
    err = capsys.readouterr().err
    assert "moe.num_experts: checkpoint 0, config 8" in err, err
    assert f"upcycle_checkpoint.py --input {load / 'iter_0000010'} --input-format megatron --num-experts 8" in err
    assert pretrain_moe.main(argv + ["--save", str(load)]) == 3
    assert "holds a Megatron-LM checkpoint; save this run elsewhere" in capsys.readouterr().err
    assert sorted(p.name for p in load.rglob("*")) == before
    small = tiny_config(num_experts=0)  # vocabulary 96 < the tokenizer's 300
    argv[1] = str(write_megatron(tmp_path / "small", build_model(small, "cpu", seed=0).state_dict(), small, 1))
    assert pretrain_moe.main(argv) == 2
    assert "model.vocab_size = 96 is smaller than the tokenizer's vocabulary" in capsys.readouterr().err
