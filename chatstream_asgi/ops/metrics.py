"""Prometheus metrics and the one-line structured log of each generation.

``prometheus-client`` is a dependency (``/metrics`` is on by default, so it must work after a plain install),
imported only when a middleware turns metrics on. Names follow vLLM's (``chatstream_time_to_first_token_seconds``, ...)
so existing dashboards need only the prefix changed. Each middleware owns its own registry unless given
one: two middlewares in one process share nothing.

The hot path stays cheap: per token, ``GenerationProbe.on_token`` does one drain check and, with metrics on,
one histogram observe; everything else is observed once per request.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ..engines.base import engine_restarts, engine_stats, prefix_cache_stats
from ..errors import ConfigurationError, HTTPError

if TYPE_CHECKING:
    from .admission import Admission

request_log = logging.getLogger("chatstream_asgi.requests")
INSTALL_HINT = "pip install prometheus-client"  # a dependency; missing only from a broken or --no-deps install
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)
REJECTION_STATUSES = frozenset({401, 403, 409, 413, 429, 503})  # refusals worth a rate alert, unlike a 400
Send = Callable[[Any], Awaitable[None]]
Outcome = Literal["completed", "disconnected", "stopped", "error", "timeout", "cancelled"]


def metrics_available() -> bool:
    return importlib.util.find_spec("prometheus_client") is not None


class ChatMetrics:
    """The Prometheus collectors of one middleware.

    Args:
        admission: read at scrape time for the running and waiting gauges.
        registry: a ``prometheus_client.CollectorRegistry``; by default a new one of its own.
        engine: read at scrape time for the prefix cache figures, if it has a prefix cache.
    """

    def __init__(self, admission: Admission, *, registry: Any = None, engine: object = None) -> None:
        try:
            import prometheus_client as prom
        except ImportError as exc:
            message = f"metrics need prometheus-client: {INSTALL_HINT}; or pass metrics_path=None"
            raise ConfigurationError(message) from exc
        self._prom = prom
        self.registry = r = prom.CollectorRegistry() if registry is None else registry

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return prom.Histogram(f"chatstream_{name}", doc, registry=r, buckets=buckets)

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
            return prom.Counter(f"chatstream_{name}", doc, labels, registry=r)

        self.requests = counter("http_requests", "Chat route requests by route and status.", ("route", "status"))
        running = prom.Gauge("chatstream_num_requests_running", "Generations holding a slot.", registry=r)
        running.set_function(lambda: admission.running)
        waiting = prom.Gauge("chatstream_num_requests_waiting", "Requests queued for a slot.", registry=r)
        waiting.set_function(lambda: admission.waiting)
        self.queue_time = histogram("request_queue_time_seconds", "Seconds queued before a slot.", LATENCY_BUCKETS)
        self.ttft = histogram("time_to_first_token_seconds", "Seconds from slot to first text.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Seconds between two text chunks.", ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Seconds from admission to the end.", LATENCY_BUCKETS)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.rejected = counter("request_rejected", "Requests refused, by reason.", ("reason",))
        self.outcomes = counter("request_outcome", "Generations by how they ended.", ("outcome",))
        self.disconnects = counter("client_disconnects", "Clients that left, by stage (queued, streaming).", ("stage",))
        if prefix_cache_stats(engine) is not None:
            r.register(PrefixCacheCollector(engine))
        if engine_stats(engine) is not None or engine_restarts(engine) is not None:
            r.register(EngineCollector(engine))

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition of every collector, and its content type."""
        return self._prom.generate_latest(self.registry), self._prom.CONTENT_TYPE_LATEST


class PrefixCacheCollector:
    """The engine's prefix cache, read at scrape time (the engine counts; nothing is done per request here).

    ``queries`` and ``hits`` count prompt tokens, as vLLM's ``prefix_cache_queries`` / ``prefix_cache_hits``:
    their rates' ratio is the hit rate.
    """

    def __init__(self, engine: object) -> None:
        self.engine = engine

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = prefix_cache_stats(self.engine)
        if stats is None:
            return
        name = "chatstream_prefix_cache_"
        yield CounterMetricFamily(name + "queries", "Prompt tokens looked up in the cache.", stats.queries_tokens)
        yield CounterMetricFamily(name + "hits", "Prompt tokens read from the cache.", stats.hit_tokens)
        yield CounterMetricFamily(name + "evictions", "Prefix cache entries evicted for room.", stats.evictions)
        yield GaugeMetricFamily(name + "bytes", "KV bytes held by the prefix cache.", stats.bytes)
        yield GaugeMetricFamily(name + "capacity_bytes", "The prefix cache's budget (0: off).", stats.capacity_bytes)
        yield GaugeMetricFamily(name + "entries", "Sequences held by the prefix cache.", stats.entries)


class EngineCollector:
    """The engine's batch and restarts, read at scrape time.

    Per process, ``num_requests_running`` / ``_waiting`` count this web process's requests; these count the
    engine's, and an engine process shared by several web workers reports every worker's sequences here.
    """

    def __init__(self, engine: object) -> None:
        self.engine = engine

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = engine_stats(self.engine)
        if stats is not None:
            name = "chatstream_engine_"
            yield GaugeMetricFamily(name + "sequences_running", "Sequences in the engine's batch.", stats.running)
            yield GaugeMetricFamily(name + "sequences_waiting", "Sequences queued inside the engine.", stats.waiting)
            yield CounterMetricFamily(name + "steps", "Forward steps the engine took.", stats.steps)
        restarts = engine_restarts(self.engine)
        if restarts is not None:
            yield CounterMetricFamily("chatstream_engine_restarts", "Engine process restarts.", restarts)


