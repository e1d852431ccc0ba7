"""The OpenAI-compatible routes driven by the official ``openai`` client (sync and async, streaming and not)
against a real uvicorn on 127.0.0.1, with ``MockEngine``: replies, usage, ``[DONE]``, 400s, API keys,
its retries on 429, and disconnect cancellation; the request limits, the context one on the tiny
``TransformersEngine``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio

from chatstream_asgi.engines.base import ChatMessage, SamplingParams

from .servers import RecordingEngine, UvicornThread, chat_app, not_found_app, read_stream, wait_for_load, words

ChatServer = Callable[..., tuple[UvicornThread, RecordingEngine]]
SyncFactory = Callable[..., openai.OpenAI]
AsyncFactory = Callable[..., openai.AsyncOpenAI]
USER = [{"role": "user", "content": "hello"}]
REPLY = words(6)


def sync_client(server: UvicornThread, **options: Any) -> openai.OpenAI:
    options.setdefault("api_key", "unused")
    return openai.OpenAI(base_url=f"{server.url}/v1", timeout=10.0, **options)


def async_client(server: UvicornThread, **options: Any) -> openai.AsyncOpenAI:
    options.setdefault("api_key", "unused")
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", timeout=10.0, **options)


@pytest.fixture
def open_sync() -> Iterator[SyncFactory]:
    """``open_sync(server, **options)``: an ``openai.OpenAI`` client for ``server``, closed after the test."""
    created: list[openai.OpenAI] = []

    def make(server: UvicornThread, **options: Any) -> openai.OpenAI:
        created.append(sync_client(server, **options))
        return created[-1]

    yield make
    for client in created:
        client.close()


@pytest_asyncio.fixture
async def open_async() -> AsyncIterator[AsyncFactory]:
    """``open_async(server, **options)``: an ``openai.AsyncOpenAI`` client for ``server``, closed after the test."""
    created: list[openai.AsyncOpenAI] = []

    def make(server: UvicornThread, **options: Any) -> openai.AsyncOpenAI:
        created.append(async_client(server, **options))
        return created[-1]

    yield make
    for client in created:
        await client.close()


def echo_history(messages: Sequence[ChatMessage]) -> str:
    return " | ".join(f"{m['role']}:{m['content']}" for m in messages)


def test_sync_non_streaming_completion_has_reply_and_usage(chat_server: ChatServer, open_sync: SyncFactory) -> None:
    server, _ = chat_server({"reply": REPLY})
    completion = open_sync(server).chat.completions.create(model="anything", messages=USER)  # type: ignore[arg-type]
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "mock"  # the served model, whatever the request named
    choice = completion.choices[0]
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", REPLY, "stop")
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 6
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 6 > 6


def test_sync_streaming_sends_role_deltas_finish_and_usage(chat_server: ChatServer, open_sync: SyncFactory) -> None:
    server, _ = chat_server({"reply": REPLY, "token_delay": 0.01})
    stream = open_sync(server).chat.completions.create(
        model="mock",
        messages=USER,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" and c.model == "mock" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) == 6  # one delta per token
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6


@pytest.mark.asyncio
async def test_async_client_streaming_and_not(chat_server: ChatServer, open_async: AsyncFactory) -> None:
    server, _ = chat_server({"reply": REPLY})
    client = open_async(server)
    completion = await client.chat.completions.create(model="mock", messages=USER)  # type: ignore[arg-type]
    assert completion.choices[0].message.content == REPLY
    stream = await client.chat.completions.create(model="mock", messages=USER, stream=True)  # type: ignore[arg-type]
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == REPLY
    assert all(c.usage is None for c in chunks)  # no usage chunk unless asked


@pytest.mark.asyncio
async def test_raw_stream_ends_with_done_and_sets_no_cookie(chat_server: ChatServer) -> None:
    server, _ = chat_server({"reply": REPLY})
    body = {"model": "mock", "messages": USER, "stream": True}
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert "set-cookie" not in response.headers
    assert response.headers["x-request-id"].startswith("chatcmpl-")
    assert response.text.endswith("data: [DONE]\n\n")


def test_history_content_parts_and_sampling_reach_the_engine(chat_server: ChatServer, open_sync: SyncFactory) -> None:
    server, _ = chat_server({"reply": echo_history})
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "part"}]},
        {"role": "assistant", "content": "ok"},
        {"role": "developer", "content": "dev"},
        {"role": "user", "content": "second"},
    ]
    completion = open_sync(server).chat.completions.create(model="mock", messages=messages)  # type: ignore[arg-type]
    expected = "system:be brief | user:first\npart | assistant:ok | system:dev | user:second"
    assert completion.choices[0].message.content == expected


@pytest.mark.parametrize("limit_field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_cuts_with_finish_reason_length(
    chat_server: ChatServer, open_sync: SyncFactory, limit_field: str
) -> None:
    server, _ = chat_server({"reply": REPLY})
    options: dict[str, Any] = {limit_field: 2}
    completion = open_sync(server).chat.completions.create(model="mock", messages=USER, **options)  # type: ignore[arg-type]
    assert completion.choices[0].message.content == "w0 w1 "
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 2


def test_stop_string_ends_the_reply(chat_server: ChatServer, open_sync: SyncFactory) -> None:
    server, _ = chat_server({"reply": REPLY})
    completion = open_sync(server).chat.completions.create(model="mock", messages=USER, stop=["w3"], seed=7)  # type: ignore[arg-type]
    assert completion.choices[0].message.content == "w0 w1 w2 "


BAD_REQUESTS: list[tuple[dict[str, Any], str]] = [
    ({"n": 2}, "n"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"logprobs": True}, "logprobs"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"temperature": 3}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages[0].content[0]",
    ),
    ({"messages": []}, "messages"),
]


@pytest.mark.parametrize(("fields", "param"), BAD_REQUESTS)
def test_unsupported_or_invalid_requests_raise_bad_request(
    chat_server: ChatServer, open_sync: SyncFactory, fields: dict[str, Any], param: str
) -> None:
    server, engine = chat_server()
    body: dict[str, Any] = {"model": "mock", "messages": USER, **fields}
    with pytest.raises(openai.BadRequestError) as caught:
        open_sync(server).chat.completions.create(**body)
    assert caught.value.status_code == 400
    assert caught.value.param == param and caught.value.type == "invalid_request_error"
    assert engine.inputs == []


def test_models_lists_the_served_model(chat_server: ChatServer, open_sync: SyncFactory) -> None:
    server, _ = chat_server({"model_name": "tiny-chat"})
    models = open_sync(server).models.list()
    assert [(m.id, m.object, m.owned_by) for m in models.data] == [("tiny-chat", "model", "chatstream_asgi")]


def test_api_keys_guard_the_openai_routes(chat_server: ChatServer, open_sync: SyncFactory) -> None:
    server, engine = chat_server({"reply": REPLY}, api_keys=["sk-old", "sk-new"])
    client = open_sync(server, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model="mock", messages=USER)  # type: ignore[arg-type]
    assert caught.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    missing = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": USER})
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"]["code"] == "invalid_api_key"
    assert engine.inputs == []
    completion = open_sync(server, api_key="sk-new").chat.completions.create(model="mock", messages=USER)  # type: ignore[arg-type]
    assert completion.choices[0].message.content == REPLY
    assert httpx.get(f"{server.url}/get_load").status_code == 200  # the chat routes keep their own rules


@pytest.mark.asyncio
async def test_full_queue_gives_rate_limit_error_then_client_retry_succeeds(
    chat_server: ChatServer, open_async: AsyncFactory, caplog: pytest.LogCaptureFixture
) -> None:
    server, _ = chat_server({"reply": words(12), "token_delay": 0.1}, max_concurrency=1, max_queue=0)
    busy = asyncio.create_task(open_async(server).chat.completions.create(model="m", messages=USER))  # type: ignore[arg-type]
    async with httpx.AsyncClient(base_url=server.url) as raw:
        await wait_for_load(raw, running=1)
    with pytest.raises(openai.RateLimitError) as caught:
        await open_async(server, max_retries=0).chat.completions.create(model="m", messages=USER)  # type: ignore[arg-type]
    assert int(caught.value.response.headers["retry-after"]) >= 1
    assert caught.value.code == "rate_limit_exceeded" and caught.value.type == "rate_limit_error"
    caplog.set_level(logging.INFO, logger="openai")
    started = time.monotonic()
    retried = await open_async(server, max_retries=5).chat.completions.create(model="m", messages=USER)  # type: ignore[arg-type]
    assert retried.choices[0].message.content == words(12)
    assert any("Retrying request" in r.getMessage() for r in caplog.records), "the client never retried"
    assert time.monotonic() - started > 0.9  # it waited out Retry-After instead of hammering
    assert (await busy).choices[0].message.content == words(12)


def test_sync_client_retries_on_429_from_another_thread(chat_server: ChatServer, open_sync: SyncFactory) -> None:
    server, _ = chat_server({"reply": words(8), "token_delay": 0.1}, max_concurrency=1, max_queue=0)
    results: list[str | None] = []
    busy = threading.Thread(
        target=lambda: results.append(
            open_sync(server).chat.completions.create(model="m", messages=USER).choices[0].message.content  # type: ignore[arg-type]
        )
    )
    busy.start()
    deadline = time.monotonic() + 5
    while httpx.get(f"{server.url}/get_load").json()["running"] != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    stream = open_sync(server, max_retries=5).chat.completions.create(model="m", messages=USER, stream=True)  # type: ignore[arg-type]
    assert "".join(c.choices[0].delta.content or "" for c in stream) == words(8)
    busy.join(10)
    assert results == [words(8)]


@pytest.mark.asyncio
async def test_queue_timeout_is_503_in_openai_shape(chat_server: ChatServer, open_async: AsyncFactory) -> None:
    server, _ = chat_server({"reply": words(20), "token_delay": 0.1}, max_concurrency=1, max_queue=1, queue_timeout=0.2)
    busy = asyncio.create_task(open_async(server).chat.completions.create(model="m", messages=USER))  # type: ignore[arg-type]
    async with httpx.AsyncClient(base_url=server.url) as raw:
        await wait_for_load(raw, running=1)
        response = await raw.post("/v1/chat/completions", json={"messages": USER})
    busy.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await busy
    assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1
    assert response.json()["error"] == {
        "message": response.json()["error"]["message"],
        "type": "server_error",
        "param": None,
        "code": "queue_timeout",
    }


@pytest.mark.asyncio
async def test_disconnect_cancels_generation_and_frees_the_slot(chat_server: ChatServer) -> None:
    server, engine = chat_server({"reply": words(200), "token_delay": 0.02})
    async with httpx.AsyncClient(base_url=server.url, timeout=10.0) as client:
        body = {"model": "mock", "messages": USER, "stream": True}
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            streamed = await read_stream(response, max_chunks=3)
        assert streamed.status == 200
        await wait_for_load(client, running=0)
    assert engine.cancelled == 1 and engine.running == 0


@pytest.mark.asyncio
async def test_engine_failure_after_first_token_is_in_band_api_error(
    chat_server: ChatServer, open_async: AsyncFactory
) -> None:
    server, engine = chat_server({"reply": REPLY, "fail_after": 2})
    client = open_async(server, max_retries=0)
    stream = await client.chat.completions.create(model="mock", messages=USER, stream=True)  # type: ignore[arg-type]
    received: list[str] = []
    with pytest.raises(openai.APIError, match="mock failure"):
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "w0 w1 "
    with pytest.raises(openai.InternalServerError):  # not streaming: nothing was sent, so a real 500
        await client.chat.completions.create(model="mock", messages=USER)  # type: ignore[arg-type]
    async with httpx.AsyncClient(base_url=server.url) as raw:
        await wait_for_load(raw, running=0)


@pytest.mark.asyncio
async def test_engine_failure_before_first_token_is_a_json_error(chat_server: ChatServer) -> None:
    server, _ = chat_server({"reply": REPLY, "fail_after": 0})
    async with httpx.AsyncClient(base_url=server.url) as raw:
        response = await raw.post("/v1/chat/completions", json={"messages": USER, "stream": True})
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "generation_error" and "param" in error


def test_back_to_back_requests_find_the_slot_free(chat_server: ChatServer, open_sync: SyncFactory) -> None:
    """The slot is released before the last byte, so a client's next request never races its own last one."""
    server, _ = chat_server({"reply": REPLY}, max_concurrency=1, max_queue=0)
    client = open_sync(server, max_retries=0)
    for _ in range(10):
        assert client.chat.completions.create(model="m", messages=USER).choices[0].message.content == REPLY  # type: ignore[arg-type]
        stream = client.chat.completions.create(model="m", messages=USER, stream=True)  # type: ignore[arg-type]
        assert "".join(c.choices[0].delta.content or "" for c in stream) == REPLY


