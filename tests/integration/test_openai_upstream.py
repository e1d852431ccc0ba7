"""``OpenAIUpstreamEngine`` against a second real uvicorn on 127.0.0.1: another ``ChatStreamMiddleware`` that
serves ``MockEngine`` (or the tiny TransformersEngine) through its own ``/v1/chat/completions``. The front
middleware keeps sessions, history and admission; generation, cancellation and errors cross the wire."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from chatstream_asgi import OpenAIUpstreamEngine
from chatstream_asgi.engines.base import ChatMessage

from .servers import (
    RecordingEngine,
    UvicornThread,
    chat,
    chat_app,
    not_found_app,
    read_stream,
    sse_events,
    wait_for_load,
    words,
)

Serve = Callable[..., UvicornThread]
TOKEN_DELAY = 0.02


def count_turns(messages: Sequence[ChatMessage]) -> str:
    return f"I see {len(messages)} messages, the last: {messages[-1]['content']}"


def upstream_pair(
    serve: Serve, engine: dict[str, Any] | None = None, upstream: dict[str, Any] | None = None, **front: Any
) -> tuple[UvicornThread, RecordingEngine, UvicornThread, OpenAIUpstreamEngine]:
    """An upstream chatstream_asgi serving a mock, and a front one generating on it through the OpenAI API."""
    mock = RecordingEngine(**{"token_delay": TOKEN_DELAY, **(engine or {})})
    upstream_server = serve(chat_app(not_found_app, mock, **(upstream or {})))
    engine_options = {"timeout": 5.0, **front.pop("engine_options", {})}
    remote = OpenAIUpstreamEngine(f"{upstream_server.url}/v1", model="mock", **engine_options)
    return upstream_server, mock, serve(chat_app(not_found_app, remote, **front)), remote


def client_for(server: UvicornThread) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.url, timeout=10.0)


def assert_json_error(response: httpx.Response | Any, status: int, error_type: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error: dict[str, Any] = json.loads(response.text)["error"]
    assert error["type"] == error_type, error
    return error


@pytest.mark.asyncio
async def test_chat_stream_streams_through_the_upstream(serve: Serve) -> None:
    upstream, mock, front, _ = upstream_pair(serve, {"reply": words(10)})
    async with client_for(front) as client:
        streamed = await chat(client, "hello")
    assert streamed.status == 200 and streamed.text == words(10)
    assert len(streamed.chunks) > 1, "the reply arrived in one piece"
    assert streamed.arrivals[0] < mock.produced[-1], "the first chunk arrived only after the upstream finished"
    assert mock.inputs == ["hello"]


@pytest.mark.asyncio
async def test_line_separators_in_the_reply_come_through_whole(serve: Serve) -> None:
    # the upstream's JSON leaves U+2028, U+2029 and U+0085 raw; an SSE line ends only at CR or LF
    reply = "line one\u2028line two\u2029 \x85 end"
    upstream, mock, front, _ = upstream_pair(serve, {"reply": reply})
    async with client_for(front) as client:
        streamed = await chat(client, "hello")
    assert streamed.status == 200 and streamed.text == reply


@pytest.mark.asyncio
async def test_history_is_kept_at_the_front_and_sent_upstream(serve: Serve) -> None:
    upstream, mock, front, _ = upstream_pair(serve, {"reply": count_turns}, system_prompt="be kind")
    async with client_for(front) as client:
        first = await chat(client, "one")
        second = await chat(client, "two")
        prompt = (await client.get("/get_prompt")).json()
    assert first.text == "I see 2 messages, the last: one"
    assert second.text == "I see 4 messages, the last: two"  # system, one, reply, two
    assert [m["content"] for m in prompt["messages"]] == ["one", first.text, "two", second.text]
    assert "[user]\none" in prompt["prompt"] and prompt["prompt"].endswith("[assistant]\n")


def test_openai_client_at_the_front_of_a_chain(serve: Serve) -> None:
    _, _, front, _ = upstream_pair(serve, {"reply": words(5)})
    with openai.OpenAI(base_url=f"{front.url}/v1", api_key="unused", timeout=10.0) as client:
        messages: Any = [{"role": "user", "content": "hi"}]
        stream = client.chat.completions.create(
            model="mock", messages=messages, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream)
        completion = client.chat.completions.create(model="mock", messages=messages, max_tokens=2)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == words(5)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 5 and usage.prompt_tokens > 0  # the upstream's counts
    assert completion.choices[0].message.content == "w0 w1 " and completion.choices[0].finish_reason == "length"


def test_a_request_the_upstream_refuses_is_a_400_that_the_openai_client_does_not_retry(serve: Serve) -> None:
    # the upstream takes at most 8 new tokens: asked for 50, it answers 400; the front passes that on as a 400, so
    # the SDK raises BadRequestError at once (it retries 5xx: as a 502 the upstream was asked three times)
    posts: list[str] = []
    upstream = chat_app(not_found_app, RecordingEngine(reply=words(5)), max_new_tokens_limit=8)

    async def counting(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            posts.append(scope["path"])
        await upstream(scope, receive, send)

    counted = serve(counting)
    front = serve(chat_app(not_found_app, OpenAIUpstreamEngine(f"{counted.url}/v1", model="mock", timeout=5.0)))
    with openai.OpenAI(base_url=f"{front.url}/v1", api_key="unused", timeout=10.0) as client:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="mock", messages=[{"role": "user", "content": "hi"}], max_tokens=50)
        reply = client.chat.completions.create(model="mock", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert refused.value.status_code == 400 and "max_tokens" in refused.value.message
    assert refused.value.code == "upstream_bad_request"
    assert posts == ["/v1/chat/completions"] * 2, posts  # the refused request once, then the one that fits
    assert reply.choices[0].message.content == "w0 w1 "


@pytest.mark.asyncio
async def test_disconnect_at_the_front_cancels_the_upstream_generation(serve: Serve) -> None:
    upstream, mock, front, _ = upstream_pair(serve, {"reply": words(300)})
    async with client_for(front) as client, client_for(upstream) as upstream_client:
        async with client.stream("POST", "/chat_stream", json={"user_input": "long"}) as response:
            streamed = await read_stream(response, max_chunks=3)
        assert streamed.status == 200
        await wait_for_load(upstream_client, running=0)
        await wait_for_load(client, running=0)
    assert mock.cancelled == 1 and mock.running == 0
    assert len(mock.produced) < 100, "the upstream kept generating after the client left"


@pytest.mark.asyncio
async def test_upstream_down_is_a_502_before_the_stream(serve: Serve) -> None:
    with socket.socket() as sock:  # a port that nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    engine = OpenAIUpstreamEngine(f"http://127.0.0.1:{port}/v1", model="mock", timeout=2.0)
    front = serve(chat_app(not_found_app, engine))
    async with client_for(front) as client:
        response = await client.post("/chat_stream", json={"user_input": "hi"})
        error = assert_json_error(response, 502, "upstream_unreachable")
        assert "is it running?" in error["message"]
        await wait_for_load(client, running=0)


@pytest.mark.asyncio
async def test_upstream_429_is_a_503_with_retry_after(serve: Serve) -> None:
    upstream, mock, front, _ = upstream_pair(serve, {"reply": words(50)}, {"max_concurrency": 1, "max_queue": 0})
    async with client_for(front) as client, client_for(upstream) as upstream_client:
        async with upstream_client.stream("POST", "/chat_stream", json={"user_input": "busy"}) as busy:
            await wait_for_load(upstream_client, running=1)
            response = await client.post("/chat_stream", json={"user_input": "hi"})
            error = assert_json_error(response, 503, "upstream_overloaded")
            assert int(response.headers["retry-after"]) >= 1
            assert "429" in error["message"]
            await busy.aclose()
        await wait_for_load(client, running=0)
        # once the upstream has room again, the same front serves normally
        await wait_for_load(upstream_client, running=0)
        assert (await chat(client, "again", max_new_tokens=2)).text == "w0 w1 "


@pytest.mark.asyncio
async def test_silent_upstream_is_a_504_and_is_cancelled(serve: Serve) -> None:
    upstream, mock, front, _ = upstream_pair(serve, {"token_delay": 1.0}, engine_options={"timeout": 0.3})
    async with client_for(front) as client, client_for(upstream) as upstream_client:
        response = await client.post("/chat_stream", json={"user_input": "hi"})
        assert_json_error(response, 504, "upstream_timeout")
        await wait_for_load(client, running=0)
        await wait_for_load(upstream_client, running=0)
    assert mock.cancelled == 1


@pytest.mark.asyncio
async def test_upstream_failure_mid_reply_is_in_band_and_frees_the_slot(serve: Serve) -> None:
    upstream, mock, front, _ = upstream_pair(serve, {"reply": words(10), "fail_after": 3})
    async with client_for(front) as client:
        streamed = await chat(client, "hi")
        assert streamed.status == 200
        assert streamed.text.startswith("w0 w1 w2 ")
        assert "[error: upstream_error]" in streamed.text and "mock failure" in streamed.text
        await wait_for_load(client, running=0)


def scripted_upstream(
    status: int, content_type: bytes, body: bytes, headers: Sequence[tuple[bytes, bytes]] = ()
) -> Any:
    """A fake OpenAI server that answers every request with ``body``."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await not_found_app(scope, receive, send)
            return
        all_headers = [(b"content-type", content_type), *headers]
        await send({"type": "http.response.start", "status": status, "headers": all_headers})
        await send({"type": "http.response.body", "body": body})

    return app


