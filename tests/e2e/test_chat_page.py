"""The built-in chat page, end to end: a real browser, a real uvicorn, the middleware with ``ui_path="/"``.

A slow ``MockEngine`` makes the stream observable: its words arrive 60 ms apart, so the page must show the
reply growing in pieces, and Stop lands mid-stream. What the server says (``/get_load``, the engine's
cancel count) is checked beside what the page shows.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.servers import RecordingEngine, UvicornThread, chat_app, not_found_app

REPLY = (
    "Here is a tiny Python example that prints a greeting, followed by a short explanation of it:\n\n"
    "```python\ndef greet(name):\n    return f\"Hello, {name}!\"\n\nprint(greet(\"world\"))\n```\n\n"
    "The function `greet` builds the text and **print** shows it. Ask me for more examples any time."
)
LONG_REPLY = " ".join(f"word{i}" for i in range(200))
PHONE = {"width": 390, "height": 844}
TIMEOUT_MS = 10_000
# the last reply's text, or "" while it only shows the waiting note ("Sending…", "Queued…")
LAST_REPLY_TEXT = """(() => {
  const reply = [...document.querySelectorAll('.msg.assistant')].pop();
  return !reply || reply.querySelector('.wait') ? '' : reply.innerText;
})()"""


@pytest.fixture
def page_server() -> Iterator[Callable[..., tuple[UvicornThread, RecordingEngine]]]:
    servers: list[UvicornThread] = []

    def start(reply: str = REPLY, delay: float = 0.06, **options: Any) -> tuple[UvicornThread, RecordingEngine]:
        engine = RecordingEngine(reply, token_delay=delay)
        app = chat_app(not_found_app, engine, ui_path="/", **options)
        hooks = app.routes.hooks
        real_stop = hooks.stop
        engine.stops = []  # type: ignore[attr-defined]  # what each /stop_generation found, for failure messages

        def recording_stop(session_id: str) -> bool:
            engine.stops.append((session_id, list(hooks.stops), real_stop(session_id)))  # type: ignore[attr-defined]
            return engine.stops[-1][-1]  # type: ignore[attr-defined, no-any-return]

        hooks.stop = recording_stop  # type: ignore[method-assign]
        server = UvicornThread(app)
        server.start()
        servers.append(server)
        return server, engine

    yield start
    for server in servers:
        server.stop()


def load(server: UvicornThread) -> dict[str, Any]:
    data: dict[str, Any] = httpx.get(f"{server.url}/get_load").json()
    return data


def wait_for(condition: Callable[[], Any], timeout: float = 5.0) -> None:
    """Poll from Python: the page's Content-Security-Policy forbids the eval behind ``page.wait_for_function``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.02)


def send_message(page: Any, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def watch_reply_grow(page: Any) -> list[str]:
    """The last assistant bubble's text, sampled until it stops streaming."""
    seen: list[str] = []
    page.wait_for_selector(".msg.assistant.streaming", timeout=TIMEOUT_MS)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = page.evaluate(LAST_REPLY_TEXT)
        if text and (not seen or seen[-1] != text):
            seen.append(text)
        if page.locator(".msg.assistant.streaming").count() == 0:
            final = page.evaluate(LAST_REPLY_TEXT)  # the end may have landed between the sample and this check
            return seen if not final or (seen and seen[-1] == final) else [*seen, final]
        time.sleep(0.02)
    raise AssertionError("the reply never finished streaming")


def test_reply_streams_in_pieces_renders_code_and_survives_reload(
    browser: Any, page_server: Any, artifacts: Path
) -> None:
    server, _ = page_server()
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    page = context.new_page()
    page.goto(server.url + "/")
    send_message(page, "Show me a Python example")
    seen = watch_reply_grow(page)
    assert len(seen) >= 5, f"the reply did not arrive in pieces: {seen}"
    assert all(len(a) <= len(b) for a, b in zip(seen, seen[1:], strict=False))
    assert page.locator(".msg.user").last.inner_text() == "Show me a Python example"
    code = page.locator(".msg.assistant pre code").inner_text()
    assert 'return f"Hello, {name}!"' in code and "```" not in page.locator(".msg.assistant").inner_text()
    assert page.locator(".msg.assistant strong").inner_text() == "print"
    page.screenshot(path=str(artifacts / "chat-desktop.png"), full_page=True)

    page.reload()
    page.wait_for_selector(".msg.assistant", timeout=TIMEOUT_MS)
    assert page.locator(".msg.user").inner_text() == "Show me a Python example"
    assert "print(greet(\"world\"))" in page.locator(".msg.assistant pre code").inner_text()

    phone = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True, device_scale_factor=2)
    phone.add_cookies(context.cookies())
    phone_page = phone.new_page()
    phone_page.goto(server.url + "/")
    phone_page.wait_for_selector(".msg.assistant pre", timeout=TIMEOUT_MS)
    width = phone_page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"the page scrolls sideways on a phone ({width} px)"
    assert phone_page.locator("#send").is_visible() and phone_page.locator("#input").is_visible()
    phone_page.screenshot(path=str(artifacts / "chat-phone.png"))
    phone.close()
    context.close()


