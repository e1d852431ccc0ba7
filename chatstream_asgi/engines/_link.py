"""One web process's connection to the engine process: requests out, one frame of events per step in.

A reader task on the event loop takes each frame (every stream's events of one engine step) and
pushes them into the streams' ``ReplyBuffer``s in one go; there is no other per-token work here.
When the connection ends, every open stream gets an ``EngineError`` (in-band for the client) and
``on_lost`` tells the engine to restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

from ..errors import EngineError
from ._delivery import ReplyBuffer
from ._wire import encode, local_event, read_message
from .base import SamplingParams

LINK_BUFFER = 1 << 22  # bytes the reader may take in one read: a step of many streams is one read


class EngineLink:
    """Submits and cancels requests; ``buffers`` maps each open request id to its stream's buffer."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        info: dict[str, Any],
        on_lost: Callable[[EngineLink], None],
    ) -> None:
        self.reader, self.writer, self.info = reader, writer, info
        self.buffers: dict[int, ReplyBuffer] = {}
        self.closed = False
        self._ids = itertools.count()
        self._on_lost = on_lost
        self._task = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def open(cls, address: str, on_lost: Callable[[EngineLink], None]) -> EngineLink:
        reader, writer = await asyncio.open_unix_connection(address, limit=LINK_BUFFER)
        try:
            writer.write(encode(("hello",)))
            kind, info = await read_message(reader)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            writer.close()
            raise ConnectionError(f"the engine on {address} closed the connection before answering") from exc
        if kind != "hello":
            writer.close()
            raise ConnectionError(f"the engine on {address} answered {kind!r} instead of hello")
        return cls(reader, writer, info, on_lost)

    def submit(self, prompt_ids: list[int], params: SamplingParams, replies: ReplyBuffer) -> int:
        if self.closed:  # nobody would ever answer this request
            raise ConnectionError("the connection to the engine is closed")
        rid = next(self._ids)
        self.buffers[rid] = replies
        self.writer.write(encode(("submit", rid, prompt_ids, dataclasses.asdict(params))))
        return rid

    def cancel(self, rid: int) -> None:
        """Stop request ``rid`` at the engine's next step; nothing to do once it ended."""
        if self.buffers.pop(rid, None) is not None and not self.closed:
            self.writer.write(encode(("cancel", rid)))

    async def close(self) -> None:
        self.closed = True
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()

    async def _read_loop(self) -> None:
        try:
            while True:
                kind, batch = await read_message(self.reader)
                if kind == "step":
                    self._deliver(batch)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self._lose()

    def _deliver(self, batch: list[tuple[int, Any]]) -> None:
        buffers = self.buffers
        for rid, wire in batch:
            replies = buffers.get(rid)
            if replies is None:
                continue  # cancelled here while its last events were on the way
            event = local_event(wire)
            if isinstance(event, str):
                replies.push(event)
                continue
            del buffers[rid]
            replies.push(EngineError(event[1]) if isinstance(event, tuple) else event)

    def _lose(self) -> None:
        """The engine is gone: fail what was running here, then let the engine restart it."""
        was_closed, self.closed = self.closed, True
        self.writer.close()
        buffers, self.buffers = self.buffers, {}
        for replies in buffers.values():
            replies.push(EngineError("The engine process ended while generating this reply; it is being restarted."))
        if not was_closed:
            self._on_lost(self)
