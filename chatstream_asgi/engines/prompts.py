"""Chat prompts: render messages with the tokenizer's chat template, within the token budget.

The budget is the model's context: ``prompt_tokens + max_new_tokens <= context_len``. When a
conversation is over it, whole turns are dropped from the oldest on (a turn is a user message and
the replies up to the next user message), so the template always sees a history that starts with a
user turn. System messages and the last user turn with what follows it are never dropped; when
they alone are over budget, ``PromptTooLong`` says by how many tokens.

Turns are dropped in steps of about a quarter of the context, not one at a time. The engine keeps a
prefix KV cache, and every turn's prompt is rendered from the whole history: dropping the fewest
turns that fit would move the prompt's beginning on every turn of a long chat, and the cache would
never hit again. So the allowed cut points are the first turn boundaries at or past 1, 2, 3, ...
quarters of the context, counted from the oldest turn with a cheap per-message token estimate, and
the smallest cut whose real render fits wins. The cut points depend only on the conversation, not
on the turn or on earlier requests: turns appended at the end do not move the boundaries of the
earlier ones, so the same cut, and the same prompt prefix, is kept until it no longer fits, and then
the window jumps by about a quarter of the context at once.

Nothing here imports torch: the helpers take a tokenizer and a model duck-typed.
"""

from __future__ import annotations

import asyncio
import re
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import ChatStreamError, ConfigurationError
from .base import ChatMessage

# the cut points of truncation lie this fraction of the context apart (see the module docstring)
TRUNCATION_STEP = 0.25
# what a chat template adds around each message's content (role markers, separators); only an estimate:
# it places the cut points, while whether a prompt fits is always decided on the real render
MESSAGE_OVERHEAD_TOKENS = 4
# Conversations up to this many characters are rendered and tokenized on the event loop: ~80-300 us here, less
# than the trip to a worker thread costs the loop (~200 us of web-process CPU per request, measured at 64 streams;
# the thread holds the GIL while it works anyway). Longer ones go to a thread, so a long history never stalls it.
INLINE_PROMPT_CHARS = 1_000
T = TypeVar("T")