def test_stop_frees_the_slot_then_regenerate_and_clear(browser: Any, page_server: Any, artifacts: Path) -> None:
    server, engine = page_server(LONG_REPLY, delay=0.05)
    context = browser.new_context()
    page = context.new_page()
    page.goto(server.url + "/")
    send_message(page, "Count for me")
    wait_for(lambda: "word5" in page.locator(".msg.assistant").inner_text())
    assert load(server)["running"] == 1
    with page.expect_request("**/stop_generation"):  # the page also asks the server to stop, not only aborts
        page.click("#stop")
    try:
        wait_for(lambda: load(server)["running"] == 0 and engine.cancelled == 1)
    except AssertionError as error:
        raise AssertionError(f"Stop did not stop: {load(server)}; stop calls: {engine.stops}") from error
    page.wait_for_selector("text=(stopped)", timeout=TIMEOUT_MS)
    stopped = page.locator(".msg.assistant").inner_text()
    assert "word199" not in stopped
    assert page.locator("#send").is_visible() and not page.locator("#stop").is_visible()

    engine.token_delay = 0.005  # the regenerated reply need not be watched word by word
    page.click("#regenerate")
    page.wait_for_selector(".msg.assistant.streaming", timeout=TIMEOUT_MS)
    assert page.locator(".msg.assistant").count() == 1  # the stopped reply was replaced, not kept beside
    page.wait_for_selector(".msg.assistant:not(.streaming)", timeout=30_000)
    assert "word199" in page.locator(".msg.assistant").inner_text()
    assert engine.inputs == ["Count for me", "Count for me"]

    page.click("#clear")
    page.wait_for_selector(".empty", timeout=TIMEOUT_MS)
    messages = page.evaluate("fetch('/get_prompt').then((r) => r.json()).then((d) => d.messages)")
    assert messages == []
    context.close()


def test_queued_request_shows_its_place_then_streams(browser: Any, page_server: Any, artifacts: Path) -> None:
    server, _ = page_server(LONG_REPLY, delay=0.05, max_concurrency=1, max_queue=2)
    holding = threading.Event()
    release = threading.Event()

    def hold_the_only_slot() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            with client.stream("POST", "/chat_stream", json={"user_input": "hold"}) as response:
                for _ in response.iter_raw():
                    holding.set()
                    if release.is_set():
                        return  # leaving closes the connection: the server frees the slot

    holder = threading.Thread(target=hold_the_only_slot, daemon=True)
    holder.start()
    assert holding.wait(10)
    context = browser.new_context()
    page = context.new_page()
    page.goto(server.url + "/")
    send_message(page, "Am I queued?")
    page.wait_for_selector("#status.queued", timeout=TIMEOUT_MS)
    # before its answer starts the page cannot know its own place: it says how many wait (it said "position N of N")
    assert "Queued: 1 waiting for a slot, 1 generating" in page.locator("#status").inner_text()
    assert "Queued: 1 waiting" in page.locator(".msg.assistant .wait").inner_text()
    page.screenshot(path=str(artifacts / "chat-queued.png"))
    release.set()
    holder.join(10)
    page.wait_for_selector(".msg.assistant.streaming", timeout=TIMEOUT_MS)
    wait_for(lambda: "word3" in page.locator(".msg.assistant").inner_text())
    assert "waited in queue" in page.locator("#status").inner_text()
    page.wait_for_selector(".msg.assistant:not(.streaming)", timeout=30_000)
    assert "word199" in page.locator(".msg.assistant").inner_text()
    wait_for(lambda: load(server)["running"] == 0)
    context.close()


