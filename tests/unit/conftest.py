"""Fixtures of the unit tests that drive ``ChatStreamMiddleware`` (see ``apps.py``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from chatstream_asgi import ChatStreamMiddleware

from .apps import REPLY, SECRET, Chat, CountingEngine
from .asgi_fakes import RecordingApp


@pytest.fixture
def make_chat() -> Iterator[Callable[..., Chat]]:
    """``make_chat(engine=None, store=None, **options)`` builds a ``Chat``: a ``CountingEngine(REPLY)`` and the
    middleware's own history store unless given. Afterwards it checks that none holds a slot, a queue place, an
    engine sequence, a streaming session or a stop switch."""
    built: list[Chat] = []

    def make(engine: CountingEngine | None = None, store: Any = None, **options: Any) -> Chat:
        engine = engine or CountingEngine(REPLY)
        if store is not None:
            options["history_store"] = store
        app = RecordingApp()
        middleware = ChatStreamMiddleware(app, engine=engine, secret_key=SECRET, **options)
        chat = Chat(middleware, app, engine, middleware.routes.store)
        built.append(chat)
        return chat

    yield make
    for chat in built:
        admission = chat.middleware.admission
        assert (admission.running, admission.waiting) == (0, 0), f"admission left busy: {admission!r}"
        assert chat.engine.running == 0, "an engine stream was left running"
        assert not chat.middleware.routes.active_sessions, "a session was left marked as streaming"
        assert not chat.middleware.routes.hooks.stops, "a stop switch was left registered"
