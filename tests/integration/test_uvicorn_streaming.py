"""The chat routes on a real uvicorn, driven by a real ``httpx.AsyncClient``: streaming, sessions,
admission control and disconnects, measured on the wire (in-process test clients buffer whole bodies
and never disconnect, so they hide exactly these bugs)."""

from __future__ import annotations

import asyncio
import random
import socket
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from chatstream_asgi import HistoryStoreError, MemoryHistoryStore

from .servers import (
    RecordingEngine,
    Streamed,
    UvicornThread,
    chat,
    chat_app,
    chat_request,
    get_load,
    not_found_app,
    read_stream,
    sse_events,
    wait_for_load,
    wait_until,
    words,
)

ChatServer = Callable[..., tuple[UvicornThread, RecordingEngine]]
TOKEN_DELAY = 0.05


def client_for(server: UvicornThread, **options: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.url, timeout=10.0, **options)


async def started_stream(client: httpx.AsyncClient, user_input: str, **kwargs: Any) -> httpx.Response:
    """Send a chat request and return once its response headers arrived (the body is still streaming)."""
    request = client.build_request(**chat_request(user_input, **kwargs))
    return await client.send(request, stream=True)


def assert_streamed(streamed: Streamed, engine: RecordingEngine) -> None:
    assert len(streamed.chunks) > 1, f"the reply arrived in one piece: {streamed.chunks!r}"
    assert streamed.arrivals[0] < engine.produced[-1], "the first chunk arrived only after the last was produced"


def assert_json_error(response: httpx.Response, status: int, error_type: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["type"] == error_type


# Streaming


@pytest.mark.asyncio
async def test_plain_text_reply_streams_chunk_by_chunk(chat_server: ChatServer) -> None:
    server, engine = chat_server({"reply": words(12), "token_delay": TOKEN_DELAY})
    async with client_for(server) as client:
        streamed = await chat(client, "hi")
    assert streamed.status == 200
    assert streamed.headers["content-type"] == "text/plain; charset=utf-8"
    assert streamed.headers["cache-control"] == "no-store"
    assert streamed.text == words(12)
    assert_streamed(streamed, engine)


@pytest.mark.asyncio
async def test_sse_reply_streams_delta_events_then_done(chat_server: ChatServer) -> None:
    server, engine = chat_server({"reply": words(12), "token_delay": TOKEN_DELAY})
    async with client_for(server) as client:
        streamed = await chat(client, "hi", sse=True)
    assert streamed.status == 200
    assert streamed.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert streamed.headers["x-accel-buffering"] == "no"
    events = sse_events(streamed.body)
    assert [name for name, _ in events] == ["delta"] * 12 + ["done"]
    assert "".join(data["text"] for name, data in events if name == "delta") == words(12)
    assert events[-1][1]["finish_reason"] == "stop"
    assert events[-1][1]["completion_tokens"] == 12
    assert_streamed(streamed, engine)


@pytest.mark.asyncio
async def test_engine_failure_mid_stream_ends_with_in_band_error_and_frees_the_slot(chat_server: ChatServer) -> None:
    server, _ = chat_server({"reply": words(10), "fail_after": 3}, max_concurrency=1, max_queue=0)
    async with client_for(server) as client:
        streamed = await chat(client, "hi", sse=True)
        assert streamed.status == 200
        names = [name for name, _ in sse_events(streamed.body)]
        assert names == ["delta", "delta", "delta", "error"]
        assert (await chat(client, "again", sse=True)).status == 200  # the only slot was given back


# Sessions


@pytest.mark.asyncio
async def test_session_cookie_carries_history_across_turns(chat_server: ChatServer) -> None:
    server, _ = chat_server({"replies": ["first reply", "second reply"]})
    async with client_for(server) as client:
        first = await chat(client, "one")
        assert first.status == 200
        assert "chatstream_session=" in first.headers["set-cookie"]
        assert "HttpOnly" in first.headers["set-cookie"]
        assert "Secure" not in first.headers["set-cookie"]
        assert client.cookies.get("chatstream_session")

        prompt = (await client.get("/get_prompt")).json()
        assert prompt["messages"] == [
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "first reply"},
        ]
        second = await chat(client, "two")
        assert second.status == 200
        assert "set-cookie" not in second.headers  # the session goes on: no new cookie
        prompt = (await client.get("/get_prompt")).json()
        assert [m["content"] for m in prompt["messages"]] == ["one", "first reply", "two", "second reply"]
        assert "first reply" in prompt["prompt"] and "second reply" in prompt["prompt"]
        async with client_for(server) as stranger:  # no cookie: not this session
            assert (await stranger.get("/get_prompt")).json()["messages"] == []

        assert (await client.post("/clear_context")).json() == {"cleared": True}
        assert (await client.get("/get_prompt")).json()["messages"] == []


