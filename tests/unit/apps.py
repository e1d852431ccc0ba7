"""``ChatStreamMiddleware`` set up for unit tests, and the drivers that run requests through it as raw ASGI.

- ``SECRET`` and ``build_middleware``: a middleware around a fresh ``RecordingApp``, signed with a test key.
- ``call``: one request with a ``ScriptedReceive`` (``client_sending``) and a ``RecordingSend`` under a hang
  guard; ``chat`` and ``get`` are its shorthands for ``POST /chat_stream`` and for a bare ``GET``.
- ``Chat``: one middleware with the parts a test inspects and session-aware ``request``/``turn``/``history``
  (the ``make_chat`` fixture in ``conftest.py`` builds them and checks afterwards that nothing was left busy);
  ``RunningTurn``, ``CountingEngine``, ``session_cookie`` and ``assert_json_error`` go with it.

Typical use::

    app = build_middleware(MockEngine("one two"), max_concurrency=1)
    send = await chat(app, "hi")
    assert send.status == 200 and send.body == b"one two"
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from chatstream_asgi import ChatStreamMiddleware, MockEngine
from chatstream_asgi.engines.base import ChatMessage, SamplingParams

from .asgi_fakes import (
    HANG_GUARD_SECONDS,
    JSON_HEADERS,
    RecordingApp,
    RecordingSend,
    ScriptedReceive,
    http_scope,
    json_body,
    request_messages,
    wait_until,
    with_hang_guard,
)

SECRET = "unit-test-secret-key-0123456789abcdef"
COOKIE_NAME = "chatstream_session"
#: what ``Chat``'s default ``CountingEngine`` answers.
REPLY = "Hello there, friend."


def build_middleware(engine: Any = None, **options: Any) -> ChatStreamMiddleware:
    """``ChatStreamMiddleware`` around a new ``RecordingApp``, signed with ``SECRET``; ``MockEngine()`` by default."""
    return ChatStreamMiddleware(
        RecordingApp(), engine=MockEngine() if engine is None else engine, secret_key=SECRET, **options
    )


def client_sending(payload: Any = None) -> ScriptedReceive:
    """A client that sends ``payload`` (bytes as they are, ``None`` for no body, anything else as JSON) in one
    message and then waits until ``disconnect()`` is called, as a browser waits for the reply."""
    body = b"" if payload is None else payload if isinstance(payload, bytes) else json_body(payload)
    return ScriptedReceive(request_messages(body), wait_for_disconnect=True)


async def call(
    app: ChatStreamMiddleware,
    method: str,
    path: str,
    *,
    payload: Any = None,
    headers: Iterable[tuple[bytes, bytes]] = JSON_HEADERS,
    cookie: str | None = None,
    root_path: str = "",
    receive: ScriptedReceive | None = None,
    send: RecordingSend | None = None,
    hang_guard: float = HANG_GUARD_SECONDS,
) -> RecordingSend:
    """Run one request through ``app`` and return what it sent.

    Args:
        payload: the body, as ``client_sending`` sends it; unused when ``receive`` is given.
        headers: the request headers, exactly these (the JSON content type unless told otherwise).
        cookie: the ``Cookie`` header's value (``name=value``), sent after ``headers``.
        root_path: the mount point; the scope's ``path`` is ``root_path + path``.
        receive: the client's side; ``client_sending(payload)`` by default.
        send: where the response is recorded (e.g. one with a hook); a new ``RecordingSend`` by default.
        hang_guard: seconds the request may take before the test fails as hung.
    """
    all_headers = [*headers, *([] if cookie is None else [(b"cookie", cookie.encode())])]
    receive = client_sending(payload) if receive is None else receive
    send = RecordingSend() if send is None else send
    scope = http_scope(method, root_path + path, headers=all_headers, root_path=root_path)
    await with_hang_guard(app(scope, receive, send), hang_guard)
    return send


async def chat(
    app: ChatStreamMiddleware,
    text: str = "hi",
    *,
    headers: Iterable[tuple[bytes, bytes]] = JSON_HEADERS,
    send: RecordingSend | None = None,
    hang_guard: float = HANG_GUARD_SECONDS,
    **fields: Any,
) -> RecordingSend:
    """``POST /chat_stream`` with ``{"user_input": text, **fields}``; the other arguments as for ``call``."""
    payload = {"user_input": text, **fields}
    return await call(app, "POST", "/chat_stream", payload=payload, headers=headers, send=send, hang_guard=hang_guard)


async def get(app: ChatStreamMiddleware, path: str) -> RecordingSend:
    """``GET path`` with no headers and an empty body; reading on after the body fails (``ReceiveWouldHang``)."""
    return await call(app, "GET", path, headers=(), receive=ScriptedReceive(request_messages()))


class CountingEngine(MockEngine):
    """A ``MockEngine`` that counts ``stream()`` calls and records the order of lifecycle calls."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stream_calls = 0
        self.lifecycle: list[str] = []

    async def start(self) -> None:
        self.lifecycle.append("start")
        await super().start()

    async def close(self) -> None:
        self.lifecycle.append(f"close with {self.running} running")
        await super().close()

    def stream(self, messages: Sequence[ChatMessage], params: SamplingParams) -> Any:
        self.stream_calls += 1
        return super().stream(messages, params)


