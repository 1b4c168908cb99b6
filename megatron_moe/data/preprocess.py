"""Tokenise text files into Megatron's indexed dataset format (``PREFIX_text_document.bin/.idx``).

Input formats, chosen by file suffix:

* ``.jsonl`` / ``.json``: one JSON object per line; the document is the string under ``json_key``
  (default ``"text"``). Blank lines are skipped.
* anything else (``.txt``, ...): plain UTF-8 text. With ``txt_mode="paragraph"`` (the default)
  every run of non-blank lines is one document (documents are separated by one or more blank
  lines; the lines of a document are joined with ``"\\n"``). With ``txt_mode="file"`` the whole
  file is one document.

Documents that are empty or only whitespace are skipped. Every document is stored as one
sequence: its token ids followed by the tokenizer's end-of-document id (``eod``). The token
dtype is the smallest that holds the vocabulary (uint16 below 65500 ids, else int32).

CLI::

    python -m megatron_moe.data.preprocess --input a.jsonl b.txt --output-prefix data/corpus \\
        --tokenizer-model data/tokenizer.model [--train-tokenizer --vocab-size 8000]

writes ``data/corpus_text_document.bin`` and ``data/corpus_text_document.idx``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from megatron_moe.data.errors import DataError
from megatron_moe.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

TXT_MODES = ("paragraph", "file")
_ENCODE_CHUNK = 512


@dataclass(frozen=True)
class PreprocessResult:
    """What :func:`preprocess_files` wrote.

    Attributes:
        prefix: dataset prefix (``.bin``/``.idx`` appended give the two files); pass it as
            ``data_path`` to :func:`megatron_moe.data.datasets.build_gpt_datasets`.
        num_documents: documents written.
        num_tokens: tokens written, eod tokens included.
        dtype: numpy dtype name of the stored token ids.
    """

    prefix: str
    num_documents: int
    num_tokens: int
    dtype: str


def _indexed_dataset_module():
    # Imported on first use: importing megatron.core takes seconds and warns that the GPU-only
    # Transformer Engine / apex are absent.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def _is_jsonl(path: str) -> bool:
    return path.endswith((".jsonl", ".json"))


def _utf8_lines(binary_file, path: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of a file opened in binary mode; DataError naming the file and line for
    bytes that are not UTF-8."""
    for line_no, raw in enumerate(binary_file, start=1):
        try:
            yield line_no, raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{line_no}: not UTF-8 text (byte {raw[e.start:e.start + 1]!r} at column "
                            f"{e.start + 1}); convert the file to UTF-8") from None


def iter_documents(path: str, *, json_key: str = "text", txt_mode: str = "paragraph") -> Iterator[str]:
    """Yield the documents of one input file, in file order (format rules in the module docstring).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a JSON line is invalid, lacks ``json_key``, or holds a non-string there.
    """
    if txt_mode not in TXT_MODES:
        raise ValueError(f"txt_mode must be one of {TXT_MODES}, got {txt_mode!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file not found: {path}")
    if _is_jsonl(path):
        with open(path, "rb") as f:
            for line_no, line in _utf8_lines(f, path):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{line_no}: invalid JSON: {err}") from err
                if not isinstance(record, dict) or json_key not in record:
                    raise ValueError(f"{path}:{line_no}: JSON object has no key {json_key!r}")
                text = record[json_key]
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{line_no}: value of {json_key!r} is {type(text).__name__}, expected str")
                if text.strip():
                    yield text
        return
    with open(path, "rb") as f:
        if txt_mode == "file":
            text = "".join(line for _, line in _utf8_lines(f, path))
            text = text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as text mode reads
            if text.strip():
                yield text
            return
        lines: list[str] = []
        for _, chunk in _utf8_lines(f, path):
            pieces = chunk.replace("\r\n", "\n").replace("\r", "\n").split("\n")  # universal newlines
            for line in pieces[:-1] if chunk.endswith(("\n", "\r")) else pieces:
                if line.strip():
                    lines.append(line)
                elif lines:
                    yield "\n".join(lines)
                    lines = []
        if lines:
            yield "\n".join(lines)