def delta_event(text: str) -> str:
    return "data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})


VLLM_CONTEXT_ERROR = b'{"error": {"message": "maximum context length is 2048 tokens", "code": 400}}'
BROKEN_UPSTREAMS = [
    (500, b"application/json", b'{"error": {"message": "CUDA out of memory"}}', 502, "upstream_error", "CUDA out"),
    (404, b"application/json", b'{"detail": "Not Found"}', 502, "upstream_rejected", "check base_url"),
    # vLLM's answer to a prompt over its context: the request's fault, so our 400 (a 502 was retried by SDKs)
    (400, b"application/json", VLLM_CONTEXT_ERROR, 400, "upstream_bad_request", "maximum context length is 2048"),
    (422, b"application/json", b'{"detail": [{"msg": "field required"}]}', 400, "upstream_bad_request", "422"),
    (503, b"text/plain", b"loading model", 503, "upstream_overloaded", "loading model"),
    (200, b"text/event-stream", b"data: {not json\n\n", 502, "upstream_protocol_error", "not JSON"),
    (200, b"text/event-stream", b'data: {"object": "x"}\n\n', 502, "upstream_protocol_error", "choices"),
    (200, b"application/json", b'{"choices": []}', 502, "upstream_protocol_error", "text/event-stream"),
    (200, b"text/event-stream", (delta_event("cut") + "\n\n").encode(), 200, "", "[error: upstream_protocol_error]"),
]


