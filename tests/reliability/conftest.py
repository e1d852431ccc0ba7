"""Fixtures for the fault suite: the tiny tokenizer (servers come from ``serve`` in tests/conftest.py)."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_engine_parts: tuple[Any, Any]) -> Any:
    return tiny_engine_parts[1]
