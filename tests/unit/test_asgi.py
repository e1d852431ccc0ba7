"""Unit tests for ``chatstream_asgi.http.asgi``: routing relative to root_path, the capped body reader, JSON replies."""

from __future__ import annotations

import json

import pytest

from chatstream_asgi.errors import ClientDisconnected, HTTPError
from chatstream_asgi.http.asgi import listen_for_disconnect, read_body, route_path, send_error, send_json

from .asgi_fakes import (
    DISCONNECT,
    ProtocolViolation,
    ReceiveWouldHang,
    RecordingSend,
    ScriptedReceive,
    http_scope,
    request_messages,
    with_hang_guard,
)


@pytest.mark.parametrize(
    ("path", "root_path", "expected"),
    [
        ("/chat_stream", "", "/chat_stream"),
        ("/api/chat_stream", "/api", "/chat_stream"),
        ("/api", "/api", "/"),
        ("/api/", "/api", "/"),
        ("/apichat_stream", "/api", "/apichat_stream"),  # a prefix of a segment is not the root path
        ("/other/chat_stream", "/api", "/other/chat_stream"),
    ],
)
def test_route_path_strips_root_path_only_at_a_segment_boundary(path: str, root_path: str, expected: str) -> None:
    assert route_path(http_scope(path=path, root_path=root_path)) == expected


def test_route_path_without_root_path_key_is_the_path() -> None:
    scope = http_scope(path="/chat_stream")
    del scope["root_path"]
    assert route_path(scope) == "/chat_stream"


@pytest.mark.asyncio
async def test_read_body_joins_streamed_chunks() -> None:
    receive = ScriptedReceive(request_messages(b"abcdefghij", chunk_size=3))
    assert await with_hang_guard(read_body(http_scope("POST"), receive, 100)) == b"abcdefghij"
    assert receive.calls == 4


@pytest.mark.asyncio
async def test_read_body_accepts_a_body_of_exactly_the_cap() -> None:
    scope = http_scope("POST", headers=[(b"content-length", b"10")])
    receive = ScriptedReceive(request_messages(b"x" * 10, chunk_size=4))
    assert await read_body(scope, receive, 10) == b"x" * 10


@pytest.mark.asyncio
async def test_read_body_refuses_declared_content_length_over_cap_without_receiving() -> None:
    scope = http_scope("POST", headers=[(b"content-length", b"11")])
    receive = ScriptedReceive(request_messages(b"x" * 11))
    with pytest.raises(HTTPError) as caught:
        await read_body(scope, receive, 10)
    assert caught.value.status == 413
    assert caught.value.error_type == "request_too_large"
    assert receive.calls == 0


@pytest.mark.asyncio
async def test_read_body_refuses_streamed_body_as_soon_as_it_passes_the_cap() -> None:
    # 4-byte chunks against a 10-byte cap: the third chunk makes 12 bytes, so the fourth is never read.
    receive = ScriptedReceive(request_messages(b"x" * 40, chunk_size=4))
    with pytest.raises(HTTPError) as caught:
        await read_body(http_scope("POST"), receive, 10)
    assert caught.value.status == 413
    assert receive.calls == 3


@pytest.mark.asyncio
async def test_read_body_refuses_body_larger_than_a_lying_content_length() -> None:
    scope = http_scope("POST", headers=[(b"content-length", b"2")])
    receive = ScriptedReceive(request_messages(b"x" * 20, chunk_size=5))
    with pytest.raises(HTTPError) as caught:
        await read_body(scope, receive, 10)
    assert caught.value.status == 413
    assert receive.calls == 3


@pytest.mark.parametrize("declared", [b"abc", b"-5", b"", b"\xb2", b"1e9", b" 99999999"])
@pytest.mark.asyncio
async def test_read_body_ignores_a_content_length_that_is_not_a_plain_number(declared: bytes) -> None:
    # b"\xb2" is latin-1 for a superscript two, which str.isdigit() accepts but int() rejects.
    scope = http_scope("POST", headers=[(b"content-length", declared)])
    receive = ScriptedReceive(request_messages(b"ok"))
    assert await read_body(scope, receive, 10) == b"ok"


@pytest.mark.asyncio
async def test_read_body_refuses_a_declared_length_too_long_for_int_without_receiving() -> None:
    scope = http_scope("POST", headers=[(b"content-length", b"9" * 5000)])
    receive = ScriptedReceive(request_messages(b"x"))
    with pytest.raises(HTTPError) as caught:
        await read_body(scope, receive, 10)
    assert caught.value.status == 413
    assert receive.calls == 0


