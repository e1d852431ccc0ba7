"""Metrics, readiness and a drain started from the host app's own admin route, on a real uvicorn."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from chatstream_asgi import ChatStreamMiddleware, MockEngine

from .servers import SECRET_KEY, UvicornThread, not_found_app, sse_events, wait_until

pytestmark = pytest.mark.asyncio
pytest.importorskip("prometheus_client")


class AdminApp:
    """The host app: ``POST /admin/drain`` drains the middleware (what a Kubernetes pre-stop hook would call)."""

    def __init__(self) -> None:
        self.middleware: ChatStreamMiddleware | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/admin/drain" and self.middleware is not None:
            ended_in_time = await self.middleware.drain(grace=0.2)
            body = b"drained" if ended_in_time else b"timeout"
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": body})
            return
        await not_found_app(scope, receive, send)


def served(serve: Callable[..., UvicornThread], engine: MockEngine) -> tuple[UvicornThread, ChatStreamMiddleware]:
    admin = AdminApp()
    admin.middleware = ChatStreamMiddleware(admin, engine=engine, secret_key=SECRET_KEY, drain_timeout=1.0)
    return serve(admin.middleware), admin.middleware


async def test_readiness_metrics_and_a_drain_from_an_admin_route(serve: Callable[..., UvicornThread]) -> None:
    server, app = served(serve, MockEngine(" ".join(["word"] * 2000), token_delay=0.005))
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        assert (await client.get("/readyz")).json()["status"] == "ready"  # lifespan started the engine
        headers = {"accept": "text/event-stream"}
        stream = asyncio.ensure_future(client.post("/chat_stream", json={"user_input": "hi"}, headers=headers))
        await wait_until(lambda: app.admission.running == 1)
        assert (await client.post("/admin/drain")).text == "drained"
        events = sse_events((await stream).content)
        assert events[-1][0] == "error" and events[-1][1]["error"]["type"] == "draining"
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        refused = await client.post("/chat_stream", json={"user_input": "hi"})
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert (await client.get("/healthz")).status_code == 200
        metrics = await client.get("/metrics")
        assert metrics.headers["content-type"].startswith("text/plain")
        text = metrics.text
        assert 'chatstream_request_rejected_total{reason="draining"} 1.0' in text
        assert 'chatstream_request_outcome_total{outcome="drained"} 1.0' in text
        assert "chatstream_num_requests_running 0.0" in text
