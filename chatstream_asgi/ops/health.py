"""Liveness, readiness, the metrics route and graceful drain.

- ``GET /healthz``: the process answers (200), whatever the model is doing.
- ``GET /readyz``: 200 once the engine is ready and the middleware is not draining; 503 otherwise, so a
  load balancer stops sending new chats to a replica that is loading or shutting down.
- ``drain(grace)``: admission stops (new generations get 503 + ``Retry-After``, the queue is emptied the
  same way), running streams get ``grace`` seconds to finish; after that each ends at its next token
  with an in-band ``draining`` error (the response is still completed properly, its slot freed).

uvicorn waits for open connections *before* it sends the lifespan shutdown, so the middleware also starts the
drain on SIGTERM/SIGINT (``signals.py``); with that off, call ``drain()`` from a pre-stop hook instead.
A reply ended by the drain is counted and logged with the outcome ``drained``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from ..engines.base import Engine
from ..errors import ConfigurationError
from ..http.asgi import send_json
from ..http.types import Receive, Scope, Send
from .admission import Admission
from .metrics import ChatMetrics, Observer

Handler = Callable[[Scope, Receive, Send], Awaitable[None]]
CANCEL_WAIT = 5.0  # seconds streams get to notice a cancelling drain before the caller goes on
NO_STORE = [(b"cache-control", b"no-store")]


class OperationsRoutes:
    """``/healthz``, ``/readyz`` and ``/metrics``, sharing the middleware's engine, admission and metrics.

    Args:
        engine: its ``ready`` property decides readiness.
        admission: its ``draining`` flag makes the replica not ready.
        metrics: the collectors served at the metrics path, or None.
    """

    def __init__(self, engine: Engine, admission: Admission, metrics: ChatMetrics | None) -> None:
        self.engine = engine
        self.admission = admission
        self.metrics = metrics

    async def healthz(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_json(send, 200, {"status": "ok"})

    async def readyz(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.admission.draining:
            await send_json(send, 503, {"status": "draining"}, [(b"retry-after", b"5")])
        elif not self.engine.ready:
            await send_json(send, 503, {"status": "loading"}, [(b"retry-after", b"5")])
        else:
            await send_json(send, 200, {"status": "ready", "model": self.engine.model_name})

    async def metrics_text(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.metrics is not None
        body, content_type = self.metrics.exposition()
        headers = [(b"content-type", content_type.encode("latin-1")), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": [*headers, *NO_STORE]})
        await send({"type": "http.response.body", "body": body})

    def table(
        self, paths: dict[str, str | None], taken: dict[str, tuple[str, Handler]]
    ) -> dict[str, tuple[str, Handler]]:
        """Routes for the names in ``paths`` (``healthz``, ``readyz``, ``metrics``) whose path is not None."""
        handlers: dict[str, Handler] = {"healthz": self.healthz, "readyz": self.readyz}
        if self.metrics is not None:
            handlers["metrics"] = self.metrics_text
        table: dict[str, tuple[str, Handler]] = {}
        for name, handler in handlers.items():
            path = paths.get(name)
            if path is None:
                continue
            if not path.startswith("/") or path in taken or path in table:
                raise ConfigurationError(f"{name}_path must start with '/' and not clash with another route: {path!r}")
            table[path] = ("GET", handler)
        return table


async def drain(admission: Admission, observer: Observer, grace: float) -> bool:
    """Stop admitting, give running streams ``grace`` seconds, then end them; True if all ended in time."""
    if grace < 0:
        raise ConfigurationError(f"the drain grace period must be seconds >= 0, got {grace!r}")
    admission.drain()
    if await admission.wait_idle(grace):
        return True
    observer.cancelling = True
    return await admission.wait_idle(CANCEL_WAIT)
