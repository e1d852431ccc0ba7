"""The drain that SIGTERM/SIGINT start (``signals.py``), with real signals raised in this process.

A recording handler stands where the server's own would be (the real uvicorn is in
``tests/integration/test_drain_signal.py``); pytest-asyncio runs the loop in the main thread, where Python
delivers signals.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

import pytest

from chatstream_asgi import ChatStreamMiddleware, MockEngine
from chatstream_asgi.ops.signals import DrainOnSignals

from .apps import build_middleware, chat
from .asgi_fakes import SSE_HEADERS, RecordingSend, wait_until, with_hang_guard

LONG_REPLY = " ".join(["word"] * 400)


class ServerHandler:
    """Stands for the server's handler: records the signals that reach it."""

    def __init__(self) -> None:
        self.received: list[int] = []

    def __call__(self, sig: int, frame: FrameType | None) -> None:
        self.received.append(sig)


@pytest.fixture
def server_handler() -> Iterator[ServerHandler]:
    handler = ServerHandler()
    originals = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield handler
    finally:
        for sig, original in originals.items():
            signal.signal(sig, original)


class Lifespan:
    """Drives the middleware's lifespan: ``await startup()``, later ``await shutdown()``."""

    def __init__(self, app: ChatStreamMiddleware) -> None:
        self.messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.send = RecordingSend()
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}}
        self.task = asyncio.ensure_future(app(scope, self.receive, self.send))

    async def receive(self) -> dict[str, Any]:
        return await self.messages.get()

    async def startup(self) -> None:
        await self.messages.put({"type": "lifespan.startup"})
        await wait_until(lambda: any(m["type"] == "lifespan.startup.complete" for m in self.send.messages))

    async def shutdown(self) -> None:
        await self.messages.put({"type": "lifespan.shutdown"})
        await with_hang_guard(self.task)


async def no_drain() -> None:
    return None


def build(reply: str = LONG_REPLY, **options: Any) -> ChatStreamMiddleware:
    return build_middleware(MockEngine(reply, token_delay=0.01), **options)


async def streaming_then_signalled(app: ChatStreamMiddleware, sig: int) -> tuple[Lifespan, asyncio.Future[Any]]:
    """Start ``app``'s lifespan (our handlers chain onto the server's), open an SSE chat, raise ``sig`` while it
    streams, and return once the drain has begun, with the chat still running."""
    lifespan = Lifespan(app)
    await lifespan.startup()
    assert signal.getsignal(sig) == app.signals.handle
    running = asyncio.ensure_future(chat(app, headers=SSE_HEADERS))
    await wait_until(lambda: app.admission.running == 1)
    signal.raise_signal(sig)
    await wait_until(lambda: app.admission.draining)
    return lifespan, running


@pytest.mark.asyncio
async def test_sigterm_drains_at_once_and_reaches_the_server_only_after_it(server_handler: ServerHandler) -> None:
    app = build(drain_timeout=0.2)
    lifespan, running = await streaming_then_signalled(app, signal.SIGTERM)
    assert server_handler.received == []  # held while the stream has its grace
    refused = await chat(app)
    assert refused.status == 503 and refused.json()["error"]["type"] == "draining"
    events = (await running).sse_events()
    assert events[-1][0] == "error" and events[-1][1]["error"]["type"] == "draining"
    await wait_until(lambda: server_handler.received == [signal.SIGTERM])
    await lifespan.shutdown()  # joins the drain the signal started
    assert signal.getsignal(signal.SIGTERM) is server_handler and signal.getsignal(signal.SIGINT) is server_handler


@pytest.mark.asyncio
async def test_a_second_signal_passes_the_held_one_on_then_itself(server_handler: ServerHandler) -> None:
    app = build(" ".join(["word"] * 30), drain_timeout=5.0)
    lifespan, running = await streaming_then_signalled(app, signal.SIGINT)
    signal.raise_signal(signal.SIGINT)  # impatient: a second Ctrl+C must reach the server (uvicorn force-quits)
    assert server_handler.received == [signal.SIGINT, signal.SIGINT]
    assert (await running).sse_events()[-1][0] == "done"  # the drain goes on: the reply finished in its grace
    await lifespan.shutdown()
    assert server_handler.received == [signal.SIGINT, signal.SIGINT]  # each signal passed on exactly once


@pytest.mark.asyncio
async def test_a_second_sigterm_during_the_drain_is_the_same_request(server_handler: ServerHandler) -> None:
    app = build(drain_timeout=0.3)
    lifespan, running = await streaming_then_signalled(app, signal.SIGTERM)
    signal.raise_signal(signal.SIGTERM)  # a process-group kill: the worker's copy and the master's forwarded one
    assert server_handler.received == []  # still held: the stream keeps its grace
    events = (await running).sse_events()
    assert events[-1][0] == "error" and events[-1][1]["error"]["type"] == "draining"
    await wait_until(lambda: server_handler.received == [signal.SIGTERM])  # once, after the drain
    await lifespan.shutdown()
    assert server_handler.received == [signal.SIGTERM]


@pytest.mark.asyncio
async def test_drain_on_signals_false_leaves_the_handlers_alone(server_handler: ServerHandler) -> None:
    app = build(drain_on_signals=False)
    lifespan = Lifespan(app)
    await lifespan.startup()
    signal.raise_signal(signal.SIGTERM)
    assert server_handler.received == [signal.SIGTERM] and not app.admission.draining
    assert signal.getsignal(signal.SIGTERM) is server_handler
    await lifespan.shutdown()


@pytest.mark.asyncio
async def test_default_dispositions_are_not_chained(server_handler: ServerHandler) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # no server waiting to shut down gracefully: a kill stays a kill
    signals = DrainOnSignals(no_drain)
    assert signals.install()  # SIGINT only
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and signal.getsignal(signal.SIGINT) == signals.handle
    signals.uninstall()
    assert signal.getsignal(signal.SIGINT) is server_handler


def test_nothing_is_installed_off_the_main_thread(server_handler: ServerHandler) -> None:
    installed: list[bool] = []

    async def install() -> None:
        installed.append(DrainOnSignals(no_drain).install())

    thread = threading.Thread(target=asyncio.run, args=(install(),))
    thread.start()
    thread.join(5)
    assert installed == [False] and signal.getsignal(signal.SIGTERM) is server_handler


def test_a_signal_with_no_running_loop_passes_straight_on(server_handler: ServerHandler) -> None:
    signals = DrainOnSignals(no_drain)

    async def install() -> None:
        assert signals.install()

    asyncio.run(install())  # installed on a loop that is gone by now
    signal.raise_signal(signal.SIGTERM)
    assert server_handler.received == [signal.SIGTERM] and signals.task is None
    signals.uninstall()
