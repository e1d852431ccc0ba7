"""Parsing and validation of the chat routes' JSON bodies.

Every problem becomes an ``HTTPError`` (400/415) whose message names the field and what to send
instead. ``previous_turns`` and ``user_message`` build a turn's messages from the history it was given;
nothing here loads or saves history, or touches the engine.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any

from ..engines.base import MIN_REPETITION_PENALTY, SamplingParams
from ..errors import HTTPError
from ..sessions.history import Message
from .asgi import header
from .types import Scope

MAX_STOP_STRINGS = 8
MAX_STOP_LENGTH = 64
MAX_SEED = 2**63 - 1

# field name -> (low, high, low inclusive); the range each sampling parameter must lie in.
FLOAT_RANGES: dict[str, tuple[float, float, bool]] = {
    "temperature": (0.0, 2.0, True),
    "top_p": (0.0, 1.0, False),
    "repetition_penalty": (MIN_REPETITION_PENALTY, 10.0, True),
}
SAMPLING_FIELDS = frozenset({"max_new_tokens", "top_k", "stop", "seed", "ignore_eos", *FLOAT_RANGES})
CHAT_FIELDS = frozenset({"user_input", "regenerate", *SAMPLING_FIELDS})


@dataclass(frozen=True)
class ChatTurn:
    """A validated ``POST /chat_stream`` body."""

    user_input: str | None
    regenerate: bool
    params: SamplingParams


def invalid(message: str) -> HTTPError:
    return HTTPError(400, "invalid_request", message)


def require_json(scope: Scope) -> None:
    content_type = (header(scope, b"content-type") or "").split(";")[0].strip().lower()
    if content_type != "application/json" and not content_type.endswith("+json"):
        raise HTTPError(415, "unsupported_media_type", "send the body as JSON with 'Content-Type: application/json'")


def parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        # Decode first: json.loads(bytes) also takes UTF-16/32 and, with "surrogatepass", invalid UTF-8.
        # ValueError covers bad UTF-8, bad JSON and integers over Python's 4300-digit limit.
        data = json.loads(body.decode("utf-8-sig"))
    except (ValueError, RecursionError) as exc:
        raise invalid(f"the body is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(data, dict):
        raise invalid("the body must be a JSON object")
    return data


def user_message(text: str) -> Message:
    return {"role": "user", "content": text}


def previous_turns(history: list[Message], turn: ChatTurn) -> tuple[list[Message], str]:
    """The history the new turn builds on, and the user input to answer."""
    if not turn.regenerate:
        assert turn.user_input is not None
        return history, turn.user_input
    for index in range(len(history) - 1, -1, -1):
        if history[index]["role"] == "user":
            return history[:index], history[index]["content"]
    raise invalid("nothing to regenerate: this session has no user turn yet")


def parse_chat_turn(
    body: bytes, defaults: SamplingParams, *, max_new_tokens_limit: int, max_input_chars: int
) -> ChatTurn:
    data = parse_json_object(body)
    unknown = sorted(set(data) - CHAT_FIELDS)
    if unknown:
        raise invalid(f"unknown field(s) {unknown}; allowed: {sorted(CHAT_FIELDS)}")
    regenerate = data.get("regenerate", False)
    if not isinstance(regenerate, bool):
        raise invalid("'regenerate' must be true or false")
    # As in ChatStream, a regenerate request reuses the last user turn and ignores user_input.
    user_input = None if regenerate else validate_user_input(data.get("user_input"), max_input_chars)
    params = parse_sampling(data, defaults, max_new_tokens_limit)
    return ChatTurn(user_input=user_input, regenerate=regenerate, params=params)


def validate_user_input(value: Any, max_chars: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise invalid("'user_input' must be a non-empty string")
    if not is_unicode_text(value):
        raise invalid("'user_input' must be valid Unicode text (no lone surrogate escapes such as \\ud800)")
    if len(value) > max_chars:
        raise invalid(f"'user_input' has {len(value)} characters; the limit is {max_chars}")
    return value


def parse_sampling(data: dict[str, Any], defaults: SamplingParams, max_new_tokens_limit: int) -> SamplingParams:
    """Overlay the request's sampling fields on ``defaults``; absent or null fields keep the default."""
    changes: dict[str, Any] = {}
    for name, (low, high, low_inclusive) in FLOAT_RANGES.items():
        if data.get(name) is not None:
            changes[name] = validate_float(name, data[name], low, high, low_inclusive)
    if data.get("max_new_tokens") is not None:
        changes["max_new_tokens"] = validate_int("max_new_tokens", data["max_new_tokens"], 1, max_new_tokens_limit)
    if data.get("top_k") is not None:
        changes["top_k"] = max(0, validate_int("top_k", data["top_k"], -1, 1_000_000))  # vLLM's -1: all tokens, our 0
    if data.get("seed") is not None:
        changes["seed"] = validate_int("seed", data["seed"], 0, MAX_SEED)
    if data.get("stop") is not None:
        changes["stop"] = validate_stop(data["stop"])
    if data.get("ignore_eos") is not None:
        if not isinstance(data["ignore_eos"], bool):
            raise invalid("'ignore_eos' must be true or false")
        changes["ignore_eos"] = data["ignore_eos"]
    params = replace(defaults, **changes)
    if params.max_new_tokens > max_new_tokens_limit:
        params = replace(params, max_new_tokens=max_new_tokens_limit)
    return params


def validate_float(name: str, value: Any, low: float, high: float, low_inclusive: bool) -> float:
    # bool is an int subclass in Python; JSON true is not a number. Ints are compared as they are:
    # math.isfinite() would raise OverflowError on a 400-digit one.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(f"'{name}' must be a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise invalid(f"'{name}' must be a number")
    too_low = value < low if low_inclusive else value <= low
    if too_low or value > high:
        bracket = "[" if low_inclusive else "("
        raise invalid(f"'{name}' must be in {bracket}{low}, {high}]; got {value}")
    return float(value)


def validate_int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"'{name}' must be an integer")
    if not low <= value <= high:
        raise invalid(f"'{name}' must be between {low} and {high}; got {value}")
    return value


def validate_stop(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s and is_unicode_text(s) for s in stops):
        raise invalid("'stop' must be a non-empty string or a list of non-empty strings")
    if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_LENGTH for s in stops):
        raise invalid(f"'stop' takes at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_LENGTH} characters")
    return tuple(stops)


def is_unicode_text(value: str) -> bool:
    """False for strings with lone surrogates, which JSON escapes can spell but UTF-8 cannot carry."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
