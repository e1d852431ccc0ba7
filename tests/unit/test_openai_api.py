"""Unit tests for the OpenAI routes inside ``ChatStreamMiddleware``, driven as a raw ASGI app with ``MockEngine``:
configuration, API keys, errors in OpenAI's shape, the request limits (messages, characters, tokens, context,
body size), and the non-streaming path's cancellation and deadline."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import pytest

from chatstream_asgi import ChatStreamMiddleware, ConfigurationError, EngineReplicas, MockEngine
from chatstream_asgi.engines.base import ChatMessage

from . import apps
from .apps import build_middleware, client_sending
from .asgi_fakes import JSON_HEADERS, RecordingSend, wait_until, with_hang_guard

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


class WordTokenizer:
    """One token per word; the template puts a role word before each message and one for the reply."""

    def apply_chat_template(self, messages: Sequence[ChatMessage], tokenize: bool, add_generation_prompt: bool) -> str:
        if any(a["role"] == b["role"] for a, b in zip(messages, messages[1:], strict=False)):
            raise ValueError("Conversation roles must alternate")  # as Llama 2's and Mistral's templates do
        return "".join(f"<{m['role']}> {m['content']}\n" for m in messages) + "<assistant>"

    def encode(self, text: str, add_special_tokens: bool) -> list[str]:
        return text.split()


class TokenizedEngine(MockEngine):
    """A mock with what ``TransformersEngine`` has for counting: ``tokenizer``, ``context_len``, ``system_prompt``."""

    def __init__(self, context_len: int = 20, system_prompt: str | None = None) -> None:
        super().__init__(words(50))
        self.tokenizer = WordTokenizer()
        self.context_len = context_len
        self.system_prompt = system_prompt


def middleware(engine: MockEngine | EngineReplicas | None = None, **options: Any) -> ChatStreamMiddleware:
    return build_middleware(engine or MockEngine("one two"), **options)


def chat_body(*contents: str, **fields: Any) -> dict[str, Any]:
    """A completion request whose messages alternate user/assistant, starting and ending with the user."""
    roles = ["user", "assistant"]
    return {"model": "m", "messages": [{"role": roles[i % 2], "content": c} for i, c in enumerate(contents)], **fields}


def words(count: int) -> str:
    return " ".join(["w"] * count)


def assert_openai_error(send: RecordingSend, status: int, param: str | None, code: str) -> str:
    """The response is ``status`` with OpenAI's error object naming ``param`` and ``code``; returns the message."""
    assert send.status == status, send.body
    error = send.json()["error"]
    assert error == {"message": error["message"], "type": error["type"], "param": param, "code": code}
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    message: str = error["message"]
    return message


async def call(
    app: ChatStreamMiddleware,
    path: str = "/v1/chat/completions",
    body: Any = CHAT,
    *,
    method: str = "POST",
    headers: list[tuple[bytes, bytes]] = JSON_HEADERS,
) -> RecordingSend:
    """``body`` as JSON to the chat completions route (or to ``path``), whatever the ``method``."""
    return await apps.call(app, method, path, payload=body, headers=headers)


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
        ({"openai_max_body_bytes": 0}, "openai_max_body_bytes must be a positive integer"),
        ({"openai_max_messages": -1}, "openai_max_messages must be a positive integer"),
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
async def test_a_key_read_from_a_file_with_its_newline_works_on_every_route() -> None:
    # open("/run/secrets/key").read() keeps the newline; the chat routes strip keys, and so must these
    app = middleware(api_keys=["sk-team-a\n"])
    sent = [*JSON_HEADERS, (b"authorization", b"Bearer sk-team-a")]
    assert (await call(app, headers=sent)).status == 200
    assert (await call(app, "/v1/models", method="GET", headers=sent)).status == 200


@pytest.mark.asyncio
async def test_request_errors_use_openai_shape() -> None:
    app = middleware(openai_max_body_bytes=200)
    wrong_type = await call(app, headers=[(b"content-type", b"text/plain")])
    assert_openai_error(wrong_type, 415, None, "unsupported_media_type")
    assert_openai_error(await call(app, body={**CHAT, "user": "x" * 300}), 413, None, "request_too_large")
    for path, method, allow in [("/v1/chat/completions", "GET", "POST"), ("/v1/models", "POST", "GET, HEAD")]:
        wrong_method = await call(app, path, method=method)  # refused before the handler runs
        assert_openai_error(wrong_method, 405, None, "method_not_allowed")
        assert wrong_method.header("allow") == allow
    chat_route = await call(app, "/chat_stream", method="GET")  # the chat routes keep the package's shape
    assert chat_route.status == 405 and set(chat_route.json()["error"]) == {"type", "message"}


