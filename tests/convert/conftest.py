"""Fixtures of the conversion tests (helpers: tests/convert/helpers.py)."""

from __future__ import annotations

import pytest

from tests.convert.helpers import make_hf


@pytest.fixture
def hf_llama(tmp_path):
    path = tmp_path / "hf_llama"
    return path, make_hf(path)
