"""Real uvicorn servers on 127.0.0.1 in background threads, and what the integration tests share.

In the manner of uvicorn's own ``tests/utils.py``: the socket is bound here on port 0 (so the OS picks
a free port and there is no race between finding a port and binding it) and handed to ``Server.run``.
The server runs its own event loop in its own thread, so a test client on the test's loop measures
the server the way a remote client would. Errors logged by uvicorn or by chatstream_asgi while the
server runs (an exception in the app, a response that never completed) fail the test on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import httpx
import uvicorn

from chatstream_asgi import ChatStreamMiddleware, MockEngine
from chatstream_asgi.engines.base import ChatMessage, GenerationChunk, SamplingParams

START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
WATCHED_LOGGERS = ("uvicorn.error", "uvicorn.asgi", "chatstream_asgi")


class ErrorRecorder(logging.Handler):
    """Collects ERROR records so a test can fail on what the server only logged."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self) -> list[str]:
        return [self.format(record) for record in self.records]


class UvicornThread:
    """``with UvicornThread(app) as server:`` serves ``app`` at ``server.url`` until the block ends.

    Args:
        app: the ASGI application.
        fail_on_errors: raise on exit if the server logged an error (set False where a test provokes one).
        start_timeout: seconds for the lifespan startup (an engine process loads its model then).
        config: more ``uvicorn.Config`` options, e.g. ``root_path="/api"`` or ``lifespan="off"``.
    """

    def __init__(
        self, app: Any, *, fail_on_errors: bool = True, start_timeout: float = START_TIMEOUT, **config: Any
    ) -> None:
        self.start_timeout = start_timeout  # an app whose lifespan starts an engine process needs longer
        options: dict[str, Any] = {
            "log_config": None,  # leave the test process's logging alone
            "log_level": "warning",
            "lifespan": "on",
            "timeout_graceful_shutdown": 2,
            **config,
        }
        self.config = uvicorn.Config(app, **options)
        self.server = uvicorn.Server(self.config)
        self.fail_on_errors = fail_on_errors
        self.errors = ErrorRecorder()
        self.sock: socket.socket | None = None
        self.thread: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        # IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and
        # without it Nagle plus delayed ACKs add ~40 ms to every small response.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        for name in WATCHED_LOGGERS:
            logging.getLogger(name).addHandler(self.errors)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, name=f"uvicorn-{self.port}", daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive():
                self.stop()
                raise RuntimeError(f"uvicorn failed to start: {self.errors.messages()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"uvicorn did not start within {self.start_timeout} s")
            time.sleep(0.01)

    def stop(self) -> None:
        try:
            if self.thread is not None:
                self.server.should_exit = True
                self.thread.join(STOP_TIMEOUT)
                if self.thread.is_alive():  # a connection refused to close: stop waiting for it
                    self.server.force_exit = True
                    self.thread.join(STOP_TIMEOUT)
                assert not self.thread.is_alive(), "uvicorn did not stop"
        finally:
            for name in WATCHED_LOGGERS:
                logging.getLogger(name).removeHandler(self.errors)
            if self.sock is not None:
                self.sock.close()

    def __enter__(self) -> UvicornThread:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
        if exc_type is None and self.fail_on_errors:
            assert not self.errors.records, "the server logged errors:\n" + "\n".join(self.errors.messages())


# Engines and apps to serve.

SECRET_KEY = "integration-tests-secret-key-0123456789"


def words(count: int) -> str:
    """A reply of ``count`` mock tokens (the mock streams one word per token)."""
    return " ".join(f"w{i}" for i in range(count))


class RecordingEngine(MockEngine):
    """A ``MockEngine`` that records what it was asked and when it produced each text chunk."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.inputs: list[str] = []
        self.produced: list[float] = []  # time.monotonic() of each text chunk, all streams together

    async def stream(self, messages: Sequence[ChatMessage], params: SamplingParams) -> AsyncIterator[GenerationChunk]:
        self.inputs.append(messages[-1]["content"])
        # aclosing: closing this generator must close the mock's at once, or its ``cancelled`` counts late
        async with contextlib.aclosing(super().stream(messages, params)) as chunks:
            async for chunk in chunks:
                if chunk.text:
                    self.produced.append(time.monotonic())
                yield chunk


def chat_app(app: Any, engine: Any, **options: Any) -> ChatStreamMiddleware:
    options.setdefault("drain_timeout", 2.0)
    return ChatStreamMiddleware(app, engine=engine, secret_key=SECRET_KEY, **options)


async def not_found_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A wrapped app with no routes of its own (lifespan accepted, everything else 404)."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send({"type": "http.response.start", "status": 404, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"not found"})


# Client helpers shared by the integration tests: every wait below is bounded.

POLL_INTERVAL = 0.02


@dataclass
class Streamed:
    """A response read chunk by chunk, with the ``time.monotonic()`` at which each chunk arrived."""

    status: int
    headers: httpx.Headers
    chunks: list[bytes] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    def json(self) -> Any:
        return json.loads(self.body)


def chat_request(user_input: str, *, sse: bool = False, **fields: Any) -> dict[str, Any]:
    """Keyword arguments for ``client.stream(...)`` that post one chat turn."""
    headers = {"accept": "text/event-stream"} if sse else {}
    return {"method": "POST", "url": "/chat_stream", "json": {"user_input": user_input, **fields}, "headers": headers}


async def read_stream(response: httpx.Response, max_chunks: int | None = None) -> Streamed:
    """Read ``response`` as it arrives (``aiter_raw``: no decoding or re-chunking on the client side)."""
    streamed = Streamed(response.status_code, response.headers)
    async for chunk in response.aiter_raw():
        streamed.chunks.append(chunk)
        streamed.arrivals.append(time.monotonic())
        if max_chunks is not None and len(streamed.chunks) >= max_chunks:
            break
    return streamed


async def chat(client: httpx.AsyncClient, user_input: str, *, sse: bool = False, **fields: Any) -> Streamed:
    """Post one chat turn and read the whole reply."""
    async with client.stream(**chat_request(user_input, sse=sse, **fields)) as response:
        return await read_stream(response)


async def wait_until(condition: Callable[[], object], timeout: float = 5.0) -> None:
    """Poll ``condition`` until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"the condition did not hold within {timeout} s")
        await asyncio.sleep(POLL_INTERVAL)


async def get_load(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/get_load")
    assert response.status_code == 200, response.text
    load: dict[str, Any] = response.json()
    return load


async def wait_for_load(client: httpx.AsyncClient, timeout: float = 5.0, **expected: int) -> dict[str, Any]:
    """Poll ``/get_load`` until every field in ``expected`` has its value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        load = await get_load(client)
        if all(load[name] == value for name, value in expected.items()):
            return load
        if time.monotonic() > deadline:
            raise AssertionError(f"/get_load never reached {expected} within {timeout} s; last: {load}")
        await asyncio.sleep(POLL_INTERVAL)


def sse_events(body: bytes) -> list[tuple[str, Any]]:
    """``(event, data)`` for each server-sent event in ``body``; comments (pings) are skipped."""
    events = []
    for block in body.decode("utf-8").split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        fields = dict(line.split(": ", 1) for line in lines)
        events.append((fields.get("event", "message"), json.loads(fields["data"])))
    return events