@pytest.mark.asyncio
async def test_second_concurrent_turn_of_one_session_gets_409(chat_server: ChatServer) -> None:
    def reply(messages: Any) -> str:
        return words(20) if messages[-1]["content"] == "long one" else "short"

    server, _ = chat_server({"reply": reply, "token_delay": TOKEN_DELAY})
    async with client_for(server) as client:
        assert (await chat(client, "start a session")).status == 200
        first = await started_stream(client, "long one")
        try:
            second = await client.post("/chat_stream", json={"user_input": "meanwhile"})
            assert_json_error(second, 409, "turn_in_progress")
            assert (await read_stream(first)).text == words(20)
        finally:
            await first.aclose()
        assert (await chat(client, "after")).status == 200  # the session is free again
        messages = (await client.get("/get_prompt")).json()["messages"]
        assert [m["content"] for m in messages if m["role"] == "user"] == ["start a session", "long one", "after"]


class SlowSaveStore(MemoryHistoryStore):
    async def save(self, session_id: str, messages: Any) -> None:
        await asyncio.sleep(0.1)
        await super().save(session_id, messages)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("outcome", "engine", "options", "rounds"),
    [
        ("done", {"reply": words(3)}, {}, 2),
        ("timeout", {"reply": words(40), "token_delay": 0.02}, {"generation_timeout": 0.1}, 2),
        ("error", {"reply": words(5), "fail_after": 2}, {}, 30),  # no save to slow down: a narrow race, repeat
    ],
)
async def test_a_turn_has_ended_when_the_client_sees_the_end_of_its_reply(
    chat_server: ChatServer, outcome: str, engine: dict[str, Any], options: dict[str, Any], rounds: int
) -> None:
    # The slow store widens the window in which the server could still be ending a turn after its last byte.
    server, _ = chat_server(engine, max_concurrency=1, max_queue=0, history_store=SlowSaveStore(), **options)
    async with client_for(server) as client:
        for _ in range(rounds):
            first = await chat(client, "one", sse=True)
            events = sse_events(first.body)
            assert first.status == 200 and events[-1][0] == ("done" if outcome == "done" else "error")
            assert (await get_load(client))["running"] == 0, "the slot was still held"
            sent = "".join(data["text"] for name, data in events if name == "delta")
            saved = (await client.get("/get_prompt")).json()["messages"]
            assert saved == ([] if outcome == "error" else [user("one"), assistant(sent)])
            clear = await client.post("/clear_context")
            assert clear.status_code == 200, "the session was still busy"


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


class FailingSaveStore(MemoryHistoryStore):
    async def save(self, session_id: str, messages: Any) -> None:
        raise HistoryStoreError("store down")


@pytest.mark.asyncio
async def test_history_store_failure_after_a_complete_reply_is_reported_in_band(chat_server: ChatServer) -> None:
    server, _ = chat_server({"reply": words(5)}, history_store=FailingSaveStore())
    async with client_for(server) as client:
        streamed = await chat(client, "hi", sse=True)
    assert streamed.status == 200
    events = sse_events(streamed.body)
    assert [name for name, _ in events] == ["delta"] * 5 + ["error"]
    assert events[-1][1]["error"]["type"] == "history_unavailable"


@pytest.mark.asyncio
async def test_history_store_failure_after_a_timed_out_reply_sends_nothing_more(chat_server: ChatServer) -> None:
    # The server must not try a second response on a finished one (the server fixture fails on logged errors).
    server, _ = chat_server(
        {"reply": words(20), "token_delay": TOKEN_DELAY}, history_store=FailingSaveStore(), generation_timeout=0.2
    )
    async with client_for(server) as client:
        streamed = await chat(client, "hi", sse=True)
        assert (await get_load(client))["running"] == 0
    names = [name for name, _ in sse_events(streamed.body)]
    assert streamed.status == 200 and names[-1] == "error" and "delta" in names
    assert sse_events(streamed.body)[-1][1]["error"]["type"] == "generation_timeout"


