"""Helpers of the data tests: a tiny Hugging Face tokenizer trained offline, and a tokenizer that proves
that preprocessing's worker processes run at the same time (importable by spawned worker processes)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def make_hf_tokenizer(folder: Path, texts: list[str], *, vocab_size: int = 320, config: bool = True,
                      bos_template: bool = False) -> Path:
    """Train a byte-level BPE ``tokenizer.json`` on ``texts`` with the ``tokenizers`` library under ``folder``.

    Special tokens: ``<|endoftext|>`` (id 0), ``<|pad|>`` (id 1), ``<|bos|>`` (id 2). With ``config`` a
    ``tokenizer_config.json`` names eos and pad (what ``transformers`` reads); with ``bos_template`` the
    post-processor puts ``<|bos|>`` before every text (added only with special tokens included).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD, "<|bos|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    if bos_template:
        tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", 2)])
    tok.save(str(folder / "tokenizer.json"))
    if config:
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "pad_token": PAD, "bos_token": "<|bos|>"}))
    return folder


class RendezvousTokenizer:
    """Wraps a tokenizer; the first ``encode_batch`` of each process waits (up to ``timeout`` s) until
    ``parties`` distinct processes have started encoding, so preprocessing finishes only if its workers
    run at the same time (one process encoding all chunks raises)."""

    def __init__(self, inner, folder: str, parties: int = 2, timeout: float = 120.0):
        self.inner, self.folder, self.parties, self.timeout = inner, folder, parties, timeout

    vocab_size = property(lambda self: self.inner.vocab_size)
    eod = property(lambda self: self.inner.eod)
    model_path = property(lambda self: self.inner.model_path)
    model_sha256 = property(lambda self: self.inner.model_sha256)

    def encode_batch(self, texts):
        mark = os.path.join(self.folder, str(os.getpid()))
        if not os.path.exists(mark):
            Path(mark).touch()
            deadline = time.monotonic() + self.timeout
            while len(os.listdir(self.folder)) < self.parties:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no other process started encoding within {self.timeout} s")
                time.sleep(0.01)
        return self.inner.encode_batch(texts)
