from __future__ import annotations

import hashlib
import json
import pickle

import pytest

from megatron_moe.data.tokenizer import (
    EOS_ID,
    PAD_ID,
    HuggingFaceTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    tokenizer_kind,
    train_sentencepiece,
)
from tests.data.helpers import make_hf_tokenizer

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


# ---- Hugging Face tokenizer.json, and telling the kinds apart ----

HF_TEXTS = [f"expert {i} routes token {i * 7} to layer {i % 5}. The gate is on." for i in range(200)]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_tokenizer(tmp_path_factory.mktemp("hf") / "tok", HF_TEXTS, bos_template=True)


def test_hf_tokenizer_matches_transformers(hf_dir):
    """Ids, vocabulary size and eod as transformers' AutoTokenizer gives them, which Megatron-LM's
    HuggingFaceTokenizer uses: its default path (tokenize + convert_tokens_to_ids, no special tokens) and
    --tokenizer-hf-include-special-tokens (tokenizer(text).input_ids, the post-processor's bos added)."""
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(hf_dir))
    plain = load_tokenizer(str(hf_dir))
    special = load_tokenizer(str(hf_dir / "tokenizer.json"), "HuggingFaceTokenizer", include_special_tokens=True)
    assert isinstance(plain, HuggingFaceTokenizer)
    assert plain.vocab_size == special.vocab_size == len(reference)
    assert plain.eod == reference.eos_token_id == 0 and plain.pad == reference.pad_token_id == 1
    for text in TEXTS:
        assert plain.encode(text) == reference.convert_tokens_to_ids(reference.tokenize(text)), text
        assert special.encode(text) == reference(text).input_ids, text
        assert plain.decode(plain.encode(text)) == text
    assert plain.encode_batch(TEXTS) == [plain.encode(t) for t in TEXTS]
    assert special.encode("")[0] == 2  # the bos of the template: an empty text is not empty with special tokens
    sha = hashlib.sha256((hf_dir / "tokenizer.json").read_bytes()).hexdigest()
    assert plain.unique_identifiers["model_sha256"] == plain.model_sha256 == sha
    again = pickle.loads(pickle.dumps(special))
    assert again.encode(TEXTS[2]) == special.encode(TEXTS[2]) and again.include_special_tokens


def test_kind_is_told_from_the_file(tmp_path, hf_dir):
    sp = _train(tmp_path / "sp")
    assert tokenizer_kind(sp) == "sentencepiece" and isinstance(load_tokenizer(sp), SentencePieceTokenizer)
    assert tokenizer_kind(str(hf_dir)) == tokenizer_kind(str(hf_dir / "tokenizer.json")) == "huggingface"
    renamed = tmp_path / "my_tok.bin"  # content decides, not the name
    renamed.write_bytes((hf_dir / "tokenizer.json").read_bytes())
    assert tokenizer_kind(str(renamed)) == "huggingface"
    folder = tmp_path / "spdir"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(open(sp, "rb").read())
    assert load_tokenizer(str(folder)).vocab_size == SentencePieceTokenizer(sp).vocab_size
    assert tokenizer_kind(sp, "GPTSentencePieceTokenizer") == "sentencepiece"
    with pytest.raises(ValueError, match="'BertWordPieceLowerCase' is not supported"):
        load_tokenizer(sp, "BertWordPieceLowerCase")
    with pytest.raises(ValueError, match="not a Hugging Face tokenizer.json"):
        load_tokenizer(sp, "huggingface")  # a protobuf forced to the other kind
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(str(tmp_path / "sp"))  # a folder with train.txt and tok.model only
    with pytest.raises(ValueError, match="for Hugging Face tokenizers"):
        load_tokenizer(sp, include_special_tokens=True)


def test_hf_eos_and_bad_files(tmp_path):
    """eos without tokenizer_config.json: a known eos name of the vocabulary; none: a clear error. The
    preprocessing record <prefix>.tokenizer.json is refused as a tokenizer."""
    bare = make_hf_tokenizer(tmp_path / "bare", HF_TEXTS[:50], config=False)
    tok = load_tokenizer(str(bare))
    assert tok.eod == 0 and tok.pad == -1
    spec = json.loads((bare / "tokenizer.json").read_text())
    for entry in spec["added_tokens"]:
        entry["content"] = entry["content"].replace("endoftext", "finished")
    spec["model"]["vocab"] = {k.replace("endoftext", "finished"): v for k, v in spec["model"]["vocab"].items()}
    (bare / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="cannot tell the end-of-document token"):
        load_tokenizer(str(bare))
    (bare / "tokenizer_config.json").write_text('{"eos_token": {"content": "<|finished|>"}}')
    assert load_tokenizer(str(bare)).eod == 0
    (bare / "tokenizer_config.json").write_text('{"eos_token": "<|nope|>"}')
    with pytest.raises(ValueError, match="'<|nope|>' of its tokenizer_config.json is not in the vocabulary"):
        load_tokenizer(str(bare))
    record = tmp_path / "corpus_text_document.tokenizer.json"
    record.write_text('{"vocab_size": 300, "model_sha256": "ab", "model": "tokenizer.json", "type": "x"}')
    with pytest.raises(ValueError, match="is a preprocessing record.*pass the tokenizer it names"):
        load_tokenizer(str(record))
    junk = tmp_path / "junk.json"
    junk.write_text('{"model": {"type": "BPE", "vocab": 3}}')
    with pytest.raises(ValueError, match="junk.json: corrupt or unsupported"):
        load_tokenizer(str(junk))