class PromptTooLong(ChatStreamError):
    """Even the system messages and the last user turn leave no room for ``max_new_tokens``.

    A client error: ``streaming.as_http_error`` answers it with ``status`` and ``error_type``.
    """

    status = 400
    error_type = "prompt_too_long"

    def __init__(self, prompt_tokens: int, max_new_tokens: int, context_len: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.context_len = context_len
        self.over_by = prompt_tokens + max_new_tokens - context_len
        super().__init__(
            f"The prompt is {self.over_by} tokens over the model's context of {context_len} tokens "
            f"({prompt_tokens} prompt tokens + max_new_tokens={max_new_tokens}); "
            "shorten the last message or the system prompt, or lower max_new_tokens."
        )


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt and what was kept to build it.

    Args:
        text: the chat-template output, generation prompt included.
        token_ids: ``text`` tokenized without extra special tokens (the template adds its own).
        messages: the messages that made it into the prompt.
        dropped: how many messages were dropped to fit the budget.
    """

    text: str
    token_ids: list[int]
    messages: list[ChatMessage]
    dropped: int


#: where configs keep their context length: most, GPT-2 style, MPT, some remote-code models
CONTEXT_LEN_FIELDS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")


def model_context_len(model: Any, override: int | None = None) -> int:
    """The context length: ``override`` if given, else the model config's (``max_position_embeddings`` or the
    name its family uses)."""
    if override is not None:
        return override
    config = getattr(model, "config", None)
    for field in CONTEXT_LEN_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    raise ConfigurationError(
        "The model config says no context length (none of " + ", ".join(CONTEXT_LEN_FIELDS) + "); "
        "pass context_len=... explicitly (ALiBi models such as BLOOM have no fixed one: use what it was trained on)."
    )


def with_system_prompt(messages: Sequence[ChatMessage], system_prompt: str | None) -> list[ChatMessage]:
    """Prepend ``system_prompt`` unless it is empty or the conversation already has a system message."""
    if not system_prompt or any(m.get("role") == "system" for m in messages):
        return list(messages)
    return [{"role": "system", "content": system_prompt}, *messages]


def render_chat(tokenizer: Any, messages: Sequence[ChatMessage]) -> str:
    """The chat template applied to ``messages``, ending with the assistant's generation prompt.

    The rendered text is tokenized whole, so a special token's text inside a message (``<|im_end|>``) would become
    that control token: a user could close their turn and open a system one. Outside system messages (the server's,
    or an API client's own) such text is broken by a zero-width space and stays text for the model; the history
    stored and shown keeps it as sent.
    """
    pattern = special_token_text(tokenizer)
    if pattern is not None:
        messages = [m if m.get("role") == "system" else defused(m, pattern) for m in messages]
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return str(text)


_SPECIAL_TEXT: weakref.WeakKeyDictionary[Any, re.Pattern[str] | None] = weakref.WeakKeyDictionary()


def special_token_text(tokenizer: Any) -> re.Pattern[str] | None:
    """A pattern of the tokenizer's special tokens' texts (longest first), or None when it has none; cached."""
    try:
        return _SPECIAL_TEXT[tokenizer]
    except (KeyError, TypeError):
        pass
    texts = {str(t) for t in getattr(tokenizer, "all_special_tokens", []) or []}
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    texts |= {str(added.content) for added in decoder.values() if getattr(added, "special", False)}
    texts = {t for t in texts if len(t) > 1}  # a one-character control token cannot be broken (nor is one in use)
    pattern = re.compile("|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True))) if texts else None
    try:
        _SPECIAL_TEXT[tokenizer] = pattern
    except TypeError:  # a tokenizer that takes no weak reference: computed each time
        pass
    return pattern


def defused(message: ChatMessage, pattern: re.Pattern[str]) -> ChatMessage:
    content = message.get("content")
    if not isinstance(content, str) or not pattern.search(content):
        return message
    return {**message, "content": pattern.sub(lambda m: m.group(0)[0] + "\u200b" + m.group(0)[1:], content)}


def _encode(tokenizer: Any, messages: Sequence[ChatMessage]) -> tuple[str, list[int]]:
    text = render_chat(tokenizer, messages)
    return text, list(tokenizer.encode(text, add_special_tokens=False))


def _droppable_turns(messages: Sequence[ChatMessage]) -> list[list[int]]:
    """Indices of the droppable turns, oldest first: every non-system message before the last user one."""
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    anchor = users[-1] if users else len(messages) - 1
    turns: list[list[int]] = []
    for i, message in enumerate(messages[: max(anchor, 0)]):
        if message.get("role") == "system":
            continue
        if not turns or message.get("role") == "user":
            turns.append([])
        turns[-1].append(i)
    return turns


def _turn_sizes(tokenizer: Any, messages: Sequence[ChatMessage], turns: list[list[int]]) -> list[int]:
    """A cheap token estimate for each turn: its contents tokenized alone, plus a per-message overhead."""
    return [
        sum(len(tokenizer.encode(messages[i].get("content", ""), add_special_tokens=False)) for i in turn)
        + MESSAGE_OVERHEAD_TOKENS * len(turn)
        for turn in turns
    ]


def _drop_counts(sizes: list[int], step: int) -> list[int]:
    """The allowed numbers of oldest turns to drop, ascending, ending with all of them.

    For k = 1, 2, ... the first turn boundary at or past ``k * step`` estimated tokens from the oldest
    turn; a turn that spans several multiples of ``step`` gives one count for all of them.
    """
    counts: list[int] = []
    total, threshold = 0, step
    for count, size in enumerate(sizes, start=1):
        total += size
        if total >= threshold:
            counts.append(count)
            threshold = (total // step + 1) * step
    if not counts or counts[-1] != len(sizes):
        counts.append(len(sizes))
    return counts


def fit_prompt(tokenizer: Any, messages: Sequence[ChatMessage], *, max_new_tokens: int, context_len: int) -> Prompt:
    """Render ``messages``, dropping the oldest turns in steps until the prompt plus reply fits ``context_len``.

    Raises:
        PromptTooLong: when even the system messages and the last user turn do not fit.
    """
    turns = _droppable_turns(messages)
    budget = context_len - max_new_tokens

    def attempt(drop: int) -> tuple[list[ChatMessage], str, list[int]]:
        dropped = {i for turn in turns[:drop] for i in turn}
        kept = [m for i, m in enumerate(messages) if i not in dropped]
        return (kept, *_encode(tokenizer, kept))

    kept, text, ids = attempt(0)
    if len(ids) <= budget:
        return Prompt(text, ids, kept, 0)
    counts = _drop_counts(_turn_sizes(tokenizer, messages, turns), max(1, int(context_len * TRUNCATION_STEP)))
    best = attempt(counts[-1])
    if len(best[2]) > budget:
        raise PromptTooLong(len(best[2]), max_new_tokens, context_len)
    # Fewer turns never means more tokens, so the smallest allowed drop that fits is found by bisection.
    low, high = 0, len(counts) - 1
    while low < high:
        middle = (low + high) // 2
        candidate = attempt(counts[middle])
        if len(candidate[2]) <= budget:
            high, best = middle, candidate
        else:
            low = middle + 1
    kept, text, ids = best
    return Prompt(text, ids, kept, len(messages) - len(kept))


async def render_off_loop_if_long(
    render: Callable[[Sequence[ChatMessage], Any], T], messages: Sequence[ChatMessage], params: Any
) -> T:
    """``render(messages, params)``: inline for a short conversation, in a worker thread for a long one."""
    if sum(len(m.get("content") or "") for m in messages) <= INLINE_PROMPT_CHARS:
        return render(messages, params)
    return await asyncio.to_thread(render, messages, params)
