"""Native dense checkpoints -> upcycled; config round trip; model-only checkpoints load at step 0."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import upcycle_checkpoint
from megatron_moe.config import ConfigError
from megatron_moe.convert.config_io import config_from_dict
from megatron_moe.convert.native import load_model
from megatron_moe.model.moe import MoELayer
from tests.convert.helpers import save_native, tiny_config, tokens


def test_config_round_trip_and_unknown_keys():
    cfg = tiny_config(num_experts=8, topk=2, router="sparsemixer", logit_norm=True)
    cfg.data.data_path = ["1.0", "a", "2.0", "b"]
    d = dataclasses.asdict(cfg)
    assert config_from_dict(d) == cfg
    d["model"]["no_such_field"] = 1
    with pytest.raises(ConfigError, match="model.no_such_field"):
        config_from_dict(d)
    with pytest.raises(ConfigError, match="unknown group 'nope'"):
        config_from_dict({"nope": {}})
    with pytest.raises(ConfigError, match="moe.topk = 9 exceeds"):
        config_from_dict({"moe": {"num_experts": 8, "topk": 9}})


def test_native_dense_upcycles_exactly(tmp_path, capsys):
    cfg = tiny_config(num_experts=0)
    cfg.model.tie_embeddings = True
    dense = save_native(tmp_path / "dense", cfg, seed=5)
    rc = upcycle_checkpoint.main(["--input", str(tmp_path / "dense"), "--input-format", "native", "--num-experts",
                                  "8", "--moe-router-topk", "2", "--output", str(tmp_path / "moe"), "--verify"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "verify: max |logit(dense) - logit(upcycled)|" in out.out
    moe, meta = load_model(tmp_path / "moe")
    assert meta["contents"] == ["model"]
    assert sum(isinstance(m, MoELayer) for m in moe.modules()) == cfg.model.num_layers
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(moe(x), dense(x), atol=1e-5, rtol=0)


def test_native_moe_input_is_refused(tmp_path, capsys):
    save_native(tmp_path / "moe", tiny_config(num_experts=4, topk=2))
    rc = upcycle_checkpoint.main(["--input", str(tmp_path / "moe"), "--input-format", "native", "--num-experts", "8",
                                  "--output", str(tmp_path / "o")])
    assert rc == 2 and "moe.num_experts = 4" in capsys.readouterr().err
    rc = upcycle_checkpoint.main(["--input", str(tmp_path / "absent"), "--input-format", "native", "--num-experts",
                                  "8", "--output", str(tmp_path / "o")])
    assert rc == 2 and "no such file" in capsys.readouterr().err


def test_native_dense_with_layernorm_biases_and_llama3_rope_upcycles_exactly(tmp_path):
    """Norm, q/k/v and LM-head biases and llama3 RoPE are carried into the MoE model (the dense FFN has no
    biases: experts cannot have any)."""
    from megatron_moe.convert.native import save_model_checkpoint
    from megatron_moe.model.transformer import build_model

    cfg = tiny_config(num_experts=0, normalization="LayerNorm", add_qkv_bias=True, lm_head_bias=True,
                      rope_scaling="llama3", rope_original_max_position=32)
    dense = build_model(cfg, "cpu", seed=5).eval()
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, p in dense.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1, generator=g)
    save_model_checkpoint(tmp_path / "dense", cfg, dense.state_dict(), "test")
    rc = upcycle_checkpoint.main(["--input", str(tmp_path / "dense"), "--input-format", "native", "--num-experts",
                                  "4", "--moe-router-topk", "2", "--output", str(tmp_path / "moe")])
    assert rc == 0
    moe, meta = load_model(tmp_path / "moe")
    assert meta["config"]["model"]["normalization"] == "LayerNorm" and moe.output.bias is not None
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(moe(x), dense(x), atol=1e-5, rtol=0)  # as the bias-free test above
