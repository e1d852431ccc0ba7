"""Two uvicorn replicas sharing one real Redis: one coherent history, and a clear 503 while Redis is down."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatstream_asgi import MockEngine
from chatstream_asgi.engines.base import ChatMessage
from chatstream_asgi.sessions.redis_store import RedisHistoryStore
from tests.redis_server import RedisServer, running_redis

from .servers import UvicornThread, chat_app, not_found_app

pytestmark = pytest.mark.asyncio
COOKIE = "chatstream_session"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    yield from running_redis(tmp_path)


def counting_reply(messages: Sequence[ChatMessage]) -> str:
    """The reply names how many user turns the replica saw: a replica with a stale history says a lower number."""
    return f"turn {sum(m['role'] == 'user' for m in messages)}"


def replica(serve: Callable[..., UvicornThread], url: str) -> UvicornThread:
    store = RedisHistoryStore(url, ttl=600, timeout=1.0)
    return serve(chat_app(not_found_app, MockEngine(counting_reply), history_store=store))


async def post(client: httpx.AsyncClient, text: str, cookie: str | None) -> httpx.Response:
    return await client.post("/chat_stream", json={"user_input": text}, headers=cookie_header(cookie), timeout=5)


def cookie_header(cookie: str | None) -> dict[str, str]:
    return {"cookie": f"{COOKIE}={cookie}"} if cookie else {}


async def test_one_session_alternating_between_two_replicas_keeps_one_history(
    serve: Callable[..., UvicornThread], redis_server: RedisServer
) -> None:
    servers = [replica(serve, redis_server.url), replica(serve, redis_server.url)]
    async with httpx.AsyncClient(base_url=servers[0].url) as a, httpx.AsyncClient(base_url=servers[1].url) as b:
        clients = [a, b]
        cookie = None
        for turn in range(1, 7):
            response = await post(clients[turn % 2], f"question {turn}", cookie)
            assert response.status_code == 200, response.text
            assert response.text == f"turn {turn}"
            cookie = cookie or response.cookies[COOKIE]
        for client in clients:
            history = (await client.get("/get_prompt", headers=cookie_header(cookie))).json()["messages"]
            assert [m["content"] for m in history[::2]] == [f"question {t}" for t in range(1, 7)]
            assert [m["content"] for m in history[1::2]] == [f"turn {t}" for t in range(1, 7)]
        await clients[0].post("/clear_context", headers=cookie_header(cookie))
        assert (await clients[1].get("/get_prompt", headers=cookie_header(cookie))).json()["messages"] == []


async def test_redis_down_gives_a_clear_503_then_service_resumes(
    serve: Callable[..., UvicornThread], redis_server: RedisServer
) -> None:
    server = replica(serve, redis_server.url)
    async with httpx.AsyncClient(base_url=server.url) as client:
        first = await post(client, "hello", None)
        cookie = first.cookies[COOKIE]
        redis_server.kill()
        for _ in range(3):
            down = await post(client, "still there?", cookie)
            assert down.status_code == 503 and down.headers["retry-after"]
            assert down.json()["error"]["type"] == "history_unavailable"
        assert (await client.get("/get_prompt", headers=cookie_header(cookie))).status_code == 503
        assert (await client.get("/healthz")).status_code == 200  # the process itself is fine
        load: dict[str, Any] = (await client.get("/get_load")).json()
        assert load["running"] == 0 and load["waiting"] == 0
        redis_server.start()
        back = await post(client, "back?", cookie)
        assert back.status_code == 200 and back.text == "turn 1"  # Redis restarted empty: a fresh history
