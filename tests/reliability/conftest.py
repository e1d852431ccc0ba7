"""Fixtures for the fault suite: real uvicorn servers (stopped after each test) and the tiny tokenizer."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.integration.servers import UvicornThread


@pytest.fixture
def serve() -> Iterator[Callable[..., UvicornThread]]:
    """``serve(app, **uvicorn_options)`` starts a real server on 127.0.0.1; every one is stopped after the test."""
    with contextlib.ExitStack() as servers:

        def start(app: Any, **options: Any) -> UvicornThread:
            return servers.enter_context(UvicornThread(app, **options))

        yield start


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_engine_parts: tuple[Any, Any]) -> Any:
    return tiny_engine_parts[1]
