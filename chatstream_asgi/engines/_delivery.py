"""Per-step delivery: the worker hands the event loop one batch of events per step, not one per token.

On a fast model the serving path sets the pace, and a ``call_soon_threadsafe`` per token per stream
(a self-pipe write and a loop wake-up each) cost the worker a tenth of its time at batch 32. Here
each sequence's events go to its ``Channel`` (one per event loop, or one per client connection of
an engine process); the scheduler calls ``flush`` once per step, which hands the whole step over in
one call. On the consumer's side a ``ReplyBuffer`` collects a stream's events, and a consumer that
was busy when several arrived takes them as one coalesced chunk (one write to the client, not n).

A channel may also hold text back for up to ``interval`` seconds (the engine's ``stream_interval``),
so that on a model faster than anyone reads, each stream gets one write per interval instead of one
per step (what SGLang's ``--stream-interval`` does in steps). A stream's first text, its end and its
failure always go at the next flush, so time to first token and the end of a reply never wait; they
take only their own stream's events with them (``StreamHold``).

Events are cheap on purpose: a ``str`` for text, a ``GenerationChunk`` only for the last one, an
exception for a failure.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, NamedTuple, Protocol

from .base import GenerationChunk
from .fair_wakes import FairWakes, fair_wakes


class FirstToken(NamedTuple):
    """A reply's first token id for a consumer that detokenizes itself, with what its prefill reused."""

    token_id: int
    cached_tokens: int


Reply = str | GenerationChunk | BaseException  # what a stream's consumer gets
Event = Reply | int | FirstToken  # ids: posted for a consumer that detokenizes itself (an engine process's)


class Channel(Protocol):
    """Where a sequence's events go; ``post`` and ``flush`` are called on the worker thread only."""

    def post(self, key: Any, event: Event, urgent: bool) -> bool:
        """Queue ``event`` for the consumer ``key``; False when nobody listens any more.

        ``urgent`` events (a first token, an end, a failure) go at the next flush whatever the interval.
        """

    def flush(self) -> bool:
        """Deliver what was posted since the last flush; False once the consumer side is gone for good."""


class StreamHold:
    """A channel's pending events, by stream, and which of them are due at a step's flush.

    Every stream's events go once ``interval`` has passed since the last full hand-over (on a model slower
    than the interval, every step). In between, a stream with an urgent event (a first token, an end, a
    failure) goes at once, alone: at batch 64 a reply starts or ends every few steps, and when each of those
    took every stream's text along (and restarted the interval), a stream got a hand-over (a detokenization,
    a wake-up) every 4.7 tokens on the fast-model benchmark; alone, every 7.5 (one per 20 ms there).
    """

    __slots__ = ("interval", "last", "events", "urgent")

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.last = 0.0
        self.events: dict[Any, list[Any]] = {}  # a stream's events in the order posted
        self.urgent: list[Any] = []  # streams holding an urgent event

    def post(self, key: Any, event: Any, urgent: bool) -> None:
        events = self.events.get(key)
        if events is None:
            self.events[key] = [event]
        else:
            events.append(event)
        if urgent:
            self.urgent.append(key)

    def take_due(self) -> dict[Any, list[Any]]:
        """The events to hand over now (all of them, the urgent streams', or none), removed from the hold."""
        if not self.events:
            return {}
        now = time.monotonic() if self.interval > 0 else 0.0
        if now - self.last >= self.interval:
            self.last = now
            due, self.events, self.urgent = self.events, {}, []
            return due
        due = {key: self.events.pop(key) for key in self.urgent if key in self.events}
        self.urgent = []
        return due


class LoopChannel:
    """The events of every stream consumed on one asyncio loop, handed over once per step (or interval)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float = 0.0) -> None:
        self.loop = loop
        self.closed = False
        self._hold = StreamHold(interval)  # its sequences detokenize: Replies by ReplyBuffer, no token ids

    def post(self, key: Any, event: Event, urgent: bool) -> bool:
        if self.closed:
            return False
        self._hold.post(key, event, urgent)
        return True

    def flush(self) -> bool:
        batch = {} if self.closed else self._hold.take_due()
        if not batch:
            # a loop that closed with nothing pending (a test's, a notebook's) leaves the scheduler's list too
            self.closed = self.closed or self.loop.is_closed()
            return not self.closed
        try:
            self.loop.call_soon_threadsafe(_dispatch, batch)
        except RuntimeError:  # the loop is closed: nobody listens; its sequences cancel at their next post
            self.closed = True
        return not self.closed


def _dispatch(batch: dict[ReplyBuffer, list[Reply]]) -> None:
    for buffer, events in batch.items():
        buffer.push_many(events)


class ReplyBuffer:
    """One stream's events on the consumer's loop; ``take`` returns all that arrived, coalesced.

    ``decode`` (an engine process's link sets it) turns raw events pushed with ``push_raw`` (token ids, an
    end, an error, as the engine sent them) into replies, pushed back here with ``push``. It runs in
    ``take``, on the consumer's own turn: the link hands a whole step frame over in one cheap pass, and
    detokenizing, the larger part of a stream's cost, falls under the loop's fair wake-ups with the rest
    of that stream's work (a write to its client).
    """

    __slots__ = ("_events", "_raw", "_waiter", "_wakes", "decode")

    def __init__(self, decode: Callable[[list[Any]], None] | None = None) -> None:
        self._events: list[Reply] = []
        self._raw: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None
        self._wakes: FairWakes | None = None
        self.decode = decode

    def push(self, event: Reply) -> None:
        """Called on the loop: store ``event`` and wake the consumer (through the loop's fair wake-ups)."""
        self.push_many((event,))

    def push_many(self, events: Iterable[Reply]) -> None:
        self._events.extend(events)
        self._wake()

    def push_raw(self, events: list[Any]) -> None:
        """Store events for ``decode`` (in arrival order, before anything pushed later) and wake the consumer."""
        self._raw.extend(events)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and self._wakes is not None:
            self._waiter = None  # handed over once: later events of this step ride on the same wake-up
            self._wakes.wake(waiter)

    async def chunks(self) -> AsyncIterator[GenerationChunk]:
        """Every chunk of the reply, up to and including the last one (which carries the finish reason)."""
        while True:
            chunk = await self.take()
            yield chunk
            if chunk.finish_reason is not None:
                return

    async def take(self) -> GenerationChunk:
        """Wait for events; return them as one chunk (text joined), or raise the failure they carry."""
        while True:
            if self._raw and self.decode is not None:
                raw, self._raw = self._raw, []
                self.decode(raw)  # may push nothing yet: a token that is part of a character, or of a stop string
            if self._events:
                return self._coalesce()
            loop = asyncio.get_running_loop()
            if self._wakes is None:
                self._wakes = fair_wakes(loop)
            self._waiter = loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _coalesce(self) -> GenerationChunk:
        events, texts = self._events, []
        for index, event in enumerate(events):
            if isinstance(event, str):
                texts.append(event)
                continue
            # Text that came before a failure is delivered first; the failure is raised on the next take.
            if isinstance(event, BaseException):
                if texts:
                    del events[:index]
                    return GenerationChunk("".join(texts))
                del events[: index + 1]
                raise event
            del events[: index + 1]
            if texts:
                texts.append(event.text)
                return dataclasses.replace(event, text="".join(texts))
            return event
        events.clear()
        return GenerationChunk("".join(texts))