class Observer:
    """What the routes report to: metrics (if on), the request log and the drain state.

    Args:
        metrics: the collectors, or None to count nothing.
        log_text: put the user's input and the reply in the request log (off: never the message text).
    """

    def __init__(self, metrics: ChatMetrics | None = None, *, log_text: bool = False) -> None:
        self.metrics = metrics
        self.log_text = log_text
        self.cancelling = False  # set by a drain whose grace period ran out: a stream's next token ends it
        self.running: set[Callable[[], None]] = set()  # each running stream's "end now" (http.streaming's senders)

    def start(self, route: str, request_id: str, queue_wait: float) -> GenerationProbe:
        if self.metrics is not None:
            self.metrics.queue_time.observe(queue_wait)
        return GenerationProbe(self, route, request_id, queue_wait)

    def rejected(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.rejected.labels(reason).inc()

    def http_error(self, error: HTTPError) -> None:
        if error.status in REJECTION_STATUSES:
            self.rejected(error.error_type)

    def left_queue(self) -> None:
        if self.metrics is not None:
            self.metrics.disconnects.labels("queued").inc()

    def counting_send(self, route: str, send: Send) -> Send:
        """``send`` that counts the response's status once it starts (one comparison per message)."""
        metrics = self.metrics
        if metrics is None:
            return send

        async def counted(message: Any) -> None:
            if message["type"] == "http.response.start":
                metrics.requests.labels(route, str(message["status"])).inc()
            await send(message)

        return counted


@dataclass
class StreamResult:
    """What happened to one streamed reply, as ``http.streaming`` records it; ``text`` is the reply as far as sent."""

    outcome: Outcome = "completed"
    parts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the engine's prefix cache supplied
    started: bool = False
    time_to_first_token: float | None = None
    error: BaseException | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)


class StreamDrained(HTTPError):
    """What ``on_token`` raises once a drain's grace is over: the reply ends in-band, counted as ``drained``."""

    def __init__(self) -> None:
        # Retry-After 1: this server is going away, so the retry is for another replica, at once (the non-streaming
        # OpenAI route answers with this error; a client without the header would back off on its own schedule)
        message = "the server is shutting down and ended this reply; retry elsewhere"
        super().__init__(503, "draining", message, {"Retry-After": "1"})


def outcome_of(result: StreamResult) -> str:
    """The outcome counted and logged: ``drained`` apart from ``error``."""
    # StreamResult.outcome stays "error": the OpenAI route without streaming answers that with the 503 draining
    return "drained" if isinstance(result.error, StreamDrained) else result.outcome


class GenerationProbe:
    """One generation's timings; ``on_token`` runs for each text chunk, ``done`` once at the end."""

    __slots__ = ("observer", "route", "request_id", "queue_wait", "started", "last")

    def __init__(self, observer: Observer, route: str, request_id: str, queue_wait: float) -> None:
        self.observer = observer
        self.route = route
        self.request_id = request_id
        self.queue_wait = queue_wait
        self.started = time.perf_counter()
        self.last: float | None = None

    def on_token(self) -> None:
        observer = self.observer
        if observer.cancelling:
            raise StreamDrained
        if observer.metrics is not None:
            now = time.perf_counter()
            if self.last is not None:
                observer.metrics.itl.observe(now - self.last)
            self.last = now

    def done(self, result: StreamResult, user_input: str | None = None) -> dict[str, Any]:
        """Observe the finished generation and log it; returns the logged fields."""
        duration = time.perf_counter() - self.started
        metrics = self.observer.metrics
        if metrics is not None:
            if result.time_to_first_token is not None:
                metrics.ttft.observe(result.time_to_first_token)
            metrics.prompt_tokens.inc(result.prompt_tokens)
            # a cut stream of an engine that counts only at the end (an upstream): its text chunks are the best figure
            metrics.generation_tokens.inc(result.completion_tokens or len(result.parts))
            metrics.e2e.observe(self.queue_wait + duration)
            metrics.outcomes.labels(outcome_of(result)).inc()
            if result.outcome == "disconnected":
                metrics.disconnects.labels("streaming").inc()
        fields = self.fields(result, duration)
        if self.observer.log_text:
            fields.update(user_input=user_input, reply=result.text)
        if request_log.isEnabledFor(logging.INFO):  # not built for nobody: 7 us, 2% of a short request's web CPU
            request_log.info("generation %s", json.dumps(fields, ensure_ascii=False), extra={"chatstream": fields})
        return fields

    def fields(self, result: StreamResult, duration: float) -> dict[str, Any]:
        ttft = result.time_to_first_token
        return {
            "request_id": self.request_id,
            "route": self.route,
            "outcome": outcome_of(result),
            "finish_reason": result.finish_reason,
            "queue_wait_s": round(self.queue_wait, 6),
            "ttft_s": None if ttft is None else round(ttft, 6),
            "duration_s": round(duration, 6),
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "cached_tokens": result.cached_tokens,
            "error": None if result.error is None else type(result.error).__name__,
        }
