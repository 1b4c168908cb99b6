"""Hugging Face dense models -> upcycled MoE checkpoints: exact function, config mapping, bad inputs."""

from __future__ import annotations

import json

import pytest
import torch

import upcycle_checkpoint
from megatron_moe.convert.hf import read_hf
from megatron_moe.convert.native import load_model
from megatron_moe.convert.source import ConversionError
from megatron_moe.convert.upcycle import UpcycleOptions, upcycle
from megatron_moe.training.checkpoint import read_meta, resolve_checkpoint
from tests.convert.helpers import make_hf, tokens

# float32 end to end; the MoE sums the same products in a different order (expert GEMMs, weighted combine),
# so logits agree to rounding: observed ~1e-7 on logits of magnitude ~0.1-1.
ATOL = 1e-5


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = upcycle_checkpoint.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("model_type,tied", [("llama", False), ("mistral", False), ("llama", True), ("qwen3", False)])
def test_upcycled_logits_equal_transformers_dense_logits(tmp_path, capsys, model_type, tied):
    hf = make_hf(tmp_path / "hf", model_type, tie_word_embeddings=tied)
    rc, out, err = run_cli(capsys, "--input", tmp_path / "hf", "--input-format", "hf", "--num-experts", 4,
                           "--moe-router-topk", 2, "--output", tmp_path / "moe", "--verify")
    assert rc == 0, err
    diff = float(out.split("= ")[-1].split()[0])
    assert diff < ATOL, out
    model, meta = load_model(tmp_path / "moe")
    assert meta["contents"] == ["model"] and meta["step"] == 0
    cfg = model.cfg
    assert (cfg.moe.num_experts, cfg.moe.topk, cfg.model.num_query_groups, cfg.model.tie_embeddings) == (4, 2, 2, tied)
    assert cfg.model.norm_eps == 1e-6
    x = tokens()
    with torch.no_grad():
        ref = hf(x).logits
        ours = model(x)
    assert ref.abs().max() > 0.05  # a meaningful comparison, not all zeros
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    # The router is fresh and the experts are identical copies of the dense FFN.
    w1 = model.layers["1"].feed_forward.experts.w1
    torch.testing.assert_close(w1[0], hf.model.layers[1].mlp.gate_proj.weight.t(), atol=0, rtol=0)
    assert all(torch.equal(w1[0], w1[e]) for e in range(4))


def test_upcycled_model_routed_by_sigmoid_scores_with_expert_bias_keeps_the_dense_function(hf_llama):
    """Upcycling then training with DeepSeek-V3's routing (--moe-router-score-function sigmoid
    --moe-router-enable-expert-bias on the upcycled checkpoint): identical experts whose K weights are normalised
    to sum 1 give the dense logits, whatever the (zero, then moving) biases choose; a scaling factor would not."""
    import dataclasses

    from megatron_moe.convert.native import model_from_state

    path, hf = hf_llama
    cfg, state = upcycle(read_hf(path), UpcycleOptions(4, 2, router_init_std=0.5))
    sigmoid = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, score_function="sigmoid", expert_bias=True))
    model = model_from_state(sigmoid, {**state, **{f"layers.{i}.feed_forward.router.expert_bias": torch.zeros(4)
                                                   for i in range(cfg.model.num_layers)}}).eval()
    x = tokens()
    with torch.no_grad():
        ref = hf(x).logits
        torch.testing.assert_close(model(x), ref, atol=ATOL, rtol=0)
        for layer in model.layers.values():  # biases that change the choices change nothing either
            layer.feed_forward.router.expert_bias.copy_(torch.tensor([0.5, -0.5, 0.2, 0.0]))
        torch.testing.assert_close(model(x), ref, atol=ATOL, rtol=0)
        for layer in model.layers.values():
            layer.feed_forward.router.topk_scaling_factor = 2.5
        assert (model(x) - ref).abs().max() > 1e-3


def test_router_is_seeded_and_noise_breaks_exactness(tmp_path, hf_llama):
    path, hf = hf_llama
    source = read_hf(path)
    _, a = upcycle(source, UpcycleOptions(4, 2, seed=7, router_init_std=0.5))
    _, b = upcycle(source, UpcycleOptions(4, 2, seed=7, router_init_std=0.5))
    _, c = upcycle(source, UpcycleOptions(4, 2, seed=8, router_init_std=0.5))
    gate = "layers.0.feed_forward.router.gate.weight"
    assert torch.equal(a[gate], b[gate]) and not torch.equal(a[gate], c[gate])
    assert abs(a[gate].std().item() - 0.5) < 0.15
    cfg, noisy = upcycle(source, UpcycleOptions(4, 2, expert_noise=0.05, seed=7))
    w = noisy["layers.0.feed_forward.experts.w1"]
    assert not torch.equal(w[0], w[1])
    rel = (w[0] - a["layers.0.feed_forward.experts.w1"][0]).pow(2).mean().sqrt() / w[0].pow(2).mean().sqrt()
    assert 0.02 < rel.item() < 0.1


