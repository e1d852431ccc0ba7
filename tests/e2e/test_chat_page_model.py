"""The chat page against a real model: the tiny random Llama of ``tests/tiny_model.py`` loaded through
``from_pretrained`` into a ``TransformersEngine``, a real uvicorn, headless Chromium.

Random weights write gibberish, so these tests check structure, not content: the reply grows on the page in
several steps, the page holds what the server kept, and Stop ends the engine's sequence, not only the fetch.
The tiny model writes ~2000 tokens/s on a CPU, and its 512-token context would end any reply within a quarter of
a second, too soon to press Stop; ``max_position_embeddings`` is raised at load time (a config override that
``from_pretrained`` takes) so a reply can run for seconds.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_chat_page import LAST_REPLY_TEXT, TIMEOUT_MS, load, send_message, wait_for
from tests.integration.servers import UvicornThread, chat_app, not_found_app

CONTEXT = 8192
REPLY_TOKENS = 800  # about half a second of streaming
LONG_TOKENS = 4000  # several seconds: only Stop ends it in time
# Every change to the last reply's bubble, as the page paints it while the reply streams.
RECORD_PAINTS = """(() => {
  window.paints = [];
  new MutationObserver(() => {
    const reply = [...document.querySelectorAll('.msg.assistant')].pop();
    if (reply && !reply.querySelector('.wait')) window.paints.push(reply.textContent);
  }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
})()"""
KEPT_REPLIES = (
    "fetch('/get_prompt').then((r) => r.json()).then((d) => d.messages.filter((m) => m.role === 'assistant'))"
)
PAGE_REPLIES = "history.filter((m) => m.role === 'assistant').map((m) => m.content)"  # the page's own record


@pytest.fixture
def model_server(
    tiny_model_dir: Path, serve: Callable[..., UvicornThread]
) -> Callable[[int], tuple[UvicornThread, Any]]:
    """``model_server(max_new_tokens)``: the chat page on the tiny model, greedy, never stopping at EOS. Errors the
    server logs fail the test (``serve`` checks them when it stops the server)."""
    from chatstream_asgi import SamplingParams, TransformersEngine

    def start(max_new_tokens: int) -> tuple[UvicornThread, Any]:
        engine = TransformersEngine.from_pretrained(
            str(tiny_model_dir), device="cpu", max_batch_size=1, max_position_embeddings=CONTEXT
        )
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
        app = chat_app(not_found_app, engine, ui_path="/", default_params=params, max_concurrency=1)
        return serve(app), engine

    return start


def visible(text: str) -> str:
    """What the page can show of a text: no whitespace layout, no emphasis or code markers, and no NUL (the random
    model writes some; HTML drops them)."""
    return re.sub(r"[\s*`\x00]+", "", text)


def test_a_real_model_reply_grows_on_the_page_and_is_what_the_server_kept(browser: Any, model_server: Any) -> None:
    server, engine = model_server(REPLY_TOKENS)
    context = browser.new_context()
    page = context.new_page()
    page.goto(server.url + "/")
    page.wait_for_selector(f"#model:has-text('{engine.model_name}')", timeout=TIMEOUT_MS)
    page.evaluate(RECORD_PAINTS)
    send_message(page, "Tell me a long story")
    page.wait_for_selector(".msg.assistant:not(.streaming)", timeout=TIMEOUT_MS)

    shown = page.locator(".msg.assistant").inner_text()
    assert "(failed)" not in shown and "(stopped)" not in shown
    [kept] = page.evaluate(KEPT_REPLIES)
    assert page.evaluate(PAGE_REPLIES) == [kept["content"]]  # the page's reply is the server's, character for character
    final = visible(page.locator(".msg.assistant").text_content())
    assert final and final == visible(kept["content"])
    paints = [visible(text) for text in page.evaluate("window.paints")]
    steps = [text for i, text in enumerate(paints) if text and (i == 0 or text != paints[i - 1])]
    assert len(steps) >= 3, f"the reply did not arrive in steps: {len(steps)} distinct paints"
    assert all(final.startswith(step) for step in steps), "a partial reply was not the start of the final one"
    assert engine.stats.steps >= REPLY_TOKENS  # the model wrote the whole reply (ignore_eos): no early end hid a bug
    context.close()


def test_stop_on_a_real_model_frees_the_slot_and_the_engine_drops_the_sequence(browser: Any, model_server: Any) -> None:
    server, engine = model_server(LONG_TOKENS)
    context = browser.new_context()
    page = context.new_page()
    page.goto(server.url + "/")
    send_message(page, "Never stop talking")
    wait_for(lambda: page.evaluate(LAST_REPLY_TEXT) != "")
    assert load(server)["running"] == 1 and engine.stats.running == 1
    with page.expect_request("**/stop_generation"):
        page.click("#stop")
    try:
        wait_for(lambda: load(server)["running"] == 0 and engine.stats.running == engine.stats.batch_rows == 0)
    except AssertionError as error:
        raise AssertionError(f"Stop did not stop: {load(server)}; engine: {engine.stats}") from error
    assert engine.stats.waiting == 0 and engine.stats.steps < LONG_TOKENS // 2, engine.stats
    page.wait_for_selector("text=(stopped)", timeout=TIMEOUT_MS)
    [shown] = page.evaluate(PAGE_REPLIES)
    [kept] = page.evaluate(KEPT_REPLIES)
    assert shown and kept["content"].startswith(shown)  # kept as far as it was sent, which the page read (or less)
    assert page.locator("#send").is_visible() and not page.locator("#stop").is_visible()
    context.close()
