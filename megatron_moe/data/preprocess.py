"""Tokenise text files into Megatron's indexed dataset format (``PREFIX_<key>_document.bin/.idx``).

The command line is a superset of Megatron-LM's ``tools/preprocess_data.py`` with its meanings:
``--input``, ``--output-prefix``, ``--tokenizer-type {GPTSentencePieceTokenizer, HuggingFaceTokenizer}``,
``--tokenizer-model``, ``--json-keys``, ``--append-eod``, ``--workers``, ``--log-interval``,
``--tokenizer-hf-include-special-tokens``; for the same token ids the ``.bin``/``.idx`` bytes are the ones
Megatron-LM writes. Sentence splitting (``--split-sentences``, NLTK) is not provided.

Input formats, chosen by file suffix:

* ``.jsonl`` / ``.json``: one JSON object per line; every key of ``json_keys`` (default ``text``)
  holds one document and has its own output. Blank lines are skipped.
* anything else (``.txt``, ...): plain UTF-8 text, one key only. With ``txt_mode="paragraph"`` (the
  default) every run of non-blank lines is one document (documents are separated by one or more
  blank lines; the lines of a document are joined with ``"\\n"``). With ``txt_mode="file"`` the
  whole file is one document.

As in Megatron-LM, every document is kept, an empty one too: a document's token ids are stored as one
sequence, followed by the end-of-document id (``eod``) when ``append_eod`` is set and the document has
tokens; a document without tokens is an index entry with no sequence (megatron-core's ``GPTDataset``
never samples it). The token dtype is the smallest that holds the vocabulary (megatron-core's
``DType.optimal_dtype``: uint16 below 65500 ids, else int32).

With ``workers > 1`` chunks of documents are tokenised by that many processes; the output is written in
input order, byte-identical to one worker's.

CLI::

    python -m megatron_moe.data.preprocess --input a.jsonl b.txt --output-prefix data/corpus \\
        --tokenizer-model data/tokenizer.model --append-eod --workers 4 \\
        [--train-tokenizer --vocab-size 8000]

writes ``data/corpus_text_document.bin`` and ``data/corpus_text_document.idx`` and the record of the
tokenizer beside them (``data/corpus_text_document.tokenizer.json``).
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from megatron_moe.data.errors import DataError
from megatron_moe.data.tokenizer import (
    KINDS,
    MEGATRON_TOKENIZER_TYPES,
    HuggingFaceTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    train_sentencepiece,
)

TXT_MODES = ("paragraph", "file")
_ENCODE_CHUNK = 256  # documents per task of a worker process


@dataclass(frozen=True)
class PreprocessResult:
    """What :func:`preprocess_files` wrote for one JSON key.

    Attributes:
        prefix: dataset prefix (``.bin``/``.idx`` appended give the two files); pass it as
            ``data_path`` to :func:`megatron_moe.data.datasets.build_gpt_datasets`.
        num_documents: documents written, empty ones included.
        num_tokens: tokens written, eod tokens included.
        dtype: numpy dtype name of the stored token ids.
        num_empty: documents without tokens (kept as index entries with no sequence).
    """

    prefix: str
    num_documents: int
    num_tokens: int
    dtype: str
    num_empty: int = 0


def _indexed_dataset_module():
    # Imported on first use: importing megatron.core takes seconds and warns that the GPU-only
    # Transformer Engine / apex are absent.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def _is_jsonl(path: str) -> bool:
    return path.endswith((".jsonl", ".json"))


def _utf8_lines(binary_file, path: str) -> Iterator[tuple[int, str, int]]:
    """(line number, text, bytes read so far) of a file opened in binary mode; DataError naming the file
    and line for bytes that are not UTF-8."""
    done = 0
    for line_no, raw in enumerate(binary_file, start=1):
        done += len(raw)
        try:
            yield line_no, raw.decode("utf-8"), done
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{line_no}: not UTF-8 text (byte {raw[e.start:e.start + 1]!r} at column "
                            f"{e.start + 1}); convert the file to UTF-8") from None


def _check_keys(path: str, json_keys: Sequence[str], txt_mode: str) -> None:
    if txt_mode not in TXT_MODES:
        raise ValueError(f"txt_mode must be one of {TXT_MODES}, got {txt_mode!r}")
    if not json_keys:
        raise ValueError("json_keys is empty")
    if not _is_jsonl(path) and len(json_keys) > 1:
        raise ValueError(f"{path}: a plain-text file holds one document stream; several json keys "
                         f"{list(json_keys)} need .jsonl inputs")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file not found: {path}")


def _iter_records(path: str, json_keys: Sequence[str], txt_mode: str) -> Iterator[tuple[tuple[str, ...], int]]:
    """(one document per key, bytes of ``path`` read so far) for every record of one input file."""
    _check_keys(path, json_keys, txt_mode)
    if _is_jsonl(path):
        with open(path, "rb") as f:
            for line_no, line, done in _utf8_lines(f, path):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{line_no}: invalid JSON: {err}") from err
                texts = []
                for key in json_keys:
                    if not isinstance(record, dict) or key not in record:
                        raise ValueError(f"{path}:{line_no}: JSON object has no key {key!r}")
                    text = record[key]
                    if not isinstance(text, str):
                        raise ValueError(f"{path}:{line_no}: value of {key!r} is {type(text).__name__}, expected str")
                    texts.append(text)
                yield tuple(texts), done
        return
    with open(path, "rb") as f:
        if txt_mode == "file":
            text = "".join(line for _, line, _ in _utf8_lines(f, path))
            text = text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as text mode reads
            yield (text,), os.path.getsize(path)
            return
        lines: list[str] = []
        done = 0
        for _, chunk, done in _utf8_lines(f, path):
            pieces = chunk.replace("\r\n", "\n").replace("\r", "\n").split("\n")  # universal newlines
            for line in pieces[:-1] if chunk.endswith(("\n", "\r")) else pieces:
                if line.strip():
                    lines.append(line)
                elif lines:
                    yield ("\n".join(lines),), done
                    lines = []
        if lines:
            yield ("\n".join(lines),), done


def iter_documents(path: str, *, json_key: str = "text", txt_mode: str = "paragraph") -> Iterator[str]:
    """Yield the documents of one input file, in file order (format rules in the module docstring).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a JSON line is invalid, lacks ``json_key``, or holds a non-string there.
    """
    for (text,), _ in _iter_records(path, (json_key,), txt_mode):
        yield text


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


def write_tokenizer_record(prefix: str, tokenizer: SentencePieceTokenizer | HuggingFaceTokenizer) -> None:
    """Record the tokenizer (kind, vocabulary size, SHA-256 of its model file) beside ``prefix.bin/.idx``;
    the dataset builder refuses to train these ids with another tokenizer. The record is named
    ``<prefix>.tokenizer.json``, never plain ``tokenizer.json``, and loading it as a tokenizer is refused."""
    record = {"vocab_size": tokenizer.vocab_size, "model_sha256": tokenizer.model_sha256,
              "model": os.path.basename(tokenizer.model_path), "type": type(tokenizer).__name__}
    with open(prefix + TOKENIZER_RECORD, "w") as f:
        json.dump(record, f)


def _encode_chunk(tokenizer, append_eod: bool, dtype, records: list[tuple[str, ...]]):
    """Per key: (all token ids of the chunk's documents concatenated, each document's length).

    Megatron-LM's rule: eod follows a document only when it has tokens, so an empty one stays empty.
    """
    out = []
    for k in range(len(records[0])):
        docs = tokenizer.encode_batch([r[k] for r in records])
        if append_eod:
            docs = [list(ids) + [tokenizer.eod] if len(ids) else ids for ids in docs]
        lengths = np.fromiter((len(ids) for ids in docs), dtype=np.int64, count=len(docs))
        flat = np.fromiter((i for ids in docs for i in ids), dtype=dtype, count=int(lengths.sum()))
        out.append((flat, lengths))
    return out


_WORKER: tuple = ()


def _init_worker(tokenizer, append_eod: bool, dtype) -> None:
    global _WORKER
    # The processes are the parallelism: a Hugging Face tokenizer's own thread pool per worker would
    # oversubscribe the cores.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER = (tokenizer, append_eod, dtype)


def _encode_in_worker(records: list[tuple[str, ...]]):
    return _encode_chunk(*_WORKER, records)


def _chunks(input_files: list[str], json_keys: Sequence[str], txt_mode: str, size: int):
    """(records, bytes of all inputs read so far) in chunks of ``size`` records."""
    before = 0
    chunk: list[tuple[str, ...]] = []
    done = 0
    for path in input_files:
        for texts, done_in_file in _iter_records(path, json_keys, txt_mode):
            chunk.append(texts)
            done = before + done_in_file
            if len(chunk) == size:
                yield chunk, done
                chunk = []
        before += os.path.getsize(path)
    if chunk:
        yield chunk, done


def _encoded_chunks(input_files, json_keys, txt_mode, size, tokenizer, append_eod, dtype, workers):
    """The encoded chunks in input order; with ``workers > 1`` encoded by that many processes, at most
    two chunks per worker in flight (bounded memory, order kept by taking results first in, first out)."""
    if workers == 1:
        for records, done in _chunks(input_files, json_keys, txt_mode, size):
            yield len(records), _encode_chunk(tokenizer, append_eod, dtype, records), done
        return
    # spawn: a forked copy of a process that runs threads (torch, tokenizers) can deadlock.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer, append_eod, dtype)) as pool:
        pending: collections.deque = collections.deque()
        for records, done in _chunks(input_files, json_keys, txt_mode, size):
            pending.append((len(records), pool.apply_async(_encode_in_worker, (records,)), done))
            if len(pending) >= 2 * workers:
                n, result, at = pending.popleft()
                yield n, result.get(), at
        while pending:
            n, result, at = pending.popleft()
            yield n, result.get(), at


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def preprocess_files(
    input_files: list[str],
    output_prefix: str,
    tokenizer: SentencePieceTokenizer | HuggingFaceTokenizer | str,
    *,
    json_key: str = "text",
    json_keys: Sequence[str] | None = None,
    txt_mode: str = "paragraph",
    append_eod: bool = True,
    workers: int = 1,
    log_interval: int = 10000,
    log: Callable[[str], None] | None = print,
) -> PreprocessResult:
    """Tokenise ``input_files`` and write ``{output_prefix}_{key}_document.bin/.idx`` for each JSON key.

    Args:
        input_files: ``.jsonl``/``.json`` or plain-text files (format rules in the module docstring).
        output_prefix: output path prefix; parent folders are created.
        tokenizer: a tokenizer of :mod:`megatron_moe.data.tokenizer`, or the path of one (kind detected).
        json_key: the JSON key holding the text; also names the output (``_text_document``).
        json_keys: several keys at once (Megatron-LM's ``--json-keys``); replaces ``json_key``.
        txt_mode: ``"paragraph"`` or ``"file"`` for plain-text inputs.
        append_eod: put the end-of-document id after every document that has tokens (Megatron-LM's
            ``--append-eod``; on by default here, off by default on its command line).
        workers: tokenising processes (Megatron-LM's ``--workers``); 1 tokenises in this process.
        log_interval: print a progress line (documents, tokens, bytes of the total, ETA) every this
            many documents.
        log: progress printer; ``None`` for silence.

    Returns:
        The :class:`PreprocessResult` of the first key (all keys are written). The files are written under
        temporary names and renamed at the end, so an interrupted run leaves no half-written dataset behind.

    Raises:
        ValueError: bad arguments or input (the message names the file and line), or a key whose
            documents hold no token at all.
    """
    keys = tuple(json_keys) if json_keys is not None else (json_key,)
    if not input_files:
        raise ValueError("preprocess_files: input_files is empty")
    if not keys or len(set(keys)) != len(keys):
        raise ValueError(f"json keys must be given once each, got {list(keys)}")
    for path in input_files:
        _check_keys(path, keys, txt_mode)
    if log_interval < 1:
        raise ValueError(f"log_interval must be >= 1, got {log_interval}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    dtype = token_dtype(tokenizer.vocab_size)

    prefixes = {key: f"{output_prefix}_{key}_document" for key in keys}
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    tmp = {key: (prefix + ".bin.tmp", prefix + ".idx.tmp") for key, prefix in prefixes.items()}
    builders = {key: _indexed_dataset_module().IndexedDatasetBuilder(tmp[key][0], dtype=dtype) for key in keys}
    num_docs = 0
    num_tokens = dict.fromkeys(keys, 0)
    num_empty = dict.fromkeys(keys, 0)
    total_bytes = sum(os.path.getsize(p) for p in input_files)
    next_log = log_interval
    t0 = time.time()

    chunks = None
    try:
        chunks = _encoded_chunks(input_files, keys, txt_mode, min(_ENCODE_CHUNK, log_interval), tokenizer, append_eod,
                                 dtype, workers)
        for n, encoded, done in chunks:
            for key, (flat, lengths) in zip(keys, encoded, strict=True):
                builder, start = builders[key], 0
                for length in lengths.tolist():
                    builder.add_document(flat[start:start + length], [length] if length else [])
                    start += length
                num_tokens[key] += start
                num_empty[key] += int((lengths == 0).sum())
            num_docs += n
            if log is not None and num_docs >= next_log:
                elapsed = max(time.time() - t0, 1e-9)
                rate = done / elapsed
                eta = _duration((total_bytes - done) / rate) if rate > 0 else "?"
                log(f"[preprocess] {num_docs} documents, {sum(num_tokens.values())} tokens, "
                    f"{done / 1e6:.1f}/{total_bytes / 1e6:.1f} MB ({100 * done / max(total_bytes, 1):.1f}%), "
                    f"{num_docs / elapsed:.0f} docs/s, {rate / 1e6:.2f} MB/s, ETA {eta}")
                while next_log <= num_docs:
                    next_log += log_interval
        for key in keys:
            builders[key].finalize(tmp[key][1])
    except BaseException:
        if chunks is not None:
            chunks.close()  # stops the worker processes now, not when the generator is collected
        for key in keys:
            builders[key].data_file.close()
            for path in tmp[key]:
                if os.path.exists(path):
                    os.remove(path)
        raise
    empty_keys = [key for key in keys if num_tokens[key] == 0]
    if empty_keys:
        for key in keys:
            for path in tmp[key]:
                os.remove(path)
        raise ValueError(f"no non-empty documents found in {input_files} (json keys {empty_keys})")
    for key, prefix in prefixes.items():
        os.replace(tmp[key][0], prefix + ".bin")
        os.replace(tmp[key][1], prefix + ".idx")
        write_tokenizer_record(prefix, tokenizer)
    results = {key: PreprocessResult(prefix=prefixes[key], num_documents=num_docs, num_tokens=num_tokens[key],
                                     dtype=np.dtype(dtype).name, num_empty=num_empty[key]) for key in keys}
    if log is not None:
        for r in results.values():
            log(f"[preprocess] done: {r.num_documents} documents ({r.num_empty} empty), {r.num_tokens} tokens "
                f"({r.dtype}) -> {r.prefix}.bin/.idx in {time.time() - t0:.1f}s with {workers} worker(s)")
    return results[keys[0]]


_TOKENIZER_TYPES = (*KINDS, *MEGATRON_TOKENIZER_TYPES)
# Megatron-LM preprocess_data.py flags with no use here: accepted with a note (their effect is what this
# tool always does) or refused with the reason.
_NO_EFFECT = {"--partitions": "the inputs are read as one stream; --workers sets the parallelism",
              "--keep-sequential-samples": "documents are always written in input order"}
_REFUSED = {"--split-sentences": "sentence splitting (NLTK punkt) is not provided; documents are stored whole",
            "--keep-newlines": "sentence splitting is not provided",
            "--find-optimal-num-workers": "not provided; time a few --workers values on a sample instead"}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_moe.data.preprocess",
        description="Tokenise .jsonl/.txt files into Megatron PREFIX_<key>_document.bin/.idx "
                    "(Megatron-LM tools/preprocess_data.py flags accepted).",
    )
    parser.add_argument("--input", nargs="+", required=True, help=".jsonl/.json or plain-text files")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX_<json-key>_document.bin/.idx")
    parser.add_argument("--tokenizer-model", required=True,
                        help="SentencePiece .model, Hugging Face tokenizer.json, or a folder holding one")
    parser.add_argument("--tokenizer-type", default="auto", metavar="TYPE",
                        help=f"one of {list(_TOKENIZER_TYPES)} (default: auto, told from --tokenizer-model)")
    parser.add_argument("--tokenizer-hf-include-special-tokens", action="store_true",
                        help="Hugging Face tokenizers: add the tokenizer's special tokens (bos...) to every document")
    parser.add_argument(
        "--train-tokenizer",
        action="store_true",
        help="first train a SentencePiece tokenizer on the inputs and write it to --tokenizer-model",
    )
    parser.add_argument("--vocab-size", type=int, default=None, help="vocabulary size for --train-tokenizer")
    parser.add_argument("--json-keys", "--json-key", nargs="+", default=["text"], dest="json_keys",
                        help="JSON keys of the documents, one output each (default: text)")
    parser.add_argument("--append-eod", action="store_true",
                        help="put the end-of-document token after every document (as Megatron-LM: off unless given)")
    parser.add_argument("--workers", type=int, default=1, help="tokenising processes (default 1)")
    parser.add_argument(
        "--txt-mode",
        choices=TXT_MODES,
        default="paragraph",
        help="plain-text files: one document per blank-line separated paragraph, or per file",
    )
    parser.add_argument("--log-interval", type=int, default=1000, help="progress line every N documents")
    parser.add_argument("--partitions", type=int, default=1, help="accepted; " + _NO_EFFECT["--partitions"])
    parser.add_argument("--keep-sequential-samples", action="store_true",
                        help="accepted; " + _NO_EFFECT["--keep-sequential-samples"])
    for flag, why in _REFUSED.items():
        parser.add_argument(flag, action="store_true", help="refused: " + why)
    parser.add_argument("--lang", default=None, help="refused unless default: " + _REFUSED["--split-sentences"])
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the process exit code (2: bad flags, 4: bad data or tokenizer)."""
    args = _build_parser().parse_args(argv)
    errors = [f"{flag}: {why}" for flag, why in _REFUSED.items() if getattr(args, flag[2:].replace("-", "_"))]
    if args.lang not in (None, "english"):
        errors.append(f"--lang {args.lang}: {_REFUSED['--split-sentences']}")
    if args.tokenizer_type not in _TOKENIZER_TYPES:
        errors.append(f"--tokenizer-type {args.tokenizer_type}: not supported here (other Megatron-LM tokenizers "
                      f"give other ids or eod); expected one of {list(_TOKENIZER_TYPES)}")
    if args.workers < 1:
        errors.append(f"--workers {args.workers}: must be at least 1")
    if args.train_tokenizer and args.vocab_size is None:
        errors.append("--train-tokenizer needs --vocab-size")
    if not args.train_tokenizer and args.vocab_size is not None:
        errors.append("--vocab-size is only used with --train-tokenizer")
    if args.train_tokenizer and args.tokenizer_type in ("huggingface", "HuggingFaceTokenizer"):
        errors.append("--train-tokenizer trains a SentencePiece model; it cannot go with --tokenizer-type "
                      f"{args.tokenizer_type}")
    if errors:
        for line in errors:
            print(f"error: {line}", file=sys.stderr)
        return 2
    for flag, why in _NO_EFFECT.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value not in (1, False):
            print(f"note: {flag} has no effect here: {why}", flush=True)
    if not args.append_eod:
        print("note: no end-of-document token is appended (Megatron-LM's default); pass --append-eod to "
              "separate documents", flush=True)
    try:
        if args.train_tokenizer:
            t0 = time.time()
            train_tokenizer_on_files(
                args.input, args.tokenizer_model, args.vocab_size, json_key=args.json_keys[0], txt_mode=args.txt_mode
            )
            print(f"[preprocess] trained tokenizer {args.tokenizer_model} in {time.time() - t0:.1f}s", flush=True)
        tokenizer = load_tokenizer(args.tokenizer_model, args.tokenizer_type,
                                   include_special_tokens=args.tokenizer_hf_include_special_tokens)
        preprocess_files(
            args.input,
            args.output_prefix,
            tokenizer,
            json_keys=args.json_keys,
            txt_mode=args.txt_mode,
            append_eod=args.append_eod,
            workers=args.workers,
            log_interval=args.log_interval,
            log=lambda msg: print(msg, flush=True),
        )
    except (ValueError, FileNotFoundError) as e:  # DataError is a ValueError; one line, pretrain_moe.py's data code
        print(f"data error: {e}", file=sys.stderr)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
