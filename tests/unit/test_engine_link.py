"""The web side of the engine process's socket: a step frame for many streams reaches them a slice per loop
iteration (``EngineLink._deliver``), so the host app's requests get in between, and first tokens and ends go
before running streams."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import pytest

from chatstream_asgi.engines import _link
from chatstream_asgi.engines._delivery import FirstToken, ReplyBuffer
from chatstream_asgi.engines._link import EngineLink
from chatstream_asgi.engines._wire import step_frame, wire_event
from chatstream_asgi.engines.base import GenerationChunk, SamplingParams

STREAMS = 32
Frame = dict[int, list[Any]]  # each stream's events, as the engine groups them


class RecordingBuffer(ReplyBuffer):
    """A stream's buffer that notes the loop iteration each push came in."""

    def __init__(self, clock: list[int]) -> None:
        super().__init__()
        self.clock = clock
        self.pushed_at: list[int] = []

    def push(self, event: Any) -> None:
        self.pushed_at.append(self.clock[0])
        super().push(event)


async def deliver(tokenizer: Any, streams: int, frame_for: Callable[[list[int]], Frame]) -> list[RecordingBuffer]:
    """Open ``streams`` requests on a link over a real socket pair, send it ``frame_for(request ids)`` as the
    engine would, and count loop iterations until every stream got something; return their buffers."""
    engine_end, web_end = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=web_end)
    link = EngineLink(reader, writer, {"tokenizer": tokenizer}, on_lost=lambda _: None)
    clock = [0]
    buffers = [RecordingBuffer(clock) for _ in range(streams)]
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    rids = [link.submit([1, 2, 3], params, buffer) for buffer in buffers]
    try:
        engine_end.sendall(step_frame(frame_for(rids)))
        while not all(b.pushed_at for b in buffers):
            clock[0] += 1
            await asyncio.sleep(0)
            assert clock[0] < 10_000, "the frame never reached every stream"
    finally:
        await link.close()
        engine_end.close()
    return buffers


async def a_first_token_and_two_more(tokenizer: Any) -> tuple[set[int], list[str], str]:
    """A frame with a first token and two more ids for each of ``STREAMS`` streams: the loop iterations the
    pushes came in, the text each stream got, and the ids' text."""
    ids = tokenizer.encode("hello world", add_special_tokens=False)[:3]

    def frame_for(rids: list[int]) -> Frame:
        return {rid: [wire_event(FirstToken(ids[0], 0)), *ids[1:]] for rid in rids}

    buffers = await deliver(tokenizer, STREAMS, frame_for)
    texts = [(await b.take()).text for b in buffers]
    return {at for b in buffers for at in b.pushed_at}, texts, tokenizer.decode(ids)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("turn_target", "iterations_wanted"),
    [
        (0.0, STREAMS),  # every stream is over the budget: one per iteration
        (10.0, 1),  # the whole frame fits in one turn
    ],
)
async def test_a_frame_is_delivered_in_as_many_iterations_as_its_slices_take(
    tiny_engine_parts: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch, turn_target: float, iterations_wanted: int
) -> None:
    _, tokenizer = tiny_engine_parts
    monkeypatch.setattr(_link, "TURN_TARGET_S", turn_target)
    iterations, texts, expected = await a_first_token_and_two_more(tokenizer)
    assert len(iterations) == iterations_wanted
    assert texts == [expected] * STREAMS  # each stream got its own ids, in order


@pytest.mark.asyncio
async def test_first_tokens_and_ends_are_delivered_before_running_streams(
    tiny_engine_parts: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # the engine lists rows in batch order, so a frame names new rows (first tokens) last; they go first here,
    # with the rows that ended (their clients send the next request), one stream per iteration
    _, tokenizer = tiny_engine_parts
    monkeypatch.setattr(_link, "TURN_TARGET_S", 0.0)
    token = tokenizer.encode("hello", add_special_tokens=False)[0]
    end, first = wire_event(GenerationChunk("", "length", 3, 8)), wire_event(FirstToken(token, 0))

    def frame_for(rids: list[int]) -> Frame:
        return {**{rid: [token] for rid in rids[:5]}, rids[5]: [token, end], rids[6]: [first], rids[7]: [first]}

    buffers = await deliver(tokenizer, 8, frame_for)
    order = sorted(range(8), key=lambda i: buffers[i].pushed_at[0])
    assert order == [5, 6, 7, 0, 1, 2, 3, 4]  # the end and the first tokens in frame order, then the rest


@pytest.mark.asyncio
async def test_a_running_streams_ids_become_its_text(tiny_engine_parts: tuple[Any, Any]) -> None:
    # the common frame: ids only (no first token, no end), turned into text in one call per stream
    _, tokenizer = tiny_engine_parts
    ids = tokenizer.encode("again and again", add_special_tokens=False)
    buffers = await deliver(tokenizer, 4, lambda rids: {rid: list(ids) for rid in rids})
    assert [(await b.take()).text for b in buffers] == [tokenizer.decode(ids)] * 4
