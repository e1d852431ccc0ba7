"""Unit tests for ``ChatStreamMiddleware`` and its routes, driven as a raw ASGI app with ``MockEngine``.

No server and no test client: every request is a scope, a ``ScriptedReceive`` and a ``RecordingSend``
(see ``asgi_fakes``), run through ``Chat`` (see ``apps``). After every test, each middleware built by
``make_chat`` (``conftest.py``) must hold no slot and no queue place, and its mock engine must have no sequence
left running.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from chatstream_asgi import MemoryHistoryStore
from chatstream_asgi.errors import HistoryStoreError

from .apps import REPLY, Chat, CountingEngine, assert_json_error, client_sending, session_cookie
from .asgi_fakes import (
    JSON_HEADERS,
    RecordingSend,
    ScriptedReceive,
    http_scope,
    lifespan_script,
    request_messages,
    wait_until,
    with_hang_guard,
)


@pytest.fixture
def chat(make_chat: Callable[..., Chat]) -> Chat:
    return make_chat()


def slow_engine(tokens: int = 10, delay: float = 0.02, **kwargs: Any) -> CountingEngine:
    return CountingEngine(" ".join(f"w{i}" for i in range(tokens)), token_delay=delay, **kwargs)


def endless_engine() -> CountingEngine:
    """Streams for ten seconds: long enough for any check, ended early by ``RunningTurn.stop()``."""
    return slow_engine(tokens=1000, delay=0.01)


# --- pass-through -----------------------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("path", ["/", "/api/items", "/chat_stream/", "/chat_streamx", "/CHAT_STREAM"])
async def test_other_paths_go_to_the_wrapped_app_unchanged(chat: Chat, path: str) -> None:
    scope = http_scope("POST", path, headers=JSON_HEADERS)
    receive, send = ScriptedReceive(request_messages(b"{}")), RecordingSend()
    await with_hang_guard(chat.middleware(scope, receive, send))
    assert len(chat.app.calls) == 1
    seen_scope, seen_receive, seen_send = chat.app.calls[0]
    assert seen_scope is scope and seen_receive is receive and seen_send is send
    assert send.body == b"app" and chat.engine.stream_calls == 0


@pytest.mark.asyncio
async def test_websocket_on_the_chat_path_goes_to_the_wrapped_app_unchanged(chat: Chat) -> None:
    scope = {"type": "websocket", "path": "/chat_stream", "root_path": "", "headers": []}
    receive, send = ScriptedReceive(), RecordingSend()
    await with_hang_guard(chat.middleware(scope, receive, send))
    assert chat.app.calls == [(scope, receive, send)]


@pytest.mark.asyncio
async def test_lifespan_goes_to_the_app_and_starts_then_closes_the_engine(chat: Chat) -> None:
    app, engine = chat.app, chat.engine
    seen_by_app_at: dict[str, int] = {}
    original_start, original_close = engine.start, engine.close

    async def start() -> None:
        seen_by_app_at["start"] = len(app.lifespan_messages)
        await original_start()

    async def close() -> None:
        seen_by_app_at["close"] = len(app.lifespan_messages)
        await original_close()

    engine.start, engine.close = start, close  # type: ignore[method-assign]
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    receive, send = ScriptedReceive(lifespan_script()), RecordingSend()
    await with_hang_guard(chat.middleware(scope, receive, send))

    seen_scope, _, _ = app.calls[0]
    assert seen_scope is scope  # receive is wrapped to run the engine's lifecycle, send to report a failed shutdown
    assert [m["type"] for m in app.lifespan_messages] == ["lifespan.startup", "lifespan.shutdown"]
    assert [m["type"] for m in send.messages] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    # the engine starts before the app hears of startup and closes before it hears of shutdown
    assert seen_by_app_at == {"start": 0, "close": 1}
    assert not engine.ready and chat.middleware.admission.draining


@pytest.mark.asyncio
async def test_lifespan_shutdown_lets_a_running_stream_finish_before_closing_the_engine(make_chat: Any) -> None:
    chat = make_chat(slow_engine(tokens=5, delay=0.02), drain_timeout=5.0)
    turn = chat.start_turn()
    await turn.streaming()
    lifespan = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    await with_hang_guard(chat.middleware(lifespan, ScriptedReceive(lifespan_script(["shutdown"])), RecordingSend()))
    send = await turn.finish()
    assert chat.engine.lifecycle == ["close with 0 running"]
    assert send.status == 200 and send.complete and send.body == b"w0 w1 w2 w3 w4"
    late = await chat.turn()
    assert_json_error(late, 503, "draining")
    assert (late.header("retry-after") or "").isdigit()


# --- routing and request errors ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_root_path_is_stripped_before_routing(chat: Chat) -> None:
    send = await chat.request("POST", "/chat_stream", {"user_input": "hi"}, root_path="/api")
    assert send.status == 200 and send.body == REPLY.encode()
    other = await chat.request("GET", "/items", root_path="/api")
    assert other.body == b"app"


@pytest.mark.asyncio
async def test_custom_paths_are_served_and_defaults_pass_through(make_chat: Any) -> None:
    chat = make_chat(path="/chat", paths={"get_load": "/load"})
    assert (await chat.request("POST", "/chat", {"user_input": "x"})).status == 200
    assert (await chat.request("GET", "/load")).json()["model"] == "mock"
    assert (await chat.request("POST", "/chat_stream", {"user_input": "x"})).body == b"app"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/chat_stream", "POST"),
        ("PUT", "/clear_context", "POST"),
        ("POST", "/get_load", "GET, HEAD"),
        ("PUT", "/healthz", "GET, HEAD"),
    ],
)
async def test_wrong_method_is_405_with_allow(chat: Chat, method: str, path: str, allow: str) -> None:
    send = await chat.request(method, path)
    assert_json_error(send, 405, "method_not_allowed")
    assert send.header("allow") == allow
    assert chat.app.calls == []


@pytest.mark.asyncio
@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/get_load", "/"])
async def test_head_on_a_get_route_answers_its_headers_without_the_body(make_chat: Any, path: str) -> None:
    # uptime monitors probe with HEAD; it was a 405, which they read as the service being down
    chat = make_chat(ui_path="/")
    await chat.middleware.startup()
    got, head = await chat.request("GET", path), await chat.request("HEAD", path)
    assert head.status == got.status and head.body == b"" and got.body
    assert head.header("content-type") == got.header("content-type")
    assert head.header("content-length") == got.header("content-length")
    assert chat.app.calls == []
    await chat.middleware.shutdown()


@pytest.mark.asyncio
async def test_the_chat_page_at_the_root_leaves_the_apps_other_methods_on_it_alone(make_chat: Any) -> None:
    chat = make_chat(ui_path="/")
    assert (await chat.request("POST", "/", {"form": 1})).status == 200  # the app's own POST /
    assert len(chat.app.calls) == 1
    assert b"<html" in (await chat.request("GET", "/")).body.lower()
    assert len(chat.app.calls) == 1


@pytest.mark.asyncio
async def test_declared_body_over_the_cap_is_413_without_reading_it(make_chat: Any) -> None:
    chat = make_chat(max_body_bytes=100)
    receive = ScriptedReceive(request_messages(b"x" * 200))
    send = await chat.request(
        "POST", "/chat_stream", headers=[*JSON_HEADERS, (b"content-length", b"200")], receive=receive
    )
    assert_json_error(send, 413, "request_too_large")
    assert receive.calls == 0 and chat.engine.stream_calls == 0


@pytest.mark.asyncio
async def test_streamed_body_over_the_cap_is_413(make_chat: Any) -> None:
    chat = make_chat(max_body_bytes=100)
    receive = ScriptedReceive(request_messages(b"x" * 1000, chunk_size=60))
    send = await chat.request("POST", "/chat_stream", headers=JSON_HEADERS, receive=receive)
    assert_json_error(send, 413, "request_too_large")
    assert receive.calls == 2


@pytest.mark.asyncio
async def test_non_json_content_type_is_415_before_the_body_is_read(chat: Chat) -> None:
    receive = ScriptedReceive(request_messages(b"user_input=hi"))
    send = await chat.request("POST", "/chat_stream", headers=[(b"content-type", b"text/plain")], receive=receive)
    assert_json_error(send, 415, "unsupported_media_type")
    assert receive.calls == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("payload", [b"{not json", {"user_input": ""}, {"user_input": "hi", "temperature": 9}])
async def test_bad_body_is_400_and_sets_no_cookie(chat: Chat, payload: Any) -> None:
    send = await chat.request("POST", "/chat_stream", payload)
    assert_json_error(send, 400, "invalid_request")
    assert send.header("set-cookie") is None and chat.engine.stream_calls == 0


@pytest.mark.asyncio
async def test_client_leaving_while_sending_the_body_gets_no_response(chat: Chat) -> None:
    receive = ScriptedReceive([{"type": "http.request", "body": b"{", "more_body": True}, {"type": "http.disconnect"}])
    send = await chat.request("POST", "/chat_stream", headers=JSON_HEADERS, receive=receive)
    assert send.messages == [] and chat.engine.stream_calls == 0


# --- sessions and history ----------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_new_session_gets_a_cookie_and_a_known_session_does_not(chat: Chat) -> None:
    first = await chat.turn("one")
    assert first.status == 200 and first.body == REPLY.encode()
    assert "HttpOnly" in (first.header("set-cookie") or "")
    cookie = session_cookie(first)
    second = await chat.turn("two", cookie=cookie)
    assert second.status == 200 and second.header("set-cookie") is None
    assert [m["content"] for m in await chat.history(cookie)] == ["one", REPLY, "two", REPLY]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "tamper",
    [
        lambda c: c[:-2] + ("AA" if not c.endswith("AA") else "BB"),
        lambda c: "garbage",
        lambda c: "x" * 5000,
        lambda c: "é€",
    ],
)
async def test_tampered_or_garbage_cookie_starts_a_fresh_session(chat: Chat, tamper: Callable[[str], str]) -> None:
    cookie = session_cookie(await chat.turn("secret"))
    send = await chat.request("POST", "/chat_stream", {"user_input": "fresh"}, cookie=tamper(cookie))
    assert send.status == 200 and send.body == REPLY.encode()
    new_cookie = session_cookie(send)
    assert new_cookie != cookie
    assert [m["content"] for m in await chat.history(new_cookie)] == ["fresh", REPLY]
    assert [m["content"] for m in await chat.history(cookie)] == ["secret", REPLY]


@pytest.mark.asyncio
async def test_history_saves_the_user_turn_and_the_full_reply_after_the_stream(chat: Chat) -> None:
    cookie = session_cookie(await chat.turn("hello"))
    assert await chat.history(cookie) == [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": REPLY},
    ]


@pytest.mark.asyncio
async def test_turn_is_saved_and_session_and_slot_freed_before_the_last_byte(chat: Chat) -> None:
    # a client that has the whole reply may send its next turn at once: it must not get 409 or stale history
    at_last_byte: dict[str, Any] = {}

    async def hook(send: RecordingSend) -> None:
        if send.complete:
            routes = chat.middleware.routes
            at_last_byte["running"] = chat.middleware.admission.running
            at_last_byte["sessions"] = len(routes.active_sessions)
            at_last_byte["saved"] = len(chat.store)

    send = await chat.request("POST", "/chat_stream", {"user_input": "hi"}, send=RecordingSend(hook=hook))
    assert send.body == REPLY.encode()
    assert at_last_byte == {"running": 0, "sessions": 0, "saved": 1}


@pytest.mark.asyncio
async def test_regenerate_replaces_the_last_reply(make_chat: Any) -> None:
    chat = make_chat(CountingEngine(replies=["first reply", "second reply", "third reply"]))
    cookie = session_cookie(await chat.turn("q1"))
    await chat.turn("q2", cookie=cookie)
    send = await chat.request("POST", "/chat_stream", {"regenerate": True}, cookie=cookie)
    assert send.status == 200 and send.body == b"third reply"
    assert [m["content"] for m in await chat.history(cookie)] == ["q1", "first reply", "q2", "third reply"]


@pytest.mark.asyncio
async def test_regenerate_without_history_is_400(chat: Chat) -> None:
    send = await chat.request("POST", "/chat_stream", {"regenerate": True})
    assert_json_error(send, 400, "invalid_request")
    assert chat.engine.stream_calls == 0


@pytest.mark.asyncio
async def test_disconnect_mid_stream_saves_the_reply_as_far_as_it_was_sent(make_chat: Any) -> None:
    chat = make_chat(slow_engine(tokens=10, delay=0.01))
    cookie = session_cookie(await chat.turn("warm up"))
    receive = client_sending({"user_input": "cut me"})

    def hook(send: RecordingSend) -> None:
        if len(send.body_chunks) == 3:
            receive.disconnect()

    send = await chat.request(
        "POST", "/chat_stream", cookie=cookie, headers=JSON_HEADERS, receive=receive, send=RecordingSend(hook=hook)
    )
    assert send.body == b"w0 w1 w2 " and not send.complete
    assert chat.engine.cancelled == 1
    history = await chat.history(cookie)
    assert history[-2:] == [{"role": "user", "content": "cut me"}, {"role": "assistant", "content": "w0 w1 w2 "}]


@pytest.mark.asyncio
async def test_generation_failing_mid_stream_saves_nothing_and_frees_the_slot(make_chat: Any) -> None:
    chat = make_chat(CountingEngine("a b c d", fail_after=2))
    send = await chat.request("POST", "/chat_stream", {"user_input": "hi"}, headers=[(b"accept", b"text/event-stream")])
    assert send.status == 200 and send.complete
    assert [name for name, _ in send.sse_events()] == ["delta", "delta", "error"]
    assert await chat.history(session_cookie(send)) == []
    assert chat.middleware.admission.running == 0


@pytest.mark.asyncio
async def test_generation_failing_before_any_text_is_500_with_the_cookie_and_saves_nothing(make_chat: Any) -> None:
    chat = make_chat(CountingEngine("a b c d", fail_after=0))
    send = await chat.turn()
    assert_json_error(send, 500, "generation_error")
    assert await chat.history(session_cookie(send)) == []


@pytest.mark.asyncio
async def test_generation_timeout_cuts_the_reply_in_band_and_keeps_it_as_far_as_sent(make_chat: Any) -> None:
    chat = make_chat(endless_engine(), generation_timeout=0.1)
    send = await chat.request("POST", "/chat_stream", {"user_input": "hi"}, headers=[(b"accept", b"text/event-stream")])
    events = send.sse_events()
    assert send.status == 200 and send.complete
    assert events[-1] == (
        "error",
        {"error": {"type": "generation_timeout", "message": events[-1][1]["error"]["message"]}},
    )
    sent = "".join(d["text"] for n, d in events if n == "delta")
    assert sent and len(sent.split()) < 1000
    history = await chat.history(session_cookie(send))
    assert history == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": sent}]


@pytest.mark.asyncio
async def test_second_concurrent_turn_of_one_session_is_409(make_chat: Any) -> None:
    chat = make_chat(endless_engine())
    first = chat.start_turn("first")
    await first.streaming()
    cookie = session_cookie(await first.stop())
    running = chat.start_turn("second", cookie=cookie)
    await running.streaming()
    clash = await chat.turn("third", cookie=cookie)
    assert_json_error(clash, 409, "turn_in_progress")
    assert clash.header("retry-after") == "1"  # a client that came back too early may just retry
    cleared = await chat.request("POST", "/clear_context", cookie=cookie)
    assert_json_error(cleared, 409, "turn_in_progress")
    assert (await running.stop()).status == 200
    assert [m["content"] for m in await chat.history(cookie)][::2] == ["first", "second"]


@pytest.mark.asyncio
async def test_clear_context_empties_the_history(chat: Chat) -> None:
    cookie = session_cookie(await chat.turn())
    send = await chat.request("POST", "/clear_context", cookie=cookie)
    assert send.status == 200 and send.json() == {"cleared": True}
    assert await chat.history(cookie) == []


@pytest.mark.asyncio
async def test_get_prompt_without_a_cookie_is_empty_and_sets_no_cookie(make_chat: Any) -> None:
    chat = make_chat(system_prompt="Be brief.")
    send = await chat.request("GET", "/get_prompt")
    assert send.status == 200 and send.header("set-cookie") is None
    body = send.json()
    assert body["messages"] == []
    assert body["prompt"] == "<|system|>\nBe brief.\n<|assistant|>\n"


@pytest.mark.asyncio
async def test_get_load_reports_running_waiting_and_limits(make_chat: Any) -> None:
    chat = make_chat(endless_engine(), max_concurrency=1, max_queue=3)
    turn = chat.start_turn()
    await turn.streaming()
    send = await chat.request("GET", "/get_load")
    assert send.status == 200 and send.header("content-type") == "application/json"
    assert send.json() == {
        "running": 1,
        "waiting": 0,
        "max_concurrency": 1,
        "max_queue": 3,
        "available_slots": 0,
        "draining": False,
        "model": "mock",
    }
    await turn.stop()


@pytest.mark.asyncio
async def test_sse_reply_has_a_request_id_header_matching_the_done_event(chat: Chat) -> None:
    send = await chat.request("POST", "/chat_stream", {"user_input": "hi"}, headers=[(b"accept", b"text/event-stream")])
    events = send.sse_events()
    assert events[-1][0] == "done" and events[-1][1]["finish_reason"] == "stop"
    assert events[-1][1]["request_id"] == send.header("x-request-id")
    assert "".join(d["text"] for n, d in events if n == "delta") == REPLY


# --- admission -------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_queue_full_returns_429_with_a_numeric_retry_after(make_chat: Any) -> None:
    chat = make_chat(endless_engine(), max_concurrency=1, max_queue=0)
    turn = chat.start_turn()
    await turn.streaming()
    send = await chat.turn()
    assert_json_error(send, 429, "queue_full")
    retry_after = send.header("retry-after")
    assert retry_after is not None and retry_after.isdigit() and int(retry_after) >= 1
    assert (await turn.stop()).status == 200
    assert chat.engine.stream_calls == 1


@pytest.mark.asyncio
async def test_queue_wait_timeout_returns_503_with_retry_after(make_chat: Any) -> None:
    chat = make_chat(endless_engine(), max_concurrency=1, max_queue=1, queue_timeout=0.05)
    turn = chat.start_turn()
    await turn.streaming()
    send = await chat.turn()
    assert_json_error(send, 503, "queue_timeout")
    assert (send.header("retry-after") or "").isdigit()
    assert (await turn.stop()).status == 200


@pytest.mark.asyncio
async def test_queued_request_gets_the_slot_when_it_frees(make_chat: Any) -> None:
    chat = make_chat(slow_engine(tokens=3, delay=0.01), max_concurrency=1, max_queue=1)
    first = chat.start_turn()
    await wait_until(lambda: chat.middleware.admission.running == 1)
    second = await chat.turn()
    assert second.status == 200 and second.header("x-queue-position") == "1"
    assert (await first.finish()).status == 200


@pytest.mark.asyncio
async def test_client_leaving_the_queue_frees_its_place_at_once_and_never_takes_a_slot(make_chat: Any) -> None:
    chat = make_chat(endless_engine(), max_concurrency=1, max_queue=2)
    admission = chat.middleware.admission
    first = chat.start_turn()
    await first.streaming()
    queued = chat.start_turn("queued")
    await wait_until(lambda: admission.waiting == 1)
    queued.receive.disconnect()
    for _ in range(5):  # a few loop turns: the queue place is freed without waiting for the running stream
        await asyncio.sleep(0)
    assert (admission.waiting, admission.running) == (0, 1)
    assert (await queued.finish()).messages == []
    assert (await first.stop()).status == 200
    assert chat.engine.stream_calls == 1


@pytest.mark.asyncio
async def test_history_store_failure_on_load_is_503_and_takes_no_slot(make_chat: Any) -> None:
    chat = make_chat(store=FailingStore(fail_load=True))
    send = await chat.turn()
    assert_json_error(send, 503, "history_unavailable")
    assert send.header("retry-after") == "5" and chat.engine.stream_calls == 0


@pytest.mark.asyncio
async def test_history_store_failure_after_the_reply_is_reported_in_band_not_as_a_second_response(
    make_chat: Any,
) -> None:
    chat = make_chat(store=FailingStore(fail_save=True))
    sse = [(b"accept", b"text/event-stream")]
    send = await chat.request("POST", "/chat_stream", {"user_input": "hi"}, headers=sse)  # raises on a 2nd start
    events = send.sse_events()
    assert send.status == 200 and send.complete
    assert "".join(d["text"] for n, d in events if n == "delta") == REPLY
    assert events[-1][0] == "error" and events[-1][1]["error"]["type"] == "history_unavailable"


class FailingStore(MemoryHistoryStore):
    def __init__(self, *, fail_load: bool = False, fail_save: bool = False) -> None:
        super().__init__()
        self.fail_load, self.fail_save = fail_load, fail_save

    async def load(self, session_id: str) -> list[dict[str, str]]:
        if self.fail_load:
            raise HistoryStoreError("store down")
        return await super().load(session_id)

    async def save(self, session_id: str, messages: Any) -> None:
        if self.fail_save:
            raise HistoryStoreError("store down")
        await super().save(session_id, messages)


@pytest.mark.asyncio
async def test_an_app_started_again_after_a_shutdown_admits_chats_again(make_chat: Any) -> None:
    # a TestClient per test on one module-level app: every chat after the first shutdown was 503 draining
    chat = make_chat()
    for _ in range(2):
        await chat.middleware.startup()
        assert (await chat.request("GET", "/readyz")).status == 200
        assert (await chat.turn("hi")).status == 200
        await chat.middleware.shutdown()
        assert (await chat.request("GET", "/readyz")).status == 503