@pytest.mark.asyncio
async def test_openai_body_limit_is_its_own() -> None:
    long_conversation = chat_body(*["x" * 10_000] * 9)  # ~90 KB, over the chat routes' 64 KiB
    assert (await call(middleware(), body=long_conversation)).status == 200
    send = await call(middleware(max_body_bytes=1_000_000, openai_max_body_bytes=80_000), body=long_conversation)
    assert "80000 bytes" in assert_openai_error(send, 413, None, "request_too_large")


@pytest.mark.asyncio
async def test_too_many_messages_is_a_400() -> None:
    app = middleware(openai_max_messages=3)
    assert (await call(app, body=chat_body("a", "b", "c"))).status == 200
    send = await call(app, body=chat_body("a", "b", "c", "d", "e"))
    message = assert_openai_error(send, 400, "messages", "array_above_max_length")
    assert "5 messages" in message and "at most 3" in message


@pytest.mark.asyncio
async def test_a_message_over_max_input_chars_is_named() -> None:
    app = middleware(max_input_chars=10)
    assert (await call(app, body=chat_body("x" * 10, "y" * 10, "z"))).status == 200
    send = await call(app, body=chat_body("short", "y" * 11, "z"))
    assert "11 characters" in assert_openai_error(send, 400, "messages[1].content", "string_above_max_length")
    parts = {"role": "user", "content": [{"type": "text", "text": "x" * 5}, {"type": "text", "text": "y" * 5}]}
    send = await call(app, body={"messages": [parts]})  # text parts are joined with a newline: 11 characters
    assert_openai_error(send, 400, "messages[0].content", "string_above_max_length")


@pytest.mark.asyncio
async def test_prompt_over_max_input_tokens_is_context_length_exceeded() -> None:
    app = middleware(TokenizedEngine(context_len=1000), max_input_tokens=10)
    assert (await call(app, body=chat_body("a b", "c d", "e f"))).status == 200  # 3 x (1 + 2) + 1 = 10 tokens
    send = await call(app, body=chat_body("a b", "c d", "e f g"))
    assert "11 tokens" in assert_openai_error(send, 400, "messages", "context_length_exceeded")


@pytest.mark.asyncio
@pytest.mark.parametrize("replicas", [False, True])
async def test_prompt_over_the_context_is_a_400_never_a_silent_truncation(replicas: bool) -> None:
    engine = EngineReplicas([TokenizedEngine(), TokenizedEngine()]) if replicas else TokenizedEngine()
    app = middleware(engine)  # context of 20 tokens; a message is 1 + its words; the reply prompt 1
    fits = (await call(app, body=chat_body(words(17)))).json()  # 19 tokens: room for 1 of the default 256
    assert fits["choices"][0]["finish_reason"] == "length" and fits["usage"]["completion_tokens"] == 1
    full = await call(app, body=chat_body(words(18)))
    message = assert_openai_error(full, 400, "messages", "context_length_exceeded")
    assert message == (
        "This model's maximum context length is 20 tokens. However, your messages resulted in 20 tokens. "
        "Please reduce the length of the messages."
    )
    asked = await call(app, body=chat_body(words(17), max_tokens=2))
    assert "you requested 21 tokens (19 in the messages, 2 in the completion)" in assert_openai_error(
        asked, 400, "messages", "context_length_exceeded"
    )
    assert (await call(app, body=chat_body(words(16), max_completion_tokens=2))).status == 200


@pytest.mark.asyncio
async def test_the_engines_own_system_prompt_counts() -> None:
    app = middleware(TokenizedEngine(system_prompt="be brief"))  # 3 more tokens unless a system message is sent
    send = await call(app, body=chat_body(words(15)))
    assert "resulted in 20 tokens" in assert_openai_error(send, 400, "messages", "context_length_exceeded")
    own_system = {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": words(15)}]}
    assert (await call(app, body=own_system)).status == 200  # 1 + 16 + 1 tokens


@pytest.mark.asyncio
async def test_messages_the_chat_template_refuses_are_a_400() -> None:
    app = middleware(TokenizedEngine())
    send = await call(app, body={"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]})
    assert "roles must alternate" in assert_openai_error(send, 400, "messages", "invalid_request")


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
    receive = client_sending(CHAT)
    task = asyncio.create_task(apps.call(app, "POST", "/v1/chat/completions", receive=receive))
    await wait_until(lambda: engine.running == 1)
    receive.disconnect()
    send = await with_hang_guard(task)
    assert send.messages == [] and engine.cancelled == 1 and app.admission.running == 0


@pytest.mark.asyncio
async def test_non_streaming_deadline_is_a_504() -> None:
    app = middleware(MockEngine("a b c", token_delay=0.2), generation_timeout=0.05)
    send = await call(app)
    assert send.status == 504 and send.json()["error"]["code"] == "generation_timeout"
    assert app.admission.running == 0
