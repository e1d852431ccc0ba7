"""Holding a generation slot around one streamed reply: waiting for it while the client may leave, and giving it
back (with the turn's other bookkeeping) before the last byte goes out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from ..engines.base import GenerationChunk
from .asgi import listen_for_disconnect
from .types import HTTPReceive

Finish = Callable[[str], Awaitable[None]]
logger = logging.getLogger("chatstream_asgi")


async def finish_before_last_byte(
    chunks: AsyncIterator[GenerationChunk], finish: Finish, cut: Finish | None = None
) -> AsyncIterator[GenerationChunk]:
    """Pass the engine's chunks on, and end the request before the sender writes the response's last byte,
    whatever the outcome: ``finish(reply)`` once the engine is done; ``cut(reply as far as it was sent)`` when the
    stream is closed or cancelled (a disconnect, the deadline, a slow client), or ``cut("")`` when the engine
    fails (``cut`` defaults to ``finish``). Ending after the last byte lost races against the client's very next
    request: 409, 429, or a history without the reply it had just read."""
    parts: list[str] = []
    try:
        async for chunk in chunks:
            yield chunk
            parts.append(chunk.text)  # the sender came back for more: this chunk was written
    except Exception:  # the engine failed: its reply is not kept
        await to_the_end((cut or finish)(""))
        raise
    except BaseException:
        with contextlib.suppress(Exception):
            await aclose(chunks)  # stop the engine before anything else
        await to_the_end((cut or finish)("".join(parts)))
        raise
    await to_the_end(finish("".join(parts)))


async def to_the_end(bookkeeping: Awaitable[None]) -> None:
    """Run a turn's bookkeeping (save the reply, free the slot) to its end even if this task is cancelled meanwhile
    (the client leaving, the deadline, a drain, while the history store is slow), then let the cancel through: a
    cancel in the middle lost the reply and the on_finish call."""
    task = asyncio.ensure_future(bookkeeping)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait({task})  # a second cancel of this task would end this wait, never the bookkeeping
        if not task.cancelled() and task.exception() is not None:
            logger.error("a cancelled turn's bookkeeping failed", exc_info=task.exception())
        raise


async def aclose(chunks: AsyncIterator[GenerationChunk]) -> None:
    closer = getattr(chunks, "aclose", None)
    if closer is not None:
        await closer()


def queue_headers(position: int) -> list[tuple[bytes, bytes]]:
    return [(b"x-queue-position", str(position).encode())] if position else []


async def wait_for_slot(ticket: Any, receive: HTTPReceive) -> bool:
    """Wait for the ticket's slot; ``False`` if the client disconnects first (it then leaves the queue)."""
    if ticket.granted:  # a slot was free: nothing to wait for, no disconnect to race (two tasks a request saved)
        await ticket.wait()
        return True
    waiter = asyncio.ensure_future(ticket.wait())
    listener = asyncio.ensure_future(listen_for_disconnect(receive))
    try:
        await asyncio.wait({waiter, listener}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (waiter, listener):
            if not task.done():
                task.cancel()
        await asyncio.wait({waiter, listener})
    if not listener.cancelled():
        if not waiter.cancelled():
            waiter.exception()  # a rejection in the same step as the disconnect: read, so asyncio does not log it
        return False
    waiter.result()  # raises QueueTimeout / Draining
    return True
