"""Unit tests for ``OpenAIUpstreamEngine`` without a server: configuration, the request it sends, the prompt it
shows, and how it reads upstream events (the wire behaviour is in ``tests/integration/test_openai_upstream.py``)."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import pytest

from chatstream_asgi import ConfigurationError, Engine, OpenAIUpstreamEngine
from chatstream_asgi.engines.base import SamplingParams
from chatstream_asgi.engines.openai_upstream import UpstreamError, parse_chunk, sse_lines
from chatstream_asgi.http.streaming import as_http_error

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


def event(**fields: Any) -> str:
    return json.dumps(fields)


def test_is_an_engine_named_after_the_model() -> None:
    engine = OpenAIUpstreamEngine("http://127.0.0.1:1/v1/", model="org/big")
    assert isinstance(engine, Engine)
    assert (engine.model_name, engine.base_url, engine.ready) == ("org/big", "http://127.0.0.1:1/v1", False)
    assert OpenAIUpstreamEngine("http://h/v1", model="org/big", model_name="big").model_name == "big"


@pytest.mark.parametrize("options", [{"base_url": "127.0.0.1:8001/v1"}, {"timeout": 0}, {"max_batch_size": 0}])
def test_bad_configuration_says_what_to_pass(options: dict[str, Any]) -> None:
    arguments = {"base_url": "http://h/v1", "model": "m", **options}
    with pytest.raises(ConfigurationError):
        OpenAIUpstreamEngine(**arguments)


def test_request_body_is_plain_openai_unless_extensions_are_asked() -> None:
    params = SamplingParams(max_new_tokens=9, temperature=0.0, top_p=0.5, top_k=3, seed=1, stop=("x",))
    body = OpenAIUpstreamEngine("http://h/v1", model="m").request_body(MESSAGES, params)
    assert body == {
        "model": "m",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 9,
        "temperature": 0.0,
        "top_p": 0.5,
        "seed": 1,
        "stop": ["x"],
    }
    engine = OpenAIUpstreamEngine("http://h/v1", model="m", sampling_extensions=True, extra_body={"top_p": 1.0})
    extended = engine.request_body(MESSAGES, params)
    assert (extended["top_k"], extended["repetition_penalty"], extended["ignore_eos"], extended["top_p"]) == (
        3,
        1.0,
        False,
        1.0,
    )


def test_render_prompt_is_readable() -> None:
    prompt = OpenAIUpstreamEngine("http://h/v1", model="m").render_prompt(MESSAGES, SamplingParams())
    assert "[system]\nbe brief" in prompt and "[user]\nhi" in prompt and prompt.endswith("[assistant]\n")


def test_parse_chunk_reads_text_finish_and_usage() -> None:
    delta = event(choices=[{"delta": {"content": "Hi"}, "finish_reason": None}])
    assert parse_chunk(delta) == ("Hi", None, None)
    assert parse_chunk(event(choices=[{"delta": {}, "finish_reason": "eos_token"}]))[1] == "stop"
    assert parse_chunk(event(choices=[{"delta": None, "finish_reason": "length"}]))[1] == "length"
    usage = parse_chunk(event(choices=[], usage={"prompt_tokens": 3, "completion_tokens": 2, "x": None}))
    assert usage == ("", None, {"prompt_tokens": 3, "completion_tokens": 2})


@pytest.mark.parametrize(
    ("payload", "error_type"),
    [
        ("{oops", "upstream_protocol_error"),
        ("[]", "upstream_protocol_error"),
        (event(choices="x"), "upstream_protocol_error"),
        (event(error={"message": "boom"}), "upstream_error"),
    ],
)
def test_parse_chunk_errors_map_to_a_502(payload: str, error_type: str) -> None:
    with pytest.raises(UpstreamError) as caught:
        parse_chunk(payload)
    error = as_http_error(caught.value)
    assert (error.status, error.error_type) == (502, error_type)


def test_retry_after_travels_to_the_http_error() -> None:
    error = as_http_error(UpstreamError("busy", status=503, error_type="upstream_overloaded", retry_after=4))
    assert (error.status, error.headers) == (503, {"Retry-After": "4"})


def test_missing_httpx_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "httpx", None)  # what `import httpx` meets when it is not installed
    with pytest.raises(ImportError, match=r"chatstream-asgi\[upstream\]"):
        OpenAIUpstreamEngine("http://h/v1", model="m")


async def lines_of(pieces: list[bytes]) -> list[str]:
    async def chunks() -> Any:
        for piece in pieces:
            yield piece
            await asyncio.sleep(0)

    return [line async for line in sse_lines(chunks())]


@pytest.mark.asyncio
async def test_event_lines_end_at_cr_and_lf_only_across_any_chunking() -> None:
    text = "one\u2028two\u2029three\x85four 東京"  # raw in JSON strings; str.splitlines would cut there
    data = f'data: {json.dumps({"t": text}, ensure_ascii=False)}'
    stream = f"{data}\r\n\r\n: ping\rdata: [DONE]\n".encode()
    expected = [data, "", ": ping", "data: [DONE]"]
    assert await lines_of([stream]) == expected
    for size in (1, 2, 3, 7):  # cut inside CR LF, inside multi-byte characters, inside the JSON
        pieces = [stream[i : i + size] for i in range(0, len(stream), size)]
        got = [line for line in await lines_of(pieces) if line]  # a CR LF cut in two may read as two line ends
        assert got == [line for line in expected if line], size
    assert await lines_of([b"data: [DONE]"]) == ["data: [DONE]"]  # no final line end
