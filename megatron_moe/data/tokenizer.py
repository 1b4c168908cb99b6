"""Tokenizers usable by preprocessing and by megatron-core's GPTDataset: SentencePiece ``.model`` files
(training included) and Hugging Face ``tokenizer.json`` files, behind one interface (``vocab_size``,
``eod``, ``pad``, ``encode``, ``encode_batch``, ``decode``, ``unique_identifiers``, ``model_path``,
``model_sha256``); :func:`load_tokenizer` tells the two kinds apart.

Special ids of every model trained by :func:`train_sentencepiece`:

* ``0`` ``<unk>`` (never produced: byte fallback encodes any unknown character as UTF-8 bytes),
* ``1`` ``<s>`` (bos; not inserted by this package),
* ``2`` ``</s>`` (eos, used as the end-of-document token ``eod``),
* ``3`` ``<pad>`` (pad; never appears in preprocessed data),
* ``4`` ``"\\n"`` (a user-defined piece so that newlines cost one token).

Training uses the identity normalisation and keeps whitespace as is, so for any string ``s``
``decode(encode(s)) == s``.

A Hugging Face tokenizer is read with the ``tokenizers`` library (no ``transformers``, no download).
``tokenizer.json`` does not say which token ends a document; like ``transformers`` (and so Megatron-LM's
``HuggingFaceTokenizer``) it is the ``eos_token`` of ``tokenizer_config.json`` or
``special_tokens_map.json`` beside the file, else the first of :data:`HF_EOS_CANDIDATES` the vocabulary
holds.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import OrderedDict

import sentencepiece as spm
import tokenizers

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
        self.model_sha256 = self._sha256
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


KINDS = ("auto", "sentencepiece", "huggingface")
# Megatron-LM's --tokenizer-type values that mean what one of this project's kinds does (same ids, same eod).
MEGATRON_TOKENIZER_TYPES = {"GPTSentencePieceTokenizer": "sentencepiece", "HuggingFaceTokenizer": "huggingface"}
HF_FILE = "tokenizer.json"
SP_FILE = "tokenizer.model"
# eos tokens of common model families, tried in this order when no tokenizer_config.json names one.
HF_EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")


def _special_token(config: dict, name: str) -> str | None:
    value = config.get(name)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable JSON ({e})") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object")
    return value


class HuggingFaceTokenizer:
    """A Hugging Face ``tokenizer.json`` (read by the ``tokenizers`` library) with the interface of
    :class:`SentencePieceTokenizer`.

    Args:
        path: a ``tokenizer.json`` file, or a folder holding one (a Hugging Face model folder).
        include_special_tokens: let the tokenizer's post-processor add its special tokens (a bos...)
            to every encoded text, as Megatron-LM's ``--tokenizer-hf-include-special-tokens`` does;
            by default only the text's own tokens are returned (Megatron-LM's default).

    Raises:
        FileNotFoundError: no such file, or a folder without ``tokenizer.json``.
        DataError: not a tokenizer file (a preprocessing record ``<prefix>.tokenizer.json`` is named
            as such), or no end-of-document token can be found (see the module docstring).
    """

    def __init__(self, path: str, include_special_tokens: bool = False) -> None:
        file = os.path.join(path, HF_FILE) if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"Hugging Face tokenizer file not found: {file}")
        with open(file, "rb") as f:
            blob = f.read()
        try:
            spec = json.loads(blob)
        except ValueError as e:
            raise DataError(f"{file}: not a Hugging Face tokenizer.json (not JSON: {e})") from None
        if isinstance(spec, dict) and "model_sha256" in spec:
            raise DataError(f"{file} is a preprocessing record (which tokenizer wrote a dataset), not a tokenizer; "
                            f"pass the tokenizer it names ({spec.get('model')!r})")
        if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
            raise DataError(f"{file}: not a Hugging Face tokenizer.json (no 'model' object)")
        try:
            self._tok = tokenizers.Tokenizer.from_str(blob.decode("utf-8"))
        except Exception as e:  # the Rust side raises plain Exception subclasses
            raise DataError(f"{file}: corrupt or unsupported Hugging Face tokenizer: {e}") from None
        self.model_path = file
        self.include_special_tokens = bool(include_special_tokens)
        self.model_sha256 = hashlib.sha256(blob).hexdigest()
        vocab = self._tok.get_vocab(with_added_tokens=True)
        if not vocab:
            raise DataError(f"{file}: empty vocabulary")
        self._vocab_size = max(self._tok.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
        folder = os.path.dirname(os.path.abspath(file))
        configs = [_read_json(p) for p in (os.path.join(folder, n) for n in ("tokenizer_config.json",
                                                                            "special_tokens_map.json"))
                   if os.path.isfile(p)]
        eos = next((t for t in (_special_token(c, "eos_token") for c in configs) if t), None)
        if eos is None:
            eos = next((t for t in HF_EOS_CANDIDATES if t in vocab), None)
        if eos is None:
            raise DataError(f"{file}: cannot tell the end-of-document token (no eos_token in a tokenizer_config.json "
                            f"beside it, none of {list(HF_EOS_CANDIDATES)} in the vocabulary); put a "
                            "tokenizer_config.json with \"eos_token\" beside it")
        if eos not in vocab:
            raise DataError(f"{file}: eos_token {eos!r} of its tokenizer_config.json is not in the vocabulary")
        self._eod = vocab[eos]
        pad = next((t for t in (_special_token(c, "pad_token") for c in configs) if t), None)
        self._pad = vocab[pad] if pad in vocab else -1
        bos = next((t for t in (_special_token(c, "bos_token") for c in configs) if t), None)
        self._bos = vocab[bos] if bos in vocab else -1
        self.unique_identifiers: OrderedDict[str, object] = OrderedDict(
            [("class", type(self).__name__), ("model_sha256", self.model_sha256), ("vocab_size", self.vocab_size),
             ("eod", self.eod), ("pad", self.pad), ("include_special_tokens", self.include_special_tokens)]
        )

    @property
    def vocab_size(self) -> int:
        """Number of ids (embedding rows needed): one more than the largest id, added tokens included."""
        return self._vocab_size

    @property
    def eod(self) -> int:
        """End-of-document id (the eos token, see the module docstring)."""
        return self._eod

    @property
    def eos(self) -> int:
        """Same as :attr:`eod`."""
        return self._eod

    @property
    def bos(self) -> int:
        """The configured bos id, or -1."""
        return self._bos

    @property
    def pad(self) -> int:
        """The configured pad id, or -1 (megatron-core then uses its own -1 sentinel)."""
        return self._pad

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (special tokens only with ``include_special_tokens``)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return list(self._tok.encode(text, add_special_tokens=self.include_special_tokens).ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each string of ``texts``."""
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=self.include_special_tokens)
        return [list(e.ids) for e in encodings]

    def decode(self, ids) -> str:
        """Text of a sequence of ids; special tokens are dropped."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        for i in ids:
            if i < 0 or i >= self.vocab_size:
                raise DataError(f"decode: id {i} out of range [0, {self.vocab_size})")
        return self._tok.decode(ids, skip_special_tokens=True)

    def __getstate__(self) -> dict:
        return {"path": self.model_path, "include_special_tokens": self.include_special_tokens}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["include_special_tokens"])

    def __repr__(self) -> str:
        return f"HuggingFaceTokenizer({self.model_path!r}, vocab_size={self.vocab_size})"


def tokenizer_kind(path: str, kind: str = "auto") -> str:
    """``"sentencepiece"`` or ``"huggingface"``: ``kind`` itself (or its Megatron-LM ``--tokenizer-type``
    name, :data:`MEGATRON_TOKENIZER_TYPES`), or for ``"auto"`` what ``path`` holds: a folder with
    ``tokenizer.json`` or a JSON file is Hugging Face, anything else a SentencePiece model.

    Raises:
        DataError: an unknown ``kind``.
        FileNotFoundError: ``path`` does not exist (``"auto"`` only).
    """
    kind = MEGATRON_TOKENIZER_TYPES.get(kind, kind)
    if kind not in KINDS:
        raise DataError(f"tokenizer type {kind!r} is not supported; expected one of {list(KINDS)} or Megatron-LM's "
                        f"{list(MEGATRON_TOKENIZER_TYPES)}")
    if kind != "auto":
        return kind
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, HF_FILE)):
            return "huggingface"
        if os.path.isfile(os.path.join(path, SP_FILE)):
            return "sentencepiece"
        raise FileNotFoundError(f"tokenizer folder {path} holds neither {HF_FILE} nor {SP_FILE}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    return "huggingface" if head.startswith(b"{") else "sentencepiece"


def load_tokenizer(path: str, kind: str = "auto", *, include_special_tokens: bool = False):
    """The tokenizer at ``path``: a :class:`SentencePieceTokenizer` or a :class:`HuggingFaceTokenizer`.

    Args:
        path: a ``.model`` file, a ``tokenizer.json`` file, or a folder holding one of them.
        kind: ``"auto"`` (detected, :func:`tokenizer_kind`), ``"sentencepiece"`` or ``"huggingface"``
            (or Megatron-LM's ``GPTSentencePieceTokenizer`` / ``HuggingFaceTokenizer``).
        include_special_tokens: Hugging Face only, see :class:`HuggingFaceTokenizer`.
    """
    kind = tokenizer_kind(path, kind)
    if kind == "huggingface":
        return HuggingFaceTokenizer(path, include_special_tokens=include_special_tokens)
    if include_special_tokens:
        raise DataError("include_special_tokens (--tokenizer-hf-include-special-tokens) is for Hugging Face "
                        f"tokenizers; {path} is a SentencePiece model")
    if os.path.isdir(path):
        path = os.path.join(path, SP_FILE)
    return SentencePieceTokenizer(path)
