"""``EngineReplicas``: least-loaded routing over mock engines, and two real CPU replicas of the tiny model."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from chatstream_asgi import MockEngine
from chatstream_asgi.engines.base import SamplingParams
from chatstream_asgi.engines.replicas import EngineReplicas
from chatstream_asgi.errors import ConfigurationError

from .apps import build_middleware, call, chat
from .asgi_fakes import wait_until, with_hang_guard

pytestmark = pytest.mark.asyncio
PARAMS = SamplingParams(max_new_tokens=8)


async def drain_stream(replicas: EngineReplicas) -> str:
    parts = [chunk.text async for chunk in replicas.stream([{"role": "user", "content": "hi"}], PARAMS)]
    return "".join(parts)


async def test_new_streams_go_to_the_least_loaded_replica() -> None:
    slow, fast = MockEngine("a b c d e f g", token_delay=0.05), MockEngine("a b c d e f g", token_delay=0.05)
    replicas = EngineReplicas([slow, fast])
    await replicas.start()  # as the lifespan does: only ready replicas are chosen
    first = asyncio.ensure_future(drain_stream(replicas))
    await wait_until(lambda: replicas.loads == [1, 0])
    second = asyncio.ensure_future(drain_stream(replicas))
    await wait_until(lambda: replicas.loads == [1, 1])
    third = asyncio.ensure_future(drain_stream(replicas))
    await wait_until(lambda: sum(replicas.loads) == 3)
    assert sorted(replicas.loads) == [1, 2]
    await with_hang_guard(asyncio.gather(first, second, third))
    assert replicas.loads == [0, 0] and sum(replicas.served) == 3


async def test_ties_rotate_so_sequential_chats_alternate() -> None:
    replicas = EngineReplicas([MockEngine("x"), MockEngine("x"), MockEngine("x")])
    await replicas.start()  # as the lifespan does: only ready replicas are chosen
    for _ in range(6):
        await drain_stream(replicas)
    assert replicas.served == [2, 2, 2]


async def test_a_closed_stream_frees_its_replica_and_stops_the_engine() -> None:
    engines = [MockEngine(" ".join(["w"] * 100), token_delay=0.01) for _ in range(2)]
    replicas = EngineReplicas(engines)
    chunks = replicas.stream([{"role": "user", "content": "hi"}], PARAMS)
    await anext(chunks)
    assert replicas.loads == [1, 0]
    await chunks.aclose()  # type: ignore[attr-defined]
    assert replicas.loads == [0, 0] and engines[0].running == 0


async def test_lifecycle_and_sizes_cover_every_replica() -> None:
    engines = [MockEngine(max_batch_size=4), MockEngine(max_batch_size=4)]
    replicas = EngineReplicas(engines)
    assert replicas.max_batch_size == 8 and not replicas.ready
    await replicas.start()
    assert replicas.ready
    await replicas.close()
    assert not any(engine.ready for engine in engines)


async def test_a_replica_that_is_down_gets_no_chats_and_the_pool_stays_ready() -> None:
    # an engine process that died is not ready until it is back: chats went to it half the time and got 503
    engines = [MockEngine("x"), MockEngine("x")]
    replicas = EngineReplicas(engines)
    await replicas.start()
    app = build_middleware(replicas)
    assert (await chat(app, "hi")).status == 200  # the conversation's affinity: replica 0
    await engines[0].close()  # down
    assert replicas.ready and replicas.replicas_ready == (1, 2)
    for _ in range(4):
        assert await drain_stream(replicas) == "x"
    assert replicas.served == [1, 4]
    ready = await call(app, "GET", "/readyz")
    assert ready.status == 200 and ready.json()["replicas_ready"] == "1/2"
    await engines[1].close()
    assert not replicas.ready
    await engines[0].start()  # back: it takes chats again
    assert await drain_stream(replicas) == "x" and replicas.served == [2, 4]
    await replicas.close()


async def test_bad_replica_sets_are_refused() -> None:
    with pytest.raises(ConfigurationError):
        EngineReplicas([])
    with pytest.raises(ConfigurationError):
        EngineReplicas([MockEngine(model_name="a"), MockEngine(model_name="b")])
    with pytest.raises(ConfigurationError):
        EngineReplicas.from_pretrained("unused", devices="cpu")  # type: ignore[arg-type]


async def test_two_cpu_transformers_replicas_share_the_chats(tiny_model_dir: Path) -> None:
    replicas = EngineReplicas.from_pretrained(str(tiny_model_dir), devices=["cpu", "cpu"], max_batch_size=2)
    app = build_middleware(replicas.engines, max_concurrency=4)
    assert isinstance(app.engine, EngineReplicas)
    await app.engine.start()
    try:
        sends = await asyncio.gather(*(chat(app, f"hello {i}", max_new_tokens=6, hang_guard=60) for i in range(4)))
        assert all(send.status == 200 and send.complete for send in sends)
        assert app.engine.served == [2, 2] and app.engine.loads == [0, 0]
        assert app.admission.running == 0
    finally:
        await app.engine.close()


def conversation(*turns: str) -> list[dict[str, str]]:
    """Alternating user and assistant messages, ending with a user one."""
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(turns)]


async def drain(replicas: EngineReplicas, messages: list[dict[str, str]]) -> None:
    async for _ in replicas.stream(messages, PARAMS):
        pass


async def test_a_chats_next_turn_goes_to_the_replica_that_served_its_last_turn() -> None:
    replicas = EngineReplicas([MockEngine("x"), MockEngine("x")])
    await replicas.start()  # as the lifespan does: only ready replicas are chosen
    await drain(replicas, conversation("alice"))  # first turns: least loaded, ties rotate
    await drain(replicas, conversation("bob"))
    assert replicas.served == [1, 1]
    for turn in range(3):  # bob's later turns stay on replica 1, where round robin would alternate
        await drain(replicas, conversation("bob", "x", *[f"more {i}" for i in range(turn)], "next"))
    await drain(replicas, conversation("alice", "x", "and then?"))
    assert replicas.served == [2, 4] and replicas.affine == 4


async def test_first_turns_alike_still_spread_and_a_full_replica_sends_the_turn_elsewhere() -> None:
    engines = [MockEngine(" ".join(["w"] * 200), token_delay=0.01, max_batch_size=1) for _ in range(2)]
    replicas = EngineReplicas(engines)
    await replicas.start()  # as the lifespan does: only ready replicas are chosen
    await drain(replicas, conversation("hello"))
    await drain(replicas, conversation("hello"))  # the same opening line: a first turn, so no affinity
    assert replicas.served == [1, 1]
    busy = asyncio.ensure_future(drain(replicas, conversation("hello", "w", "go on")))  # to replica 1, last to serve
    await wait_until(lambda: replicas.loads == [0, 1])
    await drain(replicas, conversation("hello", "w", "go on", "w", "and?"))  # replica 1 is full: the least loaded
    await with_hang_guard(busy)
    assert replicas.served == [2, 2] and replicas.affine == 1
