"""Build a small demo pretraining corpus from text already on this machine (no downloads).

The corpus is the docstrings of the Python standard library of the running interpreter
(module, class and function docstrings of every ``*.py`` file under
``sysconfig.get_paths()["stdlib"]``, test folders and ``site-packages`` skipped, docstrings
shorter than ``min_chars`` skipped, duplicates dropped) followed by the help topics of
``pydoc_data/topics.py`` when present: about 2 MB of English technical text. Files and
docstrings are visited in sorted, deterministic order, so one interpreter version always gives
the same corpus.

CLI::

    python -m megatron_moe.data.demo_corpus --output-dir data/demo [--vocab-size 2048] [--max-docs N]

writes ``corpus.jsonl``, ``tokenizer.model`` and ``corpus_text_document.bin/.idx`` in the
output folder; use ``data_path=["<output-dir>/corpus_text_document"]`` and the tokenizer file.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from megatron_moe.data.preprocess import preprocess_files
from megatron_moe.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"})
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _stdlib_python_files(stdlib_dir: str) -> list[str]:
    files: list[str] = []
    for dirpath, dirnames, filenames in os.walk(stdlib_dir):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("test"))
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("test_"):
                files.append(os.path.join(dirpath, name))
    return files


def _docstrings_of_file(path: str) -> list[str]:
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), filename=path)
    except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, _DOC_NODES):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                out.append(doc)
    return out


def _pydoc_topics(stdlib_dir: str) -> list[str]:
    path = os.path.join(stdlib_dir, "pydoc_data", "topics.py")
    if not os.path.isfile(path):
        return []
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), filename=path)
    except (SyntaxError, ValueError, OSError):
        return []
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            try:
                topics = ast.literal_eval(node.value)
            except ValueError:
                return []
            return [topics[k] for k in sorted(topics) if isinstance(topics[k], str)]
    return []


def collect_stdlib_documents(
    stdlib_dir: str | None = None,
    *,
    min_chars: int = 40,
    max_docs: int | None = None,
    include_pydoc_topics: bool = True,
    log: Callable[[str], None] | None = None,
) -> list[str]:
    """Collect the demo documents (see the module docstring), in deterministic order.

    Args:
        stdlib_dir: standard library folder; default this interpreter's.
        min_chars: skip docstrings shorter than this (after stripping).
        max_docs: keep at most this many documents.
        include_pydoc_topics: append the ``pydoc_data`` help topics.
        log: progress printer, or ``None``.

    Returns:
        The documents (non-empty strings, no duplicates).
    """
    if stdlib_dir is None:
        stdlib_dir = sysconfig.get_paths()["stdlib"]
    if not os.path.isdir(stdlib_dir):
        raise FileNotFoundError(f"standard library folder not found: {stdlib_dir}")
    if min_chars < 1:
        raise ValueError(f"min_chars must be >= 1, got {min_chars}")
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"max_docs must be >= 1, got {max_docs}")

    files = _stdlib_python_files(stdlib_dir)
    docs: list[str] = []
    seen: set[str] = set()

    def _add(text: str) -> bool:
        text = text.strip()
        if len(text) >= min_chars and text not in seen:
            seen.add(text)
            docs.append(text)
        return max_docs is not None and len(docs) >= max_docs

    for n, path in enumerate(files, start=1):
        for doc in _docstrings_of_file(path):
            if _add(doc):
                return docs
        if log is not None and n % 200 == 0:
            log(f"[demo_corpus] scanned {n}/{len(files)} files, {len(docs)} docstrings")
    if include_pydoc_topics:
        for topic in _pydoc_topics(stdlib_dir):
            if _add(topic):
                return docs
    if not docs:
        raise ValueError(f"no docstrings found under {stdlib_dir}")
    return docs


@dataclass(frozen=True)
class DemoCorpus:
    """Paths and sizes of a built demo corpus.

    Attributes:
        jsonl_path: ``corpus.jsonl`` (one ``{"text": ...}`` per line).
        tokenizer_model: ``tokenizer.model``.
        data_prefix: prefix of ``corpus_text_document.bin/.idx`` (a ``data_path`` entry).
        num_documents: documents.
        num_chars: characters of text.
        num_tokens: tokens written, one eod per document included.
        vocab_size: final tokenizer vocabulary size.
    """

    jsonl_path: str
    tokenizer_model: str
    data_prefix: str
    num_documents: int
    num_chars: int
    num_tokens: int
    vocab_size: int


def build_demo_corpus(
    output_dir: str,
    *,
    vocab_size: int = 2048,
    max_docs: int | None = None,
    stdlib_dir: str | None = None,
    log: Callable[[str], None] | None = print,
) -> DemoCorpus:
    """Collect the stdlib docstrings, train a tokenizer and write the indexed dataset.

    Args:
        output_dir: folder to write ``corpus.jsonl``, ``tokenizer.model`` and
            ``corpus_text_document.bin/.idx`` into (created if needed).
        vocab_size: tokenizer vocabulary size (a soft limit, see ``train_sentencepiece``).
        max_docs: keep at most this many documents (for quick tests).
        stdlib_dir: standard library folder; default this interpreter's.
        log: progress printer, or ``None``.

    Returns:
        A :class:`DemoCorpus`.
    """
    t0 = time.time()
    os.makedirs(output_dir, exist_ok=True)
    docs = collect_stdlib_documents(stdlib_dir, max_docs=max_docs, log=log)
    num_chars = sum(len(d) for d in docs)
    if log is not None:
        log(f"[demo_corpus] {len(docs)} documents, {num_chars / 1e6:.2f} M characters ({time.time() - t0:.1f}s)")

    jsonl_path = os.path.join(output_dir, "corpus.jsonl")
    with open(jsonl_path + ".tmp", "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}, ensure_ascii=False))
            f.write("\n")
    os.replace(jsonl_path + ".tmp", jsonl_path)

    with tempfile.TemporaryDirectory(prefix="demo_corpus_") as tmp:
        text_path = os.path.join(tmp, "train.txt")
        with open(text_path, "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(doc)
                f.write("\n")
        t1 = time.time()
        model_path = train_sentencepiece([text_path], os.path.join(output_dir, "tokenizer"), vocab_size)
    tokenizer = SentencePieceTokenizer(model_path)
    if log is not None:
        log(f"[demo_corpus] trained tokenizer {model_path} (vocab {tokenizer.vocab_size}) in {time.time() - t1:.1f}s")

    result = preprocess_files([jsonl_path], os.path.join(output_dir, "corpus"), tokenizer, log=log)
    if log is not None:
        log(f"[demo_corpus] done in {time.time() - t0:.1f}s: data prefix {result.prefix}")
    return DemoCorpus(
        jsonl_path=jsonl_path,
        tokenizer_model=model_path,
        data_prefix=result.prefix,
        num_documents=result.num_documents,
        num_chars=num_chars,
        num_tokens=result.num_tokens,
        vocab_size=tokenizer.vocab_size,
    )


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m megatron_moe.data.demo_corpus",
        description="Build a demo corpus from the Python standard library's docstrings (no downloads).",
    )
    parser.add_argument("--output-dir", required=True, help="folder for corpus.jsonl, tokenizer.model, .bin/.idx")
    parser.add_argument("--vocab-size", type=int, default=2048, help="tokenizer vocabulary size (default 2048)")
    parser.add_argument("--max-docs", type=int, default=None, help="keep at most N documents")
    args = parser.parse_args(argv)
    build_demo_corpus(
        args.output_dir,
        vocab_size=args.vocab_size,
        max_docs=args.max_docs,
        log=lambda msg: print(msg, flush=True),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
