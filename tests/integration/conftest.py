"""Fixtures for the integration tests: real uvicorn servers, an engine that records its timing, and the
tiny TransformersEngine for the one test that needs a real model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .servers import RecordingEngine, UvicornThread, chat_app, not_found_app


@pytest.fixture
def chat_server(serve: Callable[..., UvicornThread]) -> Callable[..., tuple[UvicornThread, RecordingEngine]]:
    """``chat_server(engine_options, **middleware_options)``: the middleware around a bare app, on uvicorn."""

    def start(engine: dict[str, Any] | None = None, **options: Any) -> tuple[UvicornThread, RecordingEngine]:
        mock = RecordingEngine(**(engine or {}))
        return serve(chat_app(not_found_app, mock, **options)), mock

    return start


@pytest.fixture(scope="session")
def chat_engine_factory(tiny_model_dir: Path) -> Callable[..., Any]:
    """``chat_engine_factory(**options)``: a TransformersEngine on the tiny random Llama, loaded from disk."""
    from chatstream_asgi import TransformersEngine

    def build(**options: Any) -> Any:
        return TransformersEngine.from_pretrained(str(tiny_model_dir), **options)

    return build
