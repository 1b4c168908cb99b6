from __future__ import annotations

import pickle

import pytest

from megatron_moe.data.tokenizer import (
    EOS_ID,
    PAD_ID,
    SentencePieceTokenizer,
    train_sentencepiece,
)

TEXTS = [
    "The router sends each token to its top-k experts.",
    "  leading spaces\n\nblank line, trailing tab\t",
    "unicode: é ü ß 中文 🤖 and digits 12345",
    "def f(x):\n    return x ** 2\n",
    "",
]


def _train(tmp_path, name="tok", vocab=400):
    tmp_path.mkdir(parents=True, exist_ok=True)
    text = tmp_path / "train.txt"
    text.write_text(
        "\n".join(f"expert {i} routes token {i * 7} to layer {i % 5}. The gate is on." for i in range(300)),
        encoding="utf-8",
    )
    return train_sentencepiece([str(text)], str(tmp_path / name), vocab)


def test_round_trip_and_special_ids(tmp_path):
    tok = SentencePieceTokenizer(_train(tmp_path))
    assert tok.eod == EOS_ID == 2
    assert tok.pad == PAD_ID == 3
    assert tok.eod != tok.pad
    assert 256 < tok.vocab_size <= 400
    for text in TEXTS:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.unk not in ids  # byte fallback covers unseen characters
        assert tok.decode(ids) == text
    # newline is a single piece
    assert tok.encode("\n") == [4]
    # eod is a control token: decoding drops it
    assert tok.decode(tok.encode("gate") + [tok.eod]) == "gate"


def test_training_is_deterministic(tmp_path):
    a = _train(tmp_path / "a")
    b = _train(tmp_path / "b")
    with open(a, "rb") as fa, open(b, "rb") as fb:
        assert fa.read() == fb.read()
    ta, tb = SentencePieceTokenizer(a), SentencePieceTokenizer(b)
    assert ta.unique_identifiers == tb.unique_identifiers
    c = _train(tmp_path / "c", vocab=350)
    assert SentencePieceTokenizer(c).unique_identifiers != ta.unique_identifiers


def test_pickle(tmp_path):
    tok = SentencePieceTokenizer(_train(tmp_path))
    tok2 = pickle.loads(pickle.dumps(tok))
    assert tok2.encode(TEXTS[0]) == tok.encode(TEXTS[0])


def test_missing_and_corrupt_model(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="nope.model"):
        SentencePieceTokenizer(str(missing))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a protobuf \x00\xff" * 10)
    with pytest.raises(ValueError, match="bad.model"):
        SentencePieceTokenizer(str(bad))
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.model"):
        SentencePieceTokenizer(str(empty))


def test_train_validation(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello world\n", encoding="utf-8")
    with pytest.raises(ValueError, match="vocab_size"):
        train_sentencepiece([str(text)], str(tmp_path / "m"), 100)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_sentencepiece([str(tmp_path / "missing.txt")], str(tmp_path / "m"), 400)
    with pytest.raises(ValueError, match="out of range"):
        SentencePieceTokenizer(_train(tmp_path)).decode([10**6])
