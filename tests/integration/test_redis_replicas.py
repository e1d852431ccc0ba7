"""Two uvicorn replicas sharing one real Redis: one coherent history, and a clear 503 while Redis is down."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatstream_asgi import MockEngine
from chatstream_asgi.engines.base import ChatMessage
from chatstream_asgi.http import turns
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


def replica(
    serve: Callable[..., UvicornThread], url: str, token_delay: float = 0.0, reply: Any = counting_reply
) -> UvicornThread:
    store = RedisHistoryStore(url, ttl=600, timeout=1.0)
    engine = MockEngine(reply, token_delay=token_delay)
    return serve(chat_app(not_found_app, engine, history_store=store))


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


async def test_a_second_turn_of_a_session_is_refused_on_every_replica_while_one_streams(
    serve: Callable[..., UvicornThread], redis_server: RedisServer
) -> None:
    # without the lock in Redis both turns ran, and the one saved last silently replaced the other's
    servers = [replica(serve, redis_server.url, token_delay=0.2), replica(serve, redis_server.url)]
    async with httpx.AsyncClient(base_url=servers[0].url) as a, httpx.AsyncClient(base_url=servers[1].url) as b:
        cookie = (await post(b, "first", None)).cookies[COOKIE]
        async with a.stream("POST", "/chat_stream", json={"user_input": "tab A"}, headers=cookie_header(cookie)) as r:
            assert r.status_code == 200
            refused = await post(b, "tab B", cookie)
            assert refused.status_code == 409 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["type"] == "turn_in_progress"
            assert (await r.aread()).decode() == "turn 2"
        second = await post(b, "tab B again", cookie)  # the lock went with the reply's end
        assert second.status_code == 200 and second.text == "turn 3"
        async with a.stream("POST", "/chat_stream", json={"user_input": "left"}, headers=cookie_header(cookie)) as r:
            await r.aiter_bytes().__anext__()  # the client leaves mid-reply: its turn ends, the lock goes too
        for _ in range(50):
            after_leaving = await post(b, "after", cookie)
            if after_leaving.status_code != 409:
                break
            await asyncio.sleep(0.05)  # the server notices the disconnect at its next write
        assert after_leaving.status_code == 200, after_leaving.text
        history = (await b.get("/get_prompt", headers=cookie_header(cookie))).json()["messages"]
        assert [m["content"] for m in history[::2]] == ["first", "tab A", "tab B again", "left", "after"]
    import redis

    assert redis.Redis.from_url(redis_server.url).keys("*turn:*") == []  # no lock left behind


async def test_the_turn_lock_outlives_its_expiry_while_the_reply_streams(
    serve: Callable[..., UvicornThread], redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(turns, "TURN_LOCK_SECONDS", 0.3)  # renewed every 0.1 s
    slow = replica(serve, redis_server.url, token_delay=0.25, reply="one two three four five six")  # ~1.5 s
    servers = [slow, replica(serve, redis_server.url)]
    async with httpx.AsyncClient(base_url=servers[0].url) as a, httpx.AsyncClient(base_url=servers[1].url) as b:
        cookie = (await post(b, "first", None)).cookies[COOKIE]
        async with a.stream("POST", "/chat_stream", json={"user_input": "long"}, headers=cookie_header(cookie)) as r:
            await asyncio.sleep(0.5)  # the first token came at 0.25 s: 0.75 s in, the first 0.3 s claim is long over
            assert (await post(b, "meanwhile", cookie)).status_code == 409
            assert (await r.aread()).decode() == "one two three four five six"


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
