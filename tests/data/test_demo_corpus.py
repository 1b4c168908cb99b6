from __future__ import annotations

import json

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_moe.data.demo_corpus import build_demo_corpus, collect_stdlib_documents, main
from megatron_moe.data.tokenizer import SentencePieceTokenizer


def test_collect_is_deterministic_and_clean():
    a = collect_stdlib_documents(max_docs=200)
    b = collect_stdlib_documents(max_docs=200)
    assert a == b
    assert len(a) == 200
    assert len(set(a)) == 200
    assert all(len(d) >= 40 and d == d.strip() for d in a)


def test_collect_skips_test_folders(tmp_path):
    lib = tmp_path / "lib"
    (lib / "pkg").mkdir(parents=True)
    (lib / "test").mkdir()
    (lib / "pkg" / "mod.py").write_text(
        '"""Module docstring long enough to be kept by the collector."""\n'
        'def f():\n    """Short."""\n'
        'class C:\n    """A class docstring that is also long enough to keep."""\n',
        encoding="utf-8",
    )
    (lib / "pkg" / "test_mod.py").write_text('"""A test module docstring that must be skipped!!"""\n')
    (lib / "test" / "x.py").write_text('"""A docstring inside a test folder that must be skipped."""\n')
    (lib / "broken.py").write_text("def (:\n", encoding="utf-8")
    docs = collect_stdlib_documents(str(lib))
    assert docs == [
        "Module docstring long enough to be kept by the collector.",
        "A class docstring that is also long enough to keep.",
    ]
    with pytest.raises(FileNotFoundError):
        collect_stdlib_documents(str(tmp_path / "missing"))


def test_build_demo_corpus_small(tmp_path, capsys):
    assert main(["--output-dir", str(tmp_path / "demo"), "--vocab-size", "512", "--max-docs", "300"]) == 0
    out = capsys.readouterr().out
    assert "[demo_corpus] done" in out
    demo = tmp_path / "demo"
    docs = [json.loads(line)["text"] for line in (demo / "corpus.jsonl").read_text(encoding="utf-8").splitlines()]
    assert docs == collect_stdlib_documents(max_docs=300)
    tok = SentencePieceTokenizer(str(demo / "tokenizer.model"))
    assert tok.vocab_size <= 512
    ds = IndexedDataset(str(demo / "corpus_text_document"))
    assert len(ds) == 300
    for i in (0, 150, 299):
        seq = np.array(ds[i], copy=True)
        assert int(seq[-1]) == tok.eod
        assert tok.decode(seq[:-1]) == docs[i]


def test_build_demo_corpus_function(tmp_path):
    res = build_demo_corpus(str(tmp_path), vocab_size=400, max_docs=50, log=None)
    assert res.num_documents == 50
    assert res.data_prefix == str(tmp_path / "corpus_text_document")
    assert res.num_tokens > res.num_documents
    assert res.vocab_size == SentencePieceTokenizer(res.tokenizer_model).vocab_size
