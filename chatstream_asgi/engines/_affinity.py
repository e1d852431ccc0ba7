"""Conversation affinity for ``EngineReplicas``: a chat's next turn goes to the replica that served its last one.

Each replica's prefix cache lives inside its own engine (a thread, or a process) and holds the KV of the
conversations that replica served; the next turn of one of them computes only its new tokens there and
all of its history anywhere else. A conversation is known by its start: the messages up to and including
the first user message (a session's history and a stateless OpenAI client's resent conversation both
start the same way on every turn, whatever a chat template re-renders later on). First turns go to the
least loaded replica, so a popular opening line or a system prompt every chat shares cannot pile chats
onto one replica; only continued conversations follow their history, and only while that replica has room.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from .base import ChatMessage

#: conversations remembered (their start's hash and replica: a few dozen bytes each).
REMEMBERED = 65536


def conversation_key(messages: Sequence[ChatMessage]) -> int:
    """A hash of the conversation's start: its messages up to and including the first user message."""
    start = []
    for message in messages:
        start.append((message.get("role"), message.get("content")))
        if message.get("role") == "user":
            break
    return hash(tuple(start))


def continues(messages: Sequence[ChatMessage]) -> bool:
    """True for a later turn: a reply already follows the conversation's first user message."""
    roles = [message.get("role") for message in messages]
    return "user" in roles and "assistant" in roles[roles.index("user") :]


class ConversationAffinity:
    """Where each recent conversation was served last (least recently used forgotten first)."""

    def __init__(self, remembered: int = REMEMBERED) -> None:
        self._where: OrderedDict[int, int] = OrderedDict()
        self._remembered = remembered

    def replica_of(self, messages: Sequence[ChatMessage]) -> int | None:
        """The replica that served this conversation's previous turn, if this is a later turn and it is known."""
        return self._where.get(conversation_key(messages)) if continues(messages) else None

    def served(self, messages: Sequence[ChatMessage], replica: int) -> None:
        key = conversation_key(messages)
        self._where[key] = replica
        self._where.move_to_end(key)
        if len(self._where) > self._remembered:
            self._where.popitem(last=False)
