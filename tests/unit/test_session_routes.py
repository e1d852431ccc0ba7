"""ChatStream's other routes and hooks on the middleware, driven as a raw ASGI app: generation params per session,
feedback, resource usage, stop, the finish callback, the request interceptor, the 0.3 wire format, the chat page."""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

import pytest

from chatstream_asgi.errors import ConfigurationError, HTTPError
from chatstream_asgi.http.hooks import call_hook
from chatstream_asgi.sessions.history import MemoryHistoryStore
from chatstream_asgi.sessions.state import SessionStateStore

from .apps import REPLY, Chat, CountingEngine, assert_json_error, build_middleware, session_cookie
from .asgi_fakes import HANG_GUARD_SECONDS, RecordingSend, ScriptedReceive, wait_until, with_hang_guard

MARKER = b"<::EOS::>"


# --- generation params ------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_generation_params_are_per_session_defaults(make_chat: Callable[..., Chat]) -> None:
    seen: list[Any] = []

    class ParamsEngine(CountingEngine):
        def stream(self, messages: Any, params: Any) -> Any:
            seen.append(params)
            return super().stream(messages, params)

    chat = make_chat(ParamsEngine(REPLY))
    send = await chat.request("POST", "/set_generation_params", {"temperature": 0.2, "top_k_value": 5})
    assert send.status == 200
    cookie = session_cookie(send)
    params = send.json()["generation_params"]
    assert (params["temperature"], params["top_k"], params["top_p"]) == (0.2, 5, 0.9)
    assert send.json()["overrides"] == {"temperature": 0.2, "top_k": 5}

    await chat.turn("hi", cookie=cookie)
    await chat.turn("hi again", cookie=cookie, temperature=1.5)  # the request still wins over the session
    await chat.turn("someone else")
    assert [(p.temperature, p.top_k) for p in seen] == [(0.2, 5), (1.5, 5), (0.7, 50)]

    got = await chat.request("GET", "/get_generation_params", cookie=cookie)
    assert got.json()["generation_params"]["temperature"] == 0.2
    reset = await chat.request("POST", "/set_generation_params", {"reset": True, "top_p": 0.5}, cookie=cookie)
    assert reset.json()["overrides"] == {"top_p": 0.5} and reset.header("set-cookie") is None
    fresh = await chat.request("GET", "/get_generation_params")
    assert fresh.json()["overrides"] == {} and fresh.json()["generation_params"]["temperature"] == 0.7


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("payload", "word"),
    [
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k_value": -2}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"bogus": 1}, "bogus"),
        ({"reset": "yes"}, "reset"),
        ([1, 2], "object"),
    ],
)
async def test_bad_generation_params_get_a_clear_400(make_chat: Callable[..., Chat], payload: Any, word: str) -> None:
    send = await make_chat().request("POST", "/set_generation_params", payload)
    assert word in assert_json_error(send, 400, "invalid_request")["message"]


@pytest.mark.asyncio
async def test_set_generation_params_wants_json_and_post(make_chat: Callable[..., Chat]) -> None:
    chat = make_chat()
    assert_json_error(await chat.request("POST", "/set_generation_params", headers=[]), 415, "unsupported_media_type")
    assert_json_error(await chat.request("GET", "/set_generation_params"), 405, "method_not_allowed")


# --- feedback ---------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_feedback_by_message_id_or_turn_reaches_the_hook_and_is_kept(make_chat: Callable[..., Chat]) -> None:
    received: list[tuple[str, dict[str, Any]]] = []

    async def on_feedback(session_id: str, feedback: dict[str, Any]) -> None:
        received.append((session_id, feedback))

    chat = make_chat(on_feedback=on_feedback)
    first = await chat.turn("first question")
    cookie = session_cookie(first)
    message_id = first.header("x-chatstream-last-generated-message-id")
    assert message_id and first.header("x-request-id") == message_id
    await chat.turn("second question", cookie=cookie)

    send = await chat.request("POST", "/set_feedback", {"message_id": message_id, "is_like": False}, cookie=cookie)
    assert send.status == 200 and send.json()["reply_index"] == 0
    send = await chat.request("POST", "/set_feedback", {"turn": -1, "rating": "up", "text": "great"}, cookie=cookie)
    assert send.json()["reply_index"] == 1
    assert [(f["rating"], f["user_input"], f["reply"], f["text"]) for _, f in received] == [
        ("down", "first question", REPLY, ""),
        ("up", "second question", REPLY, "great"),
    ]
    session_id = received[0][0]
    assert set(chat.middleware.routes.hooks.extras.feedback(session_id)) == {0, 1}

    await chat.request("POST", "/clear_context", cookie=cookie)
    assert chat.middleware.routes.hooks.extras.feedback(session_id) == {}
    gone = await chat.request("POST", "/set_feedback", {"message_id": message_id, "rating": "up"}, cookie=cookie)
    assert_json_error(gone, 404, "unknown_reply")


