"""Unit tests for ``chatstream_asgi.openai.schema``: request validation (every 400 names its ``param``), OpenAI's
error shape, the response builders and the ``chat.completion.chunk`` SSE encoder."""

from __future__ import annotations

import json
from typing import Any

import pytest

from chatstream_asgi.engines.base import SamplingParams
from chatstream_asgi.errors import HTTPError
from chatstream_asgi.openai.responses import DONE, OpenAIStreamEncoder, ReplyHeader, models_body, usage
from chatstream_asgi.openai.schema import OpenAIError, error_body, parse_completion_request

DEFAULTS = SamplingParams(max_new_tokens=100, temperature=0.7, top_p=0.9)
LIMIT = 1000
USER = [{"role": "user", "content": "hi"}]
HEADER = ReplyHeader("chatcmpl-1", 1700000000, "served")


def parse(**fields: Any) -> Any:
    body = {"model": "whatever", "messages": USER, **fields}
    return parse_completion_request(json.dumps(body).encode(), DEFAULTS, LIMIT)


def events(data: bytes) -> list[Any]:
    blocks = [b for b in data.decode().split("\n\n") if b and not b.startswith(":")]
    assert all(b.startswith("data: ") for b in blocks), blocks
    return [b[6:] if b == "data: [DONE]" else json.loads(b[6:]) for b in blocks]


def test_minimal_request_keeps_the_server_defaults() -> None:
    request = parse()
    assert request.messages == USER
    assert request.params == DEFAULTS
    assert (request.stream, request.include_usage) == (False, False)


def test_sampling_fields_override_defaults() -> None:
    request = parse(temperature=0, top_p=0.5, stop="END", seed=42, max_tokens=7, top_k=3, repetition_penalty=1.1)
    p = request.params
    assert (p.temperature, p.top_p, p.stop, p.seed, p.max_new_tokens) == (0.0, 0.5, ("END",), 42, 7)
    assert (p.top_k, p.repetition_penalty) == (3, 1.1)


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert parse(max_tokens=5, max_completion_tokens=9).params.max_new_tokens == 9


def test_request_says_whether_the_client_set_max_tokens() -> None:
    assert not parse().max_tokens_given and not parse(max_tokens=None).max_tokens_given
    assert parse(max_tokens=5).max_tokens_given and parse(max_completion_tokens=5).max_tokens_given


def test_null_fields_mean_absent() -> None:
    request = parse(temperature=None, stop=None, n=None, stream=None, stream_options=None, tools=None, user=None)
    assert request.params == DEFAULTS


def test_stream_with_usage() -> None:
    request = parse(stream=True, stream_options={"include_usage": True})
    assert (request.stream, request.include_usage) == (True, True)


def test_harmless_unknown_fields_are_ignored() -> None:
    request = parse(frequency_penalty=0.5, presence_penalty=0.1, logit_bias={}, metadata={"a": "b"}, store=False)
    assert request.params == DEFAULTS


def test_message_shapes() -> None:
    messages = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "x"},
        {"role": "assistant", "content": None},
        {"role": "user", "content": ""},
    ]
    assert parse(messages=messages).messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": ""},
    ]


INVALID: list[tuple[dict[str, Any], str, str]] = [
    ({"n": 3}, "n", "only null, 1"),
    ({"tools": [{"type": "function"}]}, "tools", "tool calling"),
    ({"functions": [{"name": "f"}]}, "functions", "function calling"),
    ({"tool_choice": "required"}, "tool_choice", "tool_choice"),
    ({"logprobs": True}, "logprobs", "logprobs"),
    ({"top_logprobs": 2}, "top_logprobs", "logprobs"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "text"),
    ({"temperature": 2.5}, "temperature", "[0.0, 2.0]"),
    ({"temperature": "hot"}, "temperature", "number"),
    ({"top_p": 0}, "top_p", "(0.0, 1.0]"),
    ({"max_tokens": 0}, "max_tokens", "between 1 and 1000"),
    ({"max_completion_tokens": 1001}, "max_completion_tokens", "between 1 and 1000"),
    ({"seed": -1}, "seed", "between"),
    ({"stop": [""]}, "stop", "non-empty"),
    ({"stop": ["s"] * 9}, "stop", "at most 8 strings of at most 64 characters"),  # the chat routes' limits
    ({"stop": "x" * 65}, "stop", "at most 8 strings of at most 64 characters"),
    ({"stream": "yes"}, "stream", "true or false"),
    ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage", "true or false"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when 'stream' is true"),
    ({"stream_options": []}, "stream_options", "object"),
    ({"model": 3}, "model", "string"),
    ({"messages": "hi"}, "messages", "non-empty list"),
    ({"messages": []}, "messages", "non-empty list"),
    ({"messages": ["hi"]}, "messages[0]", "object"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "one of"),
    ({"messages": [{"role": ["user"], "content": "x"}]}, "messages[0].role", "one of"),
    ({"messages": [{"content": "x"}]}, "messages[0].role", "one of"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "string or a list"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "string or a list"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]", "image_url"),
    ({"messages": [{"role": "user", "content": ["text"]}]}, "messages[0].content[0]", "only text"),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content", "Unicode"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [{}]}]}, "messages[0].tool_calls", "tool"),
]