@pytest.mark.asyncio
async def test_shutdown_lets_a_running_stream_finish_then_closes_the_engine(chat_server: ChatServer) -> None:
    server, engine = chat_server({"reply": words(12), "token_delay": TOKEN_DELAY})
    async with client_for(server) as client:
        response = await started_stream(client, "hi")
        try:
            chunks = response.aiter_raw()
            received = [await anext(chunks)]
            stopping = asyncio.create_task(asyncio.to_thread(server.stop))  # what Ctrl-C does
            received += [chunk async for chunk in chunks]
        finally:
            await response.aclose()
        await stopping
    assert b"".join(received).decode() == words(12)
    assert engine.cancelled == 0 and not engine.ready


# Admission


@pytest.mark.asyncio
async def test_burst_admits_concurrency_plus_queue_and_rejects_the_rest_at_once(chat_server: ChatServer) -> None:
    server, engine = chat_server({"reply": words(10), "token_delay": TOKEN_DELAY}, max_concurrency=2, max_queue=3)

    async def one(index: int) -> tuple[Streamed, float]:
        began = time.monotonic()
        streamed = await chat(client, f"request {index}")
        return streamed, streamed.arrivals[-1] - began

    async with client_for(server) as client:
        results = await asyncio.gather(*(one(i) for i in range(8)))
        assert await wait_for_load(client, running=0, waiting=0)
    served = [s for s, _ in results if s.status == 200]
    rejected = [(s, took) for s, took in results if s.status != 200]
    assert len(served) == 5 and len(rejected) == 3, [s.status for s, _ in results]
    for streamed, took in rejected:
        assert streamed.status == 429
        assert streamed.headers["content-type"] == "application/json"
        assert streamed.json()["error"]["type"] == "queue_full"
        assert int(streamed.headers["retry-after"]) >= 1
        assert took < 10 * TOKEN_DELAY, f"a rejection took {took:.2f} s: it waited instead of failing fast"
    positions = sorted(int(s.headers["x-queue-position"]) for s in served if "x-queue-position" in s.headers)
    assert positions == [1, 2, 3]
    assert all(s.text == words(10) for s in served)
    assert len(engine.inputs) == 5


@pytest.mark.asyncio
async def test_a_client_never_finds_the_slot_of_its_own_finished_reply_busy(chat_server: ChatServer) -> None:
    # One slot, no queue: strictly sequential requests must all be served (the race is narrow: repeat).
    server, _ = chat_server({"reply": "short reply"}, max_concurrency=1, max_queue=0)
    statuses = []
    async with client_for(server) as client:
        for _ in range(200):
            statuses.append((await chat(client, "again")).status)
            client.cookies.clear()  # a new session each time: this is about the slot, not the session
    assert statuses == [200] * 200, f"{statuses.count(429)} of 200 sequential requests got 429"


@pytest.mark.asyncio
async def test_queue_timeout_returns_503_with_retry_after(chat_server: ChatServer) -> None:
    server, engine = chat_server(
        {"reply": words(20), "token_delay": TOKEN_DELAY}, max_concurrency=1, max_queue=1, queue_timeout=0.3
    )
    async with client_for(server) as client, client_for(server) as other:
        running = await started_stream(client, "holds the slot")
        try:
            began = time.monotonic()
            waited = await other.post("/chat_stream", json={"user_input": "waits"})
            took = time.monotonic() - began
            assert_json_error(waited, 503, "queue_timeout")
            assert int(waited.headers["retry-after"]) >= 1
            assert 0.25 < took < 0.9, f"the 503 came after {took:.2f} s, not after queue_timeout=0.3 s"
            assert (await get_load(client))["waiting"] == 0
        finally:
            await running.aclose()
    assert engine.inputs == ["holds the slot"]


# Disconnects


@pytest.mark.asyncio
async def test_disconnect_mid_stream_cancels_generation_and_frees_the_slot(chat_server: ChatServer) -> None:
    server, engine = chat_server({"reply": words(40), "token_delay": TOKEN_DELAY}, max_concurrency=1)
    async with client_for(server) as client:
        response = await started_stream(client, "hi")
        first = await read_stream(response, max_chunks=1)
        assert first.chunks and (await get_load(client))["running"] == 1
        await response.aclose()  # unread body: httpx closes the connection
        closed_at = time.monotonic()
        await wait_for_load(client, timeout=1.0, running=0)
        freed_after = time.monotonic() - closed_at
    assert engine.cancelled == 1 and engine.running == 0
    assert len(engine.produced) < 40, "the generation ran to the end after the client left"
    assert freed_after < 0.5, f"the slot was freed {freed_after:.2f} s after the disconnect"


