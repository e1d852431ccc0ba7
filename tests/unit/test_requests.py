"""Unit tests for ``chatstream_asgi.http.requests``: JSON body parsing and field validation."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatstream_asgi.engines.base import SamplingParams
from chatstream_asgi.errors import HTTPError
from chatstream_asgi.http.requests import (
    CHAT_FIELDS,
    MAX_STOP_LENGTH,
    MAX_STOP_STRINGS,
    ChatTurn,
    parse_chat_turn,
    parse_json_object,
    require_json,
)

from .asgi_fakes import http_scope

DEFAULTS = SamplingParams(max_new_tokens=64, temperature=0.5, top_p=0.8, top_k=20, repetition_penalty=1.1)
LIMIT = 1000
MAX_CHARS = 50


def parse(payload: Any, defaults: SamplingParams = DEFAULTS, limit: int = LIMIT) -> ChatTurn:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return parse_chat_turn(body, defaults, max_new_tokens_limit=limit, max_input_chars=MAX_CHARS)


def rejected(payload: Any, defaults: SamplingParams = DEFAULTS) -> HTTPError:
    with pytest.raises(HTTPError) as caught:
        parse(payload, defaults)
    assert caught.value.status == 400
    assert caught.value.error_type == "invalid_request"
    return caught.value


def with_input(**fields: Any) -> dict[str, Any]:
    return {"user_input": "hi", **fields}


# --- the body -----------------------------------------------------------------------------------------------


def test_minimal_turn_keeps_every_default() -> None:
    turn = parse({"user_input": "hello"})
    assert turn == ChatTurn(user_input="hello", regenerate=False, params=DEFAULTS)


@pytest.mark.parametrize("body", [b"", b"{", b"not json", b'{"user_input": "hi",}', b"\x00"])
def test_non_json_body_is_400(body: bytes) -> None:
    assert "not valid UTF-8 JSON" in rejected(body).message


@pytest.mark.parametrize("body", [b"[]", b'"hi"', b"1", b"null", b"true", b'[{"user_input": "hi"}]'])
def test_json_that_is_not_an_object_is_400(body: bytes) -> None:
    assert "JSON object" in rejected(body).message


@pytest.mark.parametrize(
    "body",
    [
        b'{"user_input": "\xff"}',
        b'{"user_input": "\xc3"}',  # truncated two-byte sequence
        b'{"user_input": "\xed\xa0\x80"}',  # UTF-8-encoded surrogate: json.loads(bytes) lets it through
        '{"user_input": "hi"}'.encode("utf-16"),  # JSON must be UTF-8
        '{"user_input": "hi"}'.encode("utf-32-le"),
    ],
)
def test_body_that_is_not_utf8_is_400(body: bytes) -> None:
    rejected(body)


def test_utf8_with_bom_is_accepted() -> None:
    assert parse(b'\xef\xbb\xbf{"user_input": "hi"}').user_input == "hi"


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_deeply_nested_json_is_400_not_a_crash(depth: int) -> None:
    rejected(b'{"user_input": "hi", "stop": ' + b"[" * depth + b"]" * depth + b"}")
    rejected(b"[" * depth)


def test_unknown_fields_are_400_and_named() -> None:
    error = rejected(with_input(temprature=1.0, model="x"))
    assert "'model'" in error.message and "'temprature'" in error.message


def test_every_documented_field_is_accepted_together() -> None:
    turn = parse(
        with_input(
            regenerate=False,
            max_new_tokens=10,
            temperature=0.0,
            top_p=1.0,
            top_k=0,
            repetition_penalty=2.0,
            stop=["\n"],
            seed=7,
            ignore_eos=True,
        )
    )
    assert turn.params == SamplingParams(
        max_new_tokens=10,
        temperature=0.0,
        top_p=1.0,
        top_k=0,
        repetition_penalty=2.0,
        stop=("\n",),
        seed=7,
        ignore_eos=True,
    )


# --- user_input and regenerate ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, "", "   \n\t", 5, True, ["hi"], {"text": "hi"}])
def test_user_input_must_be_a_non_empty_string(value: Any) -> None:
    payload = {} if value is None else {"user_input": value}
    assert "user_input" in rejected(payload).message


def test_user_input_over_max_chars_is_400() -> None:
    assert parse({"user_input": "x" * MAX_CHARS}).user_input == "x" * MAX_CHARS
    assert f"limit is {MAX_CHARS}" in rejected({"user_input": "x" * (MAX_CHARS + 1)}).message


def test_user_input_with_lone_surrogate_escape_is_400() -> None:
    # valid JSON text, but no UTF-8 response (get_prompt, SSE) could ever carry it back
    rejected(b'{"user_input": "a\\ud800b"}')


def test_user_input_with_surrogate_pair_escape_is_accepted() -> None:
    assert parse(b'{"user_input": "\\ud83d\\ude00"}').user_input == "\U0001f600"


@pytest.mark.parametrize("value", [1, 0, "true", [True]])
def test_regenerate_must_be_a_boolean(value: Any) -> None:
    assert "regenerate" in rejected(with_input(regenerate=value)).message


def test_regenerate_ignores_user_input() -> None:
    turn = parse({"regenerate": True, "user_input": 123})
    assert turn.regenerate is True and turn.user_input is None


# --- sampling fields --------------------------------------------------------------------------------------

FLOAT_CASES = [
    ("temperature", [0.0, 0, 1, 2.0], [-0.01, 2.01, 10**400, -(10**400)]),
    ("top_p", [1e-9, 0.5, 1, 1.0], [0, 0.0, -0.1, 1.01]),
    ("repetition_penalty", [0.01, 1, 10.0], [0, -1.0, 0.0099, 1e-300, 10.5]),  # < 0.01: the logits would overflow
]


@pytest.mark.parametrize(("name", "good", "bad"), FLOAT_CASES)
def test_float_fields_accept_their_range_and_reject_outside_it(name: str, good: list[Any], bad: list[Any]) -> None:
    for value in good:
        params = parse(with_input(**{name: value})).params
        assert getattr(params, name) == value and isinstance(getattr(params, name), float)
    for value in bad:
        assert f"'{name}' must be in" in rejected(with_input(**{name: value})).message


@pytest.mark.parametrize("name", ["temperature", "top_p", "repetition_penalty"])
@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_float_fields_reject_nan_and_infinity(name: str, literal: bytes) -> None:
    body = b'{"user_input": "hi", "' + name.encode() + b'": ' + literal + b"}"
    assert "must be a number" in rejected(body).message


@pytest.mark.parametrize("name", ["temperature", "top_p", "repetition_penalty"])
@pytest.mark.parametrize("value", [True, False, "0.5", [0.5], {"v": 1}])
def test_float_fields_reject_non_numbers_including_bools(name: str, value: Any) -> None:
    assert "must be a number" in rejected(with_input(**{name: value})).message


def test_vllms_top_k_of_minus_one_means_all_tokens() -> None:
    assert parse(with_input(top_k=-1)).params.top_k == 0


def test_a_huge_integer_temperature_is_400_not_an_overflow() -> None:
    rejected(b'{"user_input": "hi", "temperature": 1' + b"0" * 400 + b"}")


INT_CASES = [
    ("max_new_tokens", [1, LIMIT], [0, -1, LIMIT + 1]),
    ("top_k", [0, 1, 1_000_000], [-2, 1_000_001]),
    ("seed", [0, 2**63 - 1], [-1, 2**63, 10**400]),
]


@pytest.mark.parametrize(("name", "good", "bad"), INT_CASES)
def test_int_fields_accept_their_range_and_reject_outside_it(name: str, good: list[int], bad: list[int]) -> None:
    for value in good:
        assert getattr(parse(with_input(**{name: value})).params, name) == value
    for value in bad:
        assert f"'{name}' must be between" in rejected(with_input(**{name: value})).message


@pytest.mark.parametrize("name", ["max_new_tokens", "top_k", "seed"])
@pytest.mark.parametrize("value", [True, False, 1.0, 2.5, "3", [3]])
def test_int_fields_reject_bools_floats_and_strings(name: str, value: Any) -> None:
    assert "must be an integer" in rejected(with_input(**{name: value})).message


@pytest.mark.parametrize("name", ["max_new_tokens", "top_k", "seed"])
def test_int_fields_reject_nan(name: str) -> None:
    rejected(b'{"user_input": "hi", "' + name.encode() + b'": NaN}')


def test_integer_over_pythons_digit_limit_is_400_not_a_crash() -> None:
    rejected(b'{"user_input": "hi", "seed": 1' + b"0" * 5000 + b"}")


def test_ignore_eos_must_be_a_boolean() -> None:
    assert parse(with_input(ignore_eos=True)).params.ignore_eos is True
    assert "ignore_eos" in rejected(with_input(ignore_eos=1)).message


def test_stop_accepts_a_string_or_a_list() -> None:
    assert parse(with_input(stop="END")).params.stop == ("END",)
    assert parse(with_input(stop=["a", "b"])).params.stop == ("a", "b")
    assert parse(with_input(stop=[])).params.stop == ()


@pytest.mark.parametrize("value", ["", [""], ["a", 1], [None], 5, {"a": 1}, [["a"]], True])
def test_stop_rejects_empty_and_non_string_entries(value: Any) -> None:
    assert "'stop'" in rejected(with_input(stop=value)).message


def test_stop_list_size_and_string_length_are_capped() -> None:
    assert len(parse(with_input(stop=["s"] * MAX_STOP_STRINGS)).params.stop) == MAX_STOP_STRINGS
    assert parse(with_input(stop=["x" * MAX_STOP_LENGTH])).params.stop == ("x" * MAX_STOP_LENGTH,)
    rejected(with_input(stop=["s"] * (MAX_STOP_STRINGS + 1)))
    rejected(with_input(stop=["x" * (MAX_STOP_LENGTH + 1)]))
    rejected(with_input(stop="x" * (MAX_STOP_LENGTH + 1)))


def test_stop_with_lone_surrogate_escape_is_400() -> None:
    rejected(b'{"user_input": "hi", "stop": ["\\udc00"]}')


# --- defaults and limits ----------------------------------------------------------------------------------


def test_request_fields_overlay_defaults_field_by_field() -> None:
    params = parse(with_input(temperature=1.5, stop="x")).params
    assert params.temperature == 1.5 and params.stop == ("x",)
    assert (params.top_p, params.top_k, params.max_new_tokens) == (DEFAULTS.top_p, DEFAULTS.top_k, 64)
    assert params.repetition_penalty == DEFAULTS.repetition_penalty


@pytest.mark.parametrize("name", sorted(CHAT_FIELDS - {"user_input", "regenerate"}))
def test_null_sampling_field_keeps_the_default(name: str) -> None:
    assert parse(with_input(**{name: None})).params == DEFAULTS


def test_max_new_tokens_over_the_limit_is_400() -> None:
    error = rejected(with_input(max_new_tokens=LIMIT + 1))
    assert str(LIMIT) in error.message


def test_default_max_new_tokens_over_the_limit_is_clamped_to_it() -> None:
    defaults = SamplingParams(max_new_tokens=5000)
    assert parse(with_input(), defaults=defaults, limit=100).params.max_new_tokens == 100


# --- content type ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [b"application/json", b"application/json; charset=utf-8", b"Application/JSON", b"application/vnd.api+json"],
)
def test_json_content_types_are_accepted(content_type: bytes) -> None:
    require_json(http_scope("POST", headers=[(b"content-type", content_type)]))


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [(b"content-type", b"text/plain")],
        [(b"content-type", b"application/x-www-form-urlencoded")],
        [(b"content-type", b"multipart/form-data; boundary=x")],
        [(b"content-type", b"application/jsonp")],
    ],
)
def test_non_json_content_types_are_415(headers: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(HTTPError) as caught:
        require_json(http_scope("POST", headers=headers))
    assert caught.value.status == 415
    assert caught.value.error_type == "unsupported_media_type"


# --- properties ---------------------------------------------------------------------------------------------

# Values near the edges that plain strategies rarely draw: huge ints, subnormals, lone surrogates.
EDGE_NUMBERS = st.sampled_from([10**400, -(10**400), 2**63, 2**63 - 1, 0.0, -0.0, 1e-320, 1e308])
ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()) | st.characters(categories=["Cs"]), max_size=12)
JSON_SCALARS = (
    st.none() | st.booleans() | st.integers() | EDGE_NUMBERS | st.floats(allow_nan=True, allow_infinity=True) | ANY_TEXT
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FIELD_NAMES = st.sampled_from(sorted(CHAT_FIELDS)) | st.text(max_size=12)


def assert_400_or_valid(body: bytes) -> None:
    try:
        turn = parse_chat_turn(body, DEFAULTS, max_new_tokens_limit=LIMIT, max_input_chars=MAX_CHARS)
    except HTTPError as error:
        assert error.status == 400
        json.dumps({"message": error.message}, ensure_ascii=False).encode("utf-8")  # the error must be sendable
        return
    if turn.user_input is not None:
        turn.user_input.encode("utf-8")
    for stop in turn.params.stop:
        stop.encode("utf-8")
    for value in (turn.params.temperature, turn.params.top_p, turn.params.repetition_penalty):
        assert math.isfinite(value)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_arbitrary_bytes_give_a_turn_or_400(body: bytes) -> None:
    assert_400_or_valid(body)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(JSON_VALUES)
def test_arbitrary_json_values_give_a_turn_or_400(value: Any) -> None:
    assert_400_or_valid(json.dumps(value).encode())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(FIELD_NAMES, JSON_VALUES, max_size=6), st.booleans())
def test_arbitrary_objects_with_chat_fields_give_a_turn_or_400(data: dict[str, Any], ascii_only: bool) -> None:
    assert_400_or_valid(json.dumps(data, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass"))


CHAT_OBJECTS = st.fixed_dictionaries(
    {"user_input": ANY_TEXT | JSON_SCALARS},
    optional={name: EDGE_NUMBERS | ANY_TEXT | JSON_SCALARS for name in sorted(CHAT_FIELDS - {"user_input"})},
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(CHAT_OBJECTS)
def test_well_shaped_chat_objects_give_a_turn_or_400(data: dict[str, Any]) -> None:
    assert_400_or_valid(json.dumps(data).encode())


@pytest.mark.parametrize("name", sorted(CHAT_FIELDS))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=EDGE_NUMBERS | ANY_TEXT | JSON_VALUES)
def test_any_value_of_one_field_gives_a_turn_or_400(name: str, value: Any) -> None:
    assert_400_or_valid(json.dumps({"user_input": "hi", name: value}).encode())


def test_parse_json_object_returns_the_object() -> None:
    assert parse_json_object(b'{"a": [1, 2]}') == {"a": [1, 2]}
