"""The send timeout of one streamed reply: one timer per reply, not one per send.

A client that stops reading makes the server's ``send`` wait (its buffer is full); after ``send_timeout``
the reply ends as a disconnect. ``asyncio.timeout`` around every send did that, at the price of a
``Timeout`` object and a timer scheduled and cancelled per chunk: 8-9 % of the web process's CPU on a
fast model, for a send that almost never waits at all. Here a send only notes when it began; one timer
per reply looks at the send in flight when it fires and re-arms for that send's own deadline, so a reply
costs a timer every ``timeout`` seconds at most. A send still stuck at its deadline has its task
cancelled, and ``expired`` turns that cancellation into the timeout (as ``asyncio.timeout`` does).
"""

from __future__ import annotations

import asyncio


class SendWatchdog:
    """Cancels the task whose send has been waiting longer than ``timeout`` seconds (``None``: never)."""

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self.loop = asyncio.get_running_loop()
        self.since: float | None = None  # when the send in flight began
        self.task: asyncio.Task[object] | None = None  # the task that awaits it
        self.fired = False
        self._timer: asyncio.TimerHandle | None = None

    def begin(self) -> None:
        """A send starts (sends of one reply never overlap: a ping and a chunk share a lock)."""
        if self.timeout is None:
            return
        self.since = self.loop.time()
        self.task = asyncio.current_task()
        if self._timer is None:
            self._timer = self.loop.call_at(self.since + self.timeout, self._check)

    def end(self) -> None:
        self.since = None
        self.task = None

    def expired(self) -> bool:
        """After a ``CancelledError`` in a send: True if this watchdog cancelled it and nothing else did."""
        if not self.fired:
            return False
        self.fired = False
        task = asyncio.current_task()
        return task is not None and task.uncancel() == 0

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        if self.since is None or self.task is None or self.timeout is None:
            return  # nothing in flight: the next send arms the timer again
        due = self.since + self.timeout
        if self.loop.time() >= due:
            self.fired = True
            self.task.cancel()
        else:
            self._timer = self.loop.call_at(due, self._check)
