"""Per-session state beside the history: generation-parameter overrides, reply ids and feedback.

Bounded like ``MemoryHistoryStore`` (session count with LRU eviction, idle TTL), so a flood of cookieless
clients cannot grow it. It lives in this process; with several replicas, a sticky session or a shared
store is needed for these extras (the history itself can already be shared).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .history import DEFAULT_MAX_SESSIONS, DEFAULT_TTL, _check_args

MAX_REPLY_IDS = 256  # reply ids and ratings remembered per session (the oldest go first)


@dataclass
class SessionExtras:
    """One session's extras.

    Replies are numbered from the session's first, so that a history store that trims old turns (``max_turns``)
    moves no id or rating onto another reply: the history's first reply is number ``replies`` minus the replies
    it holds (``first_reply_number``).

    Args:
        params: validated sampling overrides (field name -> value) that this session's turns start from.
        reply_ids: reply (message) id -> that reply's number.
        feedback: reply number -> the feedback last given on it.
        replies: the replies this session has saved, the trimmed ones too (a regenerated one counts once).
    """

    params: dict[str, Any] = field(default_factory=dict)
    reply_ids: dict[str, int] = field(default_factory=dict)
    feedback: dict[int, dict[str, Any]] = field(default_factory=dict)
    replies: int = 0
    touched: float = 0.0


class SessionStateStore:
    """Session id -> ``SessionExtras``, bounded by count (LRU) and idle time (TTL); safe across threads.

    Args:
        max_sessions: sessions kept; one more evicts the least recently used.
        ttl: seconds of idleness after which a session's extras are forgotten; None keeps them.
        clock: monotonic clock (tests inject a fake one).
    """

    def __init__(
        self,
        *,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        ttl: float | None = DEFAULT_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _check_args(max_sessions, ttl, None)
        self.max_sessions = max_sessions
        self.ttl = ttl
        self._clock = clock
        self._entries: OrderedDict[str, SessionExtras] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, session_id: str) -> SessionExtras | None:
        """The session's extras (live: change them only through this store's methods), or None."""
        with self._lock:
            return self._touch(session_id, create=False)

    def params(self, session_id: str | None) -> dict[str, Any]:
        extras = None if session_id is None else self.get(session_id)
        return dict(extras.params) if extras is not None else {}

    def set_params(self, session_id: str, params: dict[str, Any]) -> None:
        with self._lock:
            entry = self._touch(session_id, create=True)
            assert entry is not None
            entry.params = dict(params)

    def first_reply_number(self, session_id: str, stored_replies: int) -> int:
        """The number of the first reply of a history that holds ``stored_replies`` replies now."""
        extras = self.get(session_id)
        return (0 if extras is None else extras.replies) - stored_replies

    def record_reply(self, session_id: str, reply_id: str, number: int) -> None:
        """Remember that reply ``reply_id`` is the session's reply ``number``; later ones are gone (regenerated)."""
        with self._lock:
            entry = self._touch(session_id, create=True)
            assert entry is not None
            entry.reply_ids = {k: v for k, v in entry.reply_ids.items() if v < number}
            entry.feedback = {k: v for k, v in entry.feedback.items() if k < number}
            entry.reply_ids[reply_id] = number
            entry.replies = number + 1
            while len(entry.reply_ids) > MAX_REPLY_IDS:
                del entry.reply_ids[next(iter(entry.reply_ids))]
            for old in sorted(entry.feedback)[:-MAX_REPLY_IDS]:  # ratings of replies long trimmed away
                del entry.feedback[old]

    def reply_number(self, session_id: str, reply_id: str) -> int | None:
        extras = self.get(session_id)
        return None if extras is None else extras.reply_ids.get(reply_id)

    def reply_id(self, session_id: str, number: int) -> str | None:
        """The id of the session's reply ``number``, if this process recorded it."""
        extras = self.get(session_id)
        return None if extras is None else next((k for k, v in extras.reply_ids.items() if v == number), None)

    def set_feedback(self, session_id: str, number: int, feedback: dict[str, Any]) -> None:
        with self._lock:
            entry = self._touch(session_id, create=True)
            assert entry is not None
            entry.feedback[number] = dict(feedback)

    def feedback(self, session_id: str) -> dict[int, dict[str, Any]]:
        """Reply number -> the feedback given on it."""
        extras = self.get(session_id)
        return {k: dict(v) for k, v in extras.feedback.items()} if extras is not None else {}

    def cleared(self, session_id: str, new_session_id: str) -> None:
        """The history was cleared and the session got a new id: reply ids and feedback go, parameter overrides
        move to the new id (they are the user's settings, not part of the conversation)."""
        with self._lock:
            entry = self._entries.pop(session_id, None)
            if entry is not None and entry.params:
                moved = self._touch(new_session_id, create=True)
                assert moved is not None
                moved.params = entry.params

    def __len__(self) -> int:
        return len(self._entries)

    def _touch(self, session_id: str, *, create: bool) -> SessionExtras | None:
        now = self._clock()
        entry = self._entries.get(session_id)
        if entry is not None and self.ttl is not None and now - entry.touched >= self.ttl:
            del self._entries[session_id]
            entry = None
        if entry is None:
            if not create:
                return None
            entry = self._entries[session_id] = SessionExtras()
        entry.touched = now
        self._entries.move_to_end(session_id)
        while len(self._entries) > self.max_sessions:
            self._entries.popitem(last=False)
        return entry
