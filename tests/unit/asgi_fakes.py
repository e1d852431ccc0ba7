"""Raw ASGI fakes for unit tests: no server, no framework, no test client.

- ``ScriptedReceive``: ``receive()`` that hands out scripted messages in order. When the script runs
  out it either raises ``ReceiveWouldHang`` (a real server would block forever there) or, with
  ``wait_for_disconnect=True``, blocks like a real server until ``disconnect()`` is called and then
  returns ``http.disconnect``.
- ``RecordingSend``: ``send()`` that records every message and checks the HTTP response protocol
  (one ``http.response.start``, then bodies, nothing after ``more_body=False``; each message with every key
  asgiref's TypedDict for it requires). A ``hook`` runs after
  each message (e.g. to disconnect after the second chunk) and ``block`` makes body sends wait, to
  play a client that stopped reading.
- ``RecordingApp``: the wrapped app; records what it was called with and answers ``http`` with 200,
  ``lifespan`` by completing startup and shutdown.
- ``with_hang_guard``: awaits with a timeout so a hang fails the test instead of stalling the run.
- Builders: ``http_scope``, ``request_messages``, ``json_body``, ``lifespan_script``; ``wait_until`` polls a
  condition with a hang guard.

Typical use::

    receive = ScriptedReceive(request_messages(b'{"user_input": "hi"}'), wait_for_disconnect=True)
    send = RecordingSend()
    await with_hang_guard(app(http_scope("POST", "/chat_stream", headers=JSON_HEADERS), receive, send))
    assert send.status == 200 and send.complete
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from asgiref.typing import HTTPResponseBodyEvent, HTTPResponseStartEvent

from tests.integration.servers import sse_events as parse_sse

Message = dict[str, Any]
Headers = list[tuple[bytes, bytes]]

#: seconds any single ASGI call in a unit test may take before it counts as hung.
HANG_GUARD_SECONDS = 5.0
DISCONNECT: Message = {"type": "http.disconnect"}
JSON_HEADERS: Headers = [(b"content-type", b"application/json")]
SSE_HEADERS: Headers = [(b"content-type", b"application/json"), (b"accept", b"text/event-stream")]


RESPONSE_EVENTS: dict[str, Any] = {
    "http.response.start": HTTPResponseStartEvent,
    "http.response.body": HTTPResponseBodyEvent,
}


class ReceiveWouldHang(AssertionError):
    """``receive()`` was called after the script ran out, where a real server would block forever."""


class ProtocolViolation(AssertionError):
    """The app sent ASGI messages out of order (a second start, a body before start, data after the end)."""


def http_scope(
    method: str = "GET",
    path: str = "/",
    *,
    headers: Iterable[tuple[bytes, bytes]] = (),
    root_path: str = "",
    query_string: bytes = b"",
) -> dict[str, Any]:
    """An ``http`` scope as an ASGI server builds it (``path`` includes ``root_path``)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": root_path,
        "query_string": query_string,
        "headers": list(headers),
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


def request_messages(body: bytes = b"", chunk_size: int | None = None) -> list[Message]:
    """The ``http.request`` messages of ``body``, in one message or in chunks of ``chunk_size`` bytes."""
    if chunk_size is None or len(body) <= chunk_size:
        return [{"type": "http.request", "body": body, "more_body": False}]
    pieces = [body[i : i + chunk_size] for i in range(0, len(body), chunk_size)]
    return [{"type": "http.request", "body": p, "more_body": i < len(pieces) - 1} for i, p in enumerate(pieces)]


def json_body(payload: Any) -> bytes:
    return json.dumps(payload).encode()


class ScriptedReceive:
    """``receive()`` returning ``messages`` in order; then blocks for ``disconnect()`` or raises.

    Args:
        messages: what the client sends, in order (``http.request`` chunks, ``http.disconnect``, ...).
        wait_for_disconnect: after the script, block until ``disconnect()`` and then return
            ``http.disconnect`` (forever after); without it, a further call raises ``ReceiveWouldHang``.
    """

    def __init__(self, messages: Iterable[Message] = (), *, wait_for_disconnect: bool = False) -> None:
        self.script = list(messages)
        self.wait_for_disconnect = wait_for_disconnect
        self.calls = 0
        self.disconnected = asyncio.Event()

    def disconnect(self) -> None:
        """Play the client leaving: a blocked or later ``receive()`` returns ``http.disconnect``."""
        self.disconnected.set()

    async def __call__(self) -> Message:
        self.calls += 1
        if self.script:
            return self.script.pop(0)
        if not self.wait_for_disconnect:
            raise ReceiveWouldHang(f"receive() call #{self.calls} after the script ran out would block forever")
        await self.disconnected.wait()
        return dict(DISCONNECT)