QUICK_DOWN_THEN_UP = """(() => {
  const bar = [...document.querySelectorAll('.feedback')].pop();
  bar.querySelector('[aria-label="Bad reply"]').click();
  bar.querySelector('[aria-label="Good reply"]').click();
})()"""


def feedback_buttons(page: Any) -> tuple[Any, Any]:
    """The last reply's thumbs-up and thumbs-down, found by their accessible names."""
    bar = page.get_by_role("group", name="Rate this reply").last
    return bar.get_by_role("button", name="Good reply"), bar.get_by_role("button", name="Bad reply")


def feedback_recorder() -> tuple[list[tuple[str, dict[str, Any]]], Callable[[str, dict[str, Any]], None]]:
    """An ``on_feedback`` hook and the ``(session_id, feedback)`` pairs it received."""
    received: list[tuple[str, dict[str, Any]]] = []
    return received, lambda session_id, feedback: received.append((session_id, feedback))


def wait_for_feedback(page: Any, received: list[Any], count: int) -> None:
    """Until the server took ``count`` ratings and the page has no request of its own left to send."""
    wait_for(lambda: len(received) == count and page.locator(".feedback[aria-busy]").count() == 0)


def pressed(up: Any, down: Any) -> tuple[str | None, str | None]:
    return up.get_attribute("aria-pressed"), down.get_attribute("aria-pressed")


def test_feedback_rates_the_reply_by_its_id_changes_and_after_a_reload_by_its_turn(
    browser: Any, page_server: Any, artifacts: Path
) -> None:
    received, on_feedback = feedback_recorder()
    server, _ = page_server(REPLY, delay=0.02, on_feedback=on_feedback)
    extras = server.config.app.routes.hooks.extras
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    page = context.new_page()
    page.goto(server.url + "/")
    with page.expect_response("**/chat_stream") as streamed:
        send_message(page, "Show me a Python example")
    reply_id = streamed.value.headers["x-chatstream-last-generated-message-id"]
    assert page.evaluate("!!document.querySelector('.msg.streaming') && !document.querySelector('.feedback')")
    page.wait_for_selector(".msg.assistant:not(.streaming)", timeout=TIMEOUT_MS)
    up, down = feedback_buttons(page)
    assert pressed(up, down) == ("false", "false")

    up.click()
    wait_for_feedback(page, received, 1)
    session_id, feedback = received[0]
    assert (feedback["rating"], feedback["message_id"], feedback["reply_index"]) == ("up", reply_id, 0)
    assert (feedback["reply"], feedback["user_input"]) == (REPLY, "Show me a Python example")
    assert extras.reply_number(session_id, reply_id) == 0
    assert pressed(up, down) == ("true", "false")
    down.click()  # a change of mind replaces the rating
    wait_for_feedback(page, received, 2)
    assert (received[1][0], received[1][1]["rating"], received[1][1]["message_id"]) == (session_id, "down", reply_id)
    assert {index: f["rating"] for index, f in extras.feedback(session_id).items()} == {0: "down"}
    assert pressed(up, down) == ("false", "true")
    page.screenshot(path=str(artifacts / "chat-feedback-desktop.png"), full_page=True)

    page.reload()  # the page no longer knows the reply's id: it rates the reply by its turn
    page.wait_for_selector(".feedback", timeout=TIMEOUT_MS)
    up, down = feedback_buttons(page)
    assert pressed(up, down) == ("false", "true")  # the rating came back from GET /get_feedback
    with page.expect_request("**/set_feedback") as posted:
        up.click()
    assert posted.value.post_data_json == {"turn": 0, "rating": "up"}
    wait_for_feedback(page, received, 3)
    assert (received[2][0], received[2][1]["rating"], received[2][1]["reply_index"]) == (session_id, "up", 0)
    assert received[2][1]["message_id"] == reply_id and pressed(up, down) == ("true", "false")  # by turn, its id
    page.evaluate(QUICK_DOWN_THEN_UP)  # the second click comes while the first is sent: it waits its turn
    wait_for_feedback(page, received, 5)
    assert [f["rating"] for _, f in received[3:]] == ["down", "up"] and pressed(up, down) == ("true", "false")
    assert extras.feedback(session_id)[0]["rating"] == "up"

    phone = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True, device_scale_factor=2)
    phone.add_cookies(context.cookies())
    phone_page = phone.new_page()
    phone_page.goto(server.url + "/")
    phone_page.wait_for_selector(".feedback", timeout=TIMEOUT_MS)
    up, down = feedback_buttons(phone_page)
    assert pressed(up, down) == ("true", "false")
    for button in (up, down):
        box = button.bounding_box()
        assert box["width"] >= 40 and box["height"] >= 40, f"a feedback button is too small to tap: {box}"
    width = phone_page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"the page scrolls sideways on a phone ({width} px)"
    down.tap()
    wait_for_feedback(phone_page, received, 6)
    assert received[5][1]["rating"] == "down" and pressed(up, down) == ("false", "true")

    # the history is cleared behind the page's back: the server refuses, the page says so and keeps the old state
    httpx.post(f"{server.url}/clear_context", cookies={c["name"]: c["value"] for c in context.cookies()})
    up.tap()
    phone_page.wait_for_selector(".feedback-note:has-text('Feedback not saved')", timeout=TIMEOUT_MS)
    assert "400" in phone_page.locator(".feedback-note").inner_text()
    assert pressed(up, down) == ("false", "true") and len(received) == 6
    phone_page.screenshot(path=str(artifacts / "chat-feedback-phone.png"), full_page=True)
    phone.close()
    context.close()


