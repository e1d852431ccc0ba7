"""The HTTP side of the ChatStream facade: the response its handlers return, and ChatStream's API names."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from starlette.responses import Response

from chatstream_asgi import QueueFull, Rejected
from chatstream_asgi.errors import ClientDisconnected, ConfigurationError, HTTPError
from chatstream_asgi.http.asgi import send_error, send_json  # internal imports: see pyproject.toml
from chatstream_asgi.http.hooks import OnFinish, call_hook

if TYPE_CHECKING:
    from chatstream_asgi.http.types import (
        Handler,
        HTTPReceive,
        HTTPReceiveEvent,
        HTTPSend,
        HTTPSendEvent,
        Receive,
        Scope,
        Send,
    )

SESSION_ID_CHARS = 24  # the shape of the middleware's own session ids (secrets.token_urlsafe(18))
API_METHODS = {
    "chat_stream": "POST",
    "clear_context": "POST",
    "get_prompt": "GET",
    "set_generation_params": "POST",
    "get_generation_params": "GET",
    "set_feedback": "POST",
    "get_feedback": "GET",  # not ChatStream's: the chat page reads the ratings back with it
    "get_load": "GET",
    "get_resource_usage": "GET",
    "stop_generation": "POST",
    "webui_index": "GET",
}

#: ChatStream 0.3's callback message for each outcome of a streamed turn (the request log's outcomes)
CALLBACK_MESSAGES = {
    "completed": "success",
    "disconnected": "client_disconnected_while_streaming",
    "stopped": "client_disconnected_while_streaming",
    "cancelled": "client_disconnected_while_streaming",
    "error": "unknown_error_occurred,while chat_generator.generate",
    "timeout": "unknown_error_occurred,while chat_generator.generate",
    "drained": "unknown_error_occurred,while chat_generator.generate",
}
#: how long a response waits for its turn's outcome after its last byte (on_finish is a task of the same loop)
OUTCOME_WAIT = 5.0


class TurnEndings:
    """How each streamed turn ended, heard through the middleware's ``on_finish`` hook, by request id.

    A response whose engine failed mid-stream still ends its body normally (the error goes in-band), so only the
    outcome the middleware records tells ChatStream's callback "unknown_error_occurred" from "success". The app's
    own ``on_finish`` (``middleware_options``) is called after, as the middleware would call it.
    """

    def __init__(self, then: OnFinish | None) -> None:
        self.then = then
        self.waiting: dict[str, asyncio.Future[str]] = {}

    def expect(self, request_id: str) -> None:
        """Listen for this request's outcome (its response started)."""
        self.waiting[request_id] = asyncio.get_running_loop().create_future()

    async def outcome(self, request_id: str) -> str | None:
        """The outcome of an expected request once its handler returned; None if not heard in time."""
        try:
            return await asyncio.wait_for(self.waiting[request_id], OUTCOME_WAIT)
        except TimeoutError:
            return None
        finally:
            self.forget(request_id)

    def forget(self, request_id: str) -> None:
        self.waiting.pop(request_id, None)

    async def on_finish(self, session_id: str, user_input: str, reply: str, stats: dict[str, Any]) -> None:
        waiter = self.waiting.get(stats["request_id"])
        if waiter is not None and not waiter.done():
            waiter.set_result(stats["outcome"])
        if self.then is not None:
            await call_hook(self.then, session_id, user_input, reply, stats)


async def no_app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "http":
        not_found = {"error": {"type": "not_found", "message": "not a ChatStream route"}}
        await send_json(cast("HTTPSend", send), 404, not_found)


