"""ChatStreamMiddleware: wraps any ASGI app and serves the chat routes in front of it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from .config import (
    ChatStreamConfig,
    GenerationConfig,
    Hooks,
    Limits,
    ObservabilityConfig,
    OpenAIConfig,
    RoutesConfig,
    SecurityConfig,
    SessionConfig,
    Timeouts,
)
from .engines.base import Engine
from .engines.fair_wakes import fair_wakes
from .engines.gc_heap import freeze_startup_heap
from .engines.replicas import as_engine
from .errors import ClientDisconnected, HTTPError
from .http.asgi import route_path, send_error, without_body
from .http.hooks import ChatHooks
from .http.ops_routes import OperationsRoutes
from .http.routes import ChatRoutes, ChatSettings
from .http.security import RequestGuard
from .http.session_routes import SessionRoutes
from .http.types import ASGIApp, Handler, Receive, Scope, Send, http_channels
from .openai.routes import OpenAIRoutes, openai_route_table, send_openai_error
from .ops.admission import Admission, Rejected
from .ops.gc_pauses import GCPauses
from .ops.health import drain
from .ops.lifespan import Lifespan
from .ops.metrics import ChatMetrics, Observer, metrics_available
from .ops.signals import DrainOnSignals
from .sessions.cookie import SessionCookie
from .sessions.history import MemoryHistoryStore
from .sessions.state import SessionStateStore

logger = logging.getLogger("chatstream_asgi")
DEFAULT_OPENAI = OpenAIConfig()  # the default of ``openai=``: a shorthand may change it, unlike one given


class ChatStreamMiddleware:
    """Serve a streaming chat in front of any ASGI app.

    Requests to the chat routes are answered here; every other request (other paths, websockets,
    lifespan) goes to ``app`` unchanged. On lifespan startup the engine is started; on shutdown
    admission drains, running streams get ``Timeouts.drain`` seconds, then the engine closes.

    Args:
        app: the wrapped ASGI application.
        engine: what generates replies (``TransformersEngine``, ``MockEngine``, ...); a list of engines (one per
            device) becomes an ``EngineReplicas`` that sends each new chat to the least loaded one.
        secret_key: signs the session cookie; a list rotates keys (the first signs, all verify).
        limits: ``Limits``: slots, queue, request sizes.
        timeouts: ``Timeouts``: generation, send and drain time.
        sessions: ``SessionConfig``: the session cookie, the history and state stores.
        generation: ``GenerationConfig``: system prompt, sampling defaults, wire format.
        openai: ``OpenAIConfig``: the OpenAI-compatible routes (on at ``/v1`` by default); None turns them off.
        security: ``SecurityConfig``: API keys and the CSRF check.
        observability: ``ObservabilityConfig``: health, readiness and metrics routes, request log.
        routes: ``RoutesConfig``: the chat routes' paths and the chat page.
        hooks: ``Hooks``: the host app's callbacks.
        **shorthands: each flat keyword sets one field of one config object (``max_queue=8`` is
            ``limits=Limits(max_queue=8)``; ``chatstream_asgi.config.SHORTHANDS`` lists them, as does
            docs/configuration.md). Give a concern either its config object or its shorthands: both raise
            ``ConfigurationError``, as does an unknown keyword (the message names the closest one).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        engine: Engine | Sequence[Engine],
        secret_key: str | bytes | Sequence[str | bytes],
        limits: Limits | None = None,
        timeouts: Timeouts | None = None,
        sessions: SessionConfig | None = None,
        generation: GenerationConfig | None = None,
        openai: OpenAIConfig | None = DEFAULT_OPENAI,
        security: SecurityConfig | None = None,
        observability: ObservabilityConfig | None = None,
        routes: RoutesConfig | None = None,
        hooks: Hooks | None = None,
        **shorthands: Any,
    ) -> None:
        given: dict[str, object] = {"limits": limits, "timeouts": timeouts, "sessions": sessions}
        given.update(generation=generation, security=security, observability=observability, routes=routes, hooks=hooks)
        objects = {concern: value for concern, value in given.items() if value is not None}
        if openai is not DEFAULT_OPENAI:  # None included: the routes off
            objects["openai"] = openai
        self.config = config = ChatStreamConfig().replace(**objects, **shorthands)
        self.app = app
        self.engine = engine = as_engine(engine)
        limits = config.limits
        self.admission = Admission(limits.max_concurrency, limits.max_queue, limits.queue_timeout)
        self.routes = chat_routes(engine, self.admission, secret_key, config)
        self.drain_timeout = config.timeouts.drain
        self.freeze_gc = config.timeouts.freeze_gc
        self.signals = DrainOnSignals(self.drain, enabled=config.timeouts.drain_on_signals)
        self.lifespan = Lifespan(self.startup, self.shutdown)
        self.table = self.routes.table(config.routes.chat_paths)
        openai_table = self.mount_openai(config)
        metrics = chat_metrics(self.admission, engine, config.observability)
        self.gc_pauses = GCPauses(metrics.registry) if metrics is not None else None  # watched while serving
        self.observer = self.routes.observer = self.openai_routes.observer = Observer(
            metrics, log_text=config.observability.log_text
        )
        ops_table = OperationsRoutes(engine, self.admission, metrics).table(config.observability.ops_paths, self.table)
        self.table.update(ops_table)
        security = config.security
        self.guard = RequestGuard(
            security.api_keys,
            require_api_key=security.require_api_key,
            allowed_origins=security.allowed_origins,
            csrf=security.csrf,
        )
        session_routes = SessionRoutes(self.routes, config.hooks.on_feedback, config.routes.chat_paths)
        ui_path = config.routes.ui_path
        self.table.update(session_routes.table(config.routes.extra_paths or {}, ui_path, self.table))
        # the page shares its path with the app's own other methods (a POST / of the app's with the page at "/")
        self.page_paths = frozenset({ui_path} if ui_path else ())
        # API keys and the CSRF check cover the session routes; the OpenAI routes check their own keys, and health,
        # metrics and the page stay open
        self.guarded = set(self.table) - set(openai_table) - set(ops_table) - {ui_path}

    def mount_openai(self, config: ChatStreamConfig) -> dict[str, tuple[str, Handler]]:
        """Add the OpenAI routes (none when they are off) to the route table; returns them."""
        openai = config.openai or OpenAIConfig(prefix=None)
        keys = config.security.api_keys
        limits = {"max_body_bytes": openai.max_body_bytes, "max_messages": openai.max_messages}
        self.openai_routes = OpenAIRoutes(self.engine, self.admission, self.routes.settings, keys, **limits)
        # with require_api_key the keys guard the chat routes too, so they are no longer only the OpenAI routes'
        openai_keys = None if config.security.require_api_key else keys
        openai_table = openai_route_table(self.openai_routes, openai.prefix, openai_keys, self.table)
        self.table.update(openai_table)
        self.openai_paths = frozenset(openai_table)
        return openai_table

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(self.app, scope, receive, send)
            return
        route = self.table.get(route_path(scope)) if scope["type"] == "http" else None
        head = route is not None and route[0] == "GET" and scope["method"] == "HEAD"  # a GET without its body
        if route is None or (route_path(scope) in self.page_paths and scope["method"] != route[0] and not head):
            await self.app(scope, receive, send)
            return
        method, handler = route
        if head:
            send = without_body(send)
        http_receive, http_send = http_channels(scope, receive, self.observer.counting_send(route_path(scope), send))
        # OpenAI clients expect OpenAI's error shape, also for what fails before the handler (405)
        send_failure = send_openai_error if route_path(scope) in self.openai_paths else send_error
        try:
            if scope["method"] != method and not head:
                allowed = "GET, HEAD" if method == "GET" else method
                raise HTTPError(405, "method_not_allowed", f"use {method} for this route", {"Allow": allowed})
            if route_path(scope) in self.guarded:
                self.guard.check(scope)
            # A burst of chats (clients that all finished together and all ask again) starts a few per loop
            # iteration, so the wrapped app's requests get in between (engines/fair_wakes.py says why).
            await fair_wakes(asyncio.get_running_loop()).turn()
            await handler(scope, http_receive, http_send)
        except HTTPError as error:
            self.observer.http_error(error)
            await send_failure(http_send, error)
        except Rejected as rejection:
            self.observer.rejected(rejection.reason)
            await send_failure(http_send, rejection.http_error())
        except ClientDisconnected:
            return

    async def startup(self) -> None:
        # an app object can be started again after a shutdown (a TestClient per test, two servers in turn): what the
        # last shutdown's drain left (no admission, streams ending at their next token) goes; signals.install too
        self.admission.reopen()
        self.observer.cancelling = False
        await self.engine.start()
        self.signals.install()
        if self.freeze_gc:  # the model (or the tokenizer and torch) is loaded: freeze what the host app holds now
            freeze_startup_heap("chatstream_asgi startup")
        if self.gc_pauses is not None:
            self.gc_pauses.install()

    async def shutdown(self) -> None:
        self.signals.uninstall()
        if self.gc_pauses is not None:
            self.gc_pauses.uninstall()
        await (self.signals.task or self.drain())  # join the drain a signal started rather than begin another
        await self.engine.close()
        closer = getattr(self.routes.store, "aclose", None)  # e.g. RedisHistoryStore's connection pool
        if closer is not None:
            await closer()

    async def drain(self, grace: float | None = None) -> bool:
        """Stop admitting (503 + ``Retry-After``; ``/readyz`` says 503), let running streams finish for ``grace``
        seconds (default ``Timeouts.drain``), then end them with an in-band error. True if all ended in time."""
        grace = self.drain_timeout if grace is None else grace
        if await drain(self.admission, self.observer, grace):
            return True
        logger.warning("chat streams still running after %.0f s of drain and a cancel; closing anyway", grace)
        return False