def conversation(*contents: str) -> list[dict[str, str]]:
    """Messages alternating user/assistant, starting with the user."""
    return [{"role": ("user", "assistant")[i % 2], "content": content} for i, content in enumerate(contents)]


def test_request_limits_raise_bad_request_naming_code_and_param(
    chat_server: ChatServer, open_sync: SyncFactory
) -> None:
    server, engine = chat_server({"reply": REPLY}, openai_max_messages=4, max_input_chars=100)
    client = open_sync(server)
    for messages, code, param in [
        (conversation("a", "b", "c", "d", "e"), "array_above_max_length", "messages"),
        (conversation("a", "b" * 101, "c"), "string_above_max_length", "messages[1].content"),
    ]:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="mock", messages=messages)  # type: ignore[arg-type]
        assert (caught.value.code, caught.value.param, caught.value.type) == (code, param, "invalid_request_error")
    assert engine.inputs == []
    completion = client.chat.completions.create(model="mock", messages=conversation("a", "b" * 100, "c"))  # type: ignore[arg-type]
    assert completion.choices[0].message.content == REPLY


def test_long_conversation_fits_the_openai_body_limit_not_the_chat_one(
    chat_server: ChatServer, open_sync: SyncFactory
) -> None:
    server, _ = chat_server({"reply": REPLY}, openai_max_body_bytes=200_000)
    client = open_sync(server, max_retries=0)
    long = conversation(*["x" * 10_000] * 11)  # ~110 KB: over the chat routes' 64 KiB
    assert client.chat.completions.create(model="mock", messages=long).choices[0].message.content == REPLY  # type: ignore[arg-type]
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="mock", messages=long * 2)  # type: ignore[arg-type]
    assert (caught.value.status_code, caught.value.code) == (413, "request_too_large")
    wrong_method = httpx.get(f"{server.url}/v1/chat/completions")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"
    assert wrong_method.json()["error"]["type"] == "invalid_request_error"