@pytest.mark.parametrize(("fields", "param", "says"), INVALID)
def test_invalid_requests_name_the_param(fields: dict[str, Any], param: str, says: str) -> None:
    with pytest.raises(OpenAIError) as caught:
        parse(**fields)
    assert caught.value.status == 400 and caught.value.param == param
    assert says in caught.value.message


@pytest.mark.parametrize("body", [b"not json", b"[1]", b"\xff"])
def test_bad_json_is_a_400(body: bytes) -> None:
    with pytest.raises(HTTPError) as caught:
        parse_completion_request(body, DEFAULTS, LIMIT)
    assert caught.value.status == 400
    assert error_body(caught.value)["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("status", "error_type", "kind", "code"),
    [
        (400, "invalid_request", "invalid_request_error", "invalid_request"),
        (401, "invalid_api_key", "invalid_request_error", "invalid_api_key"),
        (413, "request_too_large", "invalid_request_error", "request_too_large"),
        (429, "queue_full", "rate_limit_error", "rate_limit_exceeded"),
        (503, "draining", "server_error", "draining"),
        (504, "upstream_timeout", "server_error", "upstream_timeout"),
    ],
)
def test_error_body_has_openai_shape(status: int, error_type: str, kind: str, code: str) -> None:
    body = error_body(HTTPError(status, error_type, "what to do"))
    assert body == {"error": {"message": "what to do", "type": kind, "param": None, "code": code}}


def test_completion_and_models_bodies() -> None:
    body = HEADER.completion("Hi!", "length", usage(5, 2, cached_tokens=3))
    assert body["object"] == "chat.completion" and body["model"] == "served" and body["id"] == "chatcmpl-1"
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "Hi!"}, "logprobs": None, "finish_reason": "length"}
    ]
    assert body["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 2,
        "total_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 3},
    }
    models = models_body("served", 123)
    assert models == {
        "object": "list",
        "data": [{"id": "served", "object": "model", "created": 123, "owned_by": "chatstream_asgi"}],
    }


def test_encoder_sends_role_then_deltas_then_finish_and_done() -> None:
    encoder = OpenAIStreamEncoder(HEADER, include_usage=False)
    data = encoder.delta("Hel") + encoder.delta("lo") + encoder.done({"finish_reason": "stop", "prompt_tokens": 3})
    *chunks, done = events(data)
    assert done == "[DONE]" and data.endswith(DONE)
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"role": "assistant", "content": ""},
        {"content": "Hel"},
        {"content": "lo"},
        {},
    ]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "stop"]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "chatcmpl-1" for c in chunks)
    assert all("usage" not in c for c in chunks)


@pytest.mark.parametrize("model", ["served", "model \x00content\x00 with the placeholder in its name"])
def test_encoder_content_chunks_are_the_chunk_objects_json_whatever_the_text(model: str) -> None:
    # the content chunk is rendered once around a placeholder and only the text is encoded per chunk
    header = ReplyHeader("chatcmpl-1", 1700000000, model)
    encoder = OpenAIStreamEncoder(header, include_usage=False)
    encoder.delta("")  # the role chunk
    for text in ["Hel", 'a "quote" and a \\', "line\nbreak\ttab", "東京😀", "\u2028\x00", "\x00content\x00", ""]:
        assert encoder.delta(text) == OpenAIStreamEncoder.event(header.chunk({"content": text}))
        assert events(encoder.delta(text))[0]["choices"][0]["delta"] == {"content": text}


def test_encoder_usage_chunk_and_empty_reply() -> None:
    encoder = OpenAIStreamEncoder(HEADER, include_usage=True)
    summary = {"finish_reason": None, "prompt_tokens": 4, "completion_tokens": 0, "cached_tokens": 2}
    chunks = events(encoder.done(summary))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}  # the role even with no text
    assert chunks[1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[2]["choices"] == [] and chunks[2]["usage"] == {
        "prompt_tokens": 4,
        "completion_tokens": 0,
        "total_tokens": 4,
        "prompt_tokens_details": {"cached_tokens": 2},
    }
    assert chunks[3] == "[DONE]"


def test_encoder_error_is_an_error_event_then_done() -> None:
    encoder = OpenAIStreamEncoder(HEADER, include_usage=False, ping_interval=5.0)
    assert encoder.ping() == b": ping\n\n" and encoder.ping_interval == 5.0
    error, done = events(encoder.error("generation_error", "boom"))
    assert error == {"error": {"message": "boom", "type": "server_error", "param": None, "code": "generation_error"}}
    assert done == "[DONE]"