@pytest.mark.asyncio
async def test_get_feedback_lists_one_entry_per_reply_and_forgets_a_regenerated_one(
    make_chat: Callable[..., Chat],
) -> None:
    chat = make_chat()
    assert (await chat.request("GET", "/get_feedback")).json() == {"success": True, "feedback": []}
    first = await chat.turn("first question")
    cookie = session_cookie(first)
    message_id = first.header("x-chatstream-last-generated-message-id")
    await chat.turn("second question", cookie=cookie)
    third_id = (await chat.turn("third question", cookie=cookie)).header("x-chatstream-last-generated-message-id")
    await chat.request("POST", "/set_feedback", {"message_id": message_id, "rating": "up"}, cookie=cookie)
    await chat.request("POST", "/set_feedback", {"turn": 2, "rating": "up", "text": "nice"}, cookie=cookie)
    await chat.request("POST", "/set_feedback", {"turn": 2, "rating": "down"}, cookie=cookie)  # a change of mind
    send = await chat.request("GET", "/get_feedback", cookie=cookie)
    assert send.status == 200
    assert send.json()["feedback"] == [
        {"rating": "up", "text": "", "message_id": message_id},
        None,
        # named by its turn, it is still that reply's id; the rating alone (as the chat page sends it) kept the text
        {"rating": "down", "text": "nice", "message_id": third_id},
    ]
    await chat.request("POST", "/set_feedback", {"turn": 2, "rating": "down", "text": ""}, cookie=cookie)
    assert (await chat.request("GET", "/get_feedback", cookie=cookie)).json()["feedback"][2]["text"] == ""
    await chat.turn(cookie=cookie, regenerate=True)  # a new third reply: the feedback on the old one is gone
    assert (await chat.request("GET", "/get_feedback", cookie=cookie)).json()["feedback"][1:] == [None, None]
    await chat.request("POST", "/clear_context", cookie=cookie)
    assert (await chat.request("GET", "/get_feedback", cookie=cookie)).json()["feedback"] == []


@pytest.mark.asyncio
async def test_feedback_stays_on_its_reply_when_the_store_trims_old_turns(make_chat: Callable[..., Chat]) -> None:
    chat = make_chat(store=MemoryHistoryStore(max_turns=2))
    cookie, ids = None, []
    for number in range(5):
        send = await chat.turn(f"question {number}", cookie=cookie)
        cookie = cookie or session_cookie(send)
        ids.append(send.header("x-chatstream-last-generated-message-id"))
        rated = await chat.request("POST", "/set_feedback", {"message_id": ids[-1], "rating": "up"}, cookie=cookie)
        assert rated.status == 200, rated.json()  # was 404 from the third turn on: the index ran past the history
    kept = [m["content"] for m in (await chat.request("GET", "/get_prompt", cookie=cookie)).json()["messages"]]
    assert kept[::2] == ["question 3", "question 4"]  # the store keeps 2 pairs (its window moves in steps)
    await chat.request("POST", "/set_feedback", {"turn": 0, "rating": "down"}, cookie=cookie)
    feedback = (await chat.request("GET", "/get_feedback", cookie=cookie)).json()["feedback"]
    assert [(f["rating"], f["message_id"]) for f in feedback] == [("down", ids[3]), ("up", ids[4])]
    gone = await chat.request("POST", "/set_feedback", {"message_id": ids[0], "rating": "up"}, cookie=cookie)
    assert_json_error(gone, 404, "unknown_reply")
    assert "no longer in this session's history" in gone.json()["error"]["message"]
    await chat.turn(cookie=cookie, regenerate=True)  # replaces reply 4: its rating goes, reply 3's stays
    feedback = (await chat.request("GET", "/get_feedback", cookie=cookie)).json()["feedback"]
    assert [f and f["rating"] for f in feedback] == ["down", None]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "payload",
    [
        {"turn": 0},
        {"turn": 0, "rating": "meh"},
        {"rating": "up"},
        {"turn": 0, "message_id": "x", "rating": "up"},
        {"turn": 5, "rating": "up"},
        {"turn": True, "rating": "up"},
        {"turn": 0, "rating": "up", "text": "x" * 5000},
    ],
)
async def test_bad_feedback_gets_a_400(make_chat: Callable[..., Chat], payload: dict[str, Any]) -> None:
    chat = make_chat()
    cookie = session_cookie(await chat.turn())
    assert_json_error(await chat.request("POST", "/set_feedback", payload, cookie=cookie), 400, "invalid_request")