@pytest.mark.parametrize(("status", "content_type", "body", "ours", "error_type", "says"), BROKEN_UPSTREAMS)
@pytest.mark.asyncio
async def test_broken_upstream_answers_become_clear_errors(
    serve: Serve, status: int, content_type: bytes, body: bytes, ours: int, error_type: str, says: str
) -> None:
    upstream = serve(scripted_upstream(status, content_type, body))
    engine = OpenAIUpstreamEngine(f"{upstream.url}/v1", model="m", timeout=2.0)
    front = serve(chat_app(not_found_app, engine))
    async with client_for(front) as client:
        response = await client.post("/chat_stream", json={"user_input": "hi"})
        if error_type:
            assert says in assert_json_error(response, ours, error_type)["message"]
        else:  # text was sent, then the stream ended without a finish: an in-band error
            assert response.status_code == 200 and response.text.startswith("cut") and says in response.text
        await wait_for_load(client, running=0)


FINISH = 'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\ndata: [DONE]\n\n'


@pytest.mark.asyncio
async def test_standard_event_framing_is_read_and_a_body_that_does_not_decode_is_a_502(serve: Serve) -> None:
    # a byte order mark before the first field, one event's data on several lines (joined with "\n", as the SSE
    # spec says): both were 502s; a body its gzip Content-Encoding does not describe was a 500
    split = 'data: {"choices": [{"index": 0,\ndata: "delta": {"content": "two lines"}, "finish_reason": null}]}\n\n'
    framed = ("\ufeff" + delta_event("bom ") + "\n\n" + split + FINISH).encode()
    async with client_for(serve(chat_app(not_found_app, engine_on(serve, framed)))) as client:
        response = await client.post("/chat_stream", json={"user_input": "hi"})
        assert response.status_code == 200 and response.text == "bom two lines"
    gzip = [(b"content-encoding", b"gzip")]
    broken = engine_on(serve, b"not gzip at all", gzip)
    async with client_for(serve(chat_app(not_found_app, broken))) as client:
        response = await client.post("/chat_stream", json={"user_input": "hi"})
        assert "does not decode" in assert_json_error(response, 502, "upstream_protocol_error")["message"]
        await wait_for_load(client, running=0)


