"""ChatStreamMiddleware: wraps any ASGI app and serves the chat routes in front of it."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

from ._asgi import route_path, send_error
from ._types import ASGIApp, Message, Receive, Scope, Send
from .admission import Admission, Rejected
from .engines.base import Engine, SamplingParams
from .errors import ClientDisconnected, ConfigurationError, HTTPError
from .history import HistoryStore, MemoryHistoryStore
from .openai_api import OpenAIRoutes, openai_route_table
from .routes import ChatRoutes, ChatSettings
from .session import SessionCookie

logger = logging.getLogger("chatstream_asgi")
Handler = Callable[[Scope, Receive, Send], Awaitable[None]]
DEFAULT_PATHS = {
    "chat_stream": "/chat_stream",
    "clear_context": "/clear_context",
    "get_prompt": "/get_prompt",
    "get_load": "/get_load",
}
ROUTE_METHODS = {"chat_stream": "POST", "clear_context": "POST", "get_prompt": "GET", "get_load": "GET"}


class ChatStreamMiddleware:
    """Serve a streaming chat in front of any ASGI app.

    Requests to the chat routes are answered here; every other request (other paths, websockets,
    lifespan) goes to ``app`` unchanged. On lifespan startup the engine is started; on shutdown
    admission drains, running streams get ``drain_timeout`` seconds, then the engine closes.

    Args:
        app: the wrapped ASGI application.
        engine: what generates replies (``TransformersEngine``, ``MockEngine``, ...).
        secret_key: signs the session cookie; a list rotates keys (the first signs, all verify).
        path: the chat route; the other routes keep their default paths unless given in ``paths``.
        paths: route name -> path, for ``chat_stream``, ``clear_context``, ``get_prompt``, ``get_load``.
        max_concurrency: generations running at once (match the engine's ``max_batch_size``).
        max_queue: requests waiting for a slot; the next one gets 429 with ``Retry-After``.
        queue_timeout: seconds a request may wait for a slot before a 503.
        max_body_bytes: larger request bodies get 413 without being read.
        history_store: where chat histories live; a bounded in-memory store by default.
        cookie_name, cookie_max_age, https_only, same_site: session cookie settings.
        system_prompt: a system message put before every conversation.
        default_params: sampling defaults; requests override them field by field.
        max_new_tokens_limit: the most tokens one request may ask for.
        generation_timeout: seconds after which a reply is cut (in-band error, partial reply kept).
        send_timeout: seconds a client may stop reading before it is treated as gone.
        drain_timeout: seconds running streams may finish during shutdown.
        openai_prefix: where the OpenAI-compatible routes live (``{prefix}/chat/completions``,
            ``{prefix}/models``); None turns them off.
        api_keys: Bearer keys the OpenAI routes require (``Authorization: Bearer <key>``); None requires none.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        engine: Engine,
        secret_key: str | bytes | Sequence[str | bytes],
        path: str = "/chat_stream",
        paths: dict[str, str] | None = None,
        max_concurrency: int = 2,
        max_queue: int = 5,
        queue_timeout: float | None = 60.0,
        max_body_bytes: int = 64 * 1024,
        history_store: HistoryStore | None = None,
        cookie_name: str = "chatstream_session",
        cookie_max_age: int = 14 * 24 * 3600,
        https_only: bool = False,
        same_site: str = "lax",
        system_prompt: str | None = None,
        default_params: SamplingParams | None = None,
        max_new_tokens_limit: int = 4096,
        generation_timeout: float | None = 300.0,
        send_timeout: float | None = 30.0,
        drain_timeout: float = 30.0,
        openai_prefix: str | None = "/v1",
        api_keys: str | Sequence[str] | None = None,
    ) -> None:
        check_positive(max_body_bytes=max_body_bytes, max_new_tokens_limit=max_new_tokens_limit)
        self.app = app
        self.engine = engine
        self.admission = Admission(max_concurrency, max_queue, queue_timeout)
        sessions = SessionCookie(
            secret_key, cookie_name=cookie_name, max_age=cookie_max_age, https_only=https_only, same_site=same_site
        )
        settings = ChatSettings(
            default_params=default_params or SamplingParams(),
            system_prompt=system_prompt,
            max_body_bytes=max_body_bytes,
            max_new_tokens_limit=max_new_tokens_limit,
            generation_timeout=generation_timeout,
            send_timeout=send_timeout,
        )
        store = history_store if history_store is not None else MemoryHistoryStore()
        self.routes = ChatRoutes(engine, self.admission, sessions, store, settings)
        self.drain_timeout = drain_timeout
        self.table = self.route_table({**DEFAULT_PATHS, "chat_stream": path, **(paths or {})})
        openai_routes = OpenAIRoutes(engine, self.admission, settings, api_keys)
        self.table.update(openai_route_table(openai_routes, openai_prefix, api_keys, self.table))

    def route_table(self, paths: dict[str, str]) -> dict[str, tuple[str, Handler]]:
        unknown = set(paths) - set(DEFAULT_PATHS)
        if unknown:
            raise ConfigurationError(f"unknown route name(s) {sorted(unknown)} in paths; use {sorted(DEFAULT_PATHS)}")
        for name, route in paths.items():
            if not route.startswith("/"):
                raise ConfigurationError(f"path for {name!r} must start with '/', got {route!r}")
        if len(set(paths.values())) != len(paths):
            raise ConfigurationError(f"two routes share one path: {paths}")
        return {route: (ROUTE_METHODS[name], getattr(self.routes, name)) for name, route in paths.items()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, self.lifespan_receive(receive), send)
            return
        route = self.table.get(route_path(scope)) if scope["type"] == "http" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        method, handler = route
        try:
            if scope["method"] != method:
                raise HTTPError(405, "method_not_allowed", f"use {method} for this route", {"Allow": method})
            await handler(scope, receive, send)
        except HTTPError as error:
            await send_error(send, error)
        except Rejected as rejection:
            await send_error(send, rejection_error(rejection))
        except ClientDisconnected:
            return

    def lifespan_receive(self, receive: Receive) -> Receive:
        """Start the engine before the app sees startup; drain and close it before the app sees shutdown."""

        async def wrapped() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.engine.start()
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
            return message

        return wrapped

    async def shutdown(self) -> None:
        self.admission.drain()
        if not await self.admission.wait_idle(self.drain_timeout):
            logger.warning("chat streams still running after %.0f s of drain; closing the engine", self.drain_timeout)
        await self.engine.close()


def rejection_error(rejection: Rejected) -> HTTPError:
    return HTTPError(rejection.status, rejection.reason, str(rejection), {"Retry-After": str(rejection.retry_after)})


def check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ConfigurationError(f"{name} must be a positive integer, got {value!r}")
