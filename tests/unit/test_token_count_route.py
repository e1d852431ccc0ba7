"""``GET /get_token_count``: the tokens of a session's prompt against the model's context."""

from __future__ import annotations

from typing import Any

import pytest

from chatstream_asgi import SamplingParams, TransformersEngine

from .apps import COOKIE_NAME, JSON_HEADERS, build_middleware, call, chat, session_cookie

pytestmark = pytest.mark.asyncio


async def token_count(app: Any, cookie: str | None = None) -> dict[str, Any]:
    send = await call(app, "GET", "/get_token_count", headers=(), cookie=cookie and f"{COOKIE_NAME}={cookie}")
    assert send.status == 200
    body: dict[str, Any] = send.json()
    return body


async def test_the_count_is_the_engines_own_prompt_length_and_grows_with_the_history(
    tiny_engine_parts: tuple[Any, Any],
) -> None:
    engine = TransformersEngine(*tiny_engine_parts, max_batch_size=1)
    app = build_middleware(engine, max_new_tokens_limit=8)
    try:
        assert await token_count(app) == {"prompt_tokens": 0, "context_len": 512, "messages": 0}
        cookie = session_cookie(await chat(app, "What is the capital of France?", max_new_tokens=8))
        first = await token_count(app, cookie)
        history = (await call(app, "GET", "/get_prompt", headers=(), cookie=f"{COOKIE_NAME}={cookie}")).json()
        expected = len(engine.fit_prompt(history["messages"], SamplingParams()).token_ids)
        assert first == {"prompt_tokens": expected, "context_len": 512, "messages": 2}
        same_session = [*JSON_HEADERS, (b"cookie", f"{COOKIE_NAME}={cookie}".encode())]
        assert (await chat(app, "And of Japan?", max_new_tokens=8, headers=same_session)).status == 200
        assert (await token_count(app, cookie))["prompt_tokens"] > expected
    finally:
        await engine.close()


async def test_an_engine_without_a_tokenizer_reports_null() -> None:
    app = build_middleware()  # MockEngine
    cookie = session_cookie(await chat(app, "hi"))
    assert await token_count(app, cookie) == {"prompt_tokens": None, "context_len": None, "messages": 2}
