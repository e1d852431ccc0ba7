"""Fair turns on the event loop: at most ``WAKES_PER_TURN`` chat tasks start work per loop iteration.

asyncio runs every ready callback of an iteration before it looks at its sockets again, so a request
to the host app's own endpoints waits for all of them, about three times over (its answer takes
about three iterations). On a fast model two things made those iterations long:
- one engine step makes every stream's consumer ready at once: at batch 64, 64 consumers at ~80 us
  each (encode, the server's framing, a socket write) were one 4-6 ms iteration per step;
- clients that finished together ask again together: 64 new chats parsed, admitted and rendered in
  the same iteration.
``ReplyBuffer`` wakes its consumer through ``wake`` and the middleware lets each of its requests in
through ``turn``: a few per iteration, first come first served, the rest in the next iterations. The
streams lose nothing they would notice (a whole batch is out within a millisecond or two), and the
host app's requests get in between (measured in ``benchmarks/RESULTS.md``, fast-model stack section).

A fixed number per iteration was not enough: what a wake costs varies (a write to a slow socket, a
reply's end that saves history and records metrics, the same code preempted by the engine process on
a busy machine), and an iteration that ran long still held the host app's request back. So the turn
size adapts to time (additive increase, multiplicative decrease, as TCP does with its window): when
the iteration that ran the last turn's consumers took longer than ``turn_target``, the next turn
is half as large; otherwise it grows by one, up to ``per_turn``. At 64 streams of a fast model this
halved the host app's ``/hello`` p99 (8-9 ms to 4-5 ms) at the same tokens/s.
"""

from __future__ import annotations

import asyncio
import collections
import time
import weakref

WAKES_PER_TURN = 8  # ~0.6 ms of consumer work per iteration at ~80 us each (measured on the fast-model benchmark)
#: how long one loop iteration may spend on chat work before turns shrink: a host request waits ~3 iterations
TURN_TARGET_S = 0.00025

_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, FairWakes] = weakref.WeakKeyDictionary()


class FairWakes:
    """Wakes waiting consumers of one loop, ``turn_size`` (at most ``per_turn``) per iteration, oldest first."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, per_turn: int = WAKES_PER_TURN, turn_target: float = TURN_TARGET_S
    ) -> None:
        self.loop = loop
        self.per_turn = per_turn
        self.turn_target = turn_target
        self.turn_size = per_turn  # wake-ups per iteration now: shrinks while iterations run long
        self.budget = per_turn  # wake-ups left in this iteration
        self.waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self.scheduled = False
        self.turn_at: float | None = None  # when the last turn began, while turns follow each other

    def wake(self, waiter: asyncio.Future[None]) -> None:
        """Wake ``waiter`` now if this iteration has budget left, else in a following one."""
        if self.budget > 0 and not self.waiting:
            if not waiter.done():
                if self.turn_at is None:  # the first wake after idle opens a turn: judge it like the others
                    self.turn_at = time.perf_counter()
                self.budget -= 1
                waiter.set_result(None)
        else:
            self.waiting.append(waiter)
        self._schedule()

    async def turn(self) -> None:
        """Wait for a share of an iteration's budget: a burst of new chats starts a few per iteration."""
        waiter = self.loop.create_future()
        self.wake(waiter)
        await waiter  # already done, without a pause, while this iteration has budget

    def _schedule(self) -> None:
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self._next_turn)

    def _next_turn(self) -> None:
        # Runs once per iteration while there is work: a fresh budget, spent on the oldest waiters first.
        self.scheduled = False  # so that _schedule below can queue the next one
        self._resize(time.perf_counter())
        self.budget = self.turn_size
        waiting = self.waiting
        while waiting and self.budget > 0:
            waiter = waiting.popleft()
            if not waiter.done():  # a consumer cancelled while it waited here takes no budget
                self.budget -= 1
                waiter.set_result(None)
        if waiting or self.budget < self.turn_size:  # the budget refills at the next iteration
            self._schedule()
        else:
            self.turn_at = None  # idle: the next turn has no iteration to judge

    def _resize(self, now: float) -> None:
        # Since the last turn one iteration ran: the consumers that turn woke, and whatever else was ready.
        # (No select wait in between: a turn is scheduled only while there is work, so the loop did not sleep.)
        if self.turn_at is not None and self.budget < self.turn_size:  # it woke someone: judge its iteration
            if now - self.turn_at > self.turn_target:
                self.turn_size = max(1, self.turn_size // 2)
            elif self.turn_size < self.per_turn:
                self.turn_size += 1
        self.turn_at = now


def fair_wakes(loop: asyncio.AbstractEventLoop) -> FairWakes:
    """The loop's one ``FairWakes`` (every stream of a loop shares it, so the limit is per iteration)."""
    wakes = _by_loop.get(loop)
    if wakes is None:
        wakes = _by_loop[loop] = FairWakes(loop)
    return wakes
