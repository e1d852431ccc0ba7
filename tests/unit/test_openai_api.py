"""Unit tests for the OpenAI routes inside ``ChatStreamMiddleware``, driven as a raw ASGI app with ``MockEngine``:
configuration, API keys, errors in OpenAI's shape, and the non-streaming path's cancellation and deadline."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from chatstream_asgi import ChatStreamMiddleware, ConfigurationError, MockEngine

from .asgi_fakes import (
    JSON_HEADERS,
    RecordingApp,
    RecordingSend,
    ScriptedReceive,
    http_scope,
    json_body,
    request_messages,
    wait_until,
    with_hang_guard,
)

SECRET = "unit-test-secret-key-0123456789abcdef"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def middleware(engine: MockEngine | None = None, **options: Any) -> ChatStreamMiddleware:
    return ChatStreamMiddleware(RecordingApp(), engine=engine or MockEngine("one two"), secret_key=SECRET, **options)


async def call(
    app: ChatStreamMiddleware,
    path: str = "/v1/chat/completions",
    body: Any = CHAT,
    *,
    method: str = "POST",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> RecordingSend:
    receive = ScriptedReceive(request_messages(json_body(body)), wait_for_disconnect=True)
    send = RecordingSend()
    scope = http_scope(method, path, headers=JSON_HEADERS if headers is None else headers)
    await with_hang_guard(app(scope, receive, send))
    return send


@pytest.mark.asyncio
async def test_non_streaming_reply() -> None:
    send = await call(middleware())
    assert send.status == 200 and send.header("content-type") == "application/json"
    assert send.json()["choices"][0]["message"]["content"] == "one two"
    assert send.header("set-cookie") is None


@pytest.mark.asyncio
async def test_custom_prefix_and_disabled_routes_fall_through() -> None:
    assert (await call(middleware(openai_prefix="/openai/v1"), "/openai/v1/models", method="GET")).status == 200
    app = middleware(openai_prefix=None)
    send = await call(app, "/v1/models", method="GET")
    assert send.body == b"app"  # the wrapped app answered


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"openai_prefix": "v1"}, "start with '/'"),
        ({"openai_prefix": "/v1/"}, "start with '/'"),
        ({"openai_prefix": None, "api_keys": ["k"]}, "set openai_prefix"),
        ({"api_keys": []}, "list of non-empty strings"),
        ({"api_keys": [""]}, "list of non-empty strings"),
        ({"openai_prefix": "", "path": "/chat/completions"}, "clash"),
    ],
)
def test_bad_openai_configuration_says_what_to_pass(options: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigurationError, match=says):
        middleware(**options)


@pytest.mark.asyncio
async def test_api_key_checks() -> None:
    app = middleware(api_keys="sk-only")  # one key as a plain string
    for authorization in (None, b"Bearer sk-wrong", b"Basic sk-only", b"Bearer "):
        headers = JSON_HEADERS + ([(b"authorization", authorization)] if authorization else [])
        send = await call(app, headers=headers)
        assert send.status == 401 and send.header("www-authenticate") == "Bearer"
        assert send.json()["error"]["code"] == "invalid_api_key"
    ok = await call(app, headers=[*JSON_HEADERS, (b"authorization", b"bearer  sk-only ")])
    assert ok.status == 200


@pytest.mark.asyncio
async def test_request_errors_use_openai_shape() -> None:
    app = middleware(max_body_bytes=200)
    wrong_type = await call(app, headers=[(b"content-type", b"text/plain")])
    assert wrong_type.status == 415 and set(wrong_type.json()["error"]) == {"message", "type", "param", "code"}
    too_big = await call(app, body={**CHAT, "user": "x" * 300})
    assert too_big.status == 413 and too_big.json()["error"]["code"] == "request_too_large"
    assert (await call(app, method="GET")).status == 405


@pytest.mark.asyncio
async def test_full_queue_is_429_with_retry_after() -> None:
    app = middleware(MockEngine("a b c", token_delay=0.5), max_concurrency=1, max_queue=0)
    busy = asyncio.create_task(call(app))
    await wait_until(lambda: app.admission.running == 1)
    send = await call(app)
    assert send.status == 429 and int(send.header("retry-after") or 0) >= 1
    assert send.json()["error"]["type"] == "rate_limit_error"
    busy.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await busy


@pytest.mark.asyncio
async def test_non_streaming_disconnect_cancels_the_engine_and_sends_nothing() -> None:
    engine = MockEngine("a b c d e f", token_delay=0.05)
    app = middleware(engine)
    receive = ScriptedReceive(request_messages(json_body(CHAT)), wait_for_disconnect=True)
    send = RecordingSend()
    task = asyncio.create_task(app(http_scope("POST", "/v1/chat/completions", headers=JSON_HEADERS), receive, send))
    await wait_until(lambda: engine.running == 1)
    receive.disconnect()
    await with_hang_guard(task)
    assert send.messages == [] and engine.cancelled == 1 and app.admission.running == 0


@pytest.mark.asyncio
async def test_non_streaming_deadline_is_a_504() -> None:
    app = middleware(MockEngine("a b c", token_delay=0.2), generation_timeout=0.05)
    send = await call(app)
    assert send.status == 504 and send.json()["error"]["code"] == "generation_timeout"
    assert app.admission.running == 0
