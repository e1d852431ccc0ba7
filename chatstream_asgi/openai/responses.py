"""OpenAI chat completions replies: the ``chat.completion`` object, ``usage``, ``/v1/models``, and the SSE encoder of
``chat.completion.chunk`` events (``schema`` validates the requests)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from ..errors import HTTPError
from .schema import error_body

DONE = b"data: [DONE]\n\n"
_PLACEHOLDER = "\x00content\x00"  # JSON renders it \u0000content\u0000, which an id or model name hardly holds
_PLACEHOLDER_JSON = json.dumps(_PLACEHOLDER).encode()


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; ``cached_tokens``: prompt tokens read from the prefix cache (OpenAI's prompt caching)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


@dataclass(frozen=True)
class ReplyHeader:
    """What every object of one completion shares."""

    id: str
    created: int
    model: str

    def completion(self, text: str, finish_reason: str, counts: dict[str, Any]) -> dict[str, Any]:
        """The whole reply; ``counts`` is its ``usage``."""
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        return {**self.fields("chat.completion"), "choices": [choice], "usage": counts}

    def chunk(self, delta: dict[str, str], finish_reason: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**self.fields("chat.completion.chunk"), "choices": [choice]}

    def fields(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


def models_body(model_name: str, created: int) -> dict[str, Any]:
    model = {"id": model_name, "object": "model", "created": created, "owned_by": "chatstream_asgi"}
    return {"object": "list", "data": [model]}


class OpenAIStreamEncoder:
    """``chat.completion.chunk`` events: the role first, content deltas, the finish, usage if asked, ``[DONE]``.

    An error after the stream started is one ``data: {"error": ...}`` event (the ``openai`` client raises
    ``APIError`` on it) followed by ``[DONE]``, as vLLM does.
    """

    content_type = b"text/event-stream; charset=utf-8"

    def __init__(self, header: ReplyHeader, include_usage: bool, ping_interval: float | None = 15.0) -> None:
        self.header = header
        self.include_usage = include_usage
        self.ping_interval = ping_interval
        self.role_sent = False
        # A content chunk differs from the next only in its text: render the event once around a placeholder and
        # encode just the text per chunk (1.0 us instead of 5.3, once per chunk and stream).
        event = self.event(header.chunk({"content": _PLACEHOLDER}))
        self._content_around = event.split(_PLACEHOLDER_JSON) if event.count(_PLACEHOLDER_JSON) == 1 else None

    def delta(self, text: str) -> bytes:
        if self._content_around is None:  # the placeholder's text also came up in the header's own fields
            return self.role() + self.event(self.header.chunk({"content": text}))
        before, after = self._content_around
        return self.role() + before + json.dumps(text, ensure_ascii=False).encode() + after

    def done(self, summary: dict[str, Any]) -> bytes:
        final = self.event(self.header.chunk({}, summary.get("finish_reason") or "stop"))
        if self.include_usage:
            counts = usage(
                summary.get("prompt_tokens", 0), summary.get("completion_tokens", 0), summary.get("cached_tokens", 0)
            )
            final += self.event({**self.header.fields("chat.completion.chunk"), "choices": [], "usage": counts})
        return self.role() + final + DONE

    def error(self, error_type: str, message: str) -> bytes:
        return self.event(error_body(HTTPError(500, error_type, message))) + DONE

    def ping(self) -> bytes:
        return b": ping\n\n"

    def role(self) -> bytes:
        if self.role_sent:
            return b""
        self.role_sent = True
        return self.event(self.header.chunk({"role": "assistant", "content": ""}))

    @staticmethod
    def event(data: dict[str, Any]) -> bytes:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()