@pytest.mark.asyncio
async def test_read_body_accepts_a_declared_length_with_leading_zeros() -> None:
    scope = http_scope("POST", headers=[(b"content-length", b"0" * 40 + b"2")])
    assert await read_body(scope, ScriptedReceive(request_messages(b"ok")), 10) == b"ok"


@pytest.mark.asyncio
async def test_read_body_raises_client_disconnected_on_http_disconnect() -> None:
    receive = ScriptedReceive([{"type": "http.request", "body": b"part", "more_body": True}, DISCONNECT])
    with pytest.raises(ClientDisconnected):
        await read_body(http_scope("POST"), receive, 100)
    assert receive.calls == 2


@pytest.mark.asyncio
async def test_read_body_treats_missing_body_key_as_empty() -> None:
    receive = ScriptedReceive([{"type": "http.request"}])
    assert await read_body(http_scope("POST"), receive, 10) == b""


@pytest.mark.asyncio
async def test_listen_for_disconnect_skips_other_messages_until_disconnect() -> None:
    receive = ScriptedReceive([{"type": "http.request", "body": b""}, DISCONNECT])
    await with_hang_guard(listen_for_disconnect(receive))
    assert receive.calls == 2


@pytest.mark.asyncio
async def test_scripted_receive_raises_instead_of_hanging() -> None:
    # The fake itself must be able to fail a test that reads more than the client sent.
    with pytest.raises(ReceiveWouldHang):
        await listen_for_disconnect(ScriptedReceive([{"type": "http.request", "body": b""}]))


@pytest.mark.asyncio
async def test_recording_send_rejects_messages_out_of_protocol_order() -> None:
    # The fake itself must be able to fail a test whose app sends a second response or writes after the end.
    send = RecordingSend()
    with pytest.raises(ProtocolViolation):
        await send({"type": "http.response.body", "body": b"early"})
    await send_json(send, 200, {})
    with pytest.raises(ProtocolViolation):
        await send({"type": "http.response.start", "status": 500, "headers": []})
    with pytest.raises(ProtocolViolation):
        await send({"type": "http.response.body", "body": b"late"})


@pytest.mark.asyncio
async def test_recording_send_rejects_messages_missing_keys_the_asgi_spec_requires() -> None:
    # Every route's messages pass through this check, so it must catch a start without trailers, a body without
    # more_body (the keys asgiref.typing's TypedDicts require and mypy checks in the package).
    with pytest.raises(ProtocolViolation, match="trailers"):
        await RecordingSend()({"type": "http.response.start", "status": 200, "headers": []})
    send = RecordingSend()
    await send({"type": "http.response.start", "status": 200, "headers": [], "trailers": False})
    with pytest.raises(ProtocolViolation, match="more_body"):
        await send({"type": "http.response.body", "body": b"x"})


@pytest.mark.asyncio
async def test_send_json_sets_content_type_length_and_no_store() -> None:
    send = RecordingSend()
    await send_json(send, 201, {"text": "héllo ✓"})
    body = json.dumps({"text": "héllo ✓"}, ensure_ascii=False).encode()
    assert send.status == 201
    assert send.header("content-type") == "application/json"
    assert send.header("content-length") == str(len(body))
    assert int(send.header("content-length") or 0) == len(send.body)
    assert send.header("cache-control") == "no-store"
    assert send.json() == {"text": "héllo ✓"}
    assert send.complete


@pytest.mark.asyncio
async def test_send_json_appends_extra_headers() -> None:
    send = RecordingSend()
    await send_json(send, 200, {}, [(b"set-cookie", b"a=b")])
    assert send.header("set-cookie") == "a=b"


@pytest.mark.asyncio
async def test_send_error_sends_error_body_and_passes_retry_after_and_allow_lower_cased() -> None:
    send = RecordingSend()
    error = HTTPError(429, "queue_full", "retry later", {"Retry-After": "7", "Allow": "POST"})
    await send_error(send, error, [(b"x-request-id", b"abc")])
    assert send.status == 429
    assert send.json() == {"error": {"type": "queue_full", "message": "retry later"}}
    assert send.header("retry-after") == "7"
    assert send.header("allow") == "POST"
    assert send.header("x-request-id") == "abc"
    assert all(name == name.lower() for name, _ in send.headers)
    assert int(send.header("content-length") or 0) == len(send.body)
