"""Training on data preprocessed with a Hugging Face tokenizer.json: the run loads the tokenizer (kind told
from the file), the checkpoint records it (vocabulary size, SHA-256 of tokenizer.json) and a resume with
another tokenizer is refused, as for SentencePiece models."""

from __future__ import annotations

import shutil

import pytest

from megatron_moe.data.preprocess import preprocess_files
from megatron_moe.data.tokenizer import load_tokenizer
from megatron_moe.training.checkpoint import CheckpointError, read_meta, resolve_checkpoint
from megatron_moe.training.trainer import train
from tests.builders import WORDS_A, loop_config, make_documents, write_jsonl
from tests.data.helpers import make_hf_tokenizer


@pytest.mark.slow
def test_train_and_resume_check_with_hf_tokenizer(tmp_path):
    docs = make_documents(WORDS_A, 200, seed=5)
    folder = make_hf_tokenizer(tmp_path / "hf", docs)
    tok = load_tokenizer(str(folder))
    res = preprocess_files([write_jsonl(tmp_path / "a.jsonl", docs)], str(tmp_path / "a"), tok, log=None)
    corpus = {"root": tmp_path, "tokenizer": str(folder), "prefix": res.prefix}
    cfg = loop_config(corpus, tmp_path / "run")
    train(cfg)
    meta = read_meta(resolve_checkpoint(tmp_path / "run"))
    assert meta["step"] == 3 and meta["tokenizer"] == {"vocab_size": tok.vocab_size, "sha256": tok.model_sha256}

    other = make_hf_tokenizer(tmp_path / "other", ["entirely different words " * 5] * 50, vocab_size=300)
    shutil.copy(other / "tokenizer.json", tmp_path / "other.json")  # a tokenizer.json under another name
    cfg = loop_config(corpus, tmp_path / "run")
    cfg.training.train_iters = 4
    cfg.checkpoint.load, cfg.data.tokenizer_model = str(tmp_path / "run"), str(tmp_path / "other.json")
    with pytest.raises(CheckpointError, match="other.json.*is not the one checkpoint .* was trained with"):
        train(cfg)