@pytest.mark.asyncio
async def test_client_that_stops_reading_is_dropped_after_send_timeout(chat_server: ChatServer) -> None:
    # 16 MB of reply, more than the socket buffers hold (4 MB at most here): once the client stops reading,
    # the server's send blocks.
    big_reply = " ".join(["x" * 4000] * 4000)
    server, engine = chat_server({"reply": big_reply}, max_concurrency=1, send_timeout=0.3)
    server.fail_on_errors = False  # uvicorn logs the response it had to abort; checked below
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        body = b'{"user_input": "hi", "max_new_tokens": 4000}'
        writer.write(
            b"POST /chat_stream HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        reader._transport.pause_reading()  # type: ignore[attr-defined]  # stop reading; keep the connection open
        async with client_for(server) as client:
            await wait_for_load(client, timeout=5.0, running=0)
    finally:
        writer.transport.abort()
    assert engine.cancelled == 1 and engine.running == 0
    assert len(engine.produced) < 4000, "the whole reply was sent: the test proves nothing"
    assert [r.getMessage() for r in server.errors.records] in (
        [],
        ["ASGI callable returned without completing response."],
    )


@pytest.mark.asyncio
async def test_client_that_leaves_while_queued_leaves_the_queue(chat_server: ChatServer) -> None:
    server, engine = chat_server({"reply": words(10), "token_delay": TOKEN_DELAY}, max_concurrency=1, max_queue=1)
    async with client_for(server) as client, client_for(server) as other, client_for(server) as third:
        running = await started_stream(client, "holds the slot")
        queued = asyncio.create_task(other.post("/chat_stream", json={"user_input": "gives up"}))
        await wait_for_load(client, waiting=1)
        queued.cancel()  # closes its connection while it waits for a slot
        await asyncio.gather(queued, return_exceptions=True)
        await wait_for_load(client, timeout=1.0, waiting=0)
        # the queue place is free again: this one is admitted, and gets the slot once the first finishes
        nxt = await chat(third, "next")
        assert (await read_stream(running)).text == words(10)
    assert nxt.status == 200 and nxt.text == words(10)
    assert engine.inputs == ["holds the slot", "next"]


async def abandon_raw(server: UvicornThread, sent: bytes) -> None:
    """Open a raw connection, send part of a request, then close it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(sent)
    await writer.drain()
    writer.transport.abort()
    await asyncio.sleep(0)
    del reader


@pytest.mark.asyncio
async def test_hammer_with_random_disconnects_leaves_no_slot_or_queue_place_behind(chat_server: ChatServer) -> None:
    server, engine = chat_server(
        {"reply": words(8), "token_delay": 0.02}, max_concurrency=2, max_queue=3, queue_timeout=2.0
    )
    rng = random.Random(20240601)
    partial_request = (
        b"POST /chat_stream HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        b'content-length: 100\r\n\r\n{"user_input": '
    )
    statuses: list[int] = []

    async def one(index: int) -> None:
        async with client_for(server) as client:  # one client each: one session each
            await one_with(index, client)

    async def one_with(index: int, client: httpx.AsyncClient) -> None:
        await asyncio.sleep(rng.uniform(0, 0.3))
        mode = rng.choice(["complete", "read_some", "cancel", "raw"])
        if mode == "raw":
            await abandon_raw(server, partial_request)
            return
        if mode == "cancel":
            task = asyncio.create_task(chat(client, f"hammer {index}"))
            await asyncio.sleep(rng.uniform(0, 0.3))
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return
        async with client.stream(**chat_request(f"hammer {index}", sse=rng.random() < 0.5)) as response:
            statuses.append(response.status_code)
            await read_stream(response, max_chunks=rng.randint(1, 3) if mode == "read_some" else None)

    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(40))), timeout=20)
    async with client_for(server) as client:
        await wait_for_load(client, timeout=3.0, running=0, waiting=0)
        assert engine.running == 0
        assert set(statuses) <= {200, 429, 503}, statuses
        fresh = await chat(client, "still alive")
    assert fresh.status == 200 and fresh.text == words(8)


# The host app keeps its latency


def ping_app() -> Starlette:
    async def ping(request: Request) -> PlainTextResponse:
        return PlainTextResponse("pong")

    return Starlette(routes=[Route("/ping", ping)])


async def ping_latencies(
    client: httpx.AsyncClient, count: int, *, seconds: float = 30.0, while_running: Sequence[asyncio.Task[Any]] = ()
) -> list[float]:
    """Time up to ``count`` sequential GET /ping, for at most ``seconds``, while all of ``while_running`` runs."""
    deadline = time.monotonic() + seconds
    latencies = []
    for _ in range(count):
        if time.monotonic() > deadline or any(task.done() for task in while_running):
            break
        began = time.perf_counter()
        response = await client.get("/ping")
        latencies.append(time.perf_counter() - began)
        assert response.status_code == 200 and response.text == "pong"
    return latencies


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98]


@pytest.mark.asyncio
async def test_a_passthrough_endpoint_stays_fast_while_max_concurrency_chats_stream(
    serve: Callable[..., UvicornThread], chat_engine_factory: Callable[..., Any]
) -> None:
    engine = chat_engine_factory(max_batch_size=2, device="cpu")
    server = serve(chat_app(ping_app(), engine, max_concurrency=2, max_queue=0))
    chat_fields = {"max_new_tokens": 480, "ignore_eos": True, "temperature": 0}  # the tiny model's context is 512
    received = [0, 0]

    async def stream_chat(index: int) -> None:
        async with client_for(server) as chats, chats.stream(**chat_request(f"story {index}", **chat_fields)) as r:
            assert r.status_code == 200, await r.aread()
            async for _ in r.aiter_raw():
                received[index] += 1

    async with client_for(server) as client:
        await ping_latencies(client, 20)  # warm up the connection
        idle = await ping_latencies(client, 200)
        streams = [asyncio.create_task(stream_chat(index)) for index in range(2)]
        try:
            await wait_until(lambda: all(received) or any(task.done() for task in streams), timeout=30)
            before = list(received)
            busy = await ping_latencies(client, 2000, seconds=2.0, while_running=streams)
            after = list(received)
            for task in streams:  # a stream that ended early failed: show why
                if task.done():
                    task.result()
        finally:
            for task in streams:
                task.cancel()
            await asyncio.gather(*streams, return_exceptions=True)
        await wait_for_load(client, running=0)
    figures = (
        f"idle: n={len(idle)} median={statistics.median(idle) * 1e3:.2f} ms p99={p99(idle) * 1e3:.2f} ms; "
        f"2 chats streaming: n={len(busy)} median={statistics.median(busy) * 1e3:.2f} ms "
        f"p99={p99(busy) * 1e3:.2f} ms max={max(busy) * 1e3:.2f} ms; chunks during the polls: "
        f"{[a - b for a, b in zip(after, before, strict=True)]}"
    )
    print(f"\npassthrough latency: {figures}")
    assert all(before) and all(a > b for a, b in zip(after, before, strict=True)), (
        f"the chats did not stream: {figures}"
    )
    assert len(busy) >= 50, f"too few polls while the chats streamed to measure anything: {figures}"
    assert p99(busy) <= p99(idle) * 10 + 0.050, f"the event loop was blocked while chats streamed: {figures}"


@pytest.mark.asyncio
async def test_a_prompt_that_cannot_fit_the_context_is_a_client_error(
    serve: Callable[..., UvicornThread], chat_engine_factory: Callable[..., Any]
) -> None:
    server = serve(chat_app(ping_app(), chat_engine_factory(max_batch_size=1, device="cpu")))
    async with client_for(server) as client:
        response = await client.post("/chat_stream", json={"user_input": "hi", "max_new_tokens": 4000})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "prompt_too_long"


@pytest.mark.asyncio
async def test_a_cors_middleware_around_the_chat_lets_another_origins_page_stream(serve: Any) -> None:
    # as docs/security.md shows: the CORS middleware wraps the chat middleware, the same origins in allowed_origins
    from starlette.middleware.cors import CORSMiddleware

    site = "https://app.example.com"
    chat = chat_app(not_found_app, RecordingEngine(reply=words(5), token_delay=0.01), allowed_origins=[site])
    server = serve(CORSMiddleware(chat, allow_origins=[site], allow_credentials=True, allow_methods=["GET", "POST"]))
    async with client_for(server) as client:
        preflight = await client.options(
            "/chat_stream",
            headers={
                "Origin": site,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        )
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == site
        headers = {"Origin": site, "Sec-Fetch-Site": "cross-site"}
        async with client.stream("POST", "/chat_stream", json={"user_input": "hi"}, headers=headers) as response:
            body = (await response.aread()).decode()
        assert response.status_code == 200 and body == words(5)
        assert response.headers["access-control-allow-origin"] == site
        assert response.headers["access-control-allow-credentials"] == "true"
        other = await client.post(
            "/chat_stream", json={"user_input": "hi"}, headers={**headers, "Origin": "https://x.example"}
        )
        assert other.status_code == 403  # CORS lets the browser read; the CSRF check still decides who may post
