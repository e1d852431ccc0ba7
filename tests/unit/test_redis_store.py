"""``RedisHistoryStore`` against a real redis-server started for each test."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from chatstream_asgi import HistoryStore
from chatstream_asgi.errors import ConfigurationError, HistoryStoreError
from chatstream_asgi.sessions.redis_store import RedisHistoryStore
from tests.redis_server import RedisServer, running_redis

pytestmark = pytest.mark.asyncio
TURN = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello ☃"}]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    yield from running_redis(tmp_path)


@pytest_asyncio.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RedisHistoryStore]:
    store = RedisHistoryStore(redis_server.url, ttl=60, timeout=1.0)
    yield store
    await store.aclose()


async def test_round_trip_returns_copies_and_unknown_sessions_are_empty(store: RedisHistoryStore) -> None:
    assert isinstance(store, HistoryStore)
    assert await store.load("nobody") == []
    await store.save("s1", TURN)
    loaded = await store.load("s1")
    assert loaded == TURN and loaded is not TURN
    loaded.append({"role": "user", "content": "changed"})
    assert await store.load("s1") == TURN
    await store.clear("s1")
    await store.clear("s1")  # clearing twice is fine
    assert await store.load("s1") == []


async def test_two_stores_on_one_server_share_history(redis_server: RedisServer, store: RedisHistoryStore) -> None:
    other = RedisHistoryStore(redis_server.url)
    try:
        await store.save("shared", TURN)
        assert await other.load("shared") == TURN
    finally:
        await other.aclose()


async def test_ttl_is_set_and_refreshed_by_load(redis_server: RedisServer) -> None:
    import redis.asyncio as redis

    store = RedisHistoryStore(redis_server.url, ttl=100)
    raw = redis.Redis.from_url(redis_server.url)
    try:
        await store.save("s", TURN)
        await raw.expire("chatstream:history:s", 5)
        await store.load("s")
        assert 90 < await raw.ttl("chatstream:history:s") <= 100
    finally:
        await store.aclose()
        await raw.aclose()


async def test_max_turns_trims_like_the_memory_store(redis_server: RedisServer) -> None:
    store = RedisHistoryStore(redis_server.url, max_turns=1)
    try:
        system = {"role": "system", "content": "be brief"}
        second = [{"role": "user", "content": "2"}, {"role": "assistant", "content": "b"}]
        await store.save("s", [system, *TURN, *second])
        assert await store.load("s") == [system, *second]
    finally:
        await store.aclose()


GARBAGE = {"not json": "{not json", "not messages": '[{"role": 1}]', "nested": "[" * 100_000 + "]" * 100_000}


@pytest.mark.parametrize("garbage", sorted(GARBAGE))
async def test_garbage_in_redis_is_a_store_error_once_then_a_fresh_session(
    store: RedisHistoryStore, garbage: str
) -> None:
    # nested past Python's stack it was a RecursionError (a 500); kept, every retry failed the same way
    await store._client.set("chatstream:history:bad", GARBAGE[garbage])
    with pytest.raises(HistoryStoreError) as failed:
        await store.load("bad")
    assert "role" not in str(failed.value)  # the stored data is not echoed to the client
    assert await store.load("bad") == []


async def test_redis_down_fails_fast_and_recovers_after_restart(
    redis_server: RedisServer, store: RedisHistoryStore
) -> None:
    await store.save("s", TURN)
    redis_server.kill()
    started = time.monotonic()
    for call in (store.load("s"), store.save("s", TURN), store.clear("s")):
        with pytest.raises(HistoryStoreError) as caught:
            await asyncio.wait_for(call, 5)
        assert "redis://" not in str(caught.value)  # never the URL: it may hold a password
    assert time.monotonic() - started < 5
    assert not await store.ping()
    redis_server.start()
    await store.save("s", TURN)  # a fresh connection after the restart (its memory is gone)
    assert await store.load("s") == TURN and await store.ping()


@pytest.mark.parametrize(
    "options", [{"ttl": 0}, {"ttl": -1.0}, {"max_turns": 0}, {"timeout": 0}, {"ttl": True}, {"timeout": float("inf")}]
)
async def test_bad_arguments_are_refused(options: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        RedisHistoryStore("redis://127.0.0.1:1/0", **options)  # type: ignore[arg-type]
