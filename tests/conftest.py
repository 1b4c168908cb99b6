"""Fixtures shared by every test directory (the builders themselves live in tests/builders.py)."""

from __future__ import annotations

import pytest

from tests import builders


@pytest.fixture
def tiny_config():
    """The one tiny-config builder: ``tiny_config(num_layers=3, router="sparsemixer", tp=2, ...)``."""
    return builders.tiny_config


@pytest.fixture(scope="session")
def loop_corpus(tmp_path_factory):
    """A small preprocessed corpus and its tokenizer for end-to-end training runs (built once)."""
    return builders.build_loop_corpus(tmp_path_factory.mktemp("loop_corpus"))
