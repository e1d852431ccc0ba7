"""Per-step delivery: one hand-over per step and loop, coalesced text, urgent first and last events."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from chatstream_asgi.engines._delivery import LoopChannel, ReplyBuffer, StreamHold
from chatstream_asgi.engines._sequence import Sequence
from chatstream_asgi.engines.base import GenerationChunk, SamplingParams
from chatstream_asgi.engines.detokenizer import DecoderSpec, IncrementalDetokenizer
from chatstream_asgi.engines.fair_wakes import WAKES_PER_TURN, FairWakes, fair_wakes
from chatstream_asgi.engines.transformers import TransformersEngine
from chatstream_asgi.errors import EngineError
from tests.unit.test_detokenizer import byte_fallback_tokenizer

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


@pytest.mark.asyncio
async def test_raw_events_are_decoded_on_take_and_a_decode_with_no_text_yet_keeps_waiting() -> None:
    decoded: list[list[Any]] = []

    def decode(raw: list[Any]) -> None:  # as an engine link's: ids in, text out once a whole character is in
        decoded.append(raw)
        if len(decoded) > 1:
            buffer.push("".join(map(str, (x for batch in decoded for x in batch))))

    buffer = ReplyBuffer(decode)
    buffer.push_raw([1, 2])
    assert not decoded  # nothing is decoded until the consumer takes
    waiting = asyncio.ensure_future(buffer.take())
    await asyncio.sleep(0)
    assert decoded == [[1, 2]] and not waiting.done()  # decoded, no text yet: it waits for more
    buffer.push_raw([3])
    assert await asyncio.wait_for(waiting, 1) == GenerationChunk("123")
    assert decoded == [[1, 2], [3]]

def test_a_stream_hold_releases_every_stream_an_interval_after_the_last_full_release() -> None:
    hold = StreamHold(0.05)
    assert hold.take_due() == {}  # nothing pending
    hold.post("a", "a1", urgent=False)
    assert hold.take_due() == {"a": ["a1"]}  # nothing was handed over yet: it goes at once
    hold.post("a", "a2", urgent=False)
    hold.post("b", "b1", urgent=False)
    assert hold.take_due() == {}  # within the interval of that release: held
    time.sleep(0.06)
    assert hold.take_due() == {"a": ["a2"], "b": ["b1"]}


def test_an_urgent_event_goes_at_once_with_its_own_streams_events_only() -> None:
    # a reply that starts or ends must not take every other stream's held text along: at batch 64 one does
    # every few steps, and the interval would never elapse
    hold = StreamHold(0.05)
    hold.post("a", "a1", urgent=False)
    hold.take_due()  # the first release
    hold.post("a", "a2", urgent=False)
    hold.post("b", "b1", urgent=False)
    hold.post("b", "end", urgent=True)
    hold.post("c", "first", urgent=True)
    hold.post("a", "a3", urgent=False)
    assert hold.take_due() == {"b": ["b1", "end"], "c": ["first"]}  # in order, each stream's whole run
    assert hold.take_due() == {}  # a is still held
    time.sleep(0.06)
    assert hold.take_due() == {"a": ["a2", "a3"]}


def test_a_step_slower_than_the_interval_is_never_held() -> None:
    hold = StreamHold(0.01)
    for step in range(3):
        time.sleep(0.015)  # one slow step
        hold.post("a", step, urgent=False)
        assert hold.take_due() == {"a": [step]}


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



def spin(seconds: float) -> None:
    """Keep the loop busy (a consumer whose write or history save takes long)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def consumers_woken_per_iteration(
    n: int, per_turn: int, turn_target: float = 1.0, work: Any = lambda i: None
) -> tuple[list[int], list[int]]:
    """``n`` consumers waiting on their buffers, one push each in one callback (a step); the order they woke
    in, and how many woke in each loop iteration that woke any. Consumer ``i`` does ``work(i)`` once woken."""
    loop = asyncio.get_running_loop()
    wakes = FairWakes(loop, per_turn=per_turn, turn_target=turn_target)
    buffers = [ReplyBuffer() for _ in range(n)]
    order: list[int] = []
    iteration = [0]

    async def consume(i: int) -> None:
        await buffers[i].take()
        order.append(i)
        woke_at.append(iteration[0])
        work(i)

    async def count_iterations() -> None:
        while len(order) < n:
            iteration[0] += 1
            await asyncio.sleep(0)

    woke_at: list[int] = []
    tasks = [asyncio.create_task(consume(i)) for i in range(n)]
    await asyncio.sleep(0)  # every consumer is waiting now
    for buffer in buffers:
        buffer._wakes = wakes  # noqa: SLF001 - this test's own budget instead of the loop's shared one
    counter = asyncio.create_task(count_iterations())
    for buffer in buffers:
        buffer.push("token")
    await asyncio.wait_for(asyncio.gather(*tasks, counter), 5.0)
    return order, [woke_at.count(i) for i in sorted(set(woke_at))]


