"""The web side of the engine process's socket: a step frame for many streams reaches them a slice per loop
iteration (``EngineLink._deliver``), so the host app's requests get in between."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from chatstream_asgi.engines import _link
from chatstream_asgi.engines._delivery import FirstToken, ReplyBuffer
from chatstream_asgi.engines._link import EngineLink
from chatstream_asgi.engines._wire import step_frame, wire_event
from chatstream_asgi.engines.base import SamplingParams

STREAMS = 32


class RecordingBuffer(ReplyBuffer):
    """A stream's buffer that notes the loop iteration each push came in."""

    def __init__(self, clock: list[int]) -> None:
        super().__init__()
        self.clock = clock
        self.pushed_at: list[int] = []

    def push(self, event: Any) -> None:
        self.pushed_at.append(self.clock[0])
        super().push(event)


async def iterations_a_frame_takes(tokenizer: Any) -> tuple[set[int], list[str], str]:
    """Deliver one frame (a first token and two more ids for each of ``STREAMS`` streams) through a real
    socket pair; return the loop iterations the pushes came in, the text each stream got, and the ids' text."""
    engine_end, web_end = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=web_end)
    link = EngineLink(reader, writer, {"tokenizer": tokenizer}, on_lost=lambda _: None)
    clock = [0]
    buffers = [RecordingBuffer(clock) for _ in range(STREAMS)]
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    rids = [link.submit([1, 2, 3], params, buffer) for buffer in buffers]
    ids = tokenizer.encode("hello world", add_special_tokens=False)[:3]
    frame = [(rid, event) for rid in rids for event in (wire_event(FirstToken(ids[0], 0)), *ids[1:])]
    try:
        engine_end.sendall(step_frame(frame))
        while not all(b.pushed_at for b in buffers):
            clock[0] += 1
            await asyncio.sleep(0)
            assert clock[0] < 10_000, "the frame never reached every stream"
        texts = [(await b.take()).text for b in buffers]
    finally:
        await link.close()
        engine_end.close()
    return {at for b in buffers for at in b.pushed_at}, texts, tokenizer.decode(ids)


@pytest.mark.asyncio
async def test_a_frame_that_takes_longer_than_a_turn_is_delivered_over_several_iterations(
    tiny_engine_parts: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, tokenizer = tiny_engine_parts
    monkeypatch.setattr(_link, "TURN_TARGET_S", 0.0)  # every stream is over the budget: one per iteration
    iterations, texts, expected = await iterations_a_frame_takes(tokenizer)
    assert len(iterations) == STREAMS
    assert texts == [expected] * STREAMS  # each stream got its own ids, in order


@pytest.mark.asyncio
async def test_a_frame_within_a_turn_is_delivered_in_one_iteration(
    tiny_engine_parts: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, tokenizer = tiny_engine_parts
    monkeypatch.setattr(_link, "TURN_TARGET_S", 10.0)
    iterations, texts, expected = await iterations_a_frame_takes(tokenizer)
    assert len(iterations) == 1
    assert texts == [expected] * STREAMS
