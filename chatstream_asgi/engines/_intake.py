"""Where sequences enter the engine's worker thread, from event loops or the engine process's connections,
and where each step's events leave it, one flush per channel.

``submit`` and ``wake`` run on any thread; the rest runs on the worker. The lock orders ``submit`` against
``close``, so a sequence submitted after the worker's last look at the queue is refused, never stranded.
"""

from __future__ import annotations

import queue
import threading
from collections import deque

from ..errors import EngineNotReady
from ._delivery import Channel
from ._sequence import Sequence


class Intake:
    """Sequences submitted to one worker, those waiting for their prefill, and the channels their events leave by."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Sequence | None] = queue.SimpleQueue()
        self.pending: deque[Sequence] = deque()  # taken off the queue, in arrival order (the worker's alone)
        self._channels: dict[Channel, None] = {}  # every channel that may hold events (an ordered set)
        self._lock = threading.Lock()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def waiting(self) -> int:
        return len(self.pending) + self._queue.qsize()

    def submit(self, seq: Sequence) -> None:
        with self._lock:
            if self._closed:
                raise EngineNotReady("The engine is closed; call start() again before streaming.")
            self._queue.put(seq)

    def attach(self, channel: Channel) -> None:
        """Flush ``channel`` from the next step on (any thread; the worker only reads the set or drops from it)."""
        with self._lock:
            self._channels[channel] = None

    def wake(self) -> None:
        """Unblock a worker waiting in ``take_new``."""
        self._queue.put(None)

    def take_new(self, *, block: bool, timeout: float | None = None) -> None:
        """Move every submitted sequence to ``pending``; with ``block``, wait for the first one (or a ``wake``), at
        most ``timeout`` seconds."""
        try:
            item = self._queue.get(block=block, timeout=timeout if block else None)
            while True:
                if item is not None:
                    self.pending.append(item)
                    self._channels[item.channel] = None
                item = self._queue.get_nowait()
        except queue.Empty:
            pass

    def drop_finished(self) -> None:
        if any(s.finished for s in self.pending):
            self.pending = deque(s for s in self.pending if not s.finished)

    def flush(self) -> None:
        """Hand this step's events over: one call per channel (event loop or connection), not one per token."""
        for channel in list(self._channels):
            if not channel.flush():
                del self._channels[channel]

    def close(self) -> list[Sequence]:
        """Refuse further submissions; return every sequence still waiting (and forget them) for the caller to fail."""
        with self._lock:
            self._closed = True
        self.take_new(block=False)
        left = list(self.pending)
        self.pending.clear()
        return left