@pytest.mark.asyncio
async def test_feedback_without_a_session_is_404_and_a_failing_hook_is_only_logged(
    make_chat: Callable[..., Chat], caplog: pytest.LogCaptureFixture
) -> None:
    def broken(session_id: str, feedback: dict[str, Any]) -> None:
        raise RuntimeError("boom")

    chat = make_chat(on_feedback=broken)
    assert_json_error(await chat.request("POST", "/set_feedback", {"turn": 0, "rating": "up"}), 404, "unknown_reply")
    cookie = session_cookie(await chat.turn())
    send = await chat.request("POST", "/set_feedback", {"turn": 0, "rating": "up"}, cookie=cookie)
    assert send.status == 200 and "on_feedback callback failed" in caplog.text


# --- hooks ------------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_on_finish_gets_the_turn_and_a_raising_callback_breaks_nothing(
    make_chat: Callable[..., Chat], caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[tuple[str, str, str, dict[str, Any]]] = []

    def on_finish(session_id: str, user_input: str, reply: str, stats: dict[str, Any]) -> None:
        calls.append((session_id, user_input, reply, stats))
        raise RuntimeError("the host's bug")

    chat = make_chat(on_finish=on_finish, max_concurrency=1, max_queue=0)
    for _ in range(3):  # a leaked slot would turn the next turn into a 429
        send = await chat.turn("hello")
        assert send.status == 200 and send.body == REPLY.encode() and send.complete
        await wait_until(lambda: not chat.middleware.routes.hooks.tasks)
    assert [(c[1], c[2], c[3]["outcome"]) for c in calls] == [("hello", REPLY, "completed")] * 3
    assert calls[0][3]["reply_id"] == calls[0][3]["request_id"]
    assert caplog.text.count("on_finish callback failed") == 3
    assert chat.middleware.admission.running == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("ending", ["disconnected", "stopped", "error", "timeout"])