@pytest.mark.asyncio
async def test_a_step_wakes_its_consumers_a_few_per_loop_iteration_in_order() -> None:
    order, per_iteration = await consumers_woken_per_iteration(40, per_turn=8)
    assert order == list(range(40))  # first pushed, first woken
    assert max(per_iteration) <= 8 and sum(per_iteration) == 40
    assert len(per_iteration) >= 5  # spread over iterations, so others run in between


@pytest.mark.asyncio
async def test_iterations_that_run_long_shrink_the_turns_to_one_wake() -> None:
    # every consumer keeps the loop 40 ms, twice the target: turns halve (8, 4, 2) down to one per iteration
    _, per_iteration = await consumers_woken_per_iteration(16, per_turn=8, turn_target=0.02, work=lambda i: spin(0.04))
    assert per_iteration == [8, 4, 2, 1, 1]


@pytest.mark.asyncio
async def test_turns_grow_back_by_one_once_iterations_are_short_again() -> None:
    # the first eight consumers are slow (their iterations run long), the rest cost nothing: the turns
    # shrink (4, 2), then grow one wake at a time back to the full eight
    def work(i: int) -> None:
        if i < 8:
            spin(0.04)

    _, per_iteration = await consumers_woken_per_iteration(52, per_turn=8, turn_target=0.02, work=work)
    assert per_iteration == [8, 4, 2, 3, 4, 5, 6, 7, 8, 5]


@pytest.mark.asyncio
async def test_fair_wakes_skip_a_consumer_cancelled_while_waiting_its_turn() -> None:
    loop = asyncio.get_running_loop()
    wakes = FairWakes(loop, per_turn=1)
    first, cancelled, last = loop.create_future(), loop.create_future(), loop.create_future()
    for waiter in (first, cancelled, last):
        wakes.wake(waiter)
    assert first.done() and not last.done()  # the budget of this iteration went to the first
    cancelled.cancel()
    await asyncio.sleep(0)
    assert last.done()  # the cancelled one took no turn
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not wakes.scheduled and wakes.budget == 1  # idle again, with a full budget


@pytest.mark.asyncio
async def test_every_stream_of_a_loop_shares_one_budget() -> None:
    loop = asyncio.get_running_loop()
    assert fair_wakes(loop) is fair_wakes(loop)
    assert fair_wakes(loop).per_turn == WAKES_PER_TURN


@pytest.mark.asyncio
async def test_a_burst_of_requests_takes_turns_a_few_per_iteration() -> None:
    loop = asyncio.get_running_loop()
    wakes = FairWakes(loop, per_turn=4)
    iteration = [0]
    started: list[int] = []

    async def request() -> None:
        await wakes.turn()
        started.append(iteration[0])

    async def count_iterations() -> None:
        while len(started) < 12:
            iteration[0] += 1
            await asyncio.sleep(0)

    await asyncio.wait_for(asyncio.gather(count_iterations(), *(request() for _ in range(12))), 5.0)
    assert max(started.count(i) for i in set(started)) <= 4
    assert len(set(started)) >= 3


class RecordingChannel:
    """A channel that keeps what a sequence posted, with its urgency."""

    def __init__(self) -> None:
        self.posted: list[tuple[Any, bool]] = []

    def post(self, key: Any, event: Any, urgent: bool) -> bool:
        self.posted.append((event, urgent))
        return True

    def flush(self) -> bool:
        return True


@pytest.mark.parametrize("tokenizer_kind", ["byte_level", "byte_fallback"])
@pytest.mark.parametrize("reply", ["😀 and more words", "Hello and more words"])
def test_ids_before_a_replys_first_text_are_urgent_and_later_ids_are_not(
    tiny_engine_parts: tuple[Any, Any], tokenizer_kind: str, reply: str
) -> None:
    # an engine process sends ids and its web process detokenizes: ids that do not make text yet (an emoji's
    # byte tokens) must not wait out the stream interval, or the reply's first text comes up to 20 ms late
    tokenizer = tiny_engine_parts[1] if tokenizer_kind == "byte_level" else byte_fallback_tokenizer()
    ids = tokenizer.encode(reply, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    makes_text_at = next(i for i, token_id in enumerate(ids) if detok.push(token_id))
    channel = RecordingChannel()
    params = SamplingParams(max_new_tokens=len(ids) + 1, temperature=0.0, ignore_eos=True)
    decoder = DecoderSpec(tokenizer)
    seq = Sequence([1, 2, 3], params, channel, "key", decoder=decoder, eos_ids=frozenset(), detokenize=False)
    for token_id in ids:
        seq.accept(token_id)
    urgent = [flag for _, flag in channel.posted]
    assert urgent == [True] * (makes_text_at + 1) + [False] * (len(ids) - makes_text_at - 1)
    assert (makes_text_at > 0) == reply.startswith("😀")  # the emoji really is split over several ids
