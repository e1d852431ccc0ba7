"""MemoryHistoryStore: bounded by count (LRU) and idle time (TTL), copies in and out, safe across threads."""

from __future__ import annotations

import asyncio
import random
import sys
import threading

import pytest

from chatstream_asgi.errors import ConfigurationError
from chatstream_asgi.sessions.history import HistoryStore, MemoryHistoryStore, copy_messages, trim_turns


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def turn(number: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"q{number}"}, {"role": "assistant", "content": f"a{number}"}]


def test_memory_store_satisfies_the_protocol() -> None:
    assert isinstance(MemoryHistoryStore(), HistoryStore)


@pytest.mark.asyncio
async def test_save_then_load_roundtrips_and_unknown_sessions_are_empty() -> None:
    store = MemoryHistoryStore()
    assert await store.load("nobody") == []
    await store.save("s1", turn(1))
    assert await store.load("s1") == turn(1)
    assert await store.load("s2") == []


@pytest.mark.asyncio
async def test_stored_history_is_a_copy_not_an_alias() -> None:
    store = MemoryHistoryStore()
    messages = turn(1)
    await store.save("s", messages)
    messages[0]["content"] = "changed after save"
    messages.append({"role": "user", "content": "appended after save"})
    loaded = await store.load("s")
    assert loaded == turn(1)
    loaded[1]["content"] = "changed after load"
    loaded.clear()
    assert await store.load("s") == turn(1)


@pytest.mark.asyncio
async def test_least_recently_used_session_is_evicted_at_max_sessions() -> None:
    store = MemoryHistoryStore(max_sessions=2)
    await store.save("a", turn(1))
    await store.save("b", turn(2))
    await store.load("a")  # a is now more recent than b
    await store.save("c", turn(3))
    assert len(store) == 2
    assert await store.load("b") == []
    assert await store.load("a") == turn(1) and await store.load("c") == turn(3)


@pytest.mark.asyncio
async def test_ttl_counts_from_the_last_access() -> None:
    clock = FakeClock()
    store = MemoryHistoryStore(ttl=60, clock=clock)
    await store.save("s", turn(1))
    clock.now += 59
    assert await store.load("s") == turn(1)  # the load renews the session
    clock.now += 59
    assert "s" in store and await store.load("s") == turn(1)
    clock.now += 60
    assert "s" not in store
    assert await store.load("s") == [] and len(store) == 0


@pytest.mark.asyncio
async def test_expired_sessions_are_swept_before_live_ones_are_evicted() -> None:
    clock = FakeClock()
    store = MemoryHistoryStore(max_sessions=3, ttl=10, clock=clock)
    await store.save("old1", turn(1))
    await store.save("old2", turn(2))
    clock.now += 5
    await store.save("live", turn(3))
    clock.now += 6
    await store.save("new", turn(4))
    assert len(store) == 2 and "live" in store and "new" in store


@pytest.mark.asyncio
async def test_ttl_none_never_expires() -> None:
    clock = FakeClock()
    store = MemoryHistoryStore(ttl=None, clock=clock)
    await store.save("s", turn(1))
    clock.now += 10**9
    assert await store.load("s") == turn(1)


@pytest.mark.asyncio
async def test_clear_forgets_a_session_and_ignores_unknown_ones() -> None:
    store = MemoryHistoryStore()
    await store.save("s", turn(1))
    await store.clear("s")
    await store.clear("never-existed")
    assert await store.load("s") == [] and len(store) == 0


@pytest.mark.asyncio
async def test_max_turns_keeps_the_system_prompt_and_the_last_pairs() -> None:
    store = MemoryHistoryStore(max_turns=2)
    system = [{"role": "system", "content": "be brief"}]
    await store.save("s", system + turn(1) + turn(2) + turn(3))
    assert await store.load("s") == system + turn(2) + turn(3)
    await store.save("t", turn(1) + turn(2))
    assert await store.load("t") == turn(1) + turn(2)


def test_trim_turns_drops_an_orphaned_reply() -> None:
    messages = turn(1) + turn(2) + [{"role": "user", "content": "q3"}]
    assert trim_turns(messages, 1) == [{"role": "user", "content": "q3"}]
    assert trim_turns(messages, None) is messages


def chat(pairs: int, *, system: bool = True) -> list[dict[str, str]]:
    head = [{"role": "system", "content": "be brief"}] if system else []
    return head + [m for number in range(pairs) for m in turn(number)]


