"""Small raw-ASGI helpers shared by the route handlers."""

from __future__ import annotations

import json
from typing import Any

from ..errors import ClientDisconnected, HTTPError
from .types import HTTPReceive, HTTPSend, Message, Scope, Send, response_body, response_start

JSON_CONTENT_TYPE = b"application/json"
MAX_LENGTH_DIGITS = 18  # any Content-Length with more digits is over every cap


def route_path(scope: Scope) -> str:
    """The request path relative to ``root_path`` (ASGI servers include the root path in ``path``)."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if not root_path or not path.startswith(root_path):
        return path
    rest = path[len(root_path) :]
    if rest == "" or rest.startswith("/"):
        return rest or "/"
    return path


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of a request header (``name`` lower-case), decoded as latin-1 (as Starlette's ``Headers``).

    A plain scan: ASGI servers send header names lower-cased, and building a ``Headers`` for each lookup was
    4 % of the web process's CPU per chat request (a request looks up five or six headers).
    """
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


async def read_body(scope: Scope, receive: HTTPReceive, max_bytes: int) -> bytes:
    """Read the whole request body, refusing more than ``max_bytes`` without reading it all."""
    if declares_more_than(scope, max_bytes):
        raise body_too_large(max_bytes)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected("client disconnected while sending the request body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise body_too_large(max_bytes)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def declares_more_than(scope: Scope, max_bytes: int) -> bool:
    declared = header(scope, b"content-length")
    # str.isdigit() alone accepts latin-1 superscripts such as "\xb2", which int() rejects.
    if declared is None or not (declared.isascii() and declared.isdigit()):
        return False  # absent or malformed: the bytes are counted as they arrive instead
    digits = declared.lstrip("0")
    # int() refuses strings over 4300 digits; a length that long is over any cap anyway.
    return len(digits) > MAX_LENGTH_DIGITS or int(digits or "0") > max_bytes


def body_too_large(max_bytes: int) -> HTTPError:
    return HTTPError(413, "request_too_large", f"the request body is larger than {max_bytes} bytes; send less")


async def listen_for_disconnect(receive: HTTPReceive) -> None:
    """Return when the client disconnects (``send`` does not reliably raise after a disconnect)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def error_body(error_type: str, message: str) -> dict[str, Any]:
    return {"error": {"type": error_type, "message": message}}


async def send_json(
    send: HTTPSend, status: int, payload: Any, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
    raw_headers = [
        (b"content-type", JSON_CONTENT_TYPE),
        (b"content-length", str(len(body)).encode("latin-1")),
        (b"cache-control", b"no-store"),
        *(headers or []),
    ]
    await send(response_start(status, raw_headers))
    await send(response_body(body))


async def send_error(send: HTTPSend, error: HTTPError, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in error.headers.items()]
    await send_json(send, error.status, error_body(error.error_type, error.message), [*extra, *(headers or [])])


def without_body(send: Send) -> Send:
    """``send`` for a ``HEAD`` request: the GET response's status and headers (``Content-Length`` too), no body."""

    async def headers_only(message: Message) -> None:
        if message["type"] == "http.response.body":
            message = {**message, "body": b""}
        await send(message)

    return headers_only
