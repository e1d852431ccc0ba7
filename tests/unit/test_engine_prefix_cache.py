"""``TransformersEngine`` with its prefix cache: every reply equals the reply without the cache, token for token
(float32, greedy), while later turns compute only their new tokens."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from chatstream_asgi.engines import _scheduler
from chatstream_asgi.engines._delivery import LoopChannel, ReplyBuffer
from chatstream_asgi.engines._scheduler import Scheduler
from chatstream_asgi.engines.base import ChatMessage, GenerationChunk, SamplingParams
from chatstream_asgi.engines.transformers import TransformersEngine
from chatstream_asgi.errors import ConfigurationError

pytestmark = pytest.mark.asyncio
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=16, ignore_eos=True)
TURNS = [
    "What is the capital of France? Tell me now, please.",
    "The quick brown fox jumps over the lazy dog. " * 2,
    "東京は日本の首都です。😀 How are you today?",
    "Large language models predict the next token from the previous ones.",
]
Parts = tuple[Any, Any]
Turn = tuple[str, GenerationChunk]


def engines(parts: Parts, **options: Any) -> tuple[TransformersEngine, TransformersEngine]:
    """The engine under test (cache on) and its reference (cache off)."""
    options = {"max_batch_size": 8, **options}
    cached = TransformersEngine(*parts, **{"prefix_cache_bytes": 1 << 30, **options})
    return cached, TransformersEngine(*parts, **{**options, "prefix_cache_bytes": 0})


async def ask(engine: TransformersEngine, messages: list[ChatMessage], params: SamplingParams = GREEDY) -> Turn:
    text, last = "", None
    async for chunk in engine.stream(messages, params):
        text, last = text + chunk.text, chunk
    assert last is not None and last.finish_reason is not None
    return text, last


async def converse(engine: TransformersEngine, turns: Sequence[str], who: str = "") -> list[Turn]:
    history: list[ChatMessage] = []
    replies = []
    for text in turns:
        history.append({"role": "user", "content": f"{who}{text}"})
        reply = await ask(engine, history)
        history.append({"role": "assistant", "content": reply[0]})
        replies.append(reply)
    return replies


async def closing(*items: TransformersEngine) -> None:
    for engine in items:
        await engine.close()


@pytest.fixture
def prefill_groups(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """The prefix tokens each row of every prefill group asked to reuse."""
    groups: list[list[int]] = []
    prefill = _scheduler.prefill

    def spying(runner: Any, prompts: Any, pad_id: int, reused: Any = None) -> Any:
        groups.append([n for _, n in reused] if reused else [0] * len(prompts))
        return prefill(runner, prompts, pad_id, reused)

    monkeypatch.setattr(_scheduler, "prefill", spying)
    return groups


async def rounds(engine: TransformersEngine, users: Sequence[str]) -> list[list[Turn]]:
    """User ``u`` joins in round ``u``: each round's requests go together, first turns beside later ones."""
    histories: list[list[ChatMessage]] = [[] for _ in users]
    chats: list[list[Turn]] = [[] for _ in users]

    async def turn(u: int, text: str) -> None:
        histories[u].append({"role": "user", "content": users[u] + text})
        chats[u].append(await ask(engine, histories[u]))
        histories[u].append({"role": "assistant", "content": chats[u][-1][0]})

    for r in range(len(users) + len(TURNS) - 1):
        await asyncio.gather(*(turn(u, TURNS[r - u]) for u in range(len(users)) if 0 <= r - u < len(TURNS)))
    return chats


async def test_successive_turns_of_concurrent_chats_equal_the_uncached_replies(tiny_engine_parts: Parts) -> None:
    cached, reference = engines(tiny_engine_parts)
    users = ["alice: ", "bob and carol: ", "dave: "]
    got, expected = await rounds(cached, users), await rounds(reference, users)
    await closing(cached, reference)
    assert [[text for text, _ in chat] for chat in got] == [[text for text, _ in chat] for chat in expected]
    for chat in got:
        assert chat[0][1].cached_tokens == 0
        # a row prefilled beside one with more new tokens reuses a little less (``_batch.prefill``), never nothing
        later = zip(chat, chat[1:], strict=False)
        assert all(end.cached_tokens > previous.prompt_tokens // 2 for (_, previous), (_, end) in later)
    stats = cached.prefix_cache_stats()
    assert stats.hit_tokens == sum(end.cached_tokens for chat in got for _, end in chat) > 0
    assert stats.queries_tokens == sum(end.prompt_tokens for chat in got for _, end in chat)


async def test_one_prefill_of_a_cached_and_an_uncached_row_equals_the_uncached_replies(
    tiny_engine_parts: Parts, prefill_groups: list[list[int]]
) -> None:
    cached, reference = engines(tiny_engine_parts)
    first: list[ChatMessage] = [{"role": "user", "content": TURNS[0]}]
    later = [
        *first,
        {"role": "assistant", "content": (await ask(cached, first))[0]},
        {"role": "user", "content": TURNS[1]},
    ]
    fresh: list[ChatMessage] = [{"role": "user", "content": TURNS[2]}]
    await cached.close()
    # Both wait in a new worker's queue before it starts, so its first step prefills them as one group (when they
    # arrive through stream() the group depends on timing); the worker shares the engine's model and prefix cache.
    scheduler = Scheduler(
        cached._runner,
        max_batch_size=8,
        prefill_chunk_tokens=512,
        pad_id=cached._pad_id,
        prefix_cache=cached.prefix_cache,
    )
    channel, buffers = LoopChannel(asyncio.get_running_loop(), 0.0), [ReplyBuffer(), ReplyBuffer()]
    for messages, buffer in zip((later, fresh), buffers, strict=True):
        scheduler.submit(cached.new_sequence(cached.fit_prompt(messages, GREEDY).token_ids, GREEDY, channel, buffer))
    prefill_groups.clear()
    scheduler.start()
    got = [[chunk async for chunk in buffer.chunks()] for buffer in buffers]
    scheduler.stop()
    await asyncio.to_thread(scheduler.join)
    expected = [await ask(reference, messages) for messages in (later, fresh)]
    await reference.close()
    assert prefill_groups[0][0] > 0 and prefill_groups[0][1] == 0  # one forward: a cached row beside an uncached one
    assert ["".join(c.text for c in chunks) for chunks in got] == [text for text, _ in expected]
    assert got[0][-1].cached_tokens > 0 and got[1][-1].cached_tokens == 0


async def test_a_template_that_rewrites_an_earlier_turn_matches_only_what_is_unchanged(
    tiny_model_dir: Path, tiny_engine_parts: Parts
) -> None:
    # Like Qwen3's template dropping earlier reasoning: an earlier reply is rendered cut to its first characters.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = tokenizer.chat_template.replace(
        "message['content']", "(message['content'][:12] if message['role'] == 'assistant' else message['content'])"
    )
    cached, reference = engines((tiny_engine_parts[0], tokenizer))
    got, expected = await converse(cached, TURNS[:3]), await converse(reference, TURNS[:3])
    await closing(cached, reference)
    assert [text for text, _ in got] == [text for text, _ in expected]
    first_prompt = got[0][1].prompt_tokens
    assert first_prompt <= got[1][1].cached_tokens < first_prompt + got[0][1].completion_tokens


