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
failure always go at the next flush, so time to first token and the end of a reply never wait.

Events are cheap on purpose: a ``str`` for text, a ``GenerationChunk`` only for the last one, an
exception for a failure.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any, NamedTuple, Protocol, cast

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


class HoldBack:
    """When a channel's pending events are due: at once if urgent, else ``interval`` after the last hand-over.

    Measured from the last hand-over, not from the oldest event: on a model slower than the interval every
    step goes out at once, and on a faster one the hand-overs are ``interval`` apart.
    """

    __slots__ = ("interval", "last", "pending", "urgent")

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.last = 0.0
        self.pending = False
        self.urgent = False

    def posted(self, urgent: bool) -> None:
        self.pending = True
        self.urgent = self.urgent or urgent

    def due(self) -> bool:
        if not self.pending:
            return False
        now = time.monotonic() if self.interval > 0 else 0.0
        if self.urgent or now - self.last >= self.interval:
            self.pending = self.urgent = False
            self.last = now
            return True
        return False


class LoopChannel:
    """The events of every stream consumed on one asyncio loop, handed over once per step (or interval)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float = 0.0) -> None:
        self.loop = loop
        self.closed = False
        self._pending: list[tuple[ReplyBuffer, Reply]] = []  # its sequences detokenize: no token ids
        self._hold = HoldBack(interval)

    def post(self, key: Any, event: Event, urgent: bool) -> bool:
        if self.closed:
            return False
        self._pending.append((key, cast(Reply, event)))
        self._hold.posted(urgent)
        return True

    def flush(self) -> bool:
        if self.closed or not self._hold.due():
            # a loop that closed with nothing pending (a test's, a notebook's) leaves the scheduler's list too
            self.closed = self.closed or self.loop.is_closed()
            return not self.closed
        batch, self._pending = self._pending, []
        try:
            self.loop.call_soon_threadsafe(_dispatch, batch)
        except RuntimeError:  # the loop is closed: nobody listens; its sequences cancel at their next post
            self.closed = True
        return not self.closed


def _dispatch(batch: list[tuple[ReplyBuffer, Reply]]) -> None:
    for buffer, event in batch:
        buffer.push(event)


class ReplyBuffer:
    """One stream's events on the consumer's loop; ``take`` returns all that arrived, coalesced."""

    __slots__ = ("_events", "_waiter", "_wakes")

    def __init__(self) -> None:
        self._events: list[Reply] = []
        self._waiter: asyncio.Future[None] | None = None
        self._wakes: FairWakes | None = None

    def push(self, event: Reply) -> None:
        """Called on the loop: store ``event`` and wake the consumer (through the loop's fair wake-ups)."""
        self._events.append(event)
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
        while not self._events:
            loop = asyncio.get_running_loop()
            if self._wakes is None:
                self._wakes = fair_wakes(loop)
            self._waiter = loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._coalesce()

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
