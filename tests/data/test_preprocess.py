from __future__ import annotations

import json
import os

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_moe.data.datasets import validate_indexed_dataset
from megatron_moe.data.preprocess import iter_documents, main, preprocess_files
from megatron_moe.data.tokenizer import SentencePieceTokenizer, load_tokenizer
from tests.builders import WORDS_A, WORDS_B, make_documents, write_jsonl
from tests.data.helpers import RendezvousTokenizer, make_hf_tokenizer


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
    total = (tmp_path / "d.jsonl").stat().st_size / 1e6
    assert all(f"/{total:.1f} MB (" in line and " ETA " in line for line in progress), progress
    assert "25 documents (0 empty)" in lines[-1]


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
            "--train-tokenizer", "--vocab-size", "320", "--append-eod",
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


# ---- Megatron-LM's tools/preprocess_data.py: its bytes, its flags, parallel workers ----

# Empty, whitespace-only and ordinary documents under two keys; Megatron keeps every one of them.
RECORDS = [{"text": t, "title": h} for t, h in zip(
    ["", "first document", " ", "\n\n", "unicode é ü 中文 and digits 12345", "", "last one"],
    ["t0", "", "t2", "t3", "", "", "t6"], strict=True)] + [
    {"text": d, "title": d[:7]} for d in make_documents(WORDS_B, 30, seed=9)]


