"""SentencePiece tokenizer: training and a wrapper usable by megatron-core's GPTDataset.

Special ids of every model trained by :func:`train_sentencepiece`:

* ``0`` ``<unk>`` (never produced: byte fallback encodes any unknown character as UTF-8 bytes),
* ``1`` ``<s>`` (bos; not inserted by this package),
* ``2`` ``</s>`` (eos, used as the end-of-document token ``eod``),
* ``3`` ``<pad>`` (pad; never appears in preprocessed data),
* ``4`` ``"\\n"`` (a user-defined piece so that newlines cost one token).

Training uses the identity normalisation and keeps whitespace as is, so for any string ``s``
``decode(encode(s)) == s``.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections import OrderedDict

import sentencepiece as spm

from megatron_moe.data.errors import DataError

UNK_ID = 0
BOS_ID = 1
EOS_ID = 2
PAD_ID = 3
NEWLINE_PIECE = "\n"

# 256 byte pieces + 4 special pieces + the newline piece, plus some room for merges.
MIN_VOCAB_SIZE = 300

_TRAIN_SEED = 1234


def train_sentencepiece(
    input_files: list[str],
    model_prefix: str,
    vocab_size: int,
    *,
    model_type: str = "bpe",
    num_threads: int = 2,
    max_sentence_length: int = 16384,
) -> str:
    """Train a SentencePiece model on plain-text files and write ``model_prefix + ".model"``.

    Each line of each input file is one training sentence. Training is deterministic: the same
    text and arguments give a byte-identical ``.model`` file, wherever the files lie (no
    vocabulary file is written).

    Args:
        input_files: UTF-8 text files to train on.
        model_prefix: output path without the ``.model`` suffix; parent folders are created.
        vocab_size: requested vocabulary size (at least ``MIN_VOCAB_SIZE``). It is a soft limit:
            a corpus too small to reach it gives a smaller vocabulary; read the final size from
            :attr:`SentencePieceTokenizer.vocab_size`.
        model_type: ``"bpe"`` or ``"unigram"``.
        num_threads: trainer threads.
        max_sentence_length: longer lines (in bytes) are skipped by the trainer.

    Returns:
        The path of the written ``.model`` file.
    """
    if not input_files:
        raise DataError("train_sentencepiece: input_files is empty")
    for path in input_files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"train_sentencepiece: input file not found: {path}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(
            f"train_sentencepiece: vocab_size={vocab_size} is below the minimum {MIN_VOCAB_SIZE} "
            "(byte fallback alone takes 256 ids)"
        )
    if model_type not in ("bpe", "unigram"):
        raise DataError(f"train_sentencepiece: model_type must be 'bpe' or 'unigram', got {model_type!r}")
    if num_threads < 1:
        raise DataError(f"train_sentencepiece: num_threads must be >= 1, got {num_threads}")

    model_path = model_prefix + ".model"
    parent = os.path.dirname(os.path.abspath(model_path))
    os.makedirs(parent, exist_ok=True)

    def _lines():
        for path in input_files:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    yield line.rstrip("\r\n")

    spm.set_random_generator_seed(_TRAIN_SEED)
    writer = io.BytesIO()
    # Sentences come from an iterator so that no input path is stored in the model file.
    spm.SentencePieceTrainer.train(
        sentence_iterator=_lines(),
        model_writer=writer,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        character_coverage=0.9995,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        user_defined_symbols=[NEWLINE_PIECE],
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        hard_vocab_limit=False,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        max_sentence_length=max_sentence_length,
        num_threads=num_threads,
        minloglevel=2,
    )
    tmp_path = model_path + ".tmp"
    with open(tmp_path, "wb") as f:
        f.write(writer.getvalue())
    os.replace(tmp_path, model_path)
    return model_path


class SentencePieceTokenizer:
    """A SentencePiece ``.model`` file with the attributes megatron-core's datasets read.

    megatron-core's ``GPTDataset`` uses ``eod`` (end-of-document id, for masks), ``pad`` (labels
    equal to it get ``loss_mask`` 0), ``vocab_size`` and ``unique_identifiers`` (a JSON-able dict
    hashed into the dataset index cache name). ``unique_identifiers`` holds a SHA-256 of the model
    file, so the cache is reused when the file moves but not when the model changes.

    Args:
        model_path: path to a ``.model`` file.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a valid SentencePiece model.
    """

    def __init__(self, model_path: str) -> None:
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"SentencePiece model file not found: {model_path}")
        with open(model_path, "rb") as f:
            blob = f.read()
        if not blob:
            raise DataError(f"SentencePiece model file is empty: {model_path}")
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(blob)
        except (RuntimeError, OSError, TypeError) as err:
            raise DataError(f"corrupt or unreadable SentencePiece model file {model_path}: {err}") from err
        if processor.get_piece_size() <= 0:
            raise DataError(f"SentencePiece model file has an empty vocabulary: {model_path}")
        if processor.eos_id() < 0:
            raise DataError(f"SentencePiece model {model_path} defines no eos id; it is needed as end-of-document")
        self.model_path = model_path
        self._sp = processor
        self._sha256 = hashlib.sha256(blob).hexdigest()
        self.unique_identifiers: OrderedDict[str, object] = OrderedDict(
            [
                ("class", type(self).__name__),
                ("model_sha256", self._sha256),
                ("vocab_size", self.vocab_size),
                ("eod", self.eod),
                ("pad", self.pad),
            ]
        )

    @property
    def vocab_size(self) -> int:
        """Number of ids (model embedding rows needed), including special and byte pieces."""
        return int(self._sp.get_piece_size())

    @property
    def eod(self) -> int:
        """End-of-document id (the model's eos), appended after every document by preprocessing."""
        return int(self._sp.eos_id())

    @property
    def eos(self) -> int:
        """Same as :attr:`eod`."""
        return self.eod

    @property
    def bos(self) -> int:
        """Beginning-of-sequence id, or -1 if the model has none."""
        return int(self._sp.bos_id())

    @property
    def pad(self) -> int:
        """Padding id, or -1 if the model has none (megatron-core then uses its own -1 sentinel)."""
        return int(self._sp.pad_id())

    @property
    def unk(self) -> int:
        """Unknown-piece id."""
        return int(self._sp.unk_id())

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no bos/eos added)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return list(self._sp.encode(text, out_type=int))

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        """Token ids of each string of ``texts`` (no bos/eos added)."""
        return [list(ids) for ids in self._sp.encode(list(texts), out_type=int, num_threads=num_threads)]

    def decode(self, ids) -> str:
        """Text of a sequence of ids (list, numpy array or 1-D tensor of ints)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        size = self.vocab_size
        for i in ids:
            if i < 0 or i >= size:
                raise DataError(f"decode: id {i} out of range [0, {size})")
        return self._sp.decode(ids)

    def id_to_piece(self, token_id: int) -> str:
        """The piece string of one id."""
        if token_id < 0 or token_id >= self.vocab_size:
            raise DataError(f"id_to_piece: id {token_id} out of range [0, {self.vocab_size})")
        return self._sp.id_to_piece(int(token_id))

    def __getstate__(self) -> dict:
        return {"model_path": self.model_path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_path"])

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.model_path!r}, vocab_size={self.vocab_size})"
