"""Builders shared by the tests (plain functions; tests/conftest.py exposes them as fixtures, and
multi-process test bodies, which run in spawned processes without fixtures, import them from here).
"""

from __future__ import annotations

import dataclasses
import json
import random

from megatron_moe.config import Config

WORDS_A = ["alpha", "beta", "gamma", "delta", "router", "expert", "token", "layer", "the", "of", "a"]
WORDS_B = ["zeta", "kappa", "omega", "sigma", "mixture", "gate", "shard", "batch", "is", "on", "to"]

# The tiny model every test starts from: hidden 32, 4 heads / 2 KV heads, 4 layers, dense ffn 64,
# 4 experts top-2 of ffn 32, vocab 128, sequence 16, 2 x 4 micro-batches per step.
_TINY = {
    "hidden_size": 32, "num_attention_heads": 4, "num_query_groups": 2, "num_layers": 4, "vocab_size": 128,
    "ffn_hidden_size": 64, "num_experts": 4, "topk": 2, "expert_ffn_hidden_size": 32, "aux_loss_coeff": 0.1,
    "z_loss_coeff": 1e-3, "seq_length": 16, "micro_batch_size": 2, "global_batch_size": 8,
}
# The options of released models (GRIN/PhiMoE, Qwen2, Llama 3) all on: LayerNorm, every bias, llama3 RoPE
# scaling with original context 64, so that at head_dim 8 (theta 1e4) the wavelengths 6.3, 63, 628, 6283
# hit the kept, interpolated and fully scaled regimes of the formula.
RELEASED_OPTIONS = {
    "normalization": "LayerNorm", "add_qkv_bias": True, "add_bias_linear": True, "lm_head_bias": True,
    "rope_scaling": "llama3", "rope_scaling_factor": 8.0, "rope_low_freq_factor": 1.0, "rope_high_freq_factor": 4.0,
    "rope_original_max_position": 64,
}
_SHORT_NAMES = {"tp": "tensor_model_parallel_size", "pp": "pipeline_model_parallel_size",
                "micro": "micro_batch_size", "global_batch": "global_batch_size"}


def tiny_config(**settings) -> Config:
    """The tiny test config with ``settings`` applied: keyword = a setting's field name (unique across
    the groups, e.g. ``num_layers=3``, ``router="sparsemixer"``) or ``tp``, ``pp``, ``micro``, ``global_batch``.

    Raises KeyError for a name that is no setting.
    """
    cfg = Config()
    groups = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    owner = {field.name: group for group in groups.values() for field in dataclasses.fields(group)}
    for name, value in {**_TINY, **settings}.items():
        name = _SHORT_NAMES.get(name, name)
        if name not in owner:
            raise KeyError(f"tiny_config: no setting named {name!r}")
        setattr(owner[name], name, value)
    return cfg


def make_documents(words: list[str], n: int, seed: int) -> list[str]:
    """``n`` random documents of 3..60 words from ``words``, some with punctuation and newlines."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(3, 60)):
            parts.append(rng.choice(words))
            r = rng.random()
            if r < 0.05:
                parts.append(".\n")
            elif r < 0.1:
                parts.append(", ")
        docs.append(" ".join(parts).strip())
    return docs


def write_jsonl(path, docs: list[str]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    return str(path)


def build_loop_corpus(root) -> dict:
    """A 300-document corpus preprocessed to .bin/.idx with its own 300-piece tokenizer, under ``root``."""
    from megatron_moe.data.preprocess import preprocess_files
    from megatron_moe.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

    docs = make_documents(WORDS_A, 300, seed=3)
    (root / "train.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    model = train_sentencepiece([str(root / "train.txt")], str(root / "tok"), 300)
    tokenizer = SentencePieceTokenizer(model)
    res = preprocess_files([write_jsonl(root / "a.jsonl", docs)], str(root / "a"), tokenizer, log=None)
    return {"root": root, "tokenizer": model, "prefix": res.prefix}


def loop_config(corpus: dict, run_dir, tp: int = 1, pp: int = 1) -> Config:
    """A 3-step training run on :func:`build_loop_corpus` data with adaptive coefficients and validation."""
    cfg = tiny_config(tp=tp, pp=pp, micro=2, global_batch=4)
    cfg.model.vocab_size = 512  # >= the tokenizer's; fixed, since Megatron's padding depends on tp
    cfg.data.data_path = [corpus["prefix"]]
    cfg.data.tokenizer_model = corpus["tokenizer"]
    cfg.data.split = "90,10,0"
    cfg.data.cache_dir = str(corpus["root"] / "cache")
    cfg.moe.adaptive_aux = True
    cfg.moe.adaptive_beta = 0.5
    cfg.training.train_iters, cfg.training.eval_interval, cfg.training.eval_iters = 3, 3, 1
    cfg.training.device = "cpu"
    cfg.logging.log_interval = 1
    cfg.optimizer.lr_warmup_iters = 1
    cfg.checkpoint.save = str(run_dir)
    return cfg