async def test_a_prompt_cached_whole_recomputes_only_its_last_token(tiny_engine_parts: Parts) -> None:
    cached, reference = engines(tiny_engine_parts)
    messages: list[ChatMessage] = [{"role": "user", "content": TURNS[1]}]
    first, again, expected = await ask(cached, messages), await ask(cached, messages), await ask(reference, messages)
    await closing(cached, reference)
    assert first[0] == again[0] == expected[0]
    assert (first[1].cached_tokens, again[1].cached_tokens) == (0, again[1].prompt_tokens - 1)


async def test_under_a_tiny_budget_entries_are_evicted_and_replies_stay_equal(tiny_engine_parts: Parts) -> None:
    probe, _ = engines(tiny_engine_parts)
    await converse(probe, TURNS[:1])
    one_entry = probe.prefix_cache_stats().bytes
    await probe.close()
    cached, reference = engines(tiny_engine_parts)
    cached.prefix_cache.capacity_bytes = budget = int(one_entry * 2.5)
    seen = []
    for who in ("alice: ", "bob: ", "carol: "):
        got, expected = await converse(cached, TURNS[:3], who), await converse(reference, TURNS[:3], who)
        assert [text for text, _ in got] == [text for text, _ in expected]
        seen.append(cached.prefix_cache_stats())
    await closing(cached, reference)
    assert seen[-1].evictions > 0 and all(s.bytes <= s.peak_bytes <= budget for s in seen)


async def test_a_cancelled_turn_is_kept_and_the_next_turn_reuses_it(tiny_engine_parts: Parts) -> None:
    cached, reference = engines(tiny_engine_parts)
    history: list[ChatMessage] = [{"role": "user", "content": TURNS[0]}]
    stream = cached.stream(history, SamplingParams(temperature=0.0, max_new_tokens=200, ignore_eos=True))
    partial = ""
    async for chunk in stream:
        partial += chunk.text
        if len(partial) > 10:
            break
    await stream.aclose()  # type: ignore[attr-defined]
    history += [{"role": "assistant", "content": partial}, {"role": "user", "content": TURNS[1]}]
    got, expected = await ask(cached, history), await ask(reference, history)
    await closing(cached, reference)
    assert got[0] == expected[0]
    prompt_1 = len(cached.fit_prompt(history[:1], GREEDY).token_ids)
    assert got[1].cached_tokens > prompt_1  # the prompt and part of the cut reply


async def test_a_long_new_message_is_prefilled_in_chunks_after_the_cached_prefix(tiny_engine_parts: Parts) -> None:
    cached, reference = engines(tiny_engine_parts, prefill_chunk_tokens=24)
    turns = [TURNS[0], TURNS[3] * 3]
    got, expected = await converse(cached, turns), await converse(reference, turns)
    await closing(cached, reference)
    assert [text for text, _ in got] == [text for text, _ in expected]
    assert got[1][1].prompt_tokens - got[1][1].cached_tokens > 24 and got[1][1].cached_tokens > 0


async def test_cache_off_reports_zero_and_keeps_nothing(tiny_engine_parts: Parts) -> None:
    _, reference = engines(tiny_engine_parts)
    replies = await converse(reference, TURNS[:2])
    await reference.close()
    assert [end.cached_tokens for _, end in replies] == [0, 0]
    stats = reference.prefix_cache_stats()
    assert (stats.capacity_bytes, stats.entries, stats.hit_tokens) == (0, 0, 0)


@pytest.mark.parametrize("bad", [-1, 1.5, "1GB"])
async def test_prefix_cache_bytes_must_be_a_non_negative_int(tiny_engine_parts: Parts, bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="prefix_cache_bytes"):
        TransformersEngine(*tiny_engine_parts, prefix_cache_bytes=bad)


async def test_the_default_budget_is_a_share_of_free_memory_capped(tiny_engine_parts: Parts) -> None:
    budget = TransformersEngine(*tiny_engine_parts).prefix_cache.capacity_bytes
    assert 0 < budget <= 4 << 30
