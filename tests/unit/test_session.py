"""SessionCookie: a signed id that round-trips, and anything else in a cookie header means "no session"."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from itsdangerous import TimestampSigner

from chatstream_asgi.errors import ConfigurationError
from chatstream_asgi.sessions.cookie import SALT, SessionCookie

KEY = "k" * 16 + "-current-secret"
OLD_KEY = "o" * 16 + "-retired-secret"


class FrozenClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def signed_value(cookie: SessionCookie, session_id: str) -> bytes:
    name, header = cookie.set_cookie_header(session_id)
    assert name == b"set-cookie"
    return header.split(b";", 1)[0].split(b"=", 1)[1]


def cookie_headers(value: bytes, name: bytes = b"chatstream_session") -> list[tuple[bytes, bytes]]:
    return [(b"host", b"example.com"), (b"cookie", name + b"=" + value)]


def test_roundtrip_returns_the_session_id() -> None:
    cookie = SessionCookie(KEY)
    session_id = cookie.new_session_id()
    assert cookie.session_id_from_headers(cookie_headers(signed_value(cookie, session_id))) == session_id


def test_new_session_ids_are_random_and_url_safe() -> None:
    cookie = SessionCookie(KEY)
    ids = {cookie.new_session_id() for _ in range(100)}
    assert len(ids) == 100 and all(len(i) == 24 for i in ids)


def test_no_cookie_header_means_no_session() -> None:
    assert SessionCookie(KEY).session_id_from_headers([(b"host", b"example.com")]) is None


@pytest.mark.parametrize("where", ["id", "timestamp", "signature"])
def test_tampered_cookie_is_rejected(where: str) -> None:
    cookie = SessionCookie(KEY)
    session_id, timestamp, signature = signed_value(cookie, cookie.new_session_id()).split(b".")
    parts = {"id": session_id, "timestamp": timestamp, "signature": signature}
    original = parts[where]
    # the first character: in base64 all its bits count (the last one's low bits may be padding, ignored on decode)
    parts[where] = (b"A" if original[:1] != b"A" else b"B") + original[1:]
    tampered = b".".join((parts["id"], parts["timestamp"], parts["signature"]))
    assert cookie.session_id_from_headers(cookie_headers(tampered)) is None


def test_expired_cookie_is_rejected_and_a_fresh_one_is_accepted() -> None:
    clock = FrozenClock()
    cookie = SessionCookie(KEY, max_age=3600, clock=clock)
    session_id = cookie.new_session_id()
    headers = cookie_headers(signed_value(cookie, session_id))
    clock.now += 3600
    assert cookie.session_id_from_headers(headers) == session_id
    clock.now += 1
    assert cookie.session_id_from_headers(headers) is None


def test_a_cookie_from_another_secret_or_salt_is_rejected() -> None:
    cookie = SessionCookie(KEY)
    session_id = cookie.new_session_id()
    foreign = SessionCookie("x" * 32)
    assert cookie.session_id_from_headers(cookie_headers(signed_value(foreign, session_id))) is None
    other_salt = TimestampSigner(KEY, salt="another.purpose").sign(session_id)
    assert cookie.session_id_from_headers(cookie_headers(other_salt)) is None


def test_a_validly_signed_value_of_the_wrong_shape_is_rejected() -> None:
    cookie = SessionCookie(KEY)
    for payload in ("short", "a" * 25, "a" * 23 + "!", ""):
        value = TimestampSigner(KEY, salt=SALT).sign(payload)
        assert cookie.session_id_from_headers(cookie_headers(value)) is None


@pytest.mark.parametrize(
    "header",
    [
        b"garbage",
        b"chatstream_session",
        b"chatstream_session=",
        b"=;;;=",
        b"chatstream_session=a.b.c",
        b"chatstream_session=...",
        b"chatstream_session=!!!.@@@.###",
        b"chatstream_session=" + b"A" * 5000,
        b"chatstream_session=\xff\xfe\x00",
        b"chatstream_session=\xc3\xa9t\xc3\xa9.abc.def",
        b"\xff\xff=\xff; chatstream_session",
    ],
)
def test_malformed_cookie_headers_mean_no_session(header: bytes) -> None:
    assert SessionCookie(KEY).session_id_from_headers([(b"cookie", header)]) is None


def test_the_session_cookie_is_found_among_others_and_across_headers() -> None:
    cookie = SessionCookie(KEY)
    session_id = cookie.new_session_id()
    value = signed_value(cookie, session_id)
    headers = [
        (b"cookie", b"theme=dark; lang=\xff\xfe"),
        (b"accept", b"*/*"),
        (b"Cookie", b"a=1;  chatstream_session=bogus.value.here ; chatstream_session=" + value + b"; z=2"),
    ]
    assert cookie.session_id_from_headers(headers) == session_id
    assert cookie.session_id_from_headers([(b"cookie", b'chatstream_session="' + value + b'"')]) == session_id
    assert cookie.session_id_from_headers(cookie_headers(value, name=b"other_session")) is None


def test_key_rotation_accepts_old_cookies_and_signs_with_the_first_key() -> None:
    old = SessionCookie(OLD_KEY)
    rotated = SessionCookie([KEY, OLD_KEY])
    session_id = old.new_session_id()
    assert rotated.session_id_from_headers(cookie_headers(signed_value(old, session_id))) == session_id
    new_value = signed_value(rotated, session_id)
    assert SessionCookie(KEY).session_id_from_headers(cookie_headers(new_value)) == session_id
    assert old.session_id_from_headers(cookie_headers(new_value)) is None
    assert SessionCookie([KEY.encode(), OLD_KEY.encode()]).session_id_from_headers(cookie_headers(new_value))


def test_set_cookie_flags_default_to_plain_http() -> None:
    cookie = SessionCookie(KEY, max_age=600)
    name, value = cookie.set_cookie_header(cookie.new_session_id())
    attributes = value.decode().split("; ")[1:]
    assert name == b"set-cookie"
    assert attributes == ["Max-Age=600", "Path=/", "HttpOnly", "SameSite=Lax"]


def test_set_cookie_flags_with_https_domain_and_same_site() -> None:
    cookie = SessionCookie(KEY, path="/chat", https_only=True, same_site="STRICT", domain="example.com")
    attributes = cookie.set_cookie_header(cookie.new_session_id())[1].decode().split("; ")
    assert {"Path=/chat", "Domain=example.com", "HttpOnly", "SameSite=Strict", "Secure"} <= set(attributes)
    none = SessionCookie(KEY, https_only=True, same_site="none")
    assert b"SameSite=None; Secure" in none.set_cookie_header(none.new_session_id())[1]


def test_clear_cookie_header_expires_the_cookie() -> None:
    name, value = SessionCookie(KEY, cookie_name="sid").clear_cookie_header()
    assert name == b"set-cookie"
    assert value.startswith(b"sid=; Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT; Path=/; HttpOnly")


def test_set_cookie_header_refuses_an_arbitrary_id() -> None:
    with pytest.raises(ValueError):
        SessionCookie(KEY).set_cookie_header("evil; Domain=attacker.example")


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((None,), {}, "secrets.token_urlsafe"),
        (("",), {}, "secrets.token_urlsafe"),
        (([],), {}, "secret_key is required"),
        (("short-key",), {}, "at least 16"),
        (([KEY, "short-key"],), {}, "at least 16"),
        (([KEY, 12345],), {}, "str or bytes"),
        ((KEY,), {"same_site": "sometimes"}, "same_site"),
        ((KEY,), {"same_site": "None"}, "https_only"),
        ((KEY,), {"cookie_name": "bad name"}, "cookie_name"),
        ((KEY,), {"cookie_name": "a;b"}, "cookie_name"),
        ((KEY,), {"cookie_name": ""}, "cookie_name"),
        ((KEY,), {"max_age": 0}, "max_age"),
        ((KEY,), {"path": "chat"}, "path"),
        ((KEY,), {"path": "/a; Secure"}, "path"),
        ((KEY,), {"domain": "a.com; Secure"}, "domain"),
    ],
)
def test_bad_configuration_is_rejected(args: tuple[object, ...], kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        SessionCookie(*args, **kwargs)  # type: ignore[arg-type]


def test_the_secret_never_appears_in_repr_or_errors() -> None:
    short = "sekrit-15-chars"
    with pytest.raises(ConfigurationError) as caught:
        SessionCookie([KEY, short])
    assert short not in str(caught.value)
    assert KEY not in repr(SessionCookie(KEY)) and "k" * 16 not in repr(SessionCookie(KEY))


@given(st.binary(max_size=400))
def test_random_cookie_bytes_never_raise(raw: bytes) -> None:
    cookie = SessionCookie(KEY)
    for header in (raw, b"chatstream_session=" + raw, raw + b"; chatstream_session=" + raw):
        assert cookie.session_id_from_headers([(b"cookie", header)]) is None


@given(st.lists(st.tuples(st.binary(max_size=20), st.binary(max_size=200)), max_size=5))
def test_random_header_lists_never_raise(headers: list[tuple[bytes, bytes]]) -> None:
    result = SessionCookie(KEY).session_id_from_headers(headers)
    assert result is None or isinstance(result, str)


def test_a_flood_of_session_cookies_is_verified_a_few_at_most(monkeypatch: pytest.MonkeyPatch) -> None:
    # a header of 100,000 copies held the event loop for seconds (an HMAC per key per copy)
    cookie = SessionCookie([KEY, OLD_KEY])
    verified: list[str] = []
    real_verify = cookie._verify
    monkeypatch.setattr(cookie, "_verify", lambda value: verified.append(value) or real_verify(value))
    forged = b"chatstream_session=" + signed_value(SessionCookie("x" * 32), cookie.new_session_id())
    flood = [(b"cookie", b"; ".join([forged] * 100_000))]
    assert cookie.session_id_from_headers(flood) is None and len(verified) == 8
    session_id = cookie.new_session_id()
    genuine = cookie_headers(signed_value(cookie, session_id))
    assert cookie.session_id_from_headers([(b"cookie", forged), *genuine]) == session_id  # a stale one, then ours


def test_a_cookie_past_half_its_lifetime_is_to_be_signed_again() -> None:
    # signed once, a session in daily use ended max_age after its first visit
    clock = FrozenClock()
    cookie = SessionCookie(KEY, max_age=1000, clock=clock)
    session_id = cookie.new_session_id()
    headers = cookie_headers(signed_value(cookie, session_id))
    clock.now += 400
    assert cookie.session_from_headers(headers) == (session_id, False)
    clock.now += 200  # 600 s old: past half of 1000
    assert cookie.session_from_headers(headers) == (session_id, True)
    renewed = cookie_headers(signed_value(cookie, session_id))
    clock.now += 450  # the first cookie (1,050 s) is over, the one signed again (450 s) is not
    assert cookie.session_from_headers(headers) == (None, False)
    assert cookie.session_from_headers(renewed) == (session_id, False)
