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
"""

from __future__ import annotations

import asyncio
import collections
import weakref

WAKES_PER_TURN = 8  # ~0.6 ms of consumer work per iteration at ~80 us each (measured on the fast-model benchmark)

_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, FairWakes] = weakref.WeakKeyDictionary()


class FairWakes:
    """Wakes waiting consumers of one loop, at most ``per_turn`` per iteration, first come first woken."""

    def __init__(self, loop: asyncio.AbstractEventLoop, per_turn: int = WAKES_PER_TURN) -> None:
        self.loop = loop
        self.per_turn = per_turn
        self.budget = per_turn  # wake-ups left in this iteration
        self.waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self.scheduled = False

    def wake(self, waiter: asyncio.Future[None]) -> None:
        """Wake ``waiter`` now if this iteration has budget left, else in a following one."""
        if self.budget > 0 and not self.waiting:
            if not waiter.done():
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
        self.budget = self.per_turn
        waiting = self.waiting
        while waiting and self.budget > 0:
            waiter = waiting.popleft()
            if not waiter.done():  # a consumer cancelled while it waited here takes no budget
                self.budget -= 1
                waiter.set_result(None)
        if waiting or self.budget < self.per_turn:  # the budget refills at the next iteration
            self._schedule()


def fair_wakes(loop: asyncio.AbstractEventLoop) -> FairWakes:
    """The loop's one ``FairWakes`` (every stream of a loop shares it, so the limit is per iteration)."""
    wakes = _by_loop.get(loop)
    if wakes is None:
        wakes = _by_loop[loop] = FairWakes(loop)
    return wakes