async def test_on_finish_hears_how_a_cut_reply_ended(
    make_chat: Callable[..., Chat], ending: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``stats["outcome"]`` is the request log's: the client leaving, a Stop, an engine failure and the deadline
    were all ``"cut"`` before, so an app could not tell its users' aborts from its model's failures."""
    calls: list[dict[str, Any]] = []

    async def on_finish(session_id: str, user_input: str, reply: str, stats: dict[str, Any]) -> None:
        calls.append({"reply": reply, **stats})

    caplog.set_level(logging.INFO, logger="chatstream_asgi.requests")
    words = " ".join(f"w{i}" for i in range(500))
    engine = CountingEngine(words, token_delay=0.01, fail_after=5 if ending == "error" else None)
    timeout = 0.1 if ending == "timeout" else None
    chat = make_chat(engine, on_finish=on_finish, generation_timeout=timeout)
    cookie = session_cookie(await chat.request("POST", "/set_generation_params", {}))
    turn = chat.start_turn(cookie=cookie)
    await turn.streaming()
    if ending == "disconnected":
        await turn.stop()
    elif ending == "stopped":
        assert (await chat.request("POST", "/stop_generation", cookie=cookie)).json()["stopped"] is True
    await turn.finish()
    await wait_until(lambda: bool(calls))
    assert calls[0]["outcome"] == ending
    # the reply as saved: as far as it was sent, nothing of a failed engine's
    assert calls[0]["reply"] == "" if ending == "error" else calls[0]["reply"].startswith("w0")
    logged = [r.chatstream for r in caplog.records if hasattr(r, "chatstream")]  # the request log says the same
    assert [entry["outcome"] for entry in logged] == [ending]


@pytest.mark.asyncio
async def test_request_interceptor_reads_and_rewrites_the_turn(make_chat: Callable[..., Chat]) -> None:
    seen: list[dict[str, Any]] = []

    async def interceptor(scope: Any, session_id: str, data: dict[str, Any]) -> dict[str, Any] | None:
        seen.append(dict(data))
        if data.get("user_input") == "forbidden":
            raise HTTPError(403, "forbidden", "not allowed here")
        if data.get("user_input") == "shout":
            return {**data, "user_input": "SHOUT"}
        return None

    chat = make_chat(request_interceptor=interceptor)
    cookie = session_cookie(await chat.turn("shout"))
    await chat.turn("calm", cookie=cookie)
    history = await chat.history(cookie)
    assert [m["content"] for m in history if m["role"] == "user"] == ["SHOUT", "calm"]
    assert_json_error(await chat.turn("forbidden"), 403, "forbidden")
    assert [d["user_input"] for d in seen] == ["shout", "calm", "forbidden"]


@pytest.mark.asyncio
async def test_a_crashing_interceptor_is_a_500_not_a_hang(make_chat: Callable[..., Chat]) -> None:
    chat = make_chat(request_interceptor=lambda scope, session_id, data: 1 / 0)
    assert_json_error(await chat.turn(), 500, "interceptor_error")


@pytest.mark.asyncio
async def test_plain_function_hooks_run_off_the_event_loop_so_a_blocking_one_stalls_nothing(
    make_chat: Callable[..., Chat],
) -> None:
    # A sync hook that blocks (a database write, Django's ORM) must not freeze the loop: while the interceptor of
    # one turn sleeps, a /get_load of the same app is answered.
    loop_thread = threading.get_ident()
    hook_threads: dict[str, int] = {}
    release = threading.Event()

    def interceptor(scope: Any, session_id: str, data: dict[str, Any]) -> None:
        hook_threads["interceptor"] = threading.get_ident()
        if data.get("user_input") == "slow":
            release.wait(HANG_GUARD_SECONDS)

    def on_finish(session_id: str, user_input: str, reply: str, stats: dict[str, Any]) -> None:
        hook_threads["on_finish"] = threading.get_ident()

    def on_feedback(session_id: str, feedback: dict[str, Any]) -> None:
        hook_threads["on_feedback"] = threading.get_ident()

    chat = make_chat(request_interceptor=interceptor, on_finish=on_finish, on_feedback=on_feedback)
    slow_turn = asyncio.ensure_future(chat.turn("slow"))
    await wait_until(lambda: "interceptor" in hook_threads)
    load = await chat.request("GET", "/get_load")  # answered while the interceptor still blocks its thread
    assert load.status == 200 and not slow_turn.done()
    release.set()
    send = await slow_turn
    assert send.status == 200 and send.body == REPLY.encode()
    await wait_until(lambda: "on_finish" in hook_threads)
    feedback = await chat.request("POST", "/set_feedback", {"turn": -1, "rating": "up"}, cookie=session_cookie(send))
    assert feedback.status == 200
    assert set(hook_threads) == {"interceptor", "on_finish", "on_feedback"}
    assert loop_thread not in hook_threads.values()


@pytest.mark.asyncio
async def test_call_hook_awaits_every_async_form_and_runs_plain_callables_in_a_thread() -> None:
    loop_thread = threading.get_ident()

    async def doubled(x: int) -> int:
        return 2 * x

    class AsyncCallable:  # an object whose __call__ is async is awaited, not handed to a thread
        async def __call__(self, x: int) -> int:
            return 3 * x

    class PlainCallable:
        def __call__(self, x: int) -> tuple[int, bool]:
            return 4 * x, threading.get_ident() != loop_thread

    assert await call_hook(doubled, 1) == 2
    assert await call_hook(functools.partial(doubled, 2)) == 4
    assert await call_hook(AsyncCallable(), 1) == 3
    assert await call_hook(lambda x: doubled(x), 5) == 10  # a plain function returning a coroutine
    assert await call_hook(PlainCallable(), 1) == (4, True)


def test_hooks_are_checked_at_construction() -> None:
    with pytest.raises(ValueError, match="wire"):
        build_middleware(wire="sse")
    with pytest.raises(ValueError, match="on_finish"):
        build_middleware(on_finish="print")
    with pytest.raises(ConfigurationError, match="clash"):
        build_middleware(ui_path="/get_load")


# --- wire format, stop, resource usage, page ----------------------------------------------------------------


@pytest.mark.asyncio
async def test_chatstream_03_wire_sends_the_whole_reply_and_the_marker_in_every_chunk(
    make_chat: Callable[..., Chat],
) -> None:
    chat = make_chat(CountingEngine("日本語の 返事 です"), wire="chatstream-0.3")
    send = await chat.turn()
    assert send.body_chunks == [b"\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e\xe3\x81\xae " + MARKER] + [
        ("日本語の 返事 " if i == 1 else "日本語の 返事 です").encode() + MARKER for i in (1, 2)
    ]
    assert "\ufffd" not in send.body.decode("utf-8")
    assert send.header("x-chatstream-last-generated-message-id")
    history = await chat.history(session_cookie(send))
    assert history[-1]["content"] == "日本語の 返事 です"  # the history holds the reply, not the wire format


@pytest.mark.asyncio
async def test_stop_generation_ends_the_sessions_turn_and_frees_the_slot(make_chat: Callable[..., Chat]) -> None:
    chat = make_chat(CountingEngine(" ".join(f"w{i}" for i in range(500)), token_delay=0.01))
    cookie = session_cookie(await chat.request("POST", "/set_generation_params", {}))
    assert (await chat.request("POST", "/stop_generation", cookie=cookie)).json()["stopped"] is False
    turn = chat.start_turn(cookie=cookie)
    await turn.streaming()
    other = await chat.request("POST", "/stop_generation")  # another client cannot stop it
    assert other.json()["stopped"] is False
    stopped = await chat.request("POST", "/stop_generation", cookie=cookie)
    assert stopped.json() == {"success": True, "stopped": True, "ended": True}
    # it answers once the turn is over: the slot is free and the reply saved before the next request
    assert chat.middleware.admission.running == 0 and chat.engine.cancelled == 1
    history = await chat.history(cookie)
    assert history[-1]["role"] == "assistant" and history[-1]["content"].startswith("w0")
    send = await turn.finish()  # the client is still there: its response is completed, not left open
    assert send.complete and history[-1]["content"] == b"".join(send.body_chunks).decode()


@pytest.mark.asyncio
async def test_resource_usage_reports_memory(make_chat: Callable[..., Chat]) -> None:
    send = await make_chat().request("GET", "/get_resource_usage")
    usage = send.json()["memory_usage"][0]
    assert send.status == 200 and usage["cpu"]["total_memory"] > 0 and usage["cpu"]["used_memory"] > 0
    assert usage["num_gpus"] == len(usage["gpus"])


@pytest.mark.asyncio
async def test_chat_page_is_off_by_default_and_served_at_ui_path_with_the_route_paths(
    make_chat: Callable[..., Chat],
) -> None:
    off = make_chat()
    assert (await off.request("GET", "/")).body == b"app"
    chat = make_chat(ui_path="/chat", paths={"get_load": "/load"})
    send = await chat.request("GET", "/chat", root_path="/api")
    page = send.body.decode()
    assert send.status == 200 and send.header("content-type") == "text/html; charset=utf-8"
    assert '"get_load": "/api/load"' in page and '"chat_stream": "/api/chat_stream"' in page
    assert '"set_feedback": "/api/set_feedback"' in page and '"get_feedback": "/api/get_feedback"' in page
    assert "http://" not in page and "https://" not in page  # no CDN: nothing loads from elsewhere
    assert "default-src 'self'" in (send.header("content-security-policy") or "")


def test_session_state_is_bounded_and_expires() -> None:
    now = [0.0]
    store = SessionStateStore(max_sessions=2, ttl=10, clock=lambda: now[0])
    for name in ("a", "b", "c"):
        store.set_params(name, {"temperature": 0.1})
    assert len(store) == 2 and store.get("a") is None
    now[0] = 11
    assert store.get("b") is None and store.params("c") == {}


@pytest.mark.asyncio
async def test_stop_switch_passes_real_messages_through() -> None:
    from chatstream_asgi.http.hooks import TurnStop

    receive = ScriptedReceive([{"type": "http.request", "body": b"x"}], wait_for_disconnect=True)
    switch = TurnStop(receive, RecordingSend())
    switch.armed = True
    assert (await with_hang_guard(switch.receive()))["type"] == "http.request"
    pending = asyncio.ensure_future(switch.receive())
    await asyncio.sleep(0)
    switch.stop()
    assert (await with_hang_guard(pending))["type"] == "http.disconnect"
    assert (await switch.receive())["type"] == "http.disconnect"  # and every receive after the stop


@pytest.mark.asyncio
async def test_a_cancel_that_is_not_the_stop_still_cancels_the_receive() -> None:
    # the stop interrupts a waiting receive by cancelling its task; a cancel from anywhere else (the server
    # ending the request, a drain) must stay a cancel, not turn into a disconnect message
    from chatstream_asgi.http.hooks import TurnStop

    switch = TurnStop(ScriptedReceive([], wait_for_disconnect=True), RecordingSend())
    switch.armed = True
    pending = asyncio.ensure_future(switch.receive())
    await asyncio.sleep(0)
    pending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pending
    assert not switch.stopped.is_set()