def test_feedback_buttons_only_under_replies_the_server_kept(browser: Any, page_server: Any, artifacts: Path) -> None:
    received, on_feedback = feedback_recorder()
    server, engine = page_server(LONG_REPLY, delay=0.05, on_feedback=on_feedback)
    context = browser.new_context()
    page = context.new_page()
    page.goto(server.url + "/")
    send_message(page, "Count for me")  # a stopped reply is kept as far as it was sent, so it can be rated
    wait_for(lambda: "word3" in page.locator(".msg.assistant").inner_text())
    page.click("#stop")
    page.wait_for_selector("text=(stopped)", timeout=TIMEOUT_MS)
    wait_for(lambda: load(server)["running"] == 0)
    feedback_buttons(page)[0].click()
    wait_for_feedback(page, received, 1)
    kept = received[0][1]
    assert kept["reply_index"] == 0 and kept["reply"].startswith("word0 word1 word2 word3")
    assert "word199" not in kept["reply"]

    engine.token_delay, engine.fail_after = 0.005, 3  # an engine failure mid-reply: the server keeps nothing
    send_message(page, "Fail, please")
    failed = page.locator(".msg.assistant").nth(1)
    wait_for(lambda: page.locator(".msg.assistant").count() == 2 and "(failed)" in failed.inner_text())
    assert "word2" in failed.inner_text() and "[error:" not in failed.inner_text()  # the error line is no reply
    assert "mock failure" in page.locator("#status.error").inner_text()
    assert "not kept" in failed.inner_text() and page.input_value("#input") == "Fail, please"  # to send again

    engine.token_delay, engine.fail_after = 5.0, None  # stopped before its first word: nothing to keep
    send_message(page, "Too slow")
    wait_for(lambda: load(server)["running"] == 1)
    page.click("#stop")
    wait_for(lambda: page.locator("text=(stopped)").count() == 2 and load(server)["running"] == 0)
    assert page.locator(".feedback").count() == 1  # only under the first reply
    page.screenshot(path=str(artifacts / "chat-feedback-kept.png"), full_page=True)
    messages = page.evaluate("fetch('/get_prompt').then((r) => r.json()).then((d) => d.messages)")
    assert [m["role"] for m in messages] == ["user", "assistant"] and messages[1]["content"] == kept["reply"]
    # the page's own history is the server's: the turns the server did not keep are not in it, and the stopped
    # reply has the words the server sent just before Stop too (the page asks for them once the turn is over)
    assert page.evaluate("history.map((m) => m.content)") == [m["content"] for m in messages]
    assert page.locator(".msg.assistant").first.inner_text().startswith(kept["reply"].strip())

    engine.token_delay = 5.0  # a regenerate stopped before its first word: the reply it was to replace stays
    page.click("#regenerate")
    wait_for(lambda: load(server)["running"] == 1)
    page.click("#stop")
    wait_for(lambda: load(server)["running"] == 0 and page.locator(".msg.assistant").count() == 1)
    assert page.locator(".msg.assistant").inner_text().startswith("word0 word1 word2 word3")
    assert page.evaluate("history.map((m) => m.content)") == [m["content"] for m in messages]
    assert page.locator(".feedback").count() == 1  # the kept reply can still be rated
    context.close()


