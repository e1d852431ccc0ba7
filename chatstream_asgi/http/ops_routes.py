"""The operations routes: ``GET /healthz``, ``/readyz`` and ``/metrics`` (what they report is in ``ops``).

- ``/healthz``: the process answers (200), whatever the model is doing.
- ``/readyz``: 200 when ``ops.health.readiness`` says ready; 503 + ``Retry-After`` while loading or draining.
- ``/metrics``: the Prometheus text exposition of the middleware's collectors.
"""

from __future__ import annotations

from ..engines.base import Engine
from ..errors import ConfigurationError
from ..ops.admission import Admission
from ..ops.health import readiness
from ..ops.metrics import ChatMetrics
from .asgi import send_json
from .types import Handler, HTTPReceive, HTTPSend, Scope, response_body, response_start

NO_STORE = [(b"cache-control", b"no-store")]
NOT_READY_RETRY = [(b"retry-after", b"5")]


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

    async def healthz(self, scope: Scope, receive: HTTPReceive, send: HTTPSend) -> None:
        await send_json(send, 200, {"status": "ok"})

    async def readyz(self, scope: Scope, receive: HTTPReceive, send: HTTPSend) -> None:
        ready, body = readiness(self.engine, self.admission)
        if ready:
            await send_json(send, 200, body)
        else:
            await send_json(send, 503, body, NOT_READY_RETRY)

    async def metrics_text(self, scope: Scope, receive: HTTPReceive, send: HTTPSend) -> None:
        assert self.metrics is not None
        body, content_type = self.metrics.exposition()
        headers = [(b"content-type", content_type.encode("latin-1")), (b"content-length", str(len(body)).encode())]
        await send(response_start(200, [*headers, *NO_STORE]))
        await send(response_body(body))

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
