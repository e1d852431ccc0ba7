"""Unit tests for ``chatstream_asgi.http.streaming``: encoders and ``stream_reply`` against raw ASGI fakes."""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import pytest

from chatstream_asgi.engines.base import GenerationChunk, SamplingParams
from chatstream_asgi.engines.mock import MockEngine
from chatstream_asgi.errors import EngineError, HTTPError
from chatstream_asgi.http.encoders import PlainTextEncoder, SSEEncoder, StreamEncoder
from chatstream_asgi.http.streaming import (
    StreamOptions,
    as_http_error,
    stream_reply,
)
from chatstream_asgi.ops.metrics import StreamResult

from .asgi_fakes import RecordingSend, ScriptedReceive, wait_until, with_hang_guard

COOKIE = (b"set-cookie", b"chatstream_session=abc; Path=/")


class ScriptedChunks:
    """An engine stream: yields ``chunks`` (a float means "sleep that long"), then blocks or raises.

    Records whether its cleanup ran and whether ``aclose()`` was called, like an engine that must
    drop its sequence when the consumer goes away.
    """

    def __init__(self, chunks: Iterable[GenerationChunk | float], *, then: BaseException | None = None) -> None:
        self.script = list(chunks)
        self.then = then
        self.hang_at_end = False
        self.cleaned_up = asyncio.Event()
        self.aclose_calls = 0
        self.yielded = 0
        self._gen = self._run()

    @classmethod
    def hanging(cls, chunks: Iterable[GenerationChunk | float]) -> ScriptedChunks:
        """Yields ``chunks``, then waits forever (a model that went quiet)."""
        stream = cls(chunks)
        stream.hang_at_end = True
        return stream

    async def _run(self) -> AsyncIterator[GenerationChunk]:
        try:
            for item in self.script:
                if isinstance(item, float):
                    await asyncio.sleep(item)
                    continue
                self.yielded += 1
                yield item
            if self.then is not None:
                raise self.then
            if self.hang_at_end:
                await asyncio.Event().wait()
        finally:
            self.cleaned_up.set()

    def __aiter__(self) -> ScriptedChunks:
        return self

    async def __anext__(self) -> GenerationChunk:
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        self.aclose_calls += 1
        await self._gen.aclose()


def text(*parts: str, finish: str = "stop", prompt_tokens: int = 3) -> list[GenerationChunk]:
    final = GenerationChunk("", finish, prompt_tokens, len(parts))  # type: ignore[arg-type]
    return [*(GenerationChunk(p) for p in parts), final]


async def run_stream(
    chunks: AsyncIterator[GenerationChunk],
    *,
    encoder: StreamEncoder | None = None,
    send: RecordingSend | None = None,
    receive: ScriptedReceive | None = None,
    **options: Any,
) -> tuple[StreamResult, RecordingSend]:
    send = send or RecordingSend()
    receive = receive or ScriptedReceive(wait_for_disconnect=True)
    options.setdefault("send_timeout", 1.0)
    result = await with_hang_guard(
        stream_reply(send, receive, chunks, encoder or PlainTextEncoder(), StreamOptions(**options))
    )
    return result, send


def disconnect_after_body_chunks(receive: ScriptedReceive, count: int) -> Any:
    def hook(send: RecordingSend) -> None:
        if len(send.body_chunks) >= count:
            receive.disconnect()

    return hook