def test_a_reply_cut_by_the_deadline_is_kept_and_rated_like_the_server_keeps_it(browser: Any, page_server: Any) -> None:
    received, on_feedback = feedback_recorder()
    server, _ = page_server(LONG_REPLY, delay=0.05, generation_timeout=0.6, on_feedback=on_feedback)
    context = browser.new_context()
    page = context.new_page()
    page.goto(server.url + "/")
    send_message(page, "Count slowly")
    reply = page.locator(".msg.assistant")
    wait_for(lambda: "(failed)" in reply.inner_text(), timeout=10)
    assert "generation deadline" in page.locator("#status.error").inner_text()
    assert "not kept" not in reply.inner_text() and page.input_value("#input") == ""
    messages = page.evaluate("fetch('/get_prompt').then((r) => r.json()).then((d) => d.messages)")
    assert messages[-1]["role"] == "assistant" and messages[-1]["content"].startswith("word0 word1")
    assert page.evaluate("history.map((m) => m.content)") == [m["content"] for m in messages]
    feedback_buttons(page)[0].click()
    wait_for_feedback(page, received, 1)
    assert received[0][1]["rating"] == "up" and received[0][1]["reply"] == messages[-1]["content"]
    context.close()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_page_of_the_chatstream_facade_streams_deltas_though_its_wire_is_cumulative(
    browser: Any, serve: Callable[..., UvicornThread]
) -> None:
    from fastapi import FastAPI

    from chatstream_asgi.compat import ChatStream
    from chatstream_asgi.compat.facade import MOCK_REPLY

    chat_stream = ChatStream(use_mock_response=True, secret_key="k" * 32)  # wire="chatstream-0.3" by default
    app = FastAPI()
    chat_stream.append_apis(app, {"all": True})  # the page at "/" with ChatStream's routes
    server = serve(app)
    page = browser.new_context().new_page()
    page.goto(server.url + "/")
    send_message(page, "hello")
    seen = watch_reply_grow(page)
    assert len(seen) >= 3 and seen[-1] == MOCK_REPLY.strip()  # never "reply<::EOS::>reply more<::EOS::>..."
    assert all(MOCK_REPLY.startswith(text) for text in seen)
    # a ChatStream 0.3 client that names no wire still gets the cumulative format
    old_client = httpx.post(f"{server.url}/chat_stream", json={"user_input": "hi"}, timeout=30)
    assert old_client.text.endswith(MOCK_REPLY + "<::EOS::>")


MODEL_TEXT = "Use `a**b` for power and **bold** text. Run ```pip install foo``` now.\n\n[error: engine_error] boom\n"


def test_model_text_renders_as_written_and_an_error_like_last_line_is_not_a_failure(
    browser: Any, page_server: Any
) -> None:
    # the page read the plain-text wire, where a reply ending like the server's error line read as a failure;
    # and bold inside a code span, or ``` inside a line, broke the rendering
    server, _ = page_server(MODEL_TEXT, delay=0.005)
    context = browser.new_context()
    page = context.new_page()
    page.goto(server.url + "/")
    page.click("#input")
    page.fill("#input", "Show me")
    page.click("#send")
    page.wait_for_selector(".msg.assistant:not(.streaming)", timeout=TIMEOUT_MS)
    reply = page.locator(".msg.assistant")
    assert reply.locator("code").all_inner_texts() == ["a**b", "pip install foo"]
    assert reply.locator("strong").all_inner_texts() == ["bold"] and reply.locator("pre").count() == 0
    assert "[error: engine_error] boom" in reply.inner_text() and "not kept" not in reply.inner_text()
    assert page.locator("#status").inner_text() == ""
    assert page.evaluate("document.activeElement.id") == "input"  # Send was hidden under the focus: back to the input
    context.close()


