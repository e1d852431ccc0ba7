"""The web side of the engine process's socket (``EngineLink``): a step frame for many streams is handed to
all of them in one loop callback, undecoded; each stream's consumer detokenizes its own ids when it takes
them (on its fair-wakes turn); first tokens and ends wake their consumers first; a stop string found there
ends the reply and cancels the request at the engine; a lost engine fails each stream after the text that
had arrived before."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from chatstream_asgi.engines import _link
from chatstream_asgi.engines._delivery import FirstToken, ReplyBuffer
from chatstream_asgi.engines._link import EngineLink
from chatstream_asgi.engines._wire import recv_message, step_frame, wire_event
from chatstream_asgi.engines.base import GenerationChunk, SamplingParams
from chatstream_asgi.errors import EngineError

STREAMS = 32
GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0)


@dataclass
class LinkedEngine:
    """A link over a real socket pair; ``engine`` is the engine process's end."""

    link: EngineLink
    engine: socket.socket
    frames: list[int]  # streams in each frame the link has handed over

    def open(self, count: int, params: SamplingParams = GREEDY) -> list[tuple[int, ReplyBuffer]]:
        opened = [self.link.submit([1, 2, 3], params) for _ in range(count)]
        for _ in opened:
            assert recv_message(self.engine)[0] == "submit"
        return opened

    async def send(self, frame: dict[int, list[Any]]) -> None:
        """Send a step frame as the engine does and wait until the link has handed it over."""
        handed = len(self.frames)
        self.engine.sendall(step_frame(frame))
        for _ in range(1000):
            await asyncio.sleep(0)
            if len(self.frames) > handed:
                return
        raise AssertionError("the link never read the frame")


@asynccontextmanager
async def linked(tokenizer: Any) -> AsyncIterator[LinkedEngine]:
    engine_end, web_end = socket.socketpair()
    engine_end.settimeout(10)  # a message the link never sends fails the test instead of hanging it
    reader, writer = await asyncio.open_connection(sock=web_end)
    link = EngineLink(reader, writer, {"tokenizer": tokenizer}, on_lost=lambda _: None)
    frames: list[int] = []
    deliver = link._deliver

    def counted(batch: dict[int, list[Any]]) -> None:
        frames.append(len(batch))
        deliver(batch)

    link._deliver = counted  # type: ignore[method-assign]
    try:
        yield LinkedEngine(link, engine_end, frames)
    finally:
        await link.close()
        engine_end.close()


def words(tokenizer: Any, text: str) -> list[int]:
    ids: list[int] = tokenizer.encode(text, add_special_tokens=False)
    return ids


def reply_start(ids: list[int]) -> list[Any]:
    """A reply's first events as the engine sends them: its first token, then more ids."""
    return [wire_event(FirstToken(ids[0], 0)), *ids[1:]]


async def take_each(opened: list[tuple[int, ReplyBuffer]]) -> list[str]:
    """Each stream's next text, taken by a consumer task of its own named ``consumer I``."""

    async def consume(buffer: ReplyBuffer) -> str:
        return (await buffer.take()).text

    consumers = [asyncio.create_task(consume(buffer), name=f"consumer {i}") for i, (_, buffer) in enumerate(opened)]
    return await asyncio.gather(*consumers)


