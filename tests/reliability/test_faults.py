"""Fault injection against real uvicorn servers on 127.0.0.1.

Each test breaks something (the engine, the client, the queue, Redis) and then checks the same
invariants: no slot or queue place leaked, no session left locked, every stored history well formed
(alternating turns, each reply a prefix of what the engine produces), and the server still serving.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatstream_asgi import ChatStreamMiddleware, MemoryHistoryStore, MockEngine
from tests.integration.servers import UvicornThread, chat_app, not_found_app, wait_until
from tests.redis_server import RedisServer, running_redis

pytestmark = pytest.mark.asyncio
WORDS = 30
REPLY = " ".join(f"w{i}" for i in range(WORDS))


def build(engine: MockEngine, store: Any = None, **options: Any) -> ChatStreamMiddleware:
    return chat_app(not_found_app, engine, history_store=store or MemoryHistoryStore(), **options)


async def assert_invariants(app: ChatStreamMiddleware, url: str, reply: str = REPLY) -> None:
    await wait_until(lambda: app.admission.running == 0 and app.admission.waiting == 0, timeout=10)
    await wait_until(lambda: not app.routes.active_sessions, timeout=5)
    store = app.routes.store
    if isinstance(store, MemoryHistoryStore):
        for session_id in list(store._entries):
            assert_well_formed(store.load_sync(session_id), reply)
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:  # still serving, on a fresh session
        response = await client.post("/chat_stream", json={"user_input": "still there?"})
        assert response.status_code == 200 and response.text == reply


def assert_well_formed(history: list[dict[str, str]], reply: str) -> None:
    assert [m["role"] for m in history] == ["user", "assistant"] * (len(history) // 2)
    for message in history[1::2]:
        assert message["content"] and reply.startswith(message["content"])


async def chat_and_leave(client: httpx.AsyncClient, chunks_before_leaving: int) -> None:
    """Post a chat and close the connection after reading some chunks (0: right after the headers)."""
    async with client.stream("POST", "/chat_stream", json={"user_input": "hi"}) as response:
        if chunks_before_leaving and response.status_code == 200:
            read = 0
            async for _ in response.aiter_raw():
                read += 1
                if read >= chunks_before_leaving:
                    break


async def test_engine_raising_mid_stream_ends_cleanly(serve: Callable[..., UvicornThread]) -> None:
    engine = MockEngine(REPLY, fail_after=5, token_delay=0.001)
    app = build(engine, max_concurrency=4, max_queue=20)
    server = serve(app, fail_on_errors=False)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        responses = await asyncio.gather(*(client.post("/chat_stream", json={"user_input": "hi"}) for _ in range(10)))
    for response in responses:
        assert response.status_code == 200 and "[error: generation_error]" in response.text
    engine.fail_after = None
    await assert_invariants(app, server.url)


async def test_random_disconnects_leak_nothing(serve: Callable[..., UvicornThread]) -> None:
    rng = random.Random(6)
    engine = MockEngine(REPLY, token_delay=0.003)
    app = build(engine, max_concurrency=3, max_queue=60)
    server = serve(app)
    clients = [httpx.AsyncClient(base_url=server.url, timeout=10) for _ in range(40)]
    try:
        await asyncio.gather(*(chat_and_leave(c, rng.randint(0, 12)) for c in clients))
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    await assert_invariants(app, server.url)
    assert engine.cancelled > 0  # some did leave mid-stream


def stalled_client(port: int) -> socket.socket:
    """A client that sends a chat request and then never reads a byte."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    body = b'{"user_input": "hi"}'
    head = "POST /chat_stream HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
    sock.sendall(f"{head}content-length: {len(body)}\r\n\r\n".encode() + body)
    return sock


async def test_a_client_that_stops_reading_is_dropped_after_the_send_timeout(
    serve: Callable[..., UvicornThread],
) -> None:
    big = " ".join(["x" * 40_000] * 200)  # ~8 MB in 200 tokens: far more than the socket buffers hold
    app = build(MockEngine(big), send_timeout=0.5)
    # ASGI cannot abort a response, so after giving up on the client uvicorn logs "returned without completing
    # response" and closes the connection itself: an expected log line here
    server = serve(app, fail_on_errors=False)
    sock = stalled_client(server.port)
    try:
        await wait_until(lambda: app.admission.running == 1, timeout=5)
        started = time.monotonic()
        await wait_until(lambda: app.admission.running == 0, timeout=10)
        assert time.monotonic() - started < 8
    finally:
        sock.close()
    await assert_invariants(app, server.url, big)


async def test_queue_timeouts_leave_the_queue_empty(serve: Callable[..., UvicornThread]) -> None:
    app = build(MockEngine(REPLY, token_delay=0.03), max_concurrency=1, max_queue=3, queue_timeout=0.2)
    server = serve(app)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        first = asyncio.ensure_future(client.post("/chat_stream", json={"user_input": "first"}))
        await wait_until(lambda: app.admission.running == 1)
        later = await asyncio.gather(*(client.post("/chat_stream", json={"user_input": "x"}) for _ in range(3)))
        assert [r.status_code for r in later] == [503] * 3
        assert all(r.json()["error"]["type"] == "queue_timeout" and r.headers["retry-after"] for r in later)
        assert (await first).text == REPLY
    await assert_invariants(app, server.url)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    yield from running_redis(tmp_path)


async def test_redis_killed_mid_stream(serve: Callable[..., UvicornThread], redis_server: RedisServer) -> None:
    from chatstream_asgi.sessions.redis_store import RedisHistoryStore

    store = RedisHistoryStore(redis_server.url, timeout=1.0)
    app = build(MockEngine(REPLY, token_delay=0.02), store, max_concurrency=4)
    server = serve(app, fail_on_errors=False)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        streams = [asyncio.ensure_future(client.post("/chat_stream", json={"user_input": "hi"})) for _ in range(4)]
        await wait_until(lambda: app.admission.running == 4)
        redis_server.kill()
        for response in await asyncio.gather(*streams):
            assert response.status_code == 200 and "history_unavailable" in response.text  # saving failed, in-band
        down = await client.post("/chat_stream", json={"user_input": "hi"})
        assert down.status_code == 503 and down.json()["error"]["type"] == "history_unavailable"
    assert app.admission.running == 0 and not app.routes.active_sessions
    redis_server.start()
    await assert_invariants(app, server.url)