@pytest.mark.asyncio
async def test_a_finished_reply_is_not_held_by_an_upstream_that_keeps_its_stream_open(serve: Serve) -> None:
    # it waited the whole timeout for [DONE], then failed a complete reply with upstream_timeout; and a usage chunk
    # with "choices": null was a protocol error
    usage = 'data: {"choices": null, "usage": {"prompt_tokens": 5, "completion_tokens": 2}}\n\n'
    finished = delta_event("all done") + "\n\n" + FINISH.split("data: [DONE]")[0] + usage

    async def holding_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await not_found_app(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": finished.encode(), "more_body": True})
        while (await receive())["type"] != "http.disconnect":  # no [DONE], no end: until the front hangs up
            pass

    upstream = serve(holding_app)
    engine = OpenAIUpstreamEngine(f"{upstream.url}/v1", model="m", timeout=20.0)
    async with client_for(serve(chat_app(not_found_app, engine))) as client:
        started = time.monotonic()
        response = await client.post("/chat_stream", json={"user_input": "hi"}, headers={"accept": "text/event-stream"})
        assert time.monotonic() - started < 10
        events = sse_events(response.content)
        assert "".join(data["text"] for name, data in events if name == "delta") == "all done"
        done = [data for name, data in events if name == "done"][0]
        assert (done["finish_reason"], done["prompt_tokens"], done["completion_tokens"]) == ("stop", 5, 2)
        await wait_for_load(client, running=0)


@pytest.mark.asyncio
async def test_the_upstreams_cached_tokens_reach_the_usage_and_the_log(serve: Serve, caplog: Any) -> None:
    # prompt_tokens_details.cached_tokens (vLLM's and OpenAI's prefix cache) was dropped: usage and log said 0
    details = '"prompt_tokens_details": {"cached_tokens": 96}'
    usage = f'data: {{"choices": [], "usage": {{"prompt_tokens": 120, "completion_tokens": 2, {details}}}}}\n\n'
    body = (delta_event("two words") + "\n\n" + FINISH.split("data: [DONE]")[0] + usage + "data: [DONE]\n\n").encode()
    with caplog.at_level("INFO", logger="chatstream_asgi.requests"):
        async with client_for(serve(chat_app(not_found_app, engine_on(serve, body)))) as client:
            messages = [{"role": "user", "content": "hi"}]
            response = await client.post("/v1/chat/completions", json={"model": "m", "messages": messages})
    counts = response.json()["usage"]
    assert (counts["prompt_tokens"], counts["completion_tokens"]) == (120, 2)
    assert counts["prompt_tokens_details"] == {"cached_tokens": 96}
    logged = next(r.chatstream for r in caplog.records if getattr(r, "chatstream", None))
    assert logged["cached_tokens"] == 96


def engine_on(serve: Serve, body: bytes, headers: Sequence[tuple[bytes, bytes]] = ()) -> OpenAIUpstreamEngine:
    upstream = serve(scripted_upstream(200, b"text/event-stream", body, headers))
    return OpenAIUpstreamEngine(f"{upstream.url}/v1", model="m", timeout=2.0)


@pytest.mark.asyncio
async def test_sampling_and_api_key_reach_the_upstream(serve: Serve) -> None:
    seen: list[dict[str, Any]] = []

    async def recording_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await not_found_app(scope, receive, send)
            return
        seen.append({"headers": dict(scope["headers"]), "body": json.loads((await receive())["body"])})
        events = [delta_event("ok"), 'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "eos_token"}]}']
        body = "\n\n".join([*events, "data: [DONE]", ""]).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": body})

    upstream = serve(recording_app)
    options = {"api_key": "sk-up", "sampling_extensions": True, "extra_body": {"min_p": 0.1}}
    front = serve(chat_app(not_found_app, OpenAIUpstreamEngine(f"{upstream.url}/v1", model="big", **options)))
    async with client_for(front) as client:
        fields = {"temperature": 0.0, "top_k": 5, "seed": 3, "stop": ["x"], "max_new_tokens": 9}
        streamed = await chat(client, "hi", sse=True, **fields)
    assert streamed.status == 200 and "ok" in streamed.text and '"finish_reason": "stop"' in streamed.text
    body, headers = seen[0]["body"], seen[0]["headers"]
    assert headers[b"authorization"] == b"Bearer sk-up"
    assert body["model"] == "big" and body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert (body["temperature"], body["top_k"], body["seed"], body["stop"], body["max_tokens"]) == (0.0, 5, 3, ["x"], 9)
    assert body["min_p"] == 0.1 and body["messages"] == [{"role": "user", "content": "hi"}]


@pytest.fixture
def tiny_upstream_engine(tiny_model_dir: Path) -> Any:
    """The tiny random Llama in a TransformersEngine (skipped where that engine is missing)."""
    pytest.importorskip("chatstream_asgi.engines.transformers")
    from chatstream_asgi import TransformersEngine

    return TransformersEngine.from_pretrained(str(tiny_model_dir), max_batch_size=2)


@pytest.mark.asyncio
async def test_tiny_transformers_model_generates_upstream(serve: Serve, tiny_upstream_engine: Any) -> None:
    upstream = serve(chat_app(not_found_app, tiny_upstream_engine, max_concurrency=2))
    remote = OpenAIUpstreamEngine(f"{upstream.url}/v1", model=tiny_upstream_engine.model_name, sampling_extensions=True)
    front = serve(chat_app(not_found_app, remote, max_concurrency=2))
    fields = {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True}
    async with client_for(front) as client, client_for(upstream) as upstream_client:
        turns = [await chat(client, text, sse=True, **fields) for text in ("hello", "and again")]
        long_turn = {"user_input": "go on", "max_new_tokens": 400, "ignore_eos": True}
        async with client.stream("POST", "/chat_stream", json=long_turn) as response:
            await read_stream(response, max_chunks=2)  # then leave: the upstream sequence must stop
        await wait_for_load(upstream_client, running=0)
        await wait_for_load(client, running=0)
        history = (await client.get("/get_prompt")).json()["messages"]
    for turn in turns:
        done = [data for event, data in sse_events(turn.body) if event == "done"]
        assert turn.status == 200 and done, turn.text
        assert done[0]["completion_tokens"] == 8 and done[0]["finish_reason"] == "length"
        assert done[0]["prompt_tokens"] > 0  # counted by the upstream's tokenizer
    assert [m["content"] for m in history[:3:2]] == ["hello", "and again"]
