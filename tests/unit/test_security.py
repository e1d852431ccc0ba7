"""API keys on the chat routes, the CSRF origin check, session rotation on clear, and secret-key refusal."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from chatstream_asgi import ChatStreamMiddleware, MockEngine
from chatstream_asgi.errors import ConfigurationError
from chatstream_asgi.http.security import RequestGuard

from . import apps
from .apps import build_middleware, chat
from .asgi_fakes import JSON_HEADERS, RecordingApp, RecordingSend

pytestmark = pytest.mark.asyncio
KEY = "sk-chat-0123456789"
HOST = [(b"host", b"chat.example.com")]


class CountingEngine(MockEngine):
    def __init__(self) -> None:
        super().__init__("a reply")
        self.calls = 0

    def stream(self, *args: Any) -> Any:
        self.calls += 1
        return super().stream(*args)


def build(**options: Any) -> tuple[ChatStreamMiddleware, CountingEngine]:
    engine = CountingEngine()
    return build_middleware(engine, **options), engine


async def call(
    app: ChatStreamMiddleware,
    method: str,
    path: str,
    headers: Sequence[tuple[bytes, bytes]] = (),
    cookie: str | None = None,
    payload: dict[str, Any] | None = None,
) -> RecordingSend:
    """``apps.call`` with a ``Host`` for the origin check to compare with; a chat without a payload says "hi"."""
    if payload is None and path == "/chat_stream":
        payload = {"user_input": "hi"}
    return await apps.call(app, method, path, payload=payload, headers=[*JSON_HEADERS, *HOST, *headers], cookie=cookie)


def bearer(key: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {key}".encode())]


def cookie_of(send: RecordingSend) -> str:
    return send.header_values("set-cookie")[0].split(";")[0]


async def test_required_api_key_guards_the_chat_routes_but_not_health() -> None:
    app, engine = build(api_keys=[KEY, "sk-other-key"], require_api_key=True)
    for headers in ([], bearer("sk-wrong"), [(b"authorization", f"Basic {KEY}".encode())]):
        refused = await call(app, "POST", "/chat_stream", headers)
        assert refused.status == 401 and refused.header("www-authenticate") == "Bearer"
        assert KEY not in refused.body.decode()
    assert (await call(app, "GET", "/get_prompt")).status == 401
    assert engine.calls == 0
    assert (await call(app, "POST", "/chat_stream", bearer(KEY))).body == b"a reply"
    assert (await call(app, "GET", "/healthz")).status == 200


async def test_without_require_a_browser_uses_its_cookie_but_a_wrong_bearer_is_refused() -> None:
    app, _ = build(api_keys=[KEY])
    assert (await call(app, "POST", "/chat_stream")).status == 200
    assert (await call(app, "POST", "/chat_stream", bearer("sk-nope"))).status == 401


async def test_without_api_keys_a_bearer_header_is_the_host_apps_and_ignored() -> None:
    # a single-page app that sends its own JWT with every fetch must still reach the chat
    app, engine = build()
    host_token = bearer("eyJhbGciOiJIUzI1NiJ9.host-app-jwt")
    assert (await call(app, "POST", "/chat_stream", host_token)).body == b"a reply"
    assert (await call(app, "GET", "/get_prompt", host_token)).status == 200
    cross = [(b"sec-fetch-site", b"cross-site"), (b"origin", b"https://evil.example"), *host_token]
    assert (await call(app, "POST", "/chat_stream", cross)).status == 403  # a token not ours skips no CSRF check
    assert engine.calls == 1


@pytest.mark.parametrize(
    "headers",
    [
        [(b"sec-fetch-site", b"cross-site"), (b"origin", b"https://evil.example")],
        [(b"origin", b"https://evil.example")],
        [(b"sec-fetch-site", b"same-site"), (b"origin", b"https://sub.chat.example.com")],
        [(b"sec-fetch-site", b"cross-site")],
        [(b"origin", b"null")],
    ],
)
async def test_cross_site_cookie_posts_are_refused_before_anything_runs(headers: list[tuple[bytes, bytes]]) -> None:
    app, engine = build()
    refused = await call(app, "POST", "/chat_stream", headers)
    assert refused.status == 403 and refused.json()["error"]["type"] == "cross_site_request"
    assert engine.calls == 0 and app.admission.running == 0


@pytest.mark.parametrize(
    "headers",
    [
        [],  # not a browser
        [(b"sec-fetch-site", b"same-origin"), (b"origin", b"https://chat.example.com")],
        [(b"sec-fetch-site", b"none")],
        [(b"origin", b"http://chat.example.com")],  # same host, scheme changed by a TLS proxy
        [(b"sec-fetch-site", b"cross-site"), (b"origin", b"https://app.example.org")],  # allow-listed
    ],
)
async def test_same_origin_allowed_and_non_browser_posts_pass(headers: list[tuple[bytes, bytes]]) -> None:
    app, _ = build(allowed_origins=["https://app.example.org/"])
    assert (await call(app, "POST", "/chat_stream", headers)).status == 200


async def test_a_valid_bearer_or_csrf_off_skips_the_origin_check() -> None:
    cross = [(b"sec-fetch-site", b"cross-site"), (b"origin", b"https://evil.example")]
    app, _ = build(api_keys=[KEY])
    assert (await call(app, "POST", "/chat_stream", [*cross, *bearer(KEY)])).status == 200
    assert (await call(app, "GET", "/get_prompt", cross)).status == 200  # reads are not CSRF
    off, _ = build(csrf=False)
    assert (await call(off, "POST", "/chat_stream", cross)).status == 200


async def test_a_cross_site_clear_cannot_wipe_history() -> None:
    app, _ = build()
    cookie = cookie_of(await call(app, "POST", "/chat_stream"))
    cross = [(b"sec-fetch-site", b"cross-site"), (b"origin", b"https://evil.example")]
    assert (await call(app, "POST", "/clear_context", cross, cookie)).status == 403
    assert len((await call(app, "GET", "/get_prompt", cookie=cookie)).json()["messages"]) == 2


async def test_clear_context_rotates_the_session_id() -> None:
    app, _ = build()
    old = cookie_of(await call(app, "POST", "/chat_stream"))
    cleared = await call(app, "POST", "/clear_context", cookie=old)
    new = cookie_of(cleared)
    assert cleared.json() == {"cleared": True} and new != old
    await call(app, "POST", "/chat_stream", cookie=new)
    assert (await call(app, "GET", "/get_prompt", cookie=old)).json()["messages"] == []
    assert len((await call(app, "GET", "/get_prompt", cookie=new)).json()["messages"]) == 2


async def test_generation_params_follow_the_session_to_its_new_id_but_feedback_does_not() -> None:
    app, _ = build()
    old = cookie_of(await call(app, "POST", "/chat_stream"))
    assert (await call(app, "POST", "/set_generation_params", cookie=old, payload={"temperature": 0.3})).status == 200
    assert (await call(app, "POST", "/set_feedback", cookie=old, payload={"turn": 0, "rating": "up"})).status == 200
    new = cookie_of(await call(app, "POST", "/clear_context", cookie=old))
    params = (await call(app, "GET", "/get_generation_params", cookie=new)).json()
    assert params["overrides"] == {"temperature": 0.3}
    stale = await call(app, "GET", "/get_generation_params", cookie=old)
    assert stale.json()["overrides"] == {}  # nothing is left under the old id
    assert (await call(app, "POST", "/set_feedback", cookie=new, payload={"turn": 0, "rating": "up"})).status == 400
    assert len(app.routes.hooks.extras) == 1


@pytest.mark.parametrize("secret", [None, "", "short-key", ["too-short-key"]])
async def test_a_missing_or_short_secret_is_refused_with_how_to_make_one(secret: Any) -> None:
    with pytest.raises(ConfigurationError) as caught:
        ChatStreamMiddleware(RecordingApp(), engine=MockEngine(), secret_key=secret)
    assert "secrets.token_urlsafe" in str(caught.value)
    if secret:
        assert str(secret if isinstance(secret, str) else secret[0]) not in str(caught.value)


async def test_bad_security_settings_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="needs api_keys"):
        RequestGuard(None, require_api_key=True)
    for origin in ("evil.example", "ftp://x.example", "https://x.example/path", ""):
        with pytest.raises(ConfigurationError, match="allowed_origins"):
            RequestGuard(allowed_origins=[origin])
    assert KEY not in repr(RequestGuard([KEY]))


async def test_input_limits_are_configurable_and_enforced() -> None:
    seen: list[int] = []

    def reply(messages: Sequence[Any]) -> str:
        seen.append(len(messages))
        return "ok"

    app = build_middleware(MockEngine(reply), max_input_chars=5, max_history_turns=1)
    too_long = await call(app, "POST", "/chat_stream", [])  # "hi" fits
    cookie = cookie_of(too_long)
    for _ in range(3):
        assert (await call(app, "POST", "/chat_stream", cookie=cookie)).status == 200
    assert seen == [1, 3, 3, 3]  # one earlier pair at most, plus the new question
    # the limit is on what the model is sent: the stored history keeps every turn, and the next prompt is cut the same
    kept = (await call(app, "GET", "/get_prompt", cookie=cookie)).json()
    assert [m["content"] for m in kept["messages"]] == ["hi", "ok"] * 4
    assert kept["prompt"].count("hi") == 1
    send = await chat(app, "x" * 6)
    assert send.status == 400 and "limit is 5" in send.json()["error"]["message"]
    with pytest.raises(ConfigurationError):
        build_middleware(max_history_turns=0)


async def test_max_input_tokens_counts_with_the_engine_tokenizer(tiny_model_dir: Any) -> None:
    from chatstream_asgi import TransformersEngine

    engine = TransformersEngine.from_pretrained(str(tiny_model_dir), max_batch_size=1)
    app = build_middleware(engine, max_input_tokens=8)
    text = "The quick brown fox jumps over the lazy dog. " * 3
    tokens = len(engine.tokenizer.encode(text, add_special_tokens=False))
    assert tokens > 8
    send = await chat(app, text)
    assert send.status == 400 and f"has {tokens} tokens; the limit is 8" in send.json()["error"]["message"]
    assert app.admission.running == 0 and engine.stats.running == 0
    short = await chat(app, "Hello", max_new_tokens=4, hang_guard=30)
    assert short.status == 200 and short.complete
    await engine.close()


async def test_a_session_in_use_gets_its_cookie_signed_again_past_half_its_lifetime() -> None:
    # signed once, a session in daily use ended cookie_max_age (14 days) after its first visit
    import time

    from chatstream_asgi.sessions.cookie import SessionCookie

    app, _ = build()
    sessions = app.routes.sessions

    def session_of(cookie: str) -> str | None:  # cookie: "name=value", as the Cookie header carries it
        return sessions.session_id_from_headers([(b"cookie", cookie.encode())])

    fresh = cookie_of(await call(app, "POST", "/chat_stream"))
    assert (await call(app, "POST", "/chat_stream", cookie=fresh)).header("set-cookie") is None
    session_id = session_of(fresh)
    assert session_id is not None
    ten_days_ago = SessionCookie(apps.SECRET, clock=lambda: time.time() - 10 * 24 * 3600)
    old = ten_days_ago.set_cookie_header(session_id)[1].decode().split(";")[0]
    assert session_of(old) == session_id
    renewed = await call(app, "POST", "/chat_stream", cookie=old)
    assert renewed.status == 200 and session_of(cookie_of(renewed)) == session_id  # the same session, signed now
