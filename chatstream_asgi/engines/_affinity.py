"""Prefix affinity for ``EngineReplicas``: a chat's next turn goes to the replica whose prefix cache holds its start.

Each replica's prefix cache lives in its own engine (thread or process), out of reach of the event loop;
what the loop can know cheaply is which prompts it sent where. So every replica remembers the token ids of
the last prompts it served (a ``PrefixIndex`` and an LRU of ``REMEMBERED`` prompts), and a new prompt goes
to the replica that served the longest prefix of it, when that prefix is longer by at least a block than
on any other replica (a system prompt every replica has seen decides nothing) and the replica has room.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence as Seq

from ._prefix_index import BLOCK_TOKENS, PrefixIndex

#: prompts remembered per replica.
REMEMBERED = 2048


class ReplicaMemory:
    """The prompts one replica served lately."""

    def __init__(self, remembered: int = REMEMBERED) -> None:
        self._index = PrefixIndex()
        self._order: OrderedDict[int, None] = OrderedDict()
        self._ids = itertools.count()
        self._remembered = remembered

    def served(self, tokens: Seq[int]) -> None:
        item = next(self._ids)
        self._index.add(item, tokens)
        self._order[item] = None
        while len(self._order) > self._remembered:
            oldest, _ = self._order.popitem(last=False)
            self._index.remove(oldest)

    def shared(self, tokens: Seq[int]) -> int:
        """Tokens of the longest prefix of ``tokens`` this replica served."""
        found = self._index.longest(tokens, len(tokens))
        if found is None:
            return 0
        self._order.move_to_end(found[0])
        return found[1]


def holder(memories: Seq[ReplicaMemory], tokens: Seq[int], has_room: Seq[bool]) -> int | None:
    """The replica that served clearly the longest prefix of ``tokens`` and has room, else None."""
    shared = [memory.shared(tokens) for memory in memories]
    best = max(range(len(shared)), key=shared.__getitem__)
    runner_up = max((n for i, n in enumerate(shared) if i != best), default=0)
    if shared[best] - runner_up >= BLOCK_TOKENS and has_room[best]:
        return best
    return None