class ChatStreamResponse(Response):
    """A Starlette response that runs one of the middleware's route handlers when the framework sends it."""

    def __init__(
        self,
        handler: Handler,
        body: bytes | None,
        done: Callable[[str], None],
        guard: Callable[[Scope], None] | None = None,
        session_cookie: Callable[[str], tuple[bytes, bytes]] | None = None,
        endings: TurnEndings | None = None,
    ):
        self.handler, self.replay, self.done, self.guard = handler, body, done, guard
        self.session_cookie, self.endings = session_cookie, endings
        self.background = None
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.status_code = 200  # what the handler sends decides; frameworks only log this one

    async def __call__(self, scope: Scope, receive: Receive, loose_send: Send) -> None:
        # The framework hands its own loosely typed channels; for an HTTP scope they carry HTTP events.
        send = cast("HTTPSend", loose_send)
        ended = False
        request_id: str | None = None  # a streamed turn's (its X-Request-Id): how it ended comes from on_finish

        async def tracking_send(message: HTTPSendEvent) -> None:
            nonlocal ended, request_id
            if message["type"] == "http.response.start" and self.endings is not None:
                request_id = dict(message.get("headers", [])).get(b"x-request-id", b"").decode() or None
                if request_id is not None:
                    self.endings.expect(request_id)
            await send(message)
            ended = ended or (message["type"] == "http.response.body" and not message.get("more_body", False))

        # ChatStream 0.3 calls back for a request that streamed; one refused before that (full queue, bad input)
        # gets its error response and no callback, and one whose client left while it waited is "..._before_streaming".
        outcome: str | None = None
        if self.session_cookie is not None:
            scope = fastsession_scope(scope, self.session_cookie)
        try:
            if self.guard is not None:  # API keys and the CSRF check, as the middleware applies them
                self.guard(scope)
            await self.handler(scope, self.replaying(receive), tracking_send)
            outcome = "success" if ended else "client_disconnected_while_streaming"
            if request_id is not None and self.endings is not None:
                outcome = CALLBACK_MESSAGES.get(await self.endings.outcome(request_id) or "", outcome)
        except QueueFull as rejection:  # ChatStream's body, with a real status and Retry-After
            retry_after = [(b"retry-after", str(rejection.retry_after).encode())]
            await send_json(send, 429, {"error": "too_many_requests"}, retry_after)
        except Rejected as rejection:
            await send_error(send, rejection.http_error())
        except HTTPError as error:
            await send_error(send, error)
        except ClientDisconnected:
            outcome = "client_disconnected_before_streaming"
        finally:
            if request_id is not None and self.endings is not None:
                self.endings.forget(request_id)  # the handler raised (a cancel): nobody waits for it any more
            if outcome is not None:
                self.done(outcome)

    def replaying(self, loose_receive: Receive) -> HTTPReceive:
        """``receive`` that hands out an already-read body first (an intercepted request), then the real one."""
        receive = cast("HTTPReceive", loose_receive)
        if self.replay is None:
            return receive
        pending: list[HTTPReceiveEvent] = [{"type": "http.request", "body": self.replay, "more_body": False}]

        async def replay() -> HTTPReceiveEvent:
            return pending.pop() if pending else await receive()

        return replay


def fastsession_scope(scope: Scope, session_cookie: Callable[[str], tuple[bytes, bytes]]) -> Scope:
    """``scope`` with our session cookie for the ``FastSessionMiddleware`` session it runs in, if any.

    ChatStream's quickstart adds fastsession, which replaces every ``Set-Cookie`` of the response on which it starts
    a session: our cookie never reached the browser and the first turn's history was lost. Under fastsession the
    history follows its session instead (one of ours per fastsession id, derived from it).
    """
    state = scope.get("state")
    fast = state.get("session") if isinstance(state, dict) else None
    fast_id = getattr(fast, "session_id", None)
    if not isinstance(fast_id, str) or not fast_id:
        return scope
    digest = hashlib.sha256(b"chatstream_asgi/fastsession\0" + fast_id.encode()).digest()
    ours = base64.urlsafe_b64encode(digest).decode()[:SESSION_ID_CHARS]
    _, set_cookie = session_cookie(ours)
    # first: the first valid session cookie of a request is the one read
    return {**scope, "headers": [(b"cookie", set_cookie.split(b";", 1)[0]), *scope.get("headers", [])]}


def chosen_apis(opts: dict[str, Any]) -> list[str]:
    given = [key for key in ("include", "exclude", "all") if key in opts]
    if len(given) > 1:
        raise ConfigurationError(f"give only one of 'include', 'exclude', 'all'; got {given}")
    named = set(opts.get("include", [])) | set(opts.get("exclude", []))
    unknown = sorted(named - set(API_METHODS) - {"webui_js"})
    if unknown:
        raise ConfigurationError(f"unknown API name(s) {unknown}; use {sorted(API_METHODS)}")
    if "include" in opts:
        return [name for name in API_METHODS if name in opts["include"]]
    if "exclude" in opts:
        return [name for name in API_METHODS if name not in opts["exclude"]]
    return list(API_METHODS) if opts.get("all") else []
