"""Hypothesis fuzzing of what a client controls: request bodies, cookies, and the token ids a model emits.

Each property is the same: whatever comes in, the answer is a clear 4xx (or a reply), never a crash, and
nothing is left holding a slot.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatstream_asgi import ChatStreamMiddleware, MockEngine, SamplingParams
from chatstream_asgi.engines.detokenizer import IncrementalDetokenizer
from chatstream_asgi.errors import HTTPError
from chatstream_asgi.http.requests import parse_chat_turn
from chatstream_asgi.openai.schema import parse_completion_request
from chatstream_asgi.sessions.cookie import SessionCookie
from tests.unit.asgi_fakes import RecordingApp, RecordingSend, ScriptedReceive, http_scope, request_messages

SECRET = "fuzz-secret-key-0123456789abcdef"
FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
JSON_VALUES = st.recursive(
    JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
)
FIELDS = st.sampled_from(
    ["user_input", "regenerate", "max_new_tokens", "temperature", "top_p", "top_k", "stop", "seed"]
)
CHAT_BODIES = st.dictionaries(FIELDS | st.text(max_size=8), JSON_VALUES, max_size=6)


def deeply_nested(depth: int) -> bytes:
    return b'{"user_input": ' + b"[" * depth + b"]" * depth + b"}"


@FUZZ
@given(body=st.binary(max_size=300) | CHAT_BODIES.map(lambda d: json.dumps(d).encode()))
def test_any_body_parses_or_gives_a_400(body: bytes) -> None:
    try:
        turn = parse_chat_turn(body, SamplingParams(), max_new_tokens_limit=64, max_input_chars=100)
    except HTTPError as error:
        assert error.status == 400 and error.message
        return
    assert turn.regenerate or (isinstance(turn.user_input, str) and turn.user_input.strip())
    assert 1 <= turn.params.max_new_tokens <= 64


MESSAGES = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", 3]), "content": JSON_VALUES}),
    max_size=4,
)
OPENAI_BODIES = st.fixed_dictionaries(
    {"messages": MESSAGES | JSON_VALUES},
    optional={"stream": JSON_VALUES, "max_tokens": JSON_VALUES, "temperature": JSON_VALUES, "stop": JSON_VALUES},
)


@FUZZ
@given(body=st.binary(max_size=300) | OPENAI_BODIES.map(lambda d: json.dumps(d).encode()))
def test_any_openai_body_parses_or_gives_a_400(body: bytes) -> None:
    try:
        request = parse_completion_request(body, SamplingParams(), 64)
    except HTTPError as error:
        assert error.status == 400 and error.message
        return
    assert request.messages and 1 <= request.params.max_new_tokens <= 64


@pytest.mark.parametrize("depth", [10, 1_000, 100_000])
def test_huge_nesting_is_a_400_not_a_recursion_crash(depth: int) -> None:
    with pytest.raises(HTTPError) as caught:
        parse_chat_turn(deeply_nested(depth), SamplingParams(), max_new_tokens_limit=64, max_input_chars=100)
    assert caught.value.status == 400


@FUZZ
@given(cookie=st.binary(max_size=400))
def test_any_cookie_header_gives_a_session_id_or_none(cookie: bytes) -> None:
    sessions = SessionCookie(SECRET)
    for header in (cookie, b"chatstream_session=" + cookie, b"a=b; chatstream_session=" + cookie + b"; c"):
        assert sessions.session_id_from_headers([(b"cookie", header)]) is None


@FUZZ
@given(ids=st.lists(st.integers(min_value=0, max_value=599), max_size=60))
def test_detokenizer_deltas_always_add_up_to_decode(tiny_tokenizer: Any, ids: list[int]) -> None:
    detokenizer = IncrementalDetokenizer(tiny_tokenizer)
    deltas = [detokenizer.push(token) for token in ids] + [detokenizer.flush()]
    assert "".join(deltas) == tiny_tokenizer.decode(ids, skip_special_tokens=True)


async def post_raw(app: ChatStreamMiddleware, body: bytes, headers: list[tuple[bytes, bytes]]) -> RecordingSend:
    send = RecordingSend()
    receive = ScriptedReceive(request_messages(body, chunk_size=64), wait_for_disconnect=True)
    await asyncio.wait_for(app(http_scope("POST", "/chat_stream", headers=headers), receive, send), 5)
    return send


@FUZZ
@given(
    body=st.binary(max_size=2_000) | CHAT_BODIES.map(lambda d: json.dumps(d).encode()),
    content_type=st.sampled_from([b"application/json", b"text/plain", b"application/x+json", b"\xff\xfe"]),
    cookie=st.binary(max_size=80),
)
def test_the_middleware_answers_every_body_cleanly(body: bytes, content_type: bytes, cookie: bytes) -> None:
    app = ChatStreamMiddleware(RecordingApp(), engine=MockEngine("ok"), secret_key=SECRET, max_body_bytes=1_000)
    headers = [(b"content-type", content_type), (b"cookie", cookie)]
    send = asyncio.run(post_raw(app, body, headers))
    assert send.complete
    assert send.status == 200 or (send.status in (400, 413, 415) and "error" in send.json())
    assert app.admission.running == 0 and app.admission.waiting == 0 and not app.routes.active_sessions
