"""Server-side chat history, keyed by the session id from the signed cookie.

``HistoryStore`` is the extension point: any object with these three async methods works. A store for
many replicas (``redis_store.RedisHistoryStore``) implements the same protocol and should reuse
``copy_messages`` and ``trim_turns`` so every store keeps and trims history the same way.
``trim_turns`` also shapes the history a new turn is answered from (the turn itself is built in ``http.requests``).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..errors import ConfigurationError

Message = dict[str, str]

DEFAULT_MAX_SESSIONS = 10_000
DEFAULT_TTL = 24 * 3600.0
# trim_turns moves the kept window's start by 1/TRIM_STEPS of max_turns at a time (see its docstring)
TRIM_STEPS = 4


@runtime_checkable
class HistoryStore(Protocol):
    """Where a session's chat messages (``{"role": ..., "content": ...}``) live between turns."""

    async def load(self, session_id: str) -> list[Message]:
        """The session's messages (a copy the caller may change), or ``[]`` for an unknown session."""
        ...

    async def save(self, session_id: str, messages: Iterable[Mapping[str, str]]) -> None:
        """Replace the session's messages with a copy of ``messages``."""
        ...

    async def clear(self, session_id: str) -> None:
        """Forget the session; clearing an unknown session is not an error."""
        ...


@runtime_checkable
class TurnLock(Protocol):
    """What a history store shared by several replicas adds, so that one session streams one turn at a time across
    all of them (each replica already refuses a second turn of a session it is streaming). ``holder`` is a random
    token of the turn; a lock that was not released (a replica died) frees itself after ``seconds``."""

    async def claim_turn(self, session_id: str, holder: str, seconds: float) -> bool:
        """Take the session's turn for ``seconds``; False when another turn holds it."""
        ...

    async def renew_turn(self, session_id: str, holder: str, seconds: float) -> bool:
        """Hold it ``seconds`` more; False when it is no longer ``holder``'s."""
        ...

    async def release_turn(self, session_id: str, holder: str) -> None:
        """Let it go, if ``holder`` still holds it."""
        ...


def copy_messages(messages: Iterable[Mapping[str, str]]) -> list[Message]:
    """A fresh list of fresh dicts, so neither side can change the other's history."""
    copied = []
    for message in messages:
        if not isinstance(message, Mapping) or not all(isinstance(message.get(k), str) for k in ("role", "content")):
            raise TypeError(f"each message needs str 'role' and 'content', got {message!r}")
        copied.append(dict(message))
    return copied


def trim_turns(messages: list[Message], max_turns: int | None) -> list[Message]:
    """Keep leading system messages and at most the last ``max_turns`` user/assistant pairs, cut in steps.

    Pairs are numbered from the start of the conversation, and the kept window starts at a multiple of
    ``step = max(1, max_turns // 4)`` pairs: it holds between ``max_turns - step + 1`` and ``max_turns`` pairs,
    and its start moves only every ``step`` turns. Cutting the fewest pairs would change the beginning of the
    rendered prompt on every turn, and the engine's prefix KV cache would never hit. A pair opens with a user
    message (replies before the first one count as a pair of their own): a kept tail that opened with a reply
    would have lost its question.
    """
    if max_turns is None:
        return messages
    head = 0
    while head < len(messages) and messages[head]["role"] == "system":
        head += 1
    starts = [i for i in range(head, len(messages)) if i == head or messages[i]["role"] == "user"]
    excess = len(starts) - max_turns
    if excess <= 0:
        return messages
    step = max(1, max_turns // TRIM_STEPS)
    # the smallest multiple of step that drops enough: it depends only on the pair count, not on earlier calls
    first = -(-excess // step) * step
    return messages[:head] + messages[starts[first] :]


@dataclass
class _Entry:
    messages: list[Message]
    touched: float


class MemoryHistoryStore:
    """In-process history, bounded by session count (LRU eviction) and idle time (TTL).

    Good for one process. Operations are synchronous under a lock, so one store is safe to share between
    coroutines and threads. Several replicas need a shared store instead (a Redis-backed one).

    Args:
        max_sessions: sessions kept; saving one more evicts the least recently used.
        ttl: seconds since a session's last load or save after which it is forgotten; None keeps it.
        max_turns: user/assistant pairs kept per session (leading system messages always stay); None keeps all.
        clock: monotonic clock in seconds (tests inject a fake one).
    """

    def __init__(
        self,
        *,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        ttl: float | None = DEFAULT_TTL,
        max_turns: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _check_args(max_sessions, ttl, max_turns)
        self.max_sessions = max_sessions
        self.ttl = ttl
        self.max_turns = max_turns
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    async def load(self, session_id: str) -> list[Message]:
        return self.load_sync(session_id)

    async def save(self, session_id: str, messages: Iterable[Mapping[str, str]]) -> None:
        self.save_sync(session_id, messages)

    async def clear(self, session_id: str) -> None:
        self.clear_sync(session_id)

    def load_sync(self, session_id: str) -> list[Message]:
        with self._lock:
            now = self._clock()
            entry = self._entries.get(session_id)
            if entry is None:
                return []
            if self._expired(entry, now):
                del self._entries[session_id]
                return []
            entry.touched = now
            self._entries.move_to_end(session_id)
            return copy_messages(entry.messages)

    def save_sync(self, session_id: str, messages: Iterable[Mapping[str, str]]) -> None:
        # copy outside the lock: it may be long, and it touches only the caller's data
        stored = trim_turns(copy_messages(messages), self.max_turns)
        with self._lock:
            now = self._clock()
            self._entries[session_id] = _Entry(stored, now)
            self._entries.move_to_end(session_id)
            self._evict(now)

    def clear_sync(self, session_id: str) -> None:
        with self._lock:
            self._entries.pop(session_id, None)

    def __len__(self) -> int:
        """Sessions held, expired ones not yet swept included."""
        return len(self._entries)

    def __contains__(self, session_id: object) -> bool:
        with self._lock:
            entry = self._entries.get(session_id) if isinstance(session_id, str) else None
            return entry is not None and not self._expired(entry, self._clock())

    def __repr__(self) -> str:
        return (
            f"MemoryHistoryStore(sessions={len(self)}/{self.max_sessions}, ttl={self.ttl}, max_turns={self.max_turns})"
        )

    def _expired(self, entry: _Entry, now: float) -> bool:
        return self.ttl is not None and now - entry.touched >= self.ttl

    def _evict(self, now: float) -> None:
        # entries sit in last-touched order, so expired ones gather at the front
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if not self._expired(oldest, now) and len(self._entries) <= self.max_sessions:
                break
            self._entries.popitem(last=False)


def _check_args(max_sessions: int, ttl: float | None, max_turns: int | None) -> None:
    if isinstance(max_sessions, bool) or not isinstance(max_sessions, int) or max_sessions < 1:
        raise ConfigurationError(f"max_sessions must be an int >= 1 (got {max_sessions!r}); pass e.g. 10_000")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl < math.inf):
        raise ConfigurationError(f"ttl must be seconds > 0 or None to never expire (got {ttl!r}); pass e.g. 86400")
    if max_turns is not None and (isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < 1):
        raise ConfigurationError(f"max_turns must be an int >= 1 or None to keep all (got {max_turns!r})")