@dataclass
class Chat:
    """One middleware under test with the parts a test inspects."""

    middleware: ChatStreamMiddleware
    app: RecordingApp
    engine: CountingEngine
    store: Any

    async def request(
        self,
        method: str,
        path: str,
        payload: Any = None,
        *,
        cookie: str | None = None,
        headers: Sequence[tuple[bytes, bytes]] = (),
        **options: Any,
    ) -> RecordingSend:
        """Run one request through the middleware and return what it sent.

        ``headers`` come first, then the JSON content type if there is a ``payload``, then the session cookie
        carrying ``cookie`` (a signed session id, as ``session_cookie`` returns it). ``options`` (``receive``,
        ``send``, ``root_path``) go to ``call``.
        """
        all_headers = [*headers, *(JSON_HEADERS if payload is not None else [])]
        session = None if cookie is None else f"{COOKIE_NAME}={cookie}"
        return await call(
            self.middleware, method, path, payload=payload, headers=all_headers, cookie=session, **options
        )

    async def turn(self, user_input: str = "hi", *, cookie: str | None = None, **fields: Any) -> RecordingSend:
        return await self.request("POST", "/chat_stream", {"user_input": user_input, **fields}, cookie=cookie)

    async def history(self, cookie: str) -> list[dict[str, str]]:
        send = await self.request("GET", "/get_prompt", cookie=cookie)
        assert send.status == 200
        messages: list[dict[str, str]] = send.json()["messages"]
        return messages

    def start_turn(self, user_input: str = "hi", *, cookie: str | None = None) -> RunningTurn:
        """Start a turn in the background; the test ends it with ``stop()`` (a disconnect) or ``finish()``."""
        receive = client_sending({"user_input": user_input})
        send = RecordingSend()
        request = self.request("POST", "/chat_stream", cookie=cookie, headers=JSON_HEADERS, receive=receive, send=send)
        return RunningTurn(asyncio.create_task(request), receive, send)


@dataclass
class RunningTurn:
    task: asyncio.Task[RecordingSend]
    receive: ScriptedReceive
    send: RecordingSend

    async def streaming(self) -> None:
        """Return once the first reply text went out."""
        await wait_until(lambda: bool(self.send.body_chunks) or self.task.done())
        assert self.send.body_chunks, f"the turn ended without streaming: {self.send.messages}"

    async def stop(self) -> RecordingSend:
        self.receive.disconnect()
        return await with_hang_guard(self.task)

    async def finish(self) -> RecordingSend:
        return await with_hang_guard(self.task)


def session_cookie(send: RecordingSend) -> str:
    """The signed session id from the response's ``Set-Cookie``."""
    value = send.header("set-cookie")
    assert value is not None, f"no set-cookie in {send.headers}"
    name, _, rest = value.partition("=")
    assert name == COOKIE_NAME
    return rest.split(";", 1)[0]


def assert_json_error(send: RecordingSend, status: int, error_type: str) -> dict[str, Any]:
    """The response is a complete ``status`` JSON error of ``error_type`` with a message; returns the error."""
    assert send.status == status, send.body
    assert send.header("content-type") == "application/json"
    assert int(send.header("content-length") or -1) == len(send.body)
    error: dict[str, Any] = send.json()["error"]
    assert error["type"] == error_type and error["message"]
    assert send.complete
    return error
