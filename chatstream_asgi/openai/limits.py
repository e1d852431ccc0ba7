"""Limits on ``POST {prefix}/chat/completions`` past the schema: how many messages, how long each one, and how
many tokens the whole prompt has.

OpenAI never drops old messages to make room: a conversation over the model's context is a 400
``context_length_exceeded``. ``TransformersEngine`` would drop the oldest turns instead (what the chat routes
want), so for an engine with a ``tokenizer`` the prompt is rendered and counted here first, as the engine will
render it (its own ``system_prompt`` included), off the event loop. A client that set no ``max_tokens`` gets
the room the context leaves, as vLLM does; one whose ``max_tokens`` does not fit gets the 400. Engines without
a tokenizer (the mock, an upstream, which counts for itself) are bounded by message count and characters.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from ..engines.base import ChatMessage, first_engine
from ..engines.prompts import render_chat, with_system_prompt
from .schema import CompletionRequest, OpenAIError

MAX_BODY_BYTES = 1024 * 1024
MAX_MESSAGES = 256
CONTEXT_EXCEEDED = "context_length_exceeded"


def over_limit(param: str, code: str, message: str) -> OpenAIError:
    return OpenAIError(400, code, message, param)


class PromptLimits:
    """Checks a parsed request against the message, character, token and context limits.

    Args:
        engine: the served engine; its ``tokenizer``, ``context_len`` and ``system_prompt`` are used where it has
            them (for replicas, the first one's).
        max_messages: the most messages one request may send.
        max_input_chars: the longest content one message may have.
        max_input_tokens: the most tokens the whole rendered prompt may have; None: only the context bounds it.
    """

    def __init__(
        self,
        engine: object,
        *,
        max_messages: int = MAX_MESSAGES,
        max_input_chars: int = 16_000,
        max_input_tokens: int | None = None,
    ) -> None:
        self.first = first_engine(engine)
        self.max_messages = max_messages
        self.max_input_chars = max_input_chars
        self.max_input_tokens = max_input_tokens

    # Read at each request, not at construction: an engine process's tokenizer arrives when it first answers.
    @property
    def tokenizer(self) -> Any:
        tokenizer = getattr(self.first, "tokenizer", None)
        return tokenizer if callable(getattr(tokenizer, "encode", None)) else None

    @property
    def context_len(self) -> int | None:
        context_len = getattr(self.first, "context_len", None)
        return context_len if isinstance(context_len, int) else None

    @property
    def system_prompt(self) -> str | None:
        return getattr(self.first, "system_prompt", None)

    async def check(self, request: CompletionRequest) -> CompletionRequest:
        """``request`` if it is within every limit, its reply cut to the room left when it set no ``max_tokens``."""
        self.check_messages(request.messages)
        tokenizer, context_len = self.tokenizer, self.context_len
        if tokenizer is None or (context_len is None and self.max_input_tokens is None):
            return request
        try:
            prompt_tokens = await asyncio.to_thread(self.count_prompt, request.messages, tokenizer)
        except Exception as exc:  # e.g. a template that insists on alternating roles: vLLM answers 400 too
            message = f"the model's chat template cannot render these messages: {type(exc).__name__}: {exc}"
            raise over_limit("messages", "invalid_request", message) from exc
        if self.max_input_tokens is not None and prompt_tokens > self.max_input_tokens:
            raise over_limit(
                "messages",
                CONTEXT_EXCEEDED,
                f"the messages make a prompt of {prompt_tokens} tokens; this server accepts at most "
                f"{self.max_input_tokens}. Send fewer or shorter messages.",
            )
        return request if context_len is None else fit_reply(request, prompt_tokens, context_len)

    def check_messages(self, messages: Sequence[ChatMessage]) -> None:
        if len(messages) > self.max_messages:
            raise over_limit(
                "messages",
                "array_above_max_length",
                f"'messages' has {len(messages)} messages; this server accepts at most {self.max_messages}. "
                "Send fewer (drop the oldest turns).",
            )
        for index, message in enumerate(messages):
            length = len(message["content"])
            if length > self.max_input_chars:
                param = f"messages[{index}].content"
                raise over_limit(
                    param,
                    "string_above_max_length",
                    f"'{param}' has {length} characters; the limit is {self.max_input_chars}. Shorten it.",
                )

    def count_prompt(self, messages: Sequence[ChatMessage], tokenizer: Any) -> int:
        """Tokens of the prompt the engine will generate from (called on a worker thread)."""
        messages = with_system_prompt(messages, self.system_prompt)
        if callable(getattr(tokenizer, "apply_chat_template", None)):
            text = render_chat(tokenizer, messages)
        else:  # a tokenizer without a chat template: the contents are what there is to count
            text = "\n".join(message["content"] for message in messages)
        return len(tokenizer.encode(text, add_special_tokens=False))


def fit_reply(request: CompletionRequest, prompt_tokens: int, context_len: int) -> CompletionRequest:
    """A 400 when the prompt, or the prompt plus the asked ``max_tokens``, exceeds the context; else ``request``
    with a reply that fits (a default the client did not ask for is cut to the room left)."""
    room = context_len - prompt_tokens
    wanted = request.params.max_new_tokens
    if room < 1:
        why = f"your messages resulted in {prompt_tokens} tokens. Please reduce the length of the messages."
        raise context_exceeded(context_len, why)
    if request.max_tokens_given and wanted > room:
        raise context_exceeded(
            context_len,
            f"you requested {prompt_tokens + wanted} tokens ({prompt_tokens} in the messages, {wanted} in the "
            "completion). Please reduce the length of the messages or completion.",
        )
    if wanted <= room:
        return request
    return replace(request, params=replace(request.params, max_new_tokens=room))


def context_exceeded(context_len: int, why: str) -> OpenAIError:
    message = f"This model's maximum context length is {context_len} tokens. However, {why}"
    return over_limit("messages", CONTEXT_EXCEEDED, message)