def test_prompt_over_the_model_context_raises_context_length_exceeded(
    serve: Callable[..., UvicornThread], chat_engine_factory: Callable[..., Any], open_sync: SyncFactory
) -> None:
    engine = chat_engine_factory(context_len=64, max_batch_size=1, device="cpu")
    client = open_sync(serve(chat_app(not_found_app, engine)), max_retries=0)
    sentence = "The quick brown fox jumps over the lazy dog."
    history = conversation(sentence * 3, sentence * 3, "Hello")
    assert engine.fit_prompt(history, SamplingParams(max_new_tokens=1)).dropped > 0  # the engine would drop turns
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=history)  # type: ignore[arg-type]
    assert (caught.value.code, caught.value.param) == ("context_length_exceeded", "messages")
    assert "maximum context length is 64 tokens" in caught.value.message
    short = conversation(sentence)
    prompt_tokens = len(engine.fit_prompt(short, SamplingParams(max_new_tokens=1)).token_ids)
    room = 64 - prompt_tokens
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=short, max_tokens=room + 1)  # type: ignore[arg-type]
    assert caught.value.code == "context_length_exceeded" and f"{room + 1} in the completion" in caught.value.message
    # no max_tokens: the reply gets the room the context leaves (the default 256 would not fit)
    completion = client.chat.completions.create(model="tiny", messages=short, extra_body={"ignore_eos": True})  # type: ignore[arg-type]
    assert completion.usage is not None and completion.choices[0].finish_reason == "length"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (prompt_tokens, room)
