"""ChatStreamMiddleware: wraps any ASGI app and serves the chat routes in front of it."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from .engines.base import Engine, SamplingParams
from .engines.replicas import as_engine
from .errors import ClientDisconnected, HTTPError
from .http.asgi import route_path, send_error
from .http.encoders import Wire
from .http.hooks import ChatHooks, Interceptor, OnFinish
from .http.ops_routes import OperationsRoutes
from .http.routes import DEFAULT_PATHS, ChatRoutes, ChatSettings, check_positive
from .http.security import RequestGuard
from .http.session_routes import OnFeedback, SessionRoutes
from .http.types import ASGIApp, Receive, Scope, Send
from .openai.routes import OpenAIRoutes, openai_route_table, send_openai_error
from .ops.admission import Admission, Rejected
from .ops.health import drain
from .ops.lifespan import Lifespan
from .ops.metrics import ChatMetrics, Observer, metrics_available
from .ops.signals import DrainOnSignals
from .sessions.cookie import SessionCookie
from .sessions.history import HistoryStore, MemoryHistoryStore
from .sessions.state import SessionStateStore

logger = logging.getLogger("chatstream_asgi")


class ChatStreamMiddleware:
    """Serve a streaming chat in front of any ASGI app.

    Requests to the chat routes are answered here; every other request (other paths, websockets,
    lifespan) goes to ``app`` unchanged. On lifespan startup the engine is started; on shutdown
    admission drains, running streams get ``drain_timeout`` seconds, then the engine closes.

    Args:
        app: the wrapped ASGI application.
        engine: what generates replies (``TransformersEngine``, ``MockEngine``, ...); a list of engines (one per
            device) becomes an ``EngineReplicas`` that sends each new chat to the least loaded one.
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
        drain_timeout: seconds running streams may finish during shutdown (25: inside the 30 s that Kubernetes and
            gunicorn wait before SIGKILL, with time left to end the rest cleanly).
        drain_on_signals: on SIGTERM/SIGINT (main thread only) drain at once and hold the signal back from the
            server until the drain is over; False leaves the drain to the lifespan shutdown.
        openai_prefix: where the OpenAI-compatible routes live (``{prefix}/chat/completions``,
            ``{prefix}/models``); None turns them off.
        api_keys: Bearer keys the OpenAI routes require (``Authorization: Bearer <key>``); None requires none.
        openai_max_body_bytes: the OpenAI routes' body limit (413 beyond; clients send the whole conversation).
        openai_max_messages: the most messages one OpenAI request may send (400 beyond).
        metrics_path: where Prometheus metrics are served (needs the ``metrics`` extra; without it they are
            off); None turns them off.
        metrics_registry: a ``prometheus_client.CollectorRegistry`` to register in; default a new one.
        health_path, ready_path: liveness and readiness routes; None turns one off.
        log_text: put user input and reply text in the request log (never by default).
        require_api_key: the chat routes too need ``Authorization: Bearer <key>`` from ``api_keys``
            (non-browser deployments); otherwise browsers use the session cookie.
        allowed_origins: origins besides this server's own allowed to POST with the session cookie (CSRF check).
        csrf: set False to turn the ``Origin``/``Sec-Fetch-Site`` check off.
        max_input_chars: the longest ``user_input`` (on the OpenAI routes, each message) accepted (400 beyond).
        max_history_turns: at most this many user/assistant pairs of history sent to the model with a new turn
            (older pairs are cut a quarter of it at a time, so the prompt prefix stays cacheable); None sends all
            (the engine still truncates to its context).
        max_input_tokens: the most tokens one ``user_input`` (on the OpenAI routes, the whole prompt) may have,
            counted with the engine's tokenizer (engines without one, like the mock or an upstream, are limited by
            ``max_input_chars`` only).
        ui_path: where the built-in chat page is served (e.g. ``"/"``); None (the default) turns it off.
        wire: ``"delta"`` (text deltas) or ``"chatstream-0.3"`` (each chunk the whole reply + ``<::EOS::>``,
            for ChatStream 0.3 clients); SSE clients get SSE either way.
        on_finish: ``on_finish(session_id, user_input, reply, stats)``, after each turn; errors are logged.
        request_interceptor: ``interceptor(scope, session_id, body_dict)`` before a turn is validated;
            return a replacement dict or None.
        on_feedback: ``on_feedback(session_id, feedback)`` for each ``POST /set_feedback``.
        session_state: where per-session generation params and feedback live; bounded in memory by default.
        extra_paths: paths for ``set_generation_params``, ``get_generation_params``, ``set_feedback``,
            ``get_feedback``, ``get_resource_usage``, ``stop_generation`` (default ``/<name>``).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        engine: Engine | Sequence[Engine],
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
        drain_timeout: float = 25.0,
        drain_on_signals: bool = True,
        openai_prefix: str | None = "/v1",
        api_keys: str | Sequence[str] | None = None,
        openai_max_body_bytes: int = 1024 * 1024,
        openai_max_messages: int = 256,
        metrics_path: str | None = "/metrics",
        metrics_registry: object | None = None,
        health_path: str | None = "/healthz",
        ready_path: str | None = "/readyz",
        log_text: bool = False,
        require_api_key: bool = False,
        allowed_origins: Sequence[str] = (),
        csrf: bool = True,
        max_input_chars: int = 16_000,
        max_history_turns: int | None = None,
        max_input_tokens: int | None = None,
        ui_path: str | None = None,
        wire: Wire = "delta",
        on_finish: OnFinish | None = None,
        request_interceptor: Interceptor | None = None,
        on_feedback: OnFeedback | None = None,
        session_state: SessionStateStore | None = None,
        extra_paths: dict[str, str] | None = None,
    ) -> None:
        check_positive(openai_max_body_bytes=openai_max_body_bytes, openai_max_messages=openai_max_messages)
        self.app = app
        self.engine = engine = as_engine(engine)
        self.admission = Admission(max_concurrency, max_queue, queue_timeout)
        sessions = SessionCookie(
            secret_key, cookie_name=cookie_name, max_age=cookie_max_age, https_only=https_only, same_site=same_site
        )
        settings = ChatSettings(
            default_params=default_params or SamplingParams(),
            system_prompt=system_prompt,
            max_body_bytes=max_body_bytes,
            max_new_tokens_limit=max_new_tokens_limit,
            max_input_chars=max_input_chars,
            max_history_turns=max_history_turns,
            max_input_tokens=max_input_tokens,
            generation_timeout=generation_timeout,
            send_timeout=send_timeout,
        )
        store = history_store if history_store is not None else MemoryHistoryStore()
        extras = session_state if session_state is not None else SessionStateStore()
        hooks = ChatHooks(on_finish=on_finish, request_interceptor=request_interceptor, wire=wire, extras=extras)
        self.routes = ChatRoutes(engine, self.admission, sessions, store, settings, hooks)
        self.drain_timeout = drain_timeout
        self.signals = DrainOnSignals(self.drain, enabled=drain_on_signals)
        self.lifespan = Lifespan(self.startup, self.shutdown)
        chat_paths = {**DEFAULT_PATHS, "chat_stream": path, **(paths or {})}
        self.table = self.routes.table(chat_paths)
        openai_limits = {"max_body_bytes": openai_max_body_bytes, "max_messages": openai_max_messages}
        openai_routes = OpenAIRoutes(engine, self.admission, settings, api_keys, **openai_limits)
        # with require_api_key the keys guard the chat routes too, so they are no longer only the OpenAI routes'
        openai_keys = None if require_api_key else api_keys
        openai_table = openai_route_table(openai_routes, openai_prefix, openai_keys, self.table)
        self.table.update(openai_table)
        self.openai_paths = frozenset(openai_table)
        if metrics_path is not None and metrics_registry is None and not metrics_available():
            logger.warning("prometheus-client is not installed, so %s is not served; pip install it", metrics_path)
            metrics_path = None
        metrics = None
        if metrics_path is not None:
            metrics = ChatMetrics(self.admission, registry=metrics_registry, engine=engine)
        self.observer = self.routes.observer = openai_routes.observer = Observer(metrics, log_text=log_text)
        operations = OperationsRoutes(engine, self.admission, metrics)
        ops_paths = {"healthz": health_path, "readyz": ready_path, "metrics": metrics_path}
        ops_table = operations.table(ops_paths, self.table)
        self.table.update(ops_table)
        self.guard = RequestGuard(api_keys, require_api_key=require_api_key, allowed_origins=allowed_origins, csrf=csrf)
        session_routes = SessionRoutes(self.routes, on_feedback, chat_paths)
        self.table.update(session_routes.table(extra_paths or {}, ui_path, self.table))
        # API keys and the CSRF check cover the session routes; the OpenAI routes check their own keys, and health,
        # metrics and the page stay open
        self.guarded = set(self.table) - set(openai_table) - set(ops_table) - {ui_path}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(self.app, scope, receive, send)
            return
        route = self.table.get(route_path(scope)) if scope["type"] == "http" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        method, handler = route
        send = self.observer.counting_send(route_path(scope), send)
        # OpenAI clients expect OpenAI's error shape, also for what fails before the handler (405)
        send_failure = send_openai_error if route_path(scope) in self.openai_paths else send_error
        try:
            if scope["method"] != method:
                raise HTTPError(405, "method_not_allowed", f"use {method} for this route", {"Allow": method})
            if route_path(scope) in self.guarded:
                self.guard.check(scope)
            await handler(scope, receive, send)
        except HTTPError as error:
            self.observer.http_error(error)
            await send_failure(send, error)
        except Rejected as rejection:
            self.observer.rejected(rejection.reason)
            await send_failure(send, rejection.http_error())
        except ClientDisconnected:
            return

    async def startup(self) -> None:
        await self.engine.start()
        self.signals.install()

    async def shutdown(self) -> None:
        self.signals.uninstall()
        await (self.signals.task or self.drain())  # join the drain a signal started rather than begin another
        await self.engine.close()
        closer = getattr(self.routes.store, "aclose", None)  # e.g. RedisHistoryStore's connection pool
        if closer is not None:
            await closer()

    async def drain(self, grace: float | None = None) -> bool:
        """Stop admitting (503 + ``Retry-After``; ``/readyz`` says 503), let running streams finish for ``grace``
        seconds (default ``drain_timeout``), then end them with an in-band error. True if all ended in time."""
        grace = self.drain_timeout if grace is None else grace
        if await drain(self.admission, self.observer, grace):
            return True
        logger.warning("chat streams still running after %.0f s of drain and a cancel; closing anyway", grace)
        return False