class RecordingSend:
    """``send()`` that records messages and enforces the HTTP response message order.

    Args:
        hook: called with this ``RecordingSend`` after each recorded message; may be async.
        block: while this event is unset, every ``http.response.body`` send waits for it (a client
            that stopped reading); the message is recorded only once it goes through.
    """

    def __init__(
        self,
        hook: Callable[[RecordingSend], Awaitable[None] | None] | None = None,
        block: asyncio.Event | None = None,
    ) -> None:
        self.messages: list[Message] = []
        self.hook = hook
        self.block = block

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.body" and self.block is not None:
            await self.block.wait()
        self.check_order(message)
        self.messages.append(message)
        if self.hook is not None:
            outcome = self.hook(self)
            if outcome is not None:
                await outcome

    def check_order(self, message: Message) -> None:
        kind = message["type"]
        shape = RESPONSE_EVENTS.get(kind)  # lifespan messages are recorded too, unchecked
        missing = shape.__required_keys__ - message.keys() if shape is not None else set()
        if missing:
            raise ProtocolViolation(f"{kind} without {sorted(missing)}: {message}")
        if kind == "http.response.start" and self.started:
            raise ProtocolViolation(f"second http.response.start after {self.messages[0]}")
        if kind == "http.response.body" and not self.started:
            raise ProtocolViolation("http.response.body before http.response.start")
        if self.complete:
            raise ProtocolViolation(f"{kind} after the response body ended")

    @property
    def started(self) -> bool:
        return any(m["type"] == "http.response.start" for m in self.messages)

    @property
    def complete(self) -> bool:
        """True once a body message with ``more_body`` false was sent."""
        return any(m["type"] == "http.response.body" and not m.get("more_body", False) for m in self.messages)

    @property
    def start(self) -> Message:
        starts = [m for m in self.messages if m["type"] == "http.response.start"]
        assert starts, f"no http.response.start was sent; got {self.messages}"
        return starts[0]

    @property
    def status(self) -> int:
        status: int = self.start["status"]
        return status

    @property
    def headers(self) -> Headers:
        return [(bytes(k), bytes(v)) for k, v in self.start.get("headers", [])]

    def header_values(self, name: str) -> list[str]:
        """Every value of response header ``name`` (any case), decoded as latin-1."""
        key = name.lower().encode("latin-1")
        return [v.decode("latin-1") for k, v in self.headers if k.lower() == key]

    def header(self, name: str) -> str | None:
        values = self.header_values(name)
        assert len(values) <= 1, f"header {name!r} sent {len(values)} times: {values}"
        return values[0] if values else None

    @property
    def body_chunks(self) -> list[bytes]:
        """The non-empty body chunks, in order."""
        return [m.get("body", b"") for m in self.messages if m["type"] == "http.response.body" and m.get("body")]

    @property
    def body(self) -> bytes:
        return b"".join(self.body_chunks)

    def json(self) -> Any:
        return json.loads(self.body)

    def sse_events(self) -> list[tuple[str, Any]]:
        """``(event, data)`` pairs of an SSE body; comments (pings) are skipped, data is JSON-decoded."""
        return parse_sse(self.body)


class RecordingApp:
    """The wrapped ASGI app: records each call and answers like a small real app.

    ``http`` gets ``200 text/plain`` ``b"app"``; ``lifespan`` completes startup and shutdown (recording
    the messages it received); ``websocket`` is only recorded.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, Any], Any, Any]] = []
        self.lifespan_messages: list[Message] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.calls.append((scope, receive, send))
        if scope["type"] == "http":
            headers = [(b"content-type", b"text/plain"), (b"content-length", b"3")]
            await send({"type": "http.response.start", "status": 200, "headers": headers, "trailers": False})
            await send({"type": "http.response.body", "body": b"app", "more_body": False})
        elif scope["type"] == "lifespan":
            while True:
                message = await receive()
                self.lifespan_messages.append(message)
                phase = message["type"].rsplit(".", 1)[-1]
                await send({"type": f"lifespan.{phase}.complete"})
                if phase == "shutdown":
                    return


async def with_hang_guard(awaitable: Awaitable[Any], seconds: float = HANG_GUARD_SECONDS) -> Any:
    """Await ``awaitable``; a hang longer than ``seconds`` fails the test with a clear message."""
    try:
        return await asyncio.wait_for(awaitable, seconds)
    except TimeoutError:
        raise AssertionError(f"hung: the ASGI call did not finish within {seconds} s") from None


async def wait_until(condition: Callable[[], bool], seconds: float = HANG_GUARD_SECONDS) -> None:
    """Yield to the loop until ``condition()`` holds; fail after ``seconds``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {seconds} s")
        await asyncio.sleep(0.001)


def lifespan_script(phases: Sequence[str] = ("startup", "shutdown")) -> list[Message]:
    return [{"type": f"lifespan.{phase}"} for phase in phases]
