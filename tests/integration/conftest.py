"""Fixtures for the integration tests: real uvicorn servers, an engine that records its timing, and the
tiny TransformersEngine for the one test that needs a real model."""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .servers import RecordingEngine, UvicornThread, chat_app, not_found_app


@pytest.fixture
def serve() -> Iterator[Callable[..., UvicornThread]]:
    """``serve(app, **uvicorn_options)`` starts a real server; every one is stopped after the test."""
    with contextlib.ExitStack() as servers:

        def start(app: Any, **options: Any) -> UvicornThread:
            return servers.enter_context(UvicornThread(app, **options))

        yield start


@pytest.fixture
def chat_server(serve: Callable[..., UvicornThread]) -> Callable[..., tuple[UvicornThread, RecordingEngine]]:
    """``chat_server(engine_options, **middleware_options)``: the middleware around a bare app, on uvicorn."""

    def start(engine: dict[str, Any] | None = None, **options: Any) -> tuple[UvicornThread, RecordingEngine]:
        mock = RecordingEngine(**(engine or {}))
        return serve(chat_app(not_found_app, mock, **options)), mock

    return start


@pytest.fixture(scope="session")
def chat_engine_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Any]:
    """``chat_engine_factory(**options)``: a TransformersEngine on the tiny random Llama.

    Skips where ``chatstream_asgi.engines.transformers`` or ``tests/tiny_model.py`` is missing. It builds its
    own model folder; ``tests/conftest.py``'s ``tiny_model_dir`` could provide it instead.
    """
    if importlib.util.find_spec("chatstream_asgi.engines.transformers") is None:
        pytest.skip("chatstream_asgi.engines.transformers (TransformersEngine) does not exist yet")
    if importlib.util.find_spec("tests.tiny_model") is None:
        pytest.skip("tests/tiny_model.py (build_tiny_model) does not exist yet")
    from chatstream_asgi import TransformersEngine
    from tests.tiny_model import build_tiny_model

    model_dir: Path = build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))

    def build(**options: Any) -> Any:
        return TransformersEngine.from_pretrained(str(model_dir), **options)

    return build
