"""Unit tests for ``chatstream_asgi.http.encoders``: what each wire format writes, and which one a request gets."""

from __future__ import annotations

import json
from typing import Any

import pytest

from chatstream_asgi.http.encoders import ChatStream03Encoder, PlainTextEncoder, SSEEncoder, choose_encoder

from .asgi_fakes import http_scope


def test_plain_text_encoder_writes_bare_utf8_deltas() -> None:
    encoder = PlainTextEncoder()
    assert encoder.content_type == b"text/plain; charset=utf-8"
    assert encoder.delta("héllo ✓") == "héllo ✓".encode()
    assert encoder.done({"finish_reason": "stop"}) == b""
    assert encoder.ping() == b""
    assert encoder.ping_interval is None
    assert encoder.error("generation_error", "boom") == b"\n\n[error: generation_error] boom\n"


def test_sse_encoder_writes_named_events_with_json_data() -> None:
    encoder = SSEEncoder(ping_interval=3.0)
    assert encoder.content_type == b"text/event-stream; charset=utf-8"
    assert encoder.ping_interval == 3.0
    assert encoder.delta("hé\n") == 'event: delta\ndata: {"text": "hé\\n"}\n\n'.encode()
    assert encoder.done({"finish_reason": "length"}) == b'event: done\ndata: {"finish_reason": "length"}\n\n'
    assert encoder.error("t", "m") == b'event: error\ndata: {"error": {"type": "t", "message": "m"}}\n\n'
    assert encoder.ping() == b": ping\n\n"


@pytest.mark.parametrize("text", ["", 'a "quote" and a \\', "line\nbreak\ttab", "東京😀", "\u2028\x00"])
def test_sse_delta_is_the_delta_events_json_whatever_the_text(text: str) -> None:
    assert SSEEncoder().delta(text) == SSEEncoder.event("delta", {"text": text})
    assert json.loads(SSEEncoder().delta(text).decode().split("data: ", 1)[1]) == {"text": text}


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, PlainTextEncoder),
        (b"*/*", PlainTextEncoder),
        (b"text/plain", PlainTextEncoder),
        (b"text/event-stream", SSEEncoder),
        (b"Text/Event-Stream", SSEEncoder),
        (b"application/json, text/event-stream;q=0.9", SSEEncoder),
    ],
)
def test_choose_encoder_picks_sse_only_when_accept_asks_for_it(accept: bytes | None, expected: type) -> None:
    headers = [] if accept is None else [(b"accept", accept)]
    encoder = choose_encoder(http_scope("POST", headers=headers), ping_interval=2.5)
    assert type(encoder) is expected
    if expected is SSEEncoder:
        assert encoder.ping_interval == 2.5


@pytest.mark.parametrize(
    ("requested", "default", "expected"),
    [
        (None, "chatstream-0.3", ChatStream03Encoder),
        (b"delta", "chatstream-0.3", PlainTextEncoder),
        (b" Delta ", "chatstream-0.3", PlainTextEncoder),
        (b"chatstream-0.3", "delta", ChatStream03Encoder),
        (b"no-such-wire", "delta", PlainTextEncoder),  # an unknown name keeps the server's default
        (b"no-such-wire", "chatstream-0.3", ChatStream03Encoder),
    ],
)
def test_a_request_may_name_its_wire_format(requested: bytes | None, default: Any, expected: type) -> None:
    headers = [] if requested is None else [(b"x-chatstream-wire", requested)]
    assert type(choose_encoder(http_scope("POST", headers=headers), wire=default)) is expected


def test_sse_wins_over_a_named_wire() -> None:
    headers = [(b"accept", b"text/event-stream"), (b"x-chatstream-wire", b"chatstream-0.3")]
    assert type(choose_encoder(http_scope("POST", headers=headers))) is SSEEncoder
