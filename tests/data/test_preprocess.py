from __future__ import annotations

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_moe.data.preprocess import iter_documents, main, preprocess_files
from megatron_moe.data.tokenizer import SentencePieceTokenizer
from tests.builders import WORDS_A, make_documents, write_jsonl


def _read_all(prefix: str) -> list[np.ndarray]:
    ds = IndexedDataset(prefix)
    # Copy: the arrays are views of a memory map that closes with ``ds``.
    return [np.array(ds[i], copy=True) for i in range(len(ds))]


def test_jsonl_round_trip(corpus_dir):
    tok = corpus_dir["tokenizer"]
    seqs = _read_all(corpus_dir["prefix_a"])
    docs = corpus_dir["docs_a"]
    assert len(seqs) == len(docs)
    assert seqs[0].dtype == np.uint16
    for seq, doc in zip(seqs, docs, strict=True):
        assert int(seq[-1]) == tok.eod
        assert tok.eod not in seq[:-1].tolist()
        assert tok.decode(seq[:-1]) == doc


def test_txt_paragraphs_and_mixed_inputs(tmp_path, corpus_dir):
    tok = corpus_dir["tokenizer"]
    txt = tmp_path / "p.txt"
    txt.write_text("first doc line one\nline two\n\n\n  second doc\n   \nthird\n", encoding="utf-8")
    jsonl = write_jsonl(tmp_path / "x.jsonl", ["json doc é"])
    res = preprocess_files([str(txt), jsonl], str(tmp_path / "out"), tok, log=None)
    assert res.prefix == str(tmp_path / "out_text_document")
    assert res.num_documents == 4
    decoded = [tok.decode(s[:-1]) for s in _read_all(res.prefix)]
    assert decoded == ["first doc line one\nline two", "  second doc", "third", "json doc é"]
    assert res.num_tokens == sum(len(s) for s in _read_all(res.prefix))

    whole = preprocess_files([str(txt)], str(tmp_path / "whole"), tok, txt_mode="file", log=None)
    assert whole.num_documents == 1
    assert tok.decode(_read_all(whole.prefix)[0][:-1]) == txt.read_text(encoding="utf-8")


def test_progress_lines(tmp_path, corpus_dir):
    lines = []
    docs = make_documents(WORDS_A, 25, seed=5)
    preprocess_files(
        [write_jsonl(tmp_path / "d.jsonl", docs)],
        str(tmp_path / "o"),
        corpus_dir["model"],
        log_interval=10,
        log=lines.append,
    )
    progress = [line for line in lines if "documents," in line and "done" not in line]
    assert [line.split()[1] for line in progress] == ["10", "20"]
    assert "25 documents" in lines[-1]


def test_bad_inputs(tmp_path, corpus_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        preprocess_files([str(bad)], str(tmp_path / "o"), corpus_dir["tokenizer"], log=None)
    assert not (tmp_path / "o_text_document.bin").exists()
    assert not (tmp_path / "o_text_document.bin.tmp").exists()
    nokey = tmp_path / "nokey.jsonl"
    nokey.write_text('{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="'text'"):
        list(iter_documents(str(nokey)))
    with pytest.raises(FileNotFoundError, match="absent.txt"):
        preprocess_files([str(tmp_path / "absent.txt")], str(tmp_path / "o"), corpus_dir["tokenizer"])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="no non-empty documents"):
        preprocess_files([str(empty)], str(tmp_path / "o"), corpus_dir["tokenizer"], log=None)


def test_cli_trains_tokenizer(tmp_path, capsys):
    docs = make_documents(WORDS_A, 60, seed=3)
    src = write_jsonl(tmp_path / "c.jsonl", docs)
    model = tmp_path / "tok" / "cli.model"
    rc = main(
        [
            "--input", src,
            "--output-prefix", str(tmp_path / "cli"),
            "--tokenizer-model", str(model),
            "--train-tokenizer", "--vocab-size", "320",
        ]
    )  # fmt: skip
    assert rc == 0
    assert "done: 60 documents" in capsys.readouterr().out
    tok = SentencePieceTokenizer(str(model))
    seqs = _read_all(str(tmp_path / "cli_text_document"))
    assert [tok.decode(s[:-1]) for s in seqs] == docs
    assert main(["--input", src, "--output-prefix", "x", "--tokenizer-model", str(model), "--vocab-size", "9"]) == 2


def test_non_utf8_input_names_the_file_and_line(tmp_path):
    from megatron_moe.data.errors import DataError

    cases = (("a.txt", b"fine\nalso fine\nbad \xff byte\n"), ("b.jsonl", b'{"text": "ok"}\n{"text": "\xe9"}\n'))
    for name, body in cases:
        path = tmp_path / name
        path.write_bytes(body)
        with pytest.raises(DataError, match=rf"{name}:[23]: not UTF-8 text"):
            list(iter_documents(str(path)))
    crlf = tmp_path / "c.txt"
    crlf.write_bytes(b"one\r\ntwo\r\n\r\nthree\rfour\n")
    assert list(iter_documents(str(crlf))) == ["one\ntwo", "three\nfour"]