# --- a complete stream ----------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_plain_stream_sends_200_headers_then_each_delta_then_ends_the_body() -> None:
    result, send = await run_stream(ScriptedChunks(text("Hel", "lo")), headers=[COOKIE])
    assert send.status == 200
    assert send.header("content-type") == "text/plain; charset=utf-8"
    assert send.header("cache-control") == "no-store"
    assert send.header("x-accel-buffering") == "no"
    assert send.header("set-cookie") == COOKIE[1].decode()
    assert send.body_chunks == [b"Hel", b"lo"]
    assert send.messages[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert (result.outcome, result.text, result.finish_reason) == ("completed", "Hello", "stop")
    assert (result.prompt_tokens, result.completion_tokens) == (3, 2)
    assert result.started and result.time_to_first_token is not None


@pytest.mark.asyncio
async def test_sse_done_event_carries_finish_reason_token_counts_and_summary() -> None:
    chunks = ScriptedChunks(text("a", "b", "c", finish="length", prompt_tokens=9))
    result, send = await run_stream(chunks, encoder=SSEEncoder(None), summary={"request_id": "r1"})
    assert send.header("content-type") == "text/event-stream; charset=utf-8"
    events = send.sse_events()
    assert [name for name, _ in events] == ["delta", "delta", "delta", "done"]
    assert "".join(data["text"] for name, data in events if name == "delta") == "abc"
    done = events[-1][1]
    assert done["finish_reason"] == "length"
    assert (done["prompt_tokens"], done["completion_tokens"]) == (9, 3)
    assert done["request_id"] == "r1"
    assert done["duration_s"] >= 0 and done["time_to_first_token_s"] is not None
    assert send.complete and result.outcome == "completed"


@pytest.mark.asyncio
async def test_text_in_the_final_chunk_is_sent_and_counted() -> None:
    chunks = ScriptedChunks([GenerationChunk("a"), GenerationChunk("b", "stop", 1, 2)])
    result, send = await run_stream(chunks)
    assert send.body == b"ab" and result.text == "ab" and result.finish_reason == "stop"


@pytest.mark.asyncio
async def test_headers_go_out_with_the_first_text_not_before() -> None:
    send = RecordingSend()
    seen_before_text: list[int] = []

    async def chunks() -> AsyncIterator[GenerationChunk]:
        yield GenerationChunk("")  # an empty delta (e.g. a held-back UTF-8 byte) starts nothing
        await asyncio.sleep(0.01)
        seen_before_text.append(len(send.messages))
        yield GenerationChunk("hi")
        yield GenerationChunk("", "stop")

    result, _ = await run_stream(chunks(), send=send)
    assert seen_before_text == [0]
    assert [m["type"] for m in send.messages[:2]] == ["http.response.start", "http.response.body"]
    assert result.text == "hi"


@pytest.mark.asyncio
async def test_empty_reply_still_sends_a_complete_200() -> None:
    result, send = await run_stream(ScriptedChunks(text()))
    assert send.status == 200 and send.body == b"" and send.complete
    assert result.outcome == "completed" and result.text == ""


# --- errors -------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_engine_error_before_any_text_is_a_json_500_not_a_200() -> None:
    boom = EngineError("the model fell over")
    result, send = await run_stream(ScriptedChunks([GenerationChunk("")], then=boom), headers=[COOKIE])
    assert send.status == 500
    assert send.header("content-type") == "application/json"
    assert send.header("set-cookie") == COOKIE[1].decode()  # a new session keeps its cookie
    assert send.json()["error"]["type"] == "generation_error"
    assert "the model fell over" in send.json()["error"]["message"]
    assert send.complete
    assert result.outcome == "error" and result.error is boom and result.text == ""


@pytest.mark.asyncio
async def test_http_error_from_the_engine_keeps_its_status_before_the_start() -> None:
    error = HTTPError(400, "prompt_too_long", "the prompt does not fit")
    _, send = await run_stream(ScriptedChunks([], then=error), encoder=SSEEncoder(None))
    assert send.status == 400
    assert send.json() == {"error": {"type": "prompt_too_long", "message": "the prompt does not fit"}}


def test_as_http_error_maps_status_attribute_and_defaults_to_500() -> None:
    class Upstream(Exception):
        status = 502
        error_type = "upstream_error"

    assert (as_http_error(Upstream("bad gateway")).status, as_http_error(Upstream("x")).error_type) == (
        502,
        "upstream_error",
    )
    assert as_http_error(ValueError("x")).status == 500
    weird = ValueError("x")
    weird.status = 200  # type: ignore[attr-defined]
    assert as_http_error(weird).status == 500


@pytest.mark.asyncio
async def test_sse_error_after_start_is_an_in_band_error_event_and_the_body_ends() -> None:
    chunks = ScriptedChunks([GenerationChunk("par"), GenerationChunk("tial")], then=EngineError("died"))
    result, send = await run_stream(chunks, encoder=SSEEncoder(None))
    assert send.status == 200
    events = send.sse_events()
    assert [name for name, _ in events] == ["delta", "delta", "error"]
    assert events[-1][1]["error"]["type"] == "generation_error"
    assert send.messages[-1]["more_body"] is False and send.complete
    assert result.outcome == "error" and result.text == "partial"
    assert chunks.cleaned_up.is_set()


@pytest.mark.asyncio
async def test_plain_error_after_start_is_a_final_line_and_the_body_ends() -> None:
    chunks = ScriptedChunks([GenerationChunk("part")], then=EngineError("died"))
    result, send = await run_stream(chunks)
    assert send.status == 200
    assert send.body.startswith(b"part\n\n[error: generation_error] ")
    assert send.body.endswith(b"\n")
    assert send.messages[-1]["more_body"] is False
    assert result.outcome == "error"


# --- disconnects and slow clients --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_disconnect_mid_stream_cancels_and_closes_the_engine_stream() -> None:
    receive = ScriptedReceive(wait_for_disconnect=True)
    send = RecordingSend(hook=disconnect_after_body_chunks(receive, 2))
    chunks = ScriptedChunks.hanging([GenerationChunk("one "), GenerationChunk("two "), 0.01, GenerationChunk("x")])
    result, _ = await run_stream(chunks, send=send, receive=receive)
    assert result.outcome == "disconnected"
    assert result.text == "one two "
    assert chunks.cleaned_up.is_set()
    assert chunks.aclose_calls == 1
    assert not send.complete  # nothing is written after the client left


@pytest.mark.asyncio
async def test_disconnect_while_the_engine_is_silent_closes_the_stream() -> None:
    receive = ScriptedReceive(wait_for_disconnect=True)
    chunks = ScriptedChunks.hanging([GenerationChunk("one ")])
    task = asyncio.create_task(run_stream(chunks, receive=receive))
    await wait_until(lambda: chunks.yielded == 1)
    receive.disconnect()
    result, send = await task
    assert result.outcome == "disconnected" and result.text == "one "
    assert chunks.cleaned_up.is_set()


@pytest.mark.asyncio
async def test_disconnect_cancels_a_mock_engine_sequence() -> None:
    engine = MockEngine("a b c d e f g h", token_delay=0.01)
    receive = ScriptedReceive(wait_for_disconnect=True)
    send = RecordingSend(hook=disconnect_after_body_chunks(receive, 2))
    stream = engine.stream([{"role": "user", "content": "hi"}], SamplingParams())
    result, _ = await run_stream(stream, send=send, receive=receive)
    assert result.outcome == "disconnected" and result.text == "a b "
    assert engine.cancelled == 1 and engine.running == 0


@pytest.mark.asyncio
async def test_disconnect_before_any_text_sends_nothing() -> None:
    receive = ScriptedReceive([{"type": "http.disconnect"}])
    chunks = ScriptedChunks.hanging([])
    result, send = await run_stream(chunks, receive=receive)
    assert result.outcome == "disconnected" and send.messages == []
    assert chunks.cleaned_up.is_set()


@pytest.mark.asyncio
async def test_send_blocked_longer_than_send_timeout_counts_as_disconnected() -> None:
    send = RecordingSend(block=asyncio.Event())  # a client that never reads
    chunks = ScriptedChunks.hanging([GenerationChunk("stuck")])
    result, _ = await run_stream(chunks, send=send, send_timeout=0.05)
    assert result.outcome == "disconnected"
    assert result.text == ""  # the chunk never went out
    assert chunks.cleaned_up.is_set()


class SlowSend(RecordingSend):
    """A client that reads, slowly: every body chunk takes ``seconds`` to go out."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    async def __call__(self, message: Any) -> None:
        if message["type"] == "http.response.body":
            await asyncio.sleep(self.seconds)
        await super().__call__(message)


@pytest.mark.asyncio
async def test_the_send_timeout_is_per_send_not_per_reply() -> None:
    # five sends of 60 ms each: 0.3 s in all, three times the timeout, yet no single send took 0.1 s
    result, send = await run_stream(ScriptedChunks(text("a", "b", "c", "d")), send=SlowSend(0.06), send_timeout=0.1)
    assert result.outcome == "completed" and send.body == b"abcd"


@pytest.mark.asyncio
async def test_a_quiet_model_between_sends_does_not_count_against_the_send_timeout() -> None:
    # the model is silent for twice the timeout between chunks; every send itself is instant
    chunks = ScriptedChunks([GenerationChunk("a"), 0.25, GenerationChunk("b"), 0.25, *text("c")])
    result, send = await run_stream(chunks, send_timeout=0.1)
    assert result.outcome == "completed" and send.body == b"abc"


@pytest.mark.asyncio
async def test_a_reply_schedules_no_timer_per_send() -> None:
    # asyncio.timeout around each send scheduled (and cancelled) a timer per chunk; one per reply is enough
    loop = asyncio.get_running_loop()
    scheduled = []
    call_at = loop.call_at

    def counting_call_at(when: float, callback: Any, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        scheduled.append(callback)
        return call_at(when, callback, *args, **kwargs)

    loop.call_at = counting_call_at  # type: ignore[method-assign]
    try:
        result, send = await run_stream(ScriptedChunks(text(*("x" * 300))), send_timeout=30.0)
    finally:
        del loop.call_at  # type: ignore[method-assign]
    assert result.outcome == "completed" and len(send.body_chunks) >= 300
    assert len(scheduled) <= 2


@pytest.mark.asyncio
async def test_send_raising_oserror_counts_as_disconnected_and_keeps_the_sent_text() -> None:
    # ASGI 2.4 servers raise an OSError subclass from send() once the client is gone.
    def hook(send: RecordingSend) -> None:
        if len(send.body_chunks) == 1:
            send.hook = raise_oserror

    def raise_oserror(send: RecordingSend) -> None:
        raise ConnectionResetError("client gone")

    chunks = ScriptedChunks.hanging([GenerationChunk("kept "), GenerationChunk("lost")])
    result, send = await run_stream(chunks, send=RecordingSend(hook=hook))
    assert result.outcome == "disconnected"
    assert result.text == "kept "
    assert chunks.cleaned_up.is_set()


# --- deadline and pings ----------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_deadline_cuts_a_silent_engine_with_an_in_band_timeout_error() -> None:
    chunks = ScriptedChunks.hanging([GenerationChunk("so far")])
    deadline = asyncio.get_running_loop().time() + 0.05
    result, send = await run_stream(chunks, encoder=SSEEncoder(None), deadline=deadline)
    assert result.outcome == "timeout" and result.text == "so far"
    events = send.sse_events()
    assert [name for name, _ in events] == ["delta", "error"]
    assert events[-1][1]["error"]["type"] == "generation_timeout"
    assert send.complete and chunks.cleaned_up.is_set()


@pytest.mark.asyncio
async def test_deadline_cuts_an_engine_that_never_goes_silent() -> None:
    closed = asyncio.Event()

    async def endless() -> AsyncIterator[GenerationChunk]:
        try:
            while True:
                await asyncio.sleep(0)
                yield GenerationChunk("x")
        finally:
            closed.set()

    deadline = asyncio.get_running_loop().time() + 0.05
    result, send = await run_stream(endless(), deadline=deadline)
    assert result.outcome == "timeout"
    assert b"[error: generation_timeout]" in send.body
    assert closed.is_set()


@pytest.mark.asyncio
async def test_deadline_before_any_text_is_a_json_504() -> None:
    deadline = asyncio.get_running_loop().time() + 0.02
    result, send = await run_stream(ScriptedChunks.hanging([]), deadline=deadline)
    assert result.outcome == "timeout"
    assert send.status == 504 and send.json()["error"]["type"] == "generation_timeout"


@pytest.mark.asyncio
async def test_sse_pings_while_the_engine_is_silent() -> None:
    chunks = ScriptedChunks([0.12, *text("late")])
    result, send = await run_stream(chunks, encoder=SSEEncoder(ping_interval=0.02))
    assert send.status == 200
    assert send.body_chunks[0] == b": ping\n\n"
    assert send.body.count(b": ping\n\n") >= 2
    assert [name for name, _ in send.sse_events()] == ["delta", "done"]
    assert result.outcome == "completed" and result.text == "late"


@pytest.mark.asyncio
async def test_a_ping_that_finds_the_client_gone_ends_the_stream_and_closes_the_engine_stream() -> None:
    def raise_after_the_first_ping(send: RecordingSend) -> None:
        if send.body_chunks == [b": ping\n\n"]:
            send.hook = raise_oserror

    def raise_oserror(send: RecordingSend) -> None:
        raise ConnectionResetError("client gone")

    chunks = ScriptedChunks.hanging([])  # a model that never says anything
    send = RecordingSend(hook=raise_after_the_first_ping)
    result, send = await run_stream(chunks, send=send, encoder=SSEEncoder(ping_interval=0.02))
    assert result.outcome == "disconnected"
    assert chunks.cleaned_up.is_set()
    assert send.body_chunks[:2] == [b": ping\n\n", b": ping\n\n"]  # the second one found the client gone


@pytest.mark.asyncio
async def test_sse_sends_no_ping_while_text_keeps_flowing() -> None:
    chunks = ScriptedChunks([x for part in "abcdefghij" for x in (0.01, GenerationChunk(part))] + text()[-1:])
    _, send = await run_stream(chunks, encoder=SSEEncoder(ping_interval=0.05))
    assert b": ping" not in send.body
    assert "".join(data["text"] for name, data in send.sse_events() if name == "delta") == "abcdefghij"


@pytest.mark.asyncio
async def test_plain_text_never_pings() -> None:
    chunks = ScriptedChunks([0.05, *text("late")])
    _, send = await run_stream(chunks, encoder=PlainTextEncoder())
    assert send.body == b"late"


@pytest.mark.asyncio
async def test_sse_done_event_is_valid_json_for_non_ascii_text() -> None:
    _, send = await run_stream(ScriptedChunks(text("日本", "語")), encoder=SSEEncoder(None))
    raw = send.body.decode("utf-8")
    assert "日本" in raw
    assert json.loads(raw.split("data: ", 1)[1].split("\n", 1)[0]) == {"text": "日本"}


async def turns_apart(offset: int, one: Callable[[], object], other: Callable[[], object]) -> None:
    """Call ``one`` and ``other`` ``abs(offset)`` loop turns apart: ``one`` first, or ``other`` if ``offset`` < 0."""
    first, second = (one, other) if offset >= 0 else (other, one)
    first()
    for _ in range(abs(offset)):
        await asyncio.sleep(0)
    second()


@pytest.mark.asyncio
@pytest.mark.parametrize("offset", range(-4, 5))
async def test_a_disconnect_landing_as_a_send_completes_still_ends_the_stream(offset: int) -> None:
    """The disconnect and the end of a blocked send arrive ``offset`` loop turns apart, either way round. On
    Python 3.11, ``asyncio.wait_for`` returned the send's result and dropped the cancel when both landed together,
    and the whole reply then streamed to a client that had gone (the chat page's flaky Stop)."""
    loop = asyncio.get_running_loop()
    gone = asyncio.Event()
    blocked: list[asyncio.Future[None]] = []
    messages: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)
        if len(messages) == 3:  # the start and one chunk went out; the next send waits for the client
            blocked.append(loop.create_future())
            await blocked[0]

    async def receive() -> dict[str, Any]:
        await gone.wait()
        return {"type": "http.disconnect"}

    async def endless() -> AsyncIterator[GenerationChunk]:
        for i in range(200):
            await asyncio.sleep(0.001)
            yield GenerationChunk(f"w{i} ")

    options = StreamOptions(send_timeout=5.0)
    task = asyncio.create_task(stream_reply(send, receive, endless(), PlainTextEncoder(), options))
    await wait_until(lambda: bool(blocked))
    await turns_apart(offset, gone.set, lambda: blocked[0].done() or blocked[0].set_result(None))
    result = await with_hang_guard(task)
    assert result.outcome == "disconnected"
    assert len(messages) <= 4, f"{len(messages) - 3} more chunks were sent after the disconnect"


@pytest.mark.asyncio
@pytest.mark.parametrize("offset", range(-3, 4))
async def test_an_engine_ending_as_the_client_leaves_leaves_no_unretrieved_task_error(offset: int) -> None:
    """The engine's stream ends (``StopAsyncIteration`` in the pending ``anext``) ``offset`` loop turns from the
    disconnect. Whatever the order, no task may be left with an exception nobody retrieved (asyncio logs those)."""
    loop = asyncio.get_running_loop()
    unretrieved: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: unretrieved.append(context))
    gone, end = asyncio.Event(), asyncio.Event()

    async def receive() -> dict[str, Any]:
        await gone.wait()
        return {"type": "http.disconnect"}

    async def ends_on_cue() -> AsyncIterator[GenerationChunk]:
        yield GenerationChunk("one ")
        await end.wait()

    try:
        sent = RecordingSend()
        task = asyncio.create_task(stream_reply(sent, receive, ends_on_cue(), PlainTextEncoder(), StreamOptions()))
        await wait_until(lambda: len(sent.body_chunks) == 1)
        await turns_apart(offset, gone.set, end.set)
        await with_hang_guard(task)
        del task
        gc.collect()  # an unretrieved exception is reported when its task is collected
    finally:
        loop.set_exception_handler(previous)
    assert unretrieved == []
