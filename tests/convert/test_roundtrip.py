"""Round trip per Hugging Face format: a tiny random model written by transformers -> import -> two
training steps in a tp2 x pp2 layout (4 gloo ranks, the real trainer and data path) -> export ->
transformers loads it and its logits equal ours, and the exported tokenizer encodes as ours.

One distributed launch trains every format in turn: the ranks' start (importing megatron-core takes
most of it) is paid once; each format is its own test. Measured on the shared 2-core machine: 48 s
for all five formats (load average 5), 155 s under heavy load (20; the 4-rank launch is ~125 s of
it, ~17 s of which train the five models). Tolerance: 1e-5 absolute on logits of
magnitude ~0.1-1 (float32 on both sides; the two implementations sum in different orders, observed
~1e-7).
"""

from __future__ import annotations

import json

import pytest
import torch

# Only what the spawned ranks need is imported at module level (each rank re-imports this module).

# name -> (model_type, transformers config overrides). "phimoe" has GRIN-MoE's released shape ratios
# (4 query heads per KV head, expert FFN = 1.5625 x hidden, 16 experts top-2, LayerNorm, attention and
# LM-head biases, both jitters 0.01, rope theta 1e4, a sliding window of about half the context) and,
# as released, bf16 weights (imported as bf16, trained in float32).
FORMATS = {
    "llama3": ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                                             "rope_theta": 500000.0}}),
    "qwen2": ("qwen2", {}),
    "phi3": ("phi3", {"bos_token_id": 1, "eos_token_id": 2}),
    "mixtral": ("mixtral", {"router_jitter_noise": 0.1}),
    "phimoe": ("phimoe", {"hidden_size": 128, "num_attention_heads": 8, "num_key_value_heads": 2,
                          "intermediate_size": 200, "num_local_experts": 16, "max_position_embeddings": 64,
                          "sliding_window": 32}),
}
VOCAB = 320  # >= the test tokenizer's vocabulary; divisible by tp = 2
SEQ = 32  # training sequence length of every format (the same data settings: one dataset index cache)
STEPS = 2
ATOL = 1e-5


def _run_config(load: str, save: str, corpus: dict):
    """The training run of one format: the imported checkpoint's config, STEPS steps, tp2 x pp2, no validation."""
    from megatron_moe.convert.native import read_config

    _, cfg, _ = read_config(load)
    cfg.parallel.tensor_model_parallel_size = cfg.parallel.pipeline_model_parallel_size = 2
    cfg.data.data_path, cfg.data.tokenizer_model = [corpus["prefix"]], corpus["tokenizer"]
    cfg.data.split, cfg.data.cache_dir, cfg.data.seq_length = "90,10,0", str(corpus["root"] / "cache"), SEQ
    cfg.training.micro_batch_size, cfg.training.global_batch_size = 2, 4
    cfg.training.train_iters, cfg.training.eval_interval, cfg.training.eval_iters = STEPS, 0, 0
    cfg.training.device = "cpu"
    cfg.optimizer.lr, cfg.optimizer.min_lr, cfg.optimizer.lr_warmup_iters = 1e-2, 1e-3, 0
    cfg.checkpoint.load, cfg.checkpoint.save = load, save
    cfg.logging.log_interval = 1
    return cfg


def _prebuild_index_cache(cfg) -> None:
    """Build the runs' dataset index cache in this process, as the trainer would (same arguments).

    Every rank scans the cache folder for unsafe .npy files before megatron-core's rank 0 writes new
    ones, so ranks that start while rank 0 writes can read a half-written file; with the cache
    complete before the ranks start, they only read it.
    """
    from megatron_moe.data.datasets import build_gpt_datasets
    from megatron_moe.data.tokenizer import SentencePieceTokenizer

    t, d = cfg.training, cfg.data
    build_gpt_datasets(d.data_path, d.split, SentencePieceTokenizer(d.tokenizer_model), d.seq_length, t.seed,
                       (t.train_samples, max(1, t.eval_iters) * t.global_batch_size), blend_cache_dir=d.cache_dir)


def _train_all(rank: int, world_size: int, jobs: list[tuple[str, str]], corpus: dict) -> None:
    """Train every (load, save) job for STEPS steps in a tp2 x pp2 layout with the project's trainer."""
    from megatron_moe.training.trainer import train

    for load, save in jobs:
        train(_run_config(load, save, corpus))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, loop_corpus):
    """Each format imported from transformers and trained STEPS steps on 4 ranks: name -> directories."""
    import upcycle_checkpoint
    from megatron_moe.testing import run_distributed
    from tests.convert.helpers import make_hf

    root = tmp_path_factory.mktemp("roundtrip")
    dirs = {}
    for name, (model_type, overrides) in FORMATS.items():
        d = {k: root / name / k for k in ("hf", "imported", "trained", "exported")}
        dtype = torch.bfloat16 if name == "phimoe" else torch.float32
        make_hf(d["hf"], model_type, vocab_size=VOCAB, save_dtype=dtype, **overrides)
        assert upcycle_checkpoint.main(["--input", str(d["hf"]), "--input-format", "hf",
                                        "--output", str(d["imported"])]) == 0
        dirs[name] = d
    jobs = [(str(d["imported"]), str(d["trained"])) for d in dirs.values()]
    _prebuild_index_cache(_run_config(*jobs[0], loop_corpus))
    run_distributed(_train_all, world_size=4, args=(jobs, loop_corpus), timeout=600)
    return dirs


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FORMATS))
def test_round_trip_through_tp2_pp2_training(trained, name):
    import transformers

    from megatron_moe.convert import export_hf
    from megatron_moe.convert.native import load_model
    from megatron_moe.training.checkpoint import read_meta, resolve_checkpoint
    from tests.convert.helpers import tokens

    d = trained[name]
    model_type = FORMATS[name][0]
    assert read_meta(resolve_checkpoint(d["trained"]))["step"] == STEPS
    ours, _ = load_model(d["trained"])
    before, _ = load_model(d["imported"])
    changed = [n for n, t in ours.state_dict().items() if not torch.equal(t, before.state_dict()[n])]
    assert len(changed) == len(ours.state_dict()), "training left some parameters unchanged"

    assert export_hf.main(["--load", str(d["trained"]), "--output", str(d["exported"]),
                           "--architecture", "phi3" if model_type == "phi3" else "auto"]) == 0
    config = json.loads((d["exported"] / "config.json").read_text())
    assert config["model_type"] == model_type
    hf = transformers.AutoModelForCausalLM.from_pretrained(d["exported"], dtype=torch.float32).eval()
    x = tokens(seq=min(24, ours.cfg.data.seq_length), vocab=VOCAB)
    with torch.no_grad():
        ref, got = hf(x).logits, ours(x)
    assert ref.abs().max() > 0.05
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    # The run's tokenizer travels with the export and encodes as ours does (transformers' AutoTokenizer
    # substitutes its own class for model_type qwen2: megatron_moe/convert/hf_tokenizer.py).
    cls = transformers.LlamaTokenizer if model_type == "qwen2" else transformers.AutoTokenizer
    text = "alpha beta,  gamma.\nthe expert é 42"
    assert cls.from_pretrained(d["exported"]).encode(text, add_special_tokens=False) == _sp_ids(
        ours.cfg.data.tokenizer_model, text)


def _sp_ids(model_path: str, text: str) -> list[int]:
    from megatron_moe.data.tokenizer import SentencePieceTokenizer

    return SentencePieceTokenizer(model_path).encode(text)
