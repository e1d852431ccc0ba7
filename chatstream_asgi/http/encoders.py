"""How a streamed reply looks on the wire: plain text deltas (the default), server-sent events (when the client
``Accept``s them), or ChatStream 0.3's cumulative chunks (for its existing clients)."""

from __future__ import annotations

import json
from typing import Any, Literal, Protocol

from .asgi import error_body, header
from .types import Scope


class StreamEncoder(Protocol):
    content_type: bytes
    ping_interval: float | None

    def delta(self, text: str) -> bytes: ...
    def done(self, summary: dict[str, Any]) -> bytes: ...
    def error(self, error_type: str, message: str) -> bytes: ...
    def ping(self) -> bytes: ...


class PlainTextEncoder:
    """ChatStream-compatible: the body is the concatenation of the reply's text deltas."""

    content_type = b"text/plain; charset=utf-8"
    ping_interval: float | None = None

    def delta(self, text: str) -> bytes:
        return text.encode("utf-8")

    def done(self, summary: dict[str, Any]) -> bytes:
        return b""

    def error(self, error_type: str, message: str) -> bytes:
        return f"\n\n[error: {error_type}] {message}\n".encode()

    def ping(self) -> bytes:
        return b""


class SSEEncoder:
    """``event: delta`` / ``event: done`` / ``event: error`` server-sent events with JSON data."""

    content_type = b"text/event-stream; charset=utf-8"

    def __init__(self, ping_interval: float | None = 15.0) -> None:
        self.ping_interval = ping_interval

    def delta(self, text: str) -> bytes:
        # what event("delta", {"text": text}) renders, with only the text encoded (1.5 us instead of 2.9 a chunk)
        return b'event: delta\ndata: {"text": ' + json.dumps(text, ensure_ascii=False).encode() + b"}\n\n"

    def done(self, summary: dict[str, Any]) -> bytes:
        return self.event("done", summary)

    def error(self, error_type: str, message: str) -> bytes:
        return self.event("error", error_body(error_type, message))

    def ping(self) -> bytes:
        return b": ping\n\n"

    @staticmethod
    def event(name: str, data: dict[str, Any]) -> bytes:
        return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


class ChatStream03Encoder(PlainTextEncoder):
    """ChatStream 0.3's wire format, for its existing clients: every chunk is the whole reply so far followed by
    ``<::EOS::>`` (quadratic bytes; the marker lets a client that reads merged chunks find the latest reply).
    Unlike ChatStream, a chunk never holds U+FFFD for a split UTF-8 sequence: the engines emit whole characters."""

    MARKER = "<::EOS::>"

    def __init__(self) -> None:
        self.reply = ""

    def delta(self, text: str) -> bytes:
        self.reply += text
        return (self.reply + self.MARKER).encode("utf-8")


Wire = Literal["delta", "chatstream-0.3"]
WIRES: tuple[Wire, ...] = ("delta", "chatstream-0.3")


def choose_encoder(scope: Scope, ping_interval: float | None = 15.0, wire: Wire = "delta") -> StreamEncoder:
    """SSE when the client accepts it; otherwise ``wire``, unless the request names one in ``X-ChatStream-Wire``
    (the built-in page asks for ``delta``, so it also works where the server's default is ChatStream 0.3's)."""
    accept = (header(scope, b"accept") or "").lower()
    if "text/event-stream" in accept:
        return SSEEncoder(ping_interval)
    requested = (header(scope, b"x-chatstream-wire") or "").strip().lower()
    if requested in WIRES:
        wire = requested
    return ChatStream03Encoder() if wire == "chatstream-0.3" else PlainTextEncoder()
