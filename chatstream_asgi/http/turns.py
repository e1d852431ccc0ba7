"""A session's history around one chat turn: one turn at a time per session, the history loaded before it and
the reply saved after it, and a history store's failure turned into a 503 the client can retry."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

from ..engines.base import ChatMessage
from ..errors import HistoryStoreError, HTTPError
from ..sessions.history import HistoryStore

logger = logging.getLogger("chatstream_asgi")
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class TurnMessages:
    """One chat turn's conversation: what is saved with its reply, and what the model is sent.

    Args:
        history: the whole conversation the turn builds on, and its user message: saved with the reply.
        prompt: the same cut to ``max_history_turns`` pairs: what the model is sent (the store keeps the rest).
        stored_replies: replies in the history as it was loaded (a regenerate replaces the last of them).
    """

    history: list[ChatMessage]
    prompt: list[ChatMessage]
    stored_replies: int


class SessionTurns:
    """The history store as the chat routes use it, and the sessions with a turn streaming right now."""

    def __init__(self, store: HistoryStore) -> None:
        self.store = store
        # session id -> the running turn's token: a second concurrent turn would corrupt the history
        self.active: dict[str, object] = {}

    @contextlib.contextmanager
    def exclusive(self, session_id: str) -> Iterator[Callable[[], None]]:
        """Hold the session for one turn; yields ``end_turn`` to let it go early (it is let go at exit anyway)."""
        if session_id in self.active:
            # Retry-After: a client that sent its next turn before the server saw it leave the last one may just retry
            message = "a reply is still streaming for this session; wait or stop it"
            raise HTTPError(409, "turn_in_progress", message, {"Retry-After": "1"})
        token = self.active[session_id] = object()

        def end_turn() -> None:
            if self.active.get(session_id) is token:  # never end the next turn's claim
                del self.active[session_id]

        try:
            yield end_turn
        finally:
            end_turn()

    async def load(self, session_id: str) -> list[ChatMessage]:
        return await store_call(self.store.load(session_id))

    async def save_reply(self, session_id: str, messages: list[ChatMessage], reply: str) -> bool:
        """Save ``messages`` and the reply; whether anything was saved (an empty reply is not)."""
        # A failed generation saves nothing (the caller never gets here), nor does an empty reply.
        if not reply:
            return False
        assistant: ChatMessage = {"role": "assistant", "content": reply}
        await store_call(self.store.save(session_id, [*messages, assistant]))
        return True

    async def save_cut_reply(self, session_id: str, messages: list[ChatMessage], reply: str) -> bool:
        """Keep a reply cut by a disconnect or the deadline as far as it was sent. The reply is over, so a store
        failure is only logged: it must not replace the error the client is about to get (or send a second one)."""
        try:
            return await self.save_reply(session_id, messages, reply)
        except HTTPError as error:
            logger.warning("could not save a cut reply: %s", error.message)
            return False

    async def clear(self, session_id: str) -> None:
        await store_call(self.store.clear(session_id))


async def store_call(call: Awaitable[T]) -> T:
    """Await a history store call; its failure becomes a 503 with ``Retry-After``."""
    try:
        return await call
    except HistoryStoreError as exc:
        raise HTTPError(503, "history_unavailable", f"the history store failed: {exc}", {"Retry-After": "5"}) from exc