def test_clear_refused_keeps_the_chat_and_says_why(browser: Any, page_server: Any) -> None:
    server, engine = page_server(LONG_REPLY, delay=0.002)
    context = browser.new_context()
    first, second = context.new_page(), context.new_page()  # two tabs of one session
    first.goto(server.url + "/")
    send_message(first, "A first question")
    first.wait_for_selector(".msg.assistant:not(.streaming)", timeout=TIMEOUT_MS)
    engine.token_delay = 0.05
    send_message(first, "Count for me")
    wait_for(lambda: "word3" in first.locator(".msg.assistant").last.inner_text())
    second.goto(server.url + "/")
    second.wait_for_selector(".msg.user", timeout=TIMEOUT_MS)  # the first turn, from the server
    second.click("#clear")  # the first tab's reply still streams: the server answers 409
    second.wait_for_selector("#status.error", timeout=TIMEOUT_MS)
    assert second.locator("#status").inner_text().startswith("Not cleared: 409")
    assert second.locator(".msg.user").count() == 1  # it was said "Cleared." and emptied, while the server kept all
    first.click("#stop")
    wait_for(lambda: load(server)["running"] == 0)
    context.close()


def test_a_reader_who_scrolls_up_mid_reply_stays_there(browser: Any, page_server: Any) -> None:
    reply = "\n\n".join(f"Paragraph {i} here." for i in range(80))  # 240 words: under max_new_tokens' 256
    server, _ = page_server(reply, delay=0.02)
    context = browser.new_context(viewport={"width": 800, "height": 600})
    page = context.new_page()
    page.goto(server.url + "/")
    send_message(page, "Write a lot")
    wait_for(lambda: "Paragraph 30" in page.locator(".msg.assistant").inner_text(), timeout=30)
    assert page.evaluate("document.getElementById('scroller').scrollTop") > 300  # it followed the reply down
    page.evaluate("document.getElementById('scroller').scrollTop = 0")
    time.sleep(0.5)  # about 30 frames of repaints while it streams on
    assert page.locator(".msg.assistant.streaming").count() == 1, "the reply ended before the check"
    assert page.evaluate("document.getElementById('scroller').scrollTop") == 0  # it jumped back to the bottom
    page.wait_for_selector(".msg.assistant:not(.streaming)", timeout=60_000)
    context.close()


class CuttingProxy:
    """A TCP relay in front of the server; ``cut()`` drops every open connection (a network failure), new ones
    still go through."""

    def __init__(self, port: int) -> None:
        self.target = ("127.0.0.1", port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open: list[socket.socket] = []  # the connections a cut() drops
        self.every: list[socket.socket] = []  # every socket it made, closed at the end
        self.accepting = threading.Thread(target=self.accept, daemon=True)
        self.accepting.start()

    def accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.open += [client, upstream]
            self.every += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self.relay, args=(source, sink), daemon=True).start()

    @staticmethod
    def relay(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)
        source.close()  # read to its end: each socket is one relay's source, so each is closed once its peer is done

    def cut(self) -> None:
        for sock in self.open:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the relay blocked on it; mid-body, the browser sees it fail
                sock.close()
        self.open = []

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked on it (a close alone does not)
        self.listener.close()
        self.accepting.join(5)
        self.open = self.every
        self.cut()


def test_a_connection_lost_mid_reply_keeps_what_the_server_kept(browser: Any, page_server: Any) -> None:
    # the page dimmed the reply as "not kept" and put the question back, though the server keeps a reply as far as
    # it sent it: resending doubled the turn
    server, _ = page_server(LONG_REPLY, delay=0.05)
    proxy = CuttingProxy(server.port)
    context = browser.new_context()
    page = context.new_page()
    try:
        page.goto(f"http://127.0.0.1:{proxy.port}/")
        send_message(page, "Count for me")
        wait_for(lambda: "word5" in page.locator(".msg.assistant").inner_text())
        proxy.cut()
        page.wait_for_selector("text=(connection lost)", timeout=TIMEOUT_MS)
        assert page.locator("#input").input_value() == ""  # not put back to be sent twice
        wait_for(lambda: load(server)["running"] == 0)
        kept = httpx.get(f"{server.url}/get_prompt", cookies=dict(c for c in cookie_pairs(context))).json()["messages"]
        assert [m["role"] for m in kept] == ["user", "assistant"] and kept[1]["content"].startswith("word0 word1")
        # a second later the page shows what the server kept, as after a reload
        wait_for(lambda: page.locator(".msg.assistant").inner_text().strip() == kept[1]["content"].strip())
        assert page.locator(".unkept").count() == 0
    finally:
        context.close()
        proxy.close()


def cookie_pairs(context: Any) -> list[tuple[str, str]]:
    return [(cookie["name"], cookie["value"]) for cookie in context.cookies()]
