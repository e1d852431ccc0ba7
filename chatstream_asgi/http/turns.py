"""A session's history around one chat turn: one turn at a time per session, the history loaded before it and
the reply saved after it, and a history store's failure turned into a 503 the client can retry."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

from ..engines.base import ChatMessage
from ..errors import HistoryStoreError, HTTPError
from ..sessions.history import HistoryStore, TurnLock

logger = logging.getLogger("chatstream_asgi")
T = TypeVar("T")
TURN_LOCK_SECONDS = 30.0  # a shared store's turn lock, renewed every third of it while the turn streams
EndTurn = Callable[[], Awaitable[None]]


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

    @contextlib.asynccontextmanager
    async def exclusive(self, session_id: str) -> AsyncIterator[EndTurn]:
        """Hold the session for one turn; yields ``end_turn`` to let it go early (it is let go at exit anyway).

        A store shared by replicas (``TurnLock``) is asked too, so that a second turn is refused on every replica.
        """
        if session_id in self.active:
            raise turn_in_progress()
        token = self.active[session_id] = object()
        lock = self.store if isinstance(self.store, TurnLock) else None
        holder, renewing = uuid.uuid4().hex, None
        try:
            if lock is not None:
                if not await store_call(lock.claim_turn(session_id, holder, TURN_LOCK_SECONDS)):
                    raise turn_in_progress()  # streaming on another replica
                renewing = asyncio.create_task(renew_while_streaming(lock, session_id, holder))
        except BaseException:
            del self.active[session_id]
            raise

        async def end_turn() -> None:
            if self.active.get(session_id) is not token:  # ended already: never end the next turn's claim
                return
            del self.active[session_id]
            if renewing is not None and lock is not None:
                renewing.cancel()
                try:
                    await store_call(lock.release_turn(session_id, holder))
                except HTTPError as error:  # the reply is over: the lock expires by itself
                    logger.warning("could not release a session's turn lock: %s", error.message)

        try:
            yield end_turn
        finally:
            await end_turn()

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


def reply_count(messages: Sequence[ChatMessage]) -> int:
    """How many of ``messages`` are the assistant's replies (what reply numbers and feedback count by)."""
    return sum(1 for m in messages if m["role"] == "assistant")


def turn_in_progress() -> HTTPError:
    # Retry-After: a client that sent its next turn before the server saw it leave the last one may just retry
    message = "a reply is still streaming for this session; wait or stop it"
    return HTTPError(409, "turn_in_progress", message, {"Retry-After": "1"})


async def renew_while_streaming(lock: TurnLock, session_id: str, holder: str) -> None:
    """Keep a shared store's turn lock while the turn streams (a reply may outlast ``TURN_LOCK_SECONDS``)."""
    while True:
        await asyncio.sleep(TURN_LOCK_SECONDS / 3)
        try:
            if not await lock.renew_turn(session_id, holder, TURN_LOCK_SECONDS):
                logger.warning("a session's turn lock expired while its reply streamed; another turn may start")
                return
        except Exception as exc:  # the store is down for a moment: try again at the next renewal
            logger.warning("could not renew a session's turn lock: %s", exc)


async def store_call(call: Awaitable[T]) -> T:
    """Await a history store call; its failure becomes a 503 with ``Retry-After``."""
    try:
        return await call
    except HistoryStoreError as exc:
        raise HTTPError(503, "history_unavailable", f"the history store failed: {exc}", {"Retry-After": "5"}) from exc
