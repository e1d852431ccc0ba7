"""Admission control: ``max_concurrency`` slots and a bounded FIFO queue, decided before any header is sent.

The two-phase form (``try_enter`` then ``Ticket.wait``) exists so the middleware can reject a full queue
synchronously and race the queue wait against a client disconnect. Everything runs on one event loop, so
the bookkeeping needs no locks: every state change below happens in one synchronous step.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from ..errors import ConfigurationError
from .hold_time import HoldTime
from .rejections import DRAINING_MESSAGE, Draining, QueueFull, QueueTimeout, Rejected

__all__ = ["Admission", "Draining", "QueueFull", "QueueTimeout", "Rejected", "Ticket"]
_WAITING, _GRANTED, _REJECTED, _RELEASED = "waiting", "granted", "rejected", "released"


class Ticket:
    """One request's claim on a slot, from ``Admission.try_enter()`` to ``release()``.

    Args:
        admission: the ``Admission`` that issued it.
        position: queue position at enqueue; 0 means a slot was granted at once.
    """

    def __init__(self, admission: Admission, position: int) -> None:
        self._admission = admission
        self.position = position
        self.enqueued_at = admission._clock()
        self.granted_at: float | None = None
        self._state = _WAITING
        self._started = False  # only holders that actually ran feed the hold-time average
        self._error: Rejected | None = None
        self._future: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    @property
    def granted(self) -> bool:
        return self._state == _GRANTED

    @property
    def queue_wait(self) -> float:
        """Seconds spent queued: final once granted, running while still waiting."""
        end = self.granted_at if self.granted_at is not None else self._admission._clock()
        return end - self.enqueued_at

    async def wait(self) -> None:
        """Wait for the slot; raises ``QueueTimeout`` or ``Draining``. Cancelling it leaves the queue at once."""
        if self._state == _WAITING:
            assert self._future is not None
            try:
                # shield: only Admission resolves the future, so a grant racing a cancel is never lost
                await asyncio.shield(self._future)
            except BaseException:
                self.release()  # a slot handed over in the same loop iteration passes on from here
                raise
        if self._state == _GRANTED:
            self._started = True
            return
        raise self._error or RuntimeError("this ticket was already released; call try_enter() again")

    def release(self) -> None:
        """Give back the slot or the queue place; safe to call more than once."""
        state, self._state = self._state, _RELEASED
        if state == _WAITING:
            self._admission._leave_queue(self)
        elif state == _GRANTED:
            self._admission._free_slot(self)

    def _settle(self, state: str, error: Rejected | None = None) -> None:
        """Leave the queue as granted, rejected or released, waking ``wait()`` if it is waiting."""
        self._state, self._error = state, error
        if state == _GRANTED:
            self.granted_at = self._admission._clock()
        if self._timer is not None:
            self._timer.cancel()
        if self._future is not None and not self._future.done():
            self._future.set_result(None)


class Admission:
    """Concurrency limit plus a bounded FIFO queue with a wait timeout, for one event loop.

    Args:
        max_concurrency: requests served at once (>= 1).
        max_queue: requests allowed to wait for a slot (>= 0); the next one gets ``QueueFull``.
        queue_timeout: seconds a request may wait before ``QueueTimeout``; None waits forever.
        clock: monotonic clock for hold times and queue waits (tests inject a fake one).
    """

    def __init__(
        self,
        max_concurrency: int,
        max_queue: int,
        queue_timeout: float | None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _check_args(max_concurrency, max_queue, queue_timeout)
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self._clock = clock
        self._running = 0
        self._queue: deque[Ticket] = deque()
        self._draining = False
        self._hold = HoldTime()
        self._idle = asyncio.Event()  # set while no slot is held; binds to a loop only when awaited
        self._idle.set()

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def mean_hold(self) -> float:
        """Average seconds a slot is held (EWMA), or the default before any measurement."""
        return self._hold.mean

    def retry_after(self, waiting: int | None = None) -> int:
        """Seconds until a request behind ``waiting`` others (default: the current queue) would likely start."""
        return self._hold.retry_after(self.waiting if waiting is None else waiting, self.max_concurrency)

    def try_enter(self) -> Ticket:
        """Take a slot or a queue place now, or raise ``QueueFull`` / ``Draining`` without waiting."""
        if self._draining:
            raise Draining(DRAINING_MESSAGE, retry_after=self.retry_after())
        if self._running < self.max_concurrency and not self._queue:
            ticket = Ticket(self, position=0)
            self._running += 1
            self._idle.clear()
            ticket._settle(_GRANTED)
            ticket._started = True
            return ticket
        if len(self._queue) >= self.max_queue:
            seconds = self.retry_after()
            raise QueueFull(f"all slots are busy and the queue is full; retry in {seconds} s", retry_after=seconds)
        return self._enqueue()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[Ticket]:
        """``async with admission.slot() as ticket:`` holds a slot for the body of the block."""
        ticket = self.try_enter()
        try:
            await ticket.wait()
            yield ticket
        finally:
            ticket.release()

    def reopen(self) -> None:
        """Admit again after a drain: a server (or a test client) that starts the same app once more."""
        self._draining = False

    def drain(self) -> None:
        """Stop admitting: new requests get ``Draining``, and so does everyone still queued."""
        self._draining = True
        while self._queue:
            self._queue.popleft()._settle(_REJECTED, Draining(DRAINING_MESSAGE, retry_after=self.retry_after()))

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no slot is held; False if ``timeout`` seconds passed first."""
        try:
            async with asyncio.timeout(timeout):  # not wait_for, which can swallow a cancel on 3.11
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def snapshot(self) -> dict[str, Any]:
        """Load figures for ``GET /get_load``."""
        return {
            "running": self._running,
            "waiting": len(self._queue),
            "max_concurrency": self.max_concurrency,
            "max_queue": self.max_queue,
            "available_slots": max(0, self.max_concurrency - self._running),
            "draining": self._draining,
        }

    def __repr__(self) -> str:
        return f"Admission(running={self._running}/{self.max_concurrency}, waiting={self.waiting}/{self.max_queue})"

    def _enqueue(self) -> Ticket:
        loop = asyncio.get_running_loop()
        ticket = Ticket(self, position=len(self._queue) + 1)
        ticket._future = loop.create_future()
        if self.queue_timeout is not None:
            # a timer, not a cancellation: expiry and hand-off are both plain callbacks, so exactly one wins
            ticket._timer = loop.call_later(self.queue_timeout, self._expire, ticket)
        self._queue.append(ticket)
        return ticket

    def _expire(self, ticket: Ticket) -> None:
        if ticket._state != _WAITING:
            return
        self._queue.remove(ticket)
        seconds = self.retry_after()
        message = f"no slot freed up within {self.queue_timeout} s; retry in {seconds} s"
        ticket._settle(_REJECTED, QueueTimeout(message, retry_after=seconds))

    def _leave_queue(self, ticket: Ticket) -> None:
        self._queue.remove(ticket)  # a waiting ticket is always queued: every exit from the queue settles it
        ticket._settle(_RELEASED)

    def _free_slot(self, ticket: Ticket) -> None:
        self._running -= 1
        if ticket._started and ticket.granted_at is not None:
            self._hold.record(self._clock() - ticket.granted_at)
        # hand the slot straight to the next waiter so a newcomer can never take it first
        while self._queue and self._running < self.max_concurrency:
            self._running += 1
            self._queue.popleft()._settle(_GRANTED)
        if self._running == 0:
            self._idle.set()


def _is_int(value: object, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _check_args(max_concurrency: int, max_queue: int, queue_timeout: float | None) -> None:
    if not _is_int(max_concurrency, 1):
        raise ConfigurationError(f"max_concurrency must be an int >= 1 (got {max_concurrency!r}); pass e.g. 4")
    if not _is_int(max_queue, 0):
        raise ConfigurationError(f"max_queue must be an int >= 0 (got {max_queue!r}); pass 0 to disable queueing")
    timeout_ok = isinstance(queue_timeout, (int, float)) and not isinstance(queue_timeout, bool)
    if queue_timeout is not None and not (timeout_ok and 0 < queue_timeout < math.inf):
        raise ConfigurationError(
            f"queue_timeout must be None (wait forever) or seconds > 0 (got {queue_timeout!r}); pass e.g. 30.0"
        )