def first_kept_pair(trimmed: list[dict[str, str]]) -> int:
    """The number of the first kept pair, from the ``q<number>`` of its question."""
    questions = [m for m in trimmed if m["role"] == "user"]
    return int(questions[0]["content"][1:]) if questions else -1


@pytest.mark.parametrize("max_turns", [1, 3, 4, 8, 13])
def test_trim_turns_moves_the_window_start_only_every_step_turns(max_turns: int) -> None:
    step = max(1, max_turns // 4)
    starts = []
    for pairs in range(1, 60):
        trimmed = trim_turns(chat(pairs), max_turns)
        kept = len(trimmed) // 2
        assert trimmed[0]["role"] == "system" and trimmed[1]["role"] == "user"
        assert trimmed == trimmed[:1] + chat(pairs)[-2 * kept :]
        assert min(pairs, max_turns - step + 1) <= kept <= max_turns
        start = first_kept_pair(trimmed)
        assert start % step == 0
        starts.append(start)
    moves = sum(1 for before, after in zip(starts, starts[1:], strict=False) if after != before)
    assert moves <= len(starts) // step


def test_trim_turns_with_eight_turns_keeps_the_same_start_for_two_turns() -> None:
    starts = [first_kept_pair(trim_turns(chat(pairs), 8)) for pairs in range(8, 15)]
    assert starts == [0, 2, 2, 4, 4, 6, 6]


def test_trim_turns_never_keeps_an_orphan_reply() -> None:
    greeting = [{"role": "assistant", "content": "hello, ask me anything"}]
    for pairs in range(12):
        for messages in (greeting + chat(pairs, system=False), chat(pairs) + [{"role": "user", "content": "q?"}]):
            trimmed = trim_turns(messages, 4)
            body = [m for m in trimmed if m["role"] != "system"]
            assert body[0]["role"] == "user" or trimmed == messages
            assert trimmed[-1] == messages[-1]


@pytest.mark.asyncio
async def test_trimming_on_every_save_matches_trimming_the_whole_conversation() -> None:
    store = MemoryHistoryStore(max_turns=8)
    for pairs in range(1, 40):
        await store.save("s", await store.load("s") + turn(pairs - 1))
        assert await store.load("s") == trim_turns(chat(pairs, system=False), 8)


def test_copy_messages_rejects_malformed_messages() -> None:
    with pytest.raises(TypeError):
        copy_messages([{"role": "user"}])
    with pytest.raises(TypeError):
        copy_messages([{"role": "user", "content": 3}])  # type: ignore[dict-item]


@pytest.mark.asyncio
async def test_concurrent_coroutines_keep_each_session_consistent() -> None:
    store = MemoryHistoryStore()

    async def chat(session: str) -> None:
        for number in range(20):
            history = await store.load(session)
            await asyncio.sleep(0)
            await store.save(session, history + turn(number))

    await asyncio.gather(*(chat(f"s{i}") for i in range(10)))
    for i in range(10):
        assert await store.load(f"s{i}") == [m for n in range(20) for m in turn(n)]


def test_concurrent_saves_from_threads_stay_bounded_and_whole() -> None:
    store = MemoryHistoryStore(max_sessions=20)
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        start.wait()
        try:
            for _ in range(2000):
                session = f"s{rng.randrange(40)}"
                if rng.random() < 0.6:
                    store.save_sync(session, turn(rng.randrange(1000)))
                elif rng.random() < 0.8:
                    loaded = store.load_sync(session)
                    assert loaded == [] or (len(loaded) == 2 and loaded[0]["content"][1:] == loaded[1]["content"][1:])
                else:
                    store.clear_sync(session)
        except BaseException as error:  # reported to the main thread below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    # switch threads as often as possible so unlocked read-modify-write sequences would interleave
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == [] and len(store) <= 20


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_sessions": 0},
        {"max_sessions": 1.5},
        {"max_sessions": True},
        {"ttl": 0},
        {"ttl": -5},
        {"ttl": float("inf")},
        {"max_turns": 0},
        {"max_turns": "3"},
    ],
)
def test_bad_arguments_raise_configuration_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError, match=next(iter(kwargs))):
        MemoryHistoryStore(**kwargs)  # type: ignore[arg-type]
