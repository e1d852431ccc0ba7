"""Per-step delivery: one hand-over per step and loop, coalesced text, urgent first and last events."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from chatstream_asgi.engines._delivery import HoldBack, LoopChannel, ReplyBuffer
from chatstream_asgi.engines.base import GenerationChunk, SamplingParams
from chatstream_asgi.engines.transformers import TransformersEngine
from chatstream_asgi.errors import EngineError

GREEDY = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.mark.asyncio
async def test_a_consumer_that_was_busy_gets_all_pending_text_as_one_chunk() -> None:
    buffer = ReplyBuffer()
    for text in ("Hel", "lo", ", wor", "ld"):
        buffer.push(text)
    assert await buffer.take() == GenerationChunk("Hello, world")


@pytest.mark.asyncio
async def test_pending_text_joins_the_final_chunk_with_its_counts() -> None:
    buffer = ReplyBuffer()
    buffer.push("The end")
    buffer.push(GenerationChunk(".", "stop", 7, 3))
    assert await buffer.take() == GenerationChunk("The end.", "stop", 7, 3)


@pytest.mark.asyncio
async def test_text_before_a_failure_is_delivered_before_the_failure_is_raised() -> None:
    buffer = ReplyBuffer()
    buffer.push("partial")
    buffer.push(EngineError("boom"))
    assert await buffer.take() == GenerationChunk("partial")
    with pytest.raises(EngineError, match="boom"):
        await buffer.take()


@pytest.mark.asyncio
async def test_take_waits_until_a_push_arrives() -> None:
    buffer = ReplyBuffer()
    waiting = asyncio.ensure_future(buffer.take())
    await asyncio.sleep(0)
    assert not waiting.done()
    buffer.push("late")
    assert await asyncio.wait_for(waiting, 1) == GenerationChunk("late")


def test_hold_back_releases_urgent_events_at_once_and_others_an_interval_after_the_last_release() -> None:
    hold = HoldBack(0.05)
    assert not hold.due()  # nothing pending
    hold.posted(urgent=False)
    assert hold.due()  # nothing was handed over yet: it goes at once
    hold.posted(urgent=False)
    assert not hold.due()  # within the interval of that release: held
    time.sleep(0.06)
    assert hold.due()
    hold.posted(urgent=True)
    assert hold.due()  # a first token or an end never waits
    assert not hold.due()


def test_a_step_slower_than_the_interval_is_never_held() -> None:
    hold = HoldBack(0.01)
    for _ in range(3):
        time.sleep(0.015)  # one slow step
        hold.posted(urgent=False)
        assert hold.due()


@pytest.mark.asyncio
async def test_a_flush_hands_every_stream_of_the_step_over_in_one_loop_call() -> None:
    loop = asyncio.get_running_loop()
    channel = LoopChannel(loop)
    buffers = [ReplyBuffer() for _ in range(5)]
    calls = 0
    original = loop.call_soon_threadsafe

    def counting(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        return original(*args)

    loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
    try:
        worker = threading.Thread(target=lambda: [channel.post(b, "x", False) for b in buffers] and channel.flush())
        worker.start()
        worker.join()
        chunks = await asyncio.wait_for(asyncio.gather(*(b.take() for b in buffers)), 1)
    finally:
        del loop.call_soon_threadsafe
    assert calls == 1
    assert [c.text for c in chunks] == ["x"] * 5


def test_a_channel_whose_loop_closed_with_nothing_pending_leaves_the_scheduler() -> None:
    loop = asyncio.new_event_loop()
    channel = LoopChannel(loop)
    assert channel.flush()
    loop.close()
    assert not channel.flush()


def test_a_closed_loop_makes_posts_fail_so_the_sequences_cancel() -> None:
    loop = asyncio.new_event_loop()
    channel = LoopChannel(loop)
    loop.close()
    assert channel.post(ReplyBuffer(), "x", True)
    assert not channel.flush()
    assert not channel.post(ReplyBuffer(), "y", True)


@pytest.mark.asyncio
@pytest.mark.parametrize("interval", [0.0, 0.2])
async def test_engine_replies_are_the_same_text_whatever_the_stream_interval(
    tiny_engine_parts: tuple[Any, Any], interval: float
) -> None:
    model, tokenizer = tiny_engine_parts
    engine = TransformersEngine(model, tokenizer, max_batch_size=4, stream_interval=interval)
    reference = TransformersEngine(model, tokenizer, max_batch_size=1, stream_interval=0)
    messages = [{"role": "user", "content": "Hello, world!"}]
    try:
        chunks = [c async for c in engine.stream(messages, GREEDY)]
        expected = "".join([c.text async for c in reference.stream(messages, GREEDY)])
    finally:
        await engine.close()
        await reference.close()
    assert "".join(c.text for c in chunks) == expected
    assert chunks[-1].completion_tokens == GREEDY.max_new_tokens
    if interval:
        # 24 tokens on the tiny model take far less than 0.2 s: the first text goes at once, the rest with the end
        assert len(chunks) <= 3


@pytest.mark.asyncio
async def test_engine_rejects_a_stream_interval_out_of_range(tiny_engine_parts: tuple[Any, Any]) -> None:
    model, tokenizer = tiny_engine_parts
    with pytest.raises(ValueError, match="stream_interval"):
        TransformersEngine(model, tokenizer, stream_interval=-1)