def iter_all_documents(input_files: list[str], *, json_key: str = "text", txt_mode: str = "paragraph") -> Iterator[str]:
    """Yield the documents of all ``input_files`` in order (see :func:`iter_documents`)."""
    for path in input_files:
        yield from iter_documents(path, json_key=json_key, txt_mode=txt_mode)


def token_dtype(vocab_size: int) -> type[np.number]:
    """Smallest numpy integer dtype megatron-core stores ``vocab_size`` distinct ids in."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return _indexed_dataset_module().DType.optimal_dtype(vocab_size)


def train_tokenizer_on_files(
    input_files: list[str],
    model_path: str,
    vocab_size: int,
    *,
    json_key: str = "text",
    txt_mode: str = "paragraph",
    model_type: str = "bpe",
) -> str:
    """Train a SentencePiece model on the documents of ``input_files`` (any supported format).

    The documents are written line by line to a temporary text file that the trainer reads.
    ``model_path`` must end with ``.model``. Returns ``model_path``.
    """
    if not model_path.endswith(".model"):
        raise ValueError(f"tokenizer model path must end with '.model': {model_path}")
    with tempfile.TemporaryDirectory(prefix="spm_train_") as tmp:
        text_path = os.path.join(tmp, "train.txt")
        with open(text_path, "w", encoding="utf-8") as out:
            for doc in iter_all_documents(input_files, json_key=json_key, txt_mode=txt_mode):
                out.write(doc)
                out.write("\n")
        return train_sentencepiece([text_path], model_path[: -len(".model")], vocab_size, model_type=model_type)


TOKENIZER_RECORD = ".tokenizer.json"  # beside <prefix>.bin/.idx: which tokenizer wrote the ids


def write_tokenizer_record(prefix: str, tokenizer: SentencePieceTokenizer) -> None:
    """Record the tokenizer (vocabulary size, SHA-256 of its model file) beside ``prefix.bin/.idx``; the
    dataset builder refuses to train these ids with another tokenizer."""
    record = {"vocab_size": tokenizer.vocab_size, "model_sha256": tokenizer.unique_identifiers["model_sha256"],
              "model": os.path.basename(tokenizer.model_path)}
    with open(prefix + TOKENIZER_RECORD, "w") as f:
        json.dump(record, f)


def preprocess_files(
    input_files: list[str],
    output_prefix: str,
    tokenizer: SentencePieceTokenizer | str,
    *,
    json_key: str = "text",
    txt_mode: str = "paragraph",
    log_interval: int = 10000,
    log: Callable[[str], None] | None = print,
) -> PreprocessResult:
    """Tokenise ``input_files`` and write ``{output_prefix}_{json_key}_document.bin/.idx``.

    Args:
        input_files: ``.jsonl``/``.json`` or plain-text files (format rules in the module docstring).
        output_prefix: output path prefix; parent folders are created.
        tokenizer: a :class:`SentencePieceTokenizer` or the path of its ``.model`` file.
        json_key: JSON key holding the text; also names the output (``_text_document``).
        txt_mode: ``"paragraph"`` or ``"file"`` for plain-text inputs.
        log_interval: print a progress line every this many documents.
        log: progress printer; ``None`` for silence.

    Returns:
        A :class:`PreprocessResult`. The files are written under temporary names and renamed at
        the end, so an interrupted run leaves no half-written dataset behind.
    """
    if not input_files:
        raise ValueError("preprocess_files: input_files is empty")
    for path in input_files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input file not found: {path}")
    if log_interval < 1:
        raise ValueError(f"log_interval must be >= 1, got {log_interval}")
    if isinstance(tokenizer, str):
        tokenizer = SentencePieceTokenizer(tokenizer)
    dtype = token_dtype(tokenizer.vocab_size)
    eod = tokenizer.eod

    prefix = f"{output_prefix}_{json_key}_document"
    parent = os.path.dirname(os.path.abspath(prefix))
    os.makedirs(parent, exist_ok=True)
    bin_path, idx_path = prefix + ".bin", prefix + ".idx"
    tmp_bin, tmp_idx = bin_path + ".tmp", idx_path + ".tmp"

    builder = _indexed_dataset_module().IndexedDatasetBuilder(tmp_bin, dtype=dtype)
    num_docs = 0
    num_tokens = 0
    num_chars = 0
    next_log = log_interval
    t0 = time.time()

    def _write(chunk: list[str]) -> None:
        nonlocal num_docs, num_tokens, num_chars, next_log
        for ids in tokenizer.encode_batch(chunk):
            ids.append(eod)
            builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
            num_tokens += len(ids)
        num_docs += len(chunk)
        num_chars += sum(len(doc) for doc in chunk)
        if log is not None and num_docs >= next_log:
            elapsed = max(time.time() - t0, 1e-9)
            log(f"[preprocess] {num_docs} documents, {num_tokens} tokens, {num_chars / elapsed / 1e6:.2f} M chars/s")
            while next_log <= num_docs:
                next_log += log_interval

    try:
        chunk: list[str] = []
        for doc in iter_all_documents(input_files, json_key=json_key, txt_mode=txt_mode):
            chunk.append(doc)
            if len(chunk) >= min(_ENCODE_CHUNK, log_interval):
                _write(chunk)
                chunk = []
        if chunk:
            _write(chunk)
        builder.finalize(tmp_idx)
    except BaseException:
        builder.data_file.close()
        for path in (tmp_bin, tmp_idx):
            if os.path.exists(path):
                os.remove(path)
        raise
    if num_docs == 0:
        for path in (tmp_bin, tmp_idx):
            os.remove(path)
        raise ValueError(f"no non-empty documents found in {input_files}")
    os.replace(tmp_bin, bin_path)
    os.replace(tmp_idx, idx_path)
    write_tokenizer_record(prefix, tokenizer)
    if log is not None:
        log(
            f"[preprocess] done: {num_docs} documents, {num_tokens} tokens ({np.dtype(dtype).name}) "
            f"-> {prefix}.bin/.idx in {time.time() - t0:.1f}s"
        )
    return PreprocessResult(prefix=prefix, num_documents=num_docs, num_tokens=num_tokens, dtype=np.dtype(dtype).name)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_moe.data.preprocess",
        description="Tokenise .jsonl/.txt files into Megatron PREFIX_text_document.bin/.idx.",
    )
    parser.add_argument("--input", nargs="+", required=True, help=".jsonl/.json or plain-text files")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX_<json-key>_document.bin/.idx")
    parser.add_argument("--tokenizer-model", required=True, help="SentencePiece .model file")
    parser.add_argument(
        "--train-tokenizer",
        action="store_true",
        help="first train the tokenizer on the inputs and write it to --tokenizer-model",
    )
    parser.add_argument("--vocab-size", type=int, default=None, help="vocabulary size for --train-tokenizer")
    parser.add_argument("--json-key", default="text", help="JSON key of the document text (default: text)")
    parser.add_argument(
        "--txt-mode",
        choices=TXT_MODES,
        default="paragraph",
        help="plain-text files: one document per blank-line separated paragraph, or per file",
    )
    parser.add_argument("--log-interval", type=int, default=10000, help="progress line every N documents")
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    args = _build_parser().parse_args(argv)
    if args.train_tokenizer:
        if args.vocab_size is None:
            print("error: --train-tokenizer needs --vocab-size", file=sys.stderr)
            return 2
        t0 = time.time()
        train_tokenizer_on_files(
            args.input, args.tokenizer_model, args.vocab_size, json_key=args.json_key, txt_mode=args.txt_mode
        )
        print(f"[preprocess] trained tokenizer {args.tokenizer_model} in {time.time() - t0:.1f}s", flush=True)
    elif args.vocab_size is not None:
        print("error: --vocab-size is only used with --train-tokenizer", file=sys.stderr)
        return 2
    try:
        preprocess_files(
            args.input,
            args.output_prefix,
            args.tokenizer_model,
            json_key=args.json_key,
            txt_mode=args.txt_mode,
            log_interval=args.log_interval,
            log=lambda msg: print(msg, flush=True),
        )
    except (DataError, FileNotFoundError) as e:  # bad input: one line, pretrain_moe.py's data exit code
        print(f"data error: {e}", file=sys.stderr)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
