"""Shared fixtures for the data tests: small synthetic corpora and a tokenizer, built in tmp dirs."""

from __future__ import annotations

import pytest

from megatron_moe.data.preprocess import preprocess_files
from megatron_moe.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
from tests.builders import WORDS_A, WORDS_B, make_documents, write_jsonl


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