@pytest.mark.asyncio
async def test_a_frame_reaches_every_stream_in_one_callback_and_is_decoded_by_its_consumer(
    tiny_engine_parts: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, tokenizer = tiny_engine_parts
    decoded_by: list[str] = []  # which task detokenized: the link's reader, or the stream's consumer
    real_decode = EngineLink._decode

    def decode(self: EngineLink, *args: Any) -> None:
        task = asyncio.current_task()
        decoded_by.append(task.get_name() if task is not None else "?")
        real_decode(self, *args)

    monkeypatch.setattr(EngineLink, "_decode", decode)
    ids = words(tokenizer, "hello world")[:3]
    async with linked(tokenizer) as engine:
        opened = engine.open(STREAMS)
        handed: list[int] = []
        real_push_raw = ReplyBuffer.push_raw

        def push_raw(self: ReplyBuffer, events: list[Any]) -> None:
            handed.append(len(events))
            real_push_raw(self, events)

        monkeypatch.setattr(ReplyBuffer, "push_raw", push_raw)
        await engine.send({rid: reply_start(ids) for rid, _ in opened})
        assert len(handed) == STREAMS and not decoded_by  # all handed over, nothing detokenized yet
        texts = await take_each(opened)
        more = words(tokenizer, " again and again")
        await engine.send({rid: more for rid, _ in opened})  # running streams: ids only
        later = await take_each(opened)
    assert texts == [tokenizer.decode(ids)] * STREAMS  # each stream its own ids, in order
    assert [a + b for a, b in zip(texts, later, strict=True)] == [tokenizer.decode(ids + more)] * STREAMS
    assert decoded_by == [f"consumer {i}" for i in range(STREAMS)] * 2


@pytest.mark.asyncio
async def test_first_tokens_and_ends_wake_their_consumers_before_running_streams(
    tiny_engine_parts: tuple[Any, Any],
) -> None:
    # the engine lists rows in batch order, so a frame names new rows (first tokens) last; they go first here,
    # with the rows that ended (their clients send the next request)
    _, tokenizer = tiny_engine_parts
    token = words(tokenizer, "hello")[0]
    end, first = wire_event(GenerationChunk("", "length", 3, 8)), wire_event(FirstToken(token, 0))
    async with linked(tokenizer) as engine:
        opened = engine.open(8)
        rids = [rid for rid, _ in opened]
        woken: list[int] = []

        async def consume(index: int, buffer: ReplyBuffer) -> None:
            await buffer.take()
            woken.append(index)

        consumers = [asyncio.create_task(consume(i, buffer)) for i, (_, buffer) in enumerate(opened)]
        await asyncio.sleep(0)  # every consumer waits in take()
        running = {rid: [token] for rid in rids[:5]}
        await engine.send({**running, rids[5]: [token, end], rids[6]: [first], rids[7]: [first]})
        await asyncio.gather(*consumers)
    assert woken == [5, 6, 7, 0, 1, 2, 3, 4]  # the end and the first tokens in frame order, then the rest


@pytest.mark.asyncio
async def test_a_stop_string_found_by_the_consumer_ends_the_reply_and_cancels_it_at_the_engine(
    tiny_engine_parts: tuple[Any, Any],
) -> None:
    _, tokenizer = tiny_engine_parts
    ids = words(tokenizer, "hello world again")
    stop = tokenizer.decode(ids[1:2]).strip()
    params = SamplingParams(max_new_tokens=8, temperature=0.0, stop=[stop])
    async with linked(tokenizer) as engine:
        [(rid, buffer)] = engine.open(1, params)
        await engine.send({rid: reply_start(ids)})
        chunk = await buffer.take()
        assert recv_message(engine.engine) == ("cancel", rid)  # sent when the consumer met the stop string
        await engine.send({rid: [ids[0]]})  # tokens already on their way are dropped
    assert chunk.finish_reason == "stop"
    assert stop not in chunk.text and tokenizer.decode(ids).startswith(chunk.text)
    assert not buffer._raw and not buffer._events


@pytest.mark.asyncio
async def test_a_lost_engine_fails_each_stream_after_the_text_that_arrived_before(
    tiny_engine_parts: tuple[Any, Any],
) -> None:
    _, tokenizer = tiny_engine_parts
    ids = words(tokenizer, "hello world")
    async with linked(tokenizer) as engine:
        [(rid, buffer)] = engine.open(1)
        await engine.send({rid: reply_start(ids)})
        engine.engine.close()  # the engine process died
        for _ in range(100):
            await asyncio.sleep(0)
        assert engine.link.closed
        text = (await buffer.take()).text
        with pytest.raises(EngineError, match="restarted"):
            await buffer.take()
    assert text == tokenizer.decode(ids)
    assert _link.LOST.endswith("being restarted.")
