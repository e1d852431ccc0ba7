"""Shared fixtures: a tiny random Llama with an offline-trained tokenizer, built once per session, and real
uvicorn servers stopped after each test."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.engine_helpers import TokenLog
from tests.integration.servers import UvicornThread
from tests.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the tiny model and tokenizer, as ``save_pretrained`` writes them."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_engine_parts(tiny_model_dir: Path) -> tuple[Any, Any]:
    """``(model, tokenizer)`` loaded through the real ``from_pretrained`` path, float32 on CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return model.eval(), tokenizer


@pytest.fixture
def serve() -> Iterator[Callable[..., UvicornThread]]:
    """``serve(app, **uvicorn_options)`` starts a real server on 127.0.0.1; every one is stopped after the test."""
    with contextlib.ExitStack() as servers:

        def start(app: Any, **options: Any) -> UvicornThread:
            return servers.enter_context(UvicornThread(app, **options))

        yield start


@pytest.fixture
def token_log(monkeypatch: pytest.MonkeyPatch) -> TokenLog:
    """Every token the worker accepts, in order, keyed by the sequence's prompt ids."""
    from chatstream_asgi.engines import _sequence  # imports torch: only for the tests that ask for it

    log: TokenLog = []
    accept = _sequence.Sequence.accept

    def recording(self: _sequence.Sequence, token_id: int) -> bool:
        log.append((tuple(self.prompt_ids), token_id))
        return accept(self, token_id)

    monkeypatch.setattr(_sequence.Sequence, "accept", recording)
    return log
