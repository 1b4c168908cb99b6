"""Shared fixtures for the data tests: small synthetic corpora and a tokenizer, built in tmp dirs."""

from __future__ import annotations

import json
import random

import pytest

from megatron_moe.data.preprocess import preprocess_files
from megatron_moe.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

WORDS_A = ["alpha", "beta", "gamma", "delta", "router", "expert", "token", "layer", "the", "of", "a"]
WORDS_B = ["zeta", "kappa", "omega", "sigma", "mixture", "gate", "shard", "batch", "is", "on", "to"]


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


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """A folder with a tokenizer trained on both word sets and two preprocessed corpora A and B."""
    root = tmp_path_factory.mktemp("corpus")
    docs_a = make_documents(WORDS_A, 400, seed=1)
    docs_b = make_documents(WORDS_B, 400, seed=2)
    train_txt = root / "train.txt"
    train_txt.write_text("\n".join(docs_a + docs_b) + "\n", encoding="utf-8")
    model = train_sentencepiece([str(train_txt)], str(root / "tok"), 400)
    tokenizer = SentencePieceTokenizer(model)
    res_a = preprocess_files([write_jsonl(root / "a.jsonl", docs_a)], str(root / "a"), tokenizer, log=None)
    res_b = preprocess_files([write_jsonl(root / "b.jsonl", docs_b)], str(root / "b"), tokenizer, log=None)
    return {
        "root": root,
        "tokenizer": tokenizer,
        "model": model,
        "docs_a": docs_a,
        "docs_b": docs_b,
        "prefix_a": res_a.prefix,
        "prefix_b": res_b.prefix,
    }