def chat_routes(
    engine: Engine, admission: Admission, secret_key: str | bytes | Sequence[str | bytes], config: ChatStreamConfig
) -> ChatRoutes:
    """The chat routes with their cookie signer, stores, settings and hooks, from the config objects."""
    limits, timeouts, sessions, generation = config.limits, config.timeouts, config.sessions, config.generation
    cookie = SessionCookie(
        secret_key,
        cookie_name=sessions.cookie_name,
        max_age=sessions.cookie_max_age,
        https_only=sessions.https_only,
        same_site=sessions.same_site,
    )
    settings = ChatSettings(
        default_params=generation.params,
        system_prompt=generation.system_prompt,
        max_body_bytes=limits.max_body_bytes,
        max_new_tokens_limit=limits.max_new_tokens_limit,
        max_input_chars=limits.max_input_chars,
        max_history_turns=limits.max_history_turns,
        max_input_tokens=limits.max_input_tokens,
        generation_timeout=timeouts.generation,
        send_timeout=timeouts.send,
    )
    store = sessions.history_store if sessions.history_store is not None else MemoryHistoryStore()
    extras = sessions.state_store if sessions.state_store is not None else SessionStateStore()
    hooks = ChatHooks(config.hooks.on_finish, config.hooks.request_interceptor, generation.wire, extras)
    return ChatRoutes(engine, admission, cookie, store, settings, hooks)


def chat_metrics(admission: Admission, engine: Engine, observability: ObservabilityConfig) -> ChatMetrics | None:
    """Prometheus metrics, unless their path is None or prometheus-client is missing (then with a warning)."""
    path, registry = observability.metrics_path, observability.metrics_registry
    if path is None:
        return None
    if registry is None and not metrics_available():
        logger.warning("prometheus-client is not installed, so %s is not served; pip install it", path)
        return None
    return ChatMetrics(admission, registry=registry, engine=engine)
