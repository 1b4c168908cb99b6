"""Export to Hugging Face: MoE -> Mixtral, dense -> Llama, loaded by transformers with the same logits."""

from __future__ import annotations

import json
import os

import pytest
import torch

from megatron_moe.convert import export_hf
from megatron_moe.convert.export_hf import ExportError, export
from megatron_moe.convert.hf import read_hf
from megatron_moe.convert.native import load_model, save_model_checkpoint
from megatron_moe.convert.upcycle import UpcycleOptions, upcycle
from tests.convert.helpers import make_hf, save_native, tiny_config, tokens

ATOL = 1e-5  # float32 on both sides


def test_upcycled_moe_exports_to_mixtral_with_the_same_logits(tmp_path):
    from transformers import MixtralForCausalLM

    make_hf(tmp_path / "hf")
    # Noise makes the experts differ, so the routing decisions (top-2 of 4) matter for the logits.
    cfg, state = upcycle(read_hf(tmp_path / "hf"), UpcycleOptions(4, 2, expert_noise=0.5, router_init_std=0.5))
    save_model_checkpoint(tmp_path / "moe", cfg, state, "test")
    rc = export_hf.main(["--load", str(tmp_path / "moe"), "--output", str(tmp_path / "mixtral")])
    assert rc == 0
    config = json.loads((tmp_path / "mixtral" / "config.json").read_text())
    assert (config["model_type"], config["num_local_experts"], config["num_experts_per_tok"]) == ("mixtral", 4, 2)
    hf = MixtralForCausalLM.from_pretrained(tmp_path / "mixtral").eval()
    ours, _ = load_model(tmp_path / "moe")
    x = tokens(seq=24)
    with torch.no_grad():
        ref, got = hf(x).logits, ours(x)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    # The experts really differ: the same model with the expert order reversed gives other logits.
    for layer in ours.layers.values():
        for w in (layer.feed_forward.experts.w1, layer.feed_forward.experts.w3, layer.feed_forward.experts.w2):
            w.data = w.data.flip(0)
    with torch.no_grad():
        assert (ours(x) - ref).abs().max() > 1e-3


def test_sharded_export_with_tied_embeddings(tmp_path):
    from transformers import MixtralForCausalLM

    cfg = tiny_config(num_experts=4, topk=2)
    cfg.model.tie_embeddings = True
    ours = save_native(tmp_path / "moe", cfg, seed=1)
    export(tmp_path / "moe", tmp_path / "out", max_shard_bytes=30_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    hf = MixtralForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=ATOL, rtol=0)


def test_dense_exports_to_llama(tmp_path):
    from transformers import LlamaForCausalLM

    cfg = tiny_config(num_experts=0)
    ours = save_native(tmp_path / "dense", cfg, seed=2)
    export(tmp_path / "dense", tmp_path / "llama")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=ATOL, rtol=0)
    # ... and the exported Llama round-trips through the HF reader.
    source = read_hf(tmp_path / "llama")
    for name, t in ours.state_dict().items():
        assert torch.equal(source.get(name), t), name


@pytest.mark.parametrize("moe,reason", [
    ({"router": "sparsemixer"}, "moe.router = 'sparsemixer'"),
    ({"logit_norm": True}, "moe.logit_norm"),
    ({"renormalize": False}, "moe.renormalize = false"),
    ({"first_k_dense": 1}, "moe.first_k_dense = 1"),
    ({"layer_freq": 2}, "moe.layer_freq = 2"),
])
def test_inexpressible_moe_is_explained_and_nothing_written(tmp_path, capsys, moe, reason):
    cfg = tiny_config(num_experts=4, topk=2, **moe)
    save_native(tmp_path / "moe", cfg)
    with pytest.raises(ExportError, match="cannot be exported as Mixtral"):
        export(tmp_path / "moe", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    rc = export_hf.main(["--load", str(tmp_path / "moe"), "--output", str(tmp_path / "out")])
    assert rc == 2 and reason in capsys.readouterr().err


def test_all_reasons_are_listed(tmp_path):
    cfg = tiny_config(num_experts=4, topk=2, router="sparsemixer", logit_norm=True, first_k_dense=1)
    save_native(tmp_path / "moe", cfg)
    with pytest.raises(ExportError) as err:
        export(tmp_path / "moe", tmp_path / "out")
    assert all(s in str(err.value) for s in ("sparsemixer", "logit_norm", "first_k_dense"))


def test_export_refuses_a_non_empty_output_unless_overwrite(tmp_path, capsys):
    save_native(tmp_path / "dense", tiny_config(num_experts=0), seed=2)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep me")
    argv = ["--load", str(tmp_path / "dense"), "--output", str(tmp_path / "out")]
    assert export_hf.main(argv) == 2
    assert "is not empty" in capsys.readouterr().err and sorted(os.listdir(tmp_path / "out")) == ["notes.txt"]
    assert export_hf.main(argv + ["--overwrite"]) == 0
    assert (tmp_path / "out" / "config.json").is_file() and (tmp_path / "out" / "notes.txt").read_text() == "keep me"