@pytest.mark.parametrize("experts,topk,g", [(4, 2, 2), (8, 4, 4), (8, 2, 2)])
def test_granular_upcycling_is_exact(tmp_path, hf_llama, experts, topk, g):
    path, hf = hf_llama
    from megatron_moe.convert.native import model_from_state

    cfg, state = upcycle(read_hf(path), UpcycleOptions(experts, topk, granularity=g, router_init_std=1.0))
    assert cfg.moe.expert_ffn_hidden_size == 64 // g
    w1 = state["layers.0.feed_forward.experts.w1"]
    dense_w1 = hf.model.layers[0].mlp.gate_proj.weight.t()
    for e in range(experts):  # expert e holds slice e mod G
        s = e % g
        assert torch.equal(w1[e], dense_w1[:, s * (64 // g):(s + 1) * (64 // g)])
    model = model_from_state(cfg, state)
    x = tokens(seq=24)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=ATOL, rtol=0)


def test_sharded_index_and_missing_shard(tmp_path, capsys):
    hf = make_hf(tmp_path / "hf", save_kwargs={"max_shard_size": "20KB"})
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1
    cfg, state = upcycle(read_hf(tmp_path / "hf"), UpcycleOptions(2, 1))
    torch.testing.assert_close(state["layers.1.attention.wk.weight"], hf.model.layers[1].self_attn.k_proj.weight)
    (tmp_path / "hf" / files[-1]).unlink()
    rc, _, err = run_cli(capsys, "--input", tmp_path / "hf", "--input-format", "hf", "--num-experts", 2,
                         "--output", tmp_path / "out")
    assert rc == 2 and files[-1] in err and "missing" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_type,overrides,field", [
    ("llama", {"attention_bias": True}, "attention_bias"),
    ("llama", {"mlp_bias": True}, "mlp_bias = true"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act"),
    ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, "rope_type"),
    ("qwen3", {"attention_bias": True}, "attention_bias = true puts biases on q, k, v and o_proj"),
    ("qwen3_moe", {"mlp_only_layers": [2], "num_hidden_layers": 3},
     r"mlp_only_layers = \[2\] makes layers \[0, 1\] MoE"),
])
def test_unsupported_architectures_name_the_field(tmp_path, model_type, overrides, field):
    make_hf(tmp_path / "hf", model_type, **overrides)
    with pytest.raises(ConversionError, match=field):
        read_hf(tmp_path / "hf")


def test_qwen3_without_head_dim_takes_transformers_default():
    """transformers' Qwen3Config defaults head_dim to 128 whatever the hidden size; Qwen3MoeConfig to hidden / heads."""
    from megatron_moe.convert.hf_config import config_from_hf

    base = {"hidden_size": 256, "num_attention_heads": 4, "intermediate_size": 512, "num_hidden_layers": 2,
            "vocab_size": 96}
    assert config_from_hf({**base, "model_type": "qwen3"}).model.head_dim == 128
    moe = {**base, "model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64}
    assert config_from_hf(moe).model.head_dim == 64


def test_unknown_model_type_refused(tmp_path):
    make_hf(tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="model_type = 'gpt2'"):
        read_hf(tmp_path / "q")


def test_bad_upcycling_options(tmp_path, capsys, hf_llama):
    path, _ = hf_llama
    rc, _, err = run_cli(capsys, "--input", path, "--input-format", "hf", "--num-experts", 2, "--moe-router-topk", 4,
                         "--output", tmp_path / "o")
    assert rc == 2 and "--moe-router-topk = 4" in err and "--num-experts = 2" in err
    for argv, msg in ((["--num-experts", 6, "--granularity", 4], "does not divide --num-experts"),
                      (["--num-experts", 4, "--granularity", 2, "--moe-router-topk", 1], "--moe-router-topk"),
                      (["--num-experts", 6, "--moe-router-topk", 3, "--granularity", 3], "FFN width 64")):
        rc, _, err = run_cli(capsys, "--input", path, "--input-format", "hf", *argv, "--output", tmp_path / "o")
        assert rc == 2 and msg in err, err
    rc, _, err = run_cli(capsys, "--input", tmp_path / "nowhere", "--input-format", "hf", "--num-experts", 2,
                         "--output", tmp_path / "o")
    assert rc == 2 and "config.json" in err


def test_output_is_a_step0_model_only_checkpoint(tmp_path, capsys, hf_llama):
    path, _ = hf_llama
    rc, _, _ = run_cli(capsys, "--input", path, "--input-format", "hf", "--num-experts", 2, "--moe-router-topk", 1,
                       "--output", tmp_path / "o")
    assert rc == 0
    ckpt = resolve_checkpoint(tmp_path / "o")
    meta = read_meta(ckpt)
    assert ckpt.name == "iter_0000000" and meta["step"] == 0 and meta["contents"] == ["model"]
    assert meta["config"]["moe"]["num_experts"] == 2 and meta["upcycling"]["topk"] == 1
    assert meta["source"].startswith("upcycled from hf:")


def test_upcycling_into_a_training_run_is_refused_unless_overwrite(tmp_path, capsys):
    make_hf(tmp_path / "hf")
    argv = ["--input", tmp_path / "hf", "--input-format", "hf", "--num-experts", 4, "--output", tmp_path / "moe"]
    assert run_cli(capsys, *argv)[0] == 0
    latest = (tmp_path / "moe" / "latest").read_text()
    rc, _, err = run_cli(capsys, *argv)  # a second upcycle into the same (now non-empty) directory
    assert rc == 2 and "is not empty" in err and (tmp_path / "moe" / "latest").read_text() == latest
    assert run_cli(capsys, *argv, "--overwrite")[0] == 0


@pytest.mark.parametrize("flag,value", [("--expert-noise", "nan"), ("--expert-noise", "-1"),
                                        ("--router-init-std", "inf"), ("--router-init-std", "0")])
def test_non_finite_upcycling_options_are_refused(tmp_path, capsys, flag, value):
    make_hf(tmp_path / "hf")
    rc, _, err = run_cli(capsys, "--input", tmp_path / "hf", "--input-format", "hf", "--num-experts", 4,
                         "--output", tmp_path / "moe", flag, value, "--verify")
    assert rc == 2 and flag in err and not (tmp_path / "moe").exists()
