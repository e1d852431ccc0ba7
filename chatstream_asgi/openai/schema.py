"""The OpenAI chat completions request format: validation, and OpenAI-shaped errors (``responses`` builds replies).

Accepted request fields: ``messages``, ``model`` (accepted; replies name the served model), ``stream``,
``stream_options.include_usage``, ``max_completion_tokens`` / ``max_tokens``, ``temperature``, ``top_p``,
``stop``, ``seed``, ``n`` (1 only), ``user``; vLLM's ``top_k``, ``repetition_penalty`` and ``ignore_eos``
too. Features this server cannot honour (tools, functions, logprobs, JSON response formats, several choices,
non-text content) get a 400 naming the field; other OpenAI fields (penalties, ``logit_bias``, ``metadata``,
``store``, ...) are ignored, as vLLM does. Errors use OpenAI's shape ``{"error": {"message", "type", "param",
"code"}}``, which the ``openai`` client turns into ``BadRequestError``, ``RateLimitError`` and so on.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from ..engines.base import ChatMessage, SamplingParams
from ..errors import HTTPError
from ..http.requests import is_unicode_text, parse_json_object, parse_sampling, validate_int

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
SAMPLING_EXTENSIONS = ("temperature", "top_p", "stop", "seed", "top_k", "repetition_penalty", "ignore_eos")
UNSUPPORTED = {
    "tools": "tool calling is not supported by this server",
    "functions": "function calling is not supported by this server",
    "function_call": "function calling is not supported by this server",
    "top_logprobs": "logprobs are not supported by this server",
    "audio": "audio output is not supported by this server",
    "prediction": "predicted outputs are not supported by this server",
}
ALLOWED_VALUES: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "logprobs": (None, False),
    "tool_choice": (None, "none", "auto"),
}
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 429: "rate_limit_error"}
ERROR_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded"}


class OpenAIError(HTTPError):
    """An ``HTTPError`` that names the request field at fault (OpenAI's ``param``)."""

    def __init__(self, status: int, error_type: str, message: str, param: str | None = None) -> None:
        super().__init__(status, error_type, message)
        self.param = param


def bad_field(param: str, message: str) -> OpenAIError:
    return OpenAIError(400, "invalid_request", message, param)


@contextlib.contextmanager
def field_errors(param: str) -> Iterator[None]:
    """Name ``param`` in any validation error raised inside the block."""
    try:
        yield
    except OpenAIError:
        raise
    except HTTPError as error:
        raise OpenAIError(error.status, error.error_type, error.message, param) from None


def error_body(error: HTTPError) -> dict[str, Any]:
    """OpenAI's error object for ``error``; the package's error type becomes the ``code``."""
    kind = ERROR_TYPES.get(error.status, "server_error" if error.status >= 500 else "invalid_request_error")
    code = ERROR_CODES.get(error.status, error.error_type)
    param = getattr(error, "param", None)
    return {"error": {"message": error.message, "type": kind, "param": param, "code": code}}


@dataclass(frozen=True)
class CompletionRequest:
    """A validated ``POST /v1/chat/completions`` body."""

    messages: list[ChatMessage]
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    max_tokens_given: bool = False  # else the reply may take the room the context leaves


def parse_completion_request(body: bytes, defaults: SamplingParams, max_new_tokens_limit: int) -> CompletionRequest:
    data = parse_json_object(body)
    check_supported(data)
    messages = parse_messages(data.get("messages"))
    params = parse_params(data, defaults, max_new_tokens_limit)
    stream = parse_bool(data, "stream")
    options = data.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_field("stream_options", "'stream_options' must be an object such as {\"include_usage\": true}")
    if options is not None and not stream:  # as OpenAI and vLLM answer
        raise bad_field("stream_options", "'stream_options' is only allowed when 'stream' is true")
    include_usage = parse_bool(options or {}, "include_usage", "stream_options.include_usage")
    for name in ("model", "user"):
        if data.get(name) is not None and not isinstance(data[name], str):
            raise bad_field(name, f"'{name}' must be a string")
    given = any(data.get(name) is not None for name in ("max_tokens", "max_completion_tokens"))
    return CompletionRequest(messages, params, stream, include_usage, given)


def check_supported(data: dict[str, Any]) -> None:
    for name, reason in UNSUPPORTED.items():
        if data.get(name):  # null, [] and {} ask for nothing
            raise bad_field(name, f"{reason}; remove '{name}'")
    for name, allowed in ALLOWED_VALUES.items():
        if data.get(name) not in allowed:
            shown = ", ".join("null" if v is None else json.dumps(v) for v in allowed)
            raise bad_field(name, f"this server supports only {shown} for '{name}'; got {json.dumps(data[name])}")
    response_format = data.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise bad_field("response_format", 'only {"type": "text"} is supported for \'response_format\'')


def parse_bool(data: dict[str, Any], name: str, param: str | None = None) -> bool:
    value = data.get(name)
    if value is not None and not isinstance(value, bool):
        raise bad_field(param or name, f"'{param or name}' must be true or false")
    return bool(value)


def parse_messages(value: Any) -> list[ChatMessage]:
    if not isinstance(value, list) or not value:
        raise bad_field("messages", '\'messages\' must be a non-empty list of {"role", "content"} objects')
    return [parse_message(message, f"messages[{index}]") for index, message in enumerate(value)]


def parse_message(message: Any, param: str) -> ChatMessage:
    if not isinstance(message, dict):
        raise bad_field(param, f"'{param}' must be an object with 'role' and 'content'")
    role = message.get("role")
    role = ROLES.get(role) if isinstance(role, str) else None
    if role is None:
        raise bad_field(f"{param}.role", f"'{param}.role' must be one of {sorted(ROLES)}; got {message.get('role')!r}")
    if message.get("tool_calls") or message.get("function_call"):
        raise bad_field(f"{param}.tool_calls", "tool calling is not supported by this server")
    content = message.get("content")
    if content is None and role == "assistant":
        content = ""
    return {"role": role, "content": parse_content(content, f"{param}.content")}


def parse_content(content: Any, param: str) -> str:
    """A string, or text parts joined by newlines (as vLLM joins them)."""
    if isinstance(content, list):
        texts = []
        for index, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad_field(f"{param}[{index}]", f"only text content parts are supported; got {kind!r}")
            texts.append(part["text"])
        content = "\n".join(texts)
    if not isinstance(content, str):
        raise bad_field(param, f"'{param}' must be a string or a list of text parts")
    if not is_unicode_text(content):
        raise bad_field(param, f"'{param}' must be valid Unicode text (no lone surrogate escapes)")
    return content


def parse_params(data: dict[str, Any], defaults: SamplingParams, max_new_tokens_limit: int) -> SamplingParams:
    """Overlay the request's sampling fields on ``defaults``, one field at a time so errors name it."""
    params = defaults
    for name in SAMPLING_EXTENSIONS:
        with field_errors(name):
            params = parse_sampling({name: data.get(name)}, params, max_new_tokens_limit)
    for name in ("max_tokens", "max_completion_tokens"):  # the newer name wins when both are sent
        if data.get(name) is not None:
            with field_errors(name):
                params = replace(params, max_new_tokens=validate_int(name, data[name], 1, max_new_tokens_limit))
    return params


# Responses.