def _write_records(path, records=RECORDS) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def _megatron_reference(tmp_path, name, tokenizer, texts, append_eod) -> str:
    """What Megatron-LM's preprocess_data.py writes for ``texts``: its Encoder.encode rule (ids of the
    text, eod appended only to a document with ids, one sequence per non-empty document, none for an
    empty one) fed to megatron-core's own IndexedDatasetBuilder."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    prefix = str(tmp_path / name)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(tokenizer.vocab_size))
    for text in texts:
        doc_ids, sentence_lens = [], []
        ids = tokenizer.encode(text)
        if len(ids) > 0:
            doc_ids.extend(ids)
            sentence_lens.append(len(ids))
        if len(doc_ids) > 0 and append_eod:
            doc_ids.append(tokenizer.eod)
            sentence_lens[-1] += 1
        builder.add_document(doc_ids, sentence_lens)
    builder.finalize(prefix + ".idx")
    return prefix


def _same_bytes(prefix_a: str, prefix_b: str) -> bool:
    return all(open(prefix_a + ext, "rb").read() == open(prefix_b + ext, "rb").read() for ext in (".bin", ".idx"))


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "tok"
    return make_hf_tokenizer(folder, [r["text"] for r in RECORDS] + make_documents(WORDS_A, 100, seed=4))


@pytest.mark.parametrize("kind", ["sentencepiece", "huggingface"])
@pytest.mark.parametrize("append_eod", [True, False])
def test_bytes_equal_megatron_indexed_dataset_builder(tmp_path, corpus_dir, hf_tokenizer, kind, append_eod):
    tok = corpus_dir["tokenizer"] if kind == "sentencepiece" else load_tokenizer(str(hf_tokenizer))
    src = _write_records(tmp_path / "r.jsonl")
    res = preprocess_files([src], str(tmp_path / "ours"), tok, json_keys=["text", "title"], append_eod=append_eod,
                           log=None)
    assert res.prefix == str(tmp_path / "ours_text_document")
    assert res.num_documents == len(RECORDS) and res.num_empty >= 2  # "" and, for BPE without eod, others
    for key in ("text", "title"):
        ref = _megatron_reference(tmp_path, f"ref_{key}", tok, [r[key] for r in RECORDS], append_eod)
        assert _same_bytes(str(tmp_path / f"ours_{key}_document"), ref), key
    # Empty documents are index entries without a sequence: the document index repeats, sequences skip them.
    ds = IndexedDataset(res.prefix)
    assert len(ds.document_indices) == len(RECORDS) + 1
    assert len(ds) == len(RECORDS) - res.num_empty
    assert ds.document_indices[1] == 0  # the first record's text is ""
    info = validate_indexed_dataset(res.prefix)  # what training checks first accepts them
    assert (info.num_documents, info.num_sequences, info.num_tokens) == (len(RECORDS), len(ds), res.num_tokens)


def test_workers_run_in_parallel_and_write_what_one_worker_writes(tmp_path, corpus_dir):
    """Two worker processes: each one's first chunk waits until the other has started (a run that
    tokenised everything in one process would raise), and the bytes equal the one-worker output."""
    docs = make_documents(WORDS_A, 60, seed=11) + [""] + make_documents(WORDS_B, 60, seed=12)
    src = write_jsonl(tmp_path / "w.jsonl", docs)
    one = preprocess_files([src], str(tmp_path / "one"), corpus_dir["tokenizer"], log=None, log_interval=8)
    marks = tmp_path / "marks"
    marks.mkdir()
    lines: list[str] = []
    two = preprocess_files([src], str(tmp_path / "two"), RendezvousTokenizer(corpus_dir["tokenizer"], str(marks)),
                           workers=2, log_interval=8, log=lines.append)
    assert len(list(marks.iterdir())) == 2  # two processes encoded, neither of them this one
    assert str(os.getpid()) not in {p.name for p in marks.iterdir()}
    assert _same_bytes(one.prefix, two.prefix)
    assert (one.num_documents, one.num_tokens, one.num_empty) == (two.num_documents, two.num_tokens, 1)
    assert "with 2 worker(s)" in lines[-1] and sum("ETA" in line for line in lines) == 121 // 8
    # A worker that fails (here: waits for a third process that never comes) fails the run; nothing is left.
    marks = tmp_path / "marks3"
    marks.mkdir()
    never = RendezvousTokenizer(corpus_dir["tokenizer"], str(marks), parties=3, timeout=1.0)
    with pytest.raises(RuntimeError, match="no other process started encoding"):
        preprocess_files([src], str(tmp_path / "failed"), never, workers=2, log=None)
    assert not list(tmp_path.glob("failed*"))


def test_megatron_command_line(tmp_path, hf_tokenizer, capsys):
    """Megatron-LM's preprocess_data.py command, with a Hugging Face tokenizer folder; its flags refused or
    noted with the reason; without --append-eod no eod (Megatron's default), with a note."""
    src = _write_records(tmp_path / "r.jsonl")
    out = str(tmp_path / "meg")
    argv = ["--input", src, "--output-prefix", out, "--tokenizer-type", "HuggingFaceTokenizer",
            "--tokenizer-model", str(hf_tokenizer), "--json-keys", "text", "title", "--append-eod", "--workers", "2",
            "--log-interval", "10", "--partitions", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "note: --partitions has no effect here" in printed and "ETA" in printed
    tok = load_tokenizer(str(hf_tokenizer))
    for key in ("text", "title"):
        ref = _megatron_reference(tmp_path, f"ref_{key}", tok, [r[key] for r in RECORDS], True)
        assert _same_bytes(f"{out}_{key}_document", ref), key
        record = json.loads(open(f"{out}_{key}_document.tokenizer.json").read())
        assert record["model_sha256"] == tok.model_sha256 and record["type"] == "HuggingFaceTokenizer"
    assert main(argv[:-8] + ["--output-prefix", str(tmp_path / "noeod")]) == 0
    assert "no end-of-document token is appended" in capsys.readouterr().out
    ref = _megatron_reference(tmp_path, "ref_noeod", tok, [r["text"] for r in RECORDS], False)
    assert _same_bytes(str(tmp_path / "noeod_text_document"), ref)

    assert main(argv + ["--split-sentences", "--lang", "german"]) == 2
    err = capsys.readouterr().err
    assert "--split-sentences: sentence splitting (NLTK punkt) is not provided" in err and "--lang german" in err
    assert main(argv[:4] + ["--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", str(hf_tokenizer)]) == 2
    assert "--tokenizer-type Llama2Tokenizer: not supported here" in capsys.readouterr().err
    capsys.readouterr()
    assert main(argv[:6] + ["--tokenizer-model", str(hf_tokenizer), "--json-keys", "nokey"]) == 4
    assert "r.jsonl:1: JSON object has no key 'nokey'" in capsys.readouterr().err
    assert main(argv[:6] + ["--tokenizer-model", src]) == 4
    assert "r.jsonl: not a Hugging Face tokenizer.json" in capsys.readouterr().err
