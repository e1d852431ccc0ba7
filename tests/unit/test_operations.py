"""Metrics, health, readiness, graceful drain and the structured request log, driven as raw ASGI."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import time
from typing import Any

import pytest

from chatstream_asgi import ChatStreamMiddleware, MockEngine
from chatstream_asgi.sessions.history import MemoryHistoryStore

from .apps import build_middleware, call, chat, client_sending, get
from .asgi_fakes import SSE_HEADERS, RecordingSend, wait_until, with_hang_guard

pytest.importorskip("prometheus_client")
pytestmark = pytest.mark.asyncio
REPLY = "one two three four five six"


def build(engine: MockEngine | None = None, **options: Any) -> ChatStreamMiddleware:
    return build_middleware(engine or MockEngine(REPLY), **options)


def samples(app: ChatStreamMiddleware) -> dict[str, float]:
    """``name{labels}`` -> value, parsed from the served exposition."""
    metrics = app.observer.metrics
    assert metrics is not None
    values = {}
    for line in metrics.exposition()[0].decode().splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            values[key] = float(value)
    return values


async def test_metrics_route_serves_vllm_style_names_after_a_chat() -> None:
    app = build()
    assert (await chat(app)).status == 200
    send = await get(app, "/metrics")
    assert send.status == 200 and (send.header("content-type") or "").startswith("text/plain")
    text = send.body.decode()
    for name in (
        "chatstream_time_to_first_token_seconds_bucket",
        "chatstream_inter_token_latency_seconds_bucket",
        "chatstream_request_queue_time_seconds_count",
        "chatstream_e2e_request_latency_seconds_count",
        "chatstream_num_requests_running",
        "chatstream_num_requests_waiting",
        "chatstream_prompt_tokens_total",
        "chatstream_generation_tokens_total",
    ):
        assert name in text, name
    values = samples(app)
    tokens = len(REPLY.split())
    assert values['chatstream_http_requests_total{route="/chat_stream",status="200"}'] == 1
    assert values["chatstream_generation_tokens_total"] == tokens
    assert values["chatstream_time_to_first_token_seconds_count"] == 1
    assert values["chatstream_inter_token_latency_seconds_count"] == tokens - 1
    assert values['chatstream_request_outcome_total{outcome="completed"}'] == 1
    assert values["chatstream_num_requests_running"] == 0


async def test_the_engines_batch_is_in_metrics_and_get_load(tiny_engine_parts: tuple[Any, Any]) -> None:
    from chatstream_asgi import SamplingParams, TransformersEngine

    model, tokenizer = tiny_engine_parts
    engine = TransformersEngine(model, tokenizer, max_batch_size=4)
    app = build(engine)  # type: ignore[arg-type]
    await engine.start()
    long = SamplingParams(max_new_tokens=400, temperature=0.0, ignore_eos=True)
    streams = [engine.stream([{"role": "user", "content": f"q{i}"}], long) for i in range(2)]
    try:
        await asyncio.gather(*(anext(aiter(stream)) for stream in streams))
        values = samples(app)
        assert values["chatstream_engine_sequences_running"] == 2  # the engine's, not this process's admission
        assert values["chatstream_engine_sequences_waiting"] == 0 and values["chatstream_engine_steps_total"] >= 1
        assert "chatstream_engine_restarts_total" not in values  # an in-thread engine is never restarted
        load = (await get(app, "/get_load")).json()
        assert load["engine"] == {"running": 2, "waiting": 0, "max_batch_size": 4} and load["running"] == 0
    finally:
        for stream in streams:
            await stream.aclose()  # type: ignore[attr-defined]
        await engine.close()
    mock = build()
    assert "engine" not in (await get(mock, "/get_load")).json()
    assert not any(name.startswith("chatstream_engine_") for name in samples(mock))


async def test_rejections_are_counted_by_reason() -> None:
    app = build(MockEngine(REPLY, token_delay=0.05), max_concurrency=1, max_queue=0)
    first = asyncio.ensure_future(chat(app))
    await wait_until(lambda: app.admission.running == 1)
    assert (await chat(app)).status == 429
    assert (await first).status == 200
    values = samples(app)
    assert values['chatstream_request_rejected_total{reason="queue_full"}'] == 1
    assert values['chatstream_http_requests_total{route="/chat_stream",status="429"}'] == 1


async def test_two_middlewares_share_no_metrics() -> None:
    one, two = build(), build()
    await chat(one)
    assert samples(one)["chatstream_generation_tokens_total"] > 0
    assert samples(two)["chatstream_generation_tokens_total"] == 0


async def test_metrics_path_none_passes_the_path_to_the_app() -> None:
    app = build(metrics_path=None)
    send = await get(app, "/metrics")
    assert send.body == b"app" and app.observer.metrics is None
    assert (await chat(app)).status == 200  # the hot path works without collectors


async def test_healthz_is_alive_and_readyz_follows_engine_and_drain() -> None:
    engine = MockEngine(REPLY)
    app = build(engine)
    assert (await get(app, "/healthz")).status == 200
    not_ready = await get(app, "/readyz")
    assert not_ready.status == 503 and not_ready.json()["status"] == "loading"
    await engine.start()
    assert (await get(app, "/readyz")).json() == {"status": "ready", "model": "mock"}
    assert await app.drain(0.5)
    draining = await get(app, "/readyz")
    assert draining.status == 503 and draining.json()["status"] == "draining"
    assert (await get(app, "/healthz")).status == 200


async def test_drain_lets_running_streams_finish_and_refuses_new_ones() -> None:
    app = build(MockEngine(REPLY, token_delay=0.02))
    running = asyncio.ensure_future(chat(app))
    await wait_until(lambda: app.admission.running == 1)
    drained = asyncio.ensure_future(app.drain(5.0))
    await wait_until(lambda: app.admission.draining)
    refused = await chat(app)
    assert refused.status == 503 and refused.header("retry-after") is not None
    assert refused.json()["error"]["type"] == "draining"
    assert (await running).body.decode() == REPLY  # finished whole
    assert await drained
    assert samples(app)['chatstream_request_rejected_total{reason="draining"}'] == 1


async def test_drain_past_its_grace_ends_streams_in_band_and_frees_slots() -> None:
    app = build(MockEngine(" ".join(["word"] * 400), token_delay=0.01))
    running = asyncio.ensure_future(chat(app, headers=SSE_HEADERS))
    await wait_until(lambda: app.admission.running == 1)
    assert await with_hang_guard(app.drain(0.1))
    send = await running
    assert send.status == 200 and send.complete
    events = send.sse_events()
    assert events[-1][0] == "error" and events[-1][1]["error"]["type"] == "draining"
    assert app.admission.running == 0 and app.admission.waiting == 0


async def test_a_stream_ended_by_the_drain_is_counted_and_logged_as_drained(caplog: pytest.LogCaptureFixture) -> None:
    finished: list[tuple[str, str, str, dict[str, Any]]] = []
    engine = MockEngine(" ".join(["word"] * 400), token_delay=0.01)
    app = build(engine, on_finish=lambda *turn: finished.append(turn))
    with caplog.at_level(logging.INFO, logger="chatstream_asgi.requests"):
        running = asyncio.ensure_future(chat(app, headers=SSE_HEADERS))
        await wait_until(lambda: app.admission.running == 1)
        await with_hang_guard(app.drain(0.1))
        send = await running
        await wait_until(lambda: bool(finished))
    values = samples(app)
    assert values['chatstream_request_outcome_total{outcome="drained"}'] == 1
    assert 'chatstream_request_outcome_total{outcome="error"}' not in values
    record = next(r for r in caplog.records if r.name == "chatstream_asgi.requests")
    assert record.chatstream["outcome"] == "drained"  # type: ignore[attr-defined]
    # the reply is kept as far as it was sent: in the on_finish call and in the history
    sent = "".join(data["text"] for name, data in send.sse_events() if name == "delta")
    session_id, _, reply, stats = finished[0]
    assert sent and reply == sent and stats["outcome"] == "drained"
    assert (await app.routes.store.load(session_id))[-1] == {"role": "assistant", "content": sent}


@pytest.mark.parametrize("route", ["/chat_stream", "/v1/chat/completions"])
async def test_the_drain_ends_a_stream_whose_engine_has_gone_silent(route: str) -> None:
    """A stream waiting for its next token (an engine process stopped or stuck) never reached the drain's check, so
    shutdown waited for generation_timeout (300 s): past a Kubernetes grace period, the pod was killed instead."""

    class Silent(MockEngine):
        async def stream(self, messages: Any, params: Any) -> Any:
            async for chunk in super().stream(messages, params):
                yield chunk
                await asyncio.Event().wait()  # after the first token: nothing more, ever

    app = build(Silent(REPLY))
    payload = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    body = payload if route != "/chat_stream" else {"user_input": "hi"}
    running = asyncio.ensure_future(call(app, "POST", route, payload=body, headers=SSE_HEADERS))
    await wait_until(lambda: app.admission.running == 1)
    started = time.perf_counter()
    assert await with_hang_guard(app.drain(0.1))  # ended by its cancel, at once (it waited up to 5 s, in vain)
    send = await with_hang_guard(running)
    assert time.perf_counter() - started < 2 and send.complete and app.admission.running == 0
    assert b"draining" in send.body and not app.observer.running
    assert samples(app)['chatstream_request_outcome_total{outcome="drained"}'] == 1


class SlowStore(MemoryHistoryStore):
    """A network store: a save takes ``delay`` seconds."""

    def __init__(self, delay: float = 0.3) -> None:
        super().__init__()
        self.delay = delay

    async def save(self, session_id: str, messages: Any) -> Any:
        await asyncio.sleep(self.delay)
        return await super().save(session_id, messages)


async def test_a_drain_while_a_cut_reply_is_saved_loses_neither_the_reply_nor_on_finish() -> None:
    """The drain's "end now" reached a stream whose client had left while its cut reply was being saved: the second
    cancel landed in the save, and the reply and the on_finish call were lost."""
    finished: list[str] = []

    async def on_finish(session_id: str, user_input: str, reply: str, stats: dict[str, Any]) -> None:
        finished.append(stats["outcome"])

    store = SlowStore()
    app = build(MockEngine("word " * 500, token_delay=0.05), history_store=store, on_finish=on_finish)
    receive = client_sending({"user_input": "talk"})
    running = asyncio.ensure_future(call(app, "POST", "/chat_stream", receive=receive, headers=SSE_HEADERS))
    await asyncio.sleep(0.5)
    receive.disconnect()
    await asyncio.sleep(0.1)  # the cut reply is being saved until 0.8 s
    assert await with_hang_guard(app.drain(0))
    await with_hang_guard(running)
    await wait_until(lambda: bool(finished))
    assert finished == ["disconnected"] and len(store._entries) == 1  # type: ignore[attr-defined]


async def test_a_drain_while_a_timed_out_stream_unwinds_neither_crashes_nor_skips_the_others() -> None:
    """A stream past its deadline was saving its cut reply when the drain's grace ended: moving its expiring deadline
    raised out of the drain, the shutdown stopped there, and a stream waiting on a silent engine was never ended."""

    class PartlySilent(MockEngine):
        async def stream(self, messages: Any, params: Any) -> Any:
            if messages[-1]["content"] == "silent":
                await asyncio.Event().wait()
            async for chunk in super().stream(messages, params):
                yield chunk

    engine = PartlySilent("word " * 500, token_delay=0.05)
    app = build(engine, history_store=SlowStore(delay=0.6), generation_timeout=2.0)
    talking = asyncio.ensure_future(chat(app, "talk"))  # its deadline at 2.0 s, its cut reply saved until 2.6 s
    await asyncio.sleep(1.5)
    silent = asyncio.ensure_future(chat(app, "silent"))  # its deadline at 3.5 s
    await asyncio.sleep(0.7)
    assert await with_hang_guard(app.drain(0))
    assert (await with_hang_guard(silent)).status == 503  # ended by the drain, long before its own deadline
    assert (await with_hang_guard(talking)).complete and app.admission.running == 0


async def test_a_drained_completion_without_streaming_still_answers_503() -> None:
    app = build(MockEngine(" ".join(["word"] * 400), token_delay=0.01))
    payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    running = asyncio.ensure_future(call(app, "POST", "/v1/chat/completions", payload=payload))
    await wait_until(lambda: app.admission.running == 1)
    await with_hang_guard(app.drain(0.1))
    send = await with_hang_guard(running)
    assert send.status == 503 and send.json()["error"]["code"] == "draining"
    assert send.header("retry-after") == "1"  # as docs/openai.md says: the client retries elsewhere, at once
    assert samples(app)['chatstream_request_outcome_total{outcome="drained"}'] == 1


async def test_lifespan_shutdown_drains_then_closes_the_engine() -> None:
    engine = MockEngine(REPLY)
    app = build(engine, drain_timeout=1.0)
    await engine.start()
    await app.shutdown()
    assert app.admission.draining and not engine.ready


async def test_request_log_has_one_json_line_per_chat_without_text(caplog: pytest.LogCaptureFixture) -> None:
    app = build()
    with caplog.at_level(logging.INFO, logger="chatstream_asgi.requests"):
        send = await chat(app, "my secret question")
    records = [r for r in caplog.records if r.name == "chatstream_asgi.requests"]
    assert len(records) == 1
    fields = json.loads(records[0].getMessage().split(" ", 1)[1])
    assert fields["request_id"] == send.header("x-request-id")
    assert fields["outcome"] == "completed" and fields["completion_tokens"] == len(REPLY.split())
    assert fields["queue_wait_s"] >= 0 and fields["ttft_s"] is not None
    assert "my secret question" not in caplog.text and REPLY not in caplog.text


async def test_request_log_includes_text_only_when_asked(caplog: pytest.LogCaptureFixture) -> None:
    app = build(log_text=True)
    with caplog.at_level(logging.INFO, logger="chatstream_asgi.requests"):
        await chat(app, "my question")
    record = next(r for r in caplog.records if r.name == "chatstream_asgi.requests")
    fields: dict[str, Any] = record.chatstream  # type: ignore[attr-defined]
    assert fields["user_input"] == "my question" and fields["reply"] == REPLY


async def test_a_client_leaving_mid_stream_is_counted_as_a_disconnect() -> None:
    app = build(MockEngine(" ".join(["word"] * 200), token_delay=0.01))
    receive = client_sending({"user_input": "hi"})

    def leave_after_two_chunks(send: RecordingSend) -> None:
        if len(send.body_chunks) == 2:
            receive.disconnect()

    await call(app, "POST", "/chat_stream", receive=receive, send=RecordingSend(hook=leave_after_two_chunks))
    await wait_until(lambda: app.admission.running == 0)
    values = samples(app)
    assert values['chatstream_client_disconnects_total{stage="streaming"}'] == 1
    assert values['chatstream_request_outcome_total{outcome="disconnected"}'] == 1


@pytest.mark.parametrize("path", ["/chat_stream", "/v1/chat/completions"])
async def test_a_request_the_server_cancels_mid_reply_is_logged_and_counted(
    path: str, caplog: pytest.LogCaptureFixture
) -> None:
    # uvicorn's timeout_graceful_shutdown, hypercorn's graceful timeout: the request task is cancelled; it left no log
    # line and no counts
    app = build(MockEngine(" ".join(["word"] * 200), token_delay=0.01))
    payload: dict[str, Any] = {"user_input": "hi"}
    if path != "/chat_stream":
        payload = {"model": "mock", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    two_chunks = asyncio.Event()

    def after_two_chunks(send: RecordingSend) -> None:
        if len(send.body_chunks) >= 2:
            two_chunks.set()

    with caplog.at_level(logging.INFO, logger="chatstream_asgi.requests"):
        send = RecordingSend(hook=after_two_chunks)
        request = asyncio.create_task(call(app, "POST", path, payload=payload, send=send))
        await asyncio.wait_for(two_chunks.wait(), 5)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
    await wait_until(lambda: app.admission.running == 0)
    logged = next(r.chatstream for r in caplog.records if r.name == "chatstream_asgi.requests")  # type: ignore[attr-defined]
    assert logged["outcome"] == "cancelled" and logged["completion_tokens"] >= 2
    values = samples(app)
    assert values['chatstream_request_outcome_total{outcome="cancelled"}'] == 1
    assert values["chatstream_generation_tokens_total"] == logged["completion_tokens"]


async def test_a_reply_cut_before_its_first_text_still_counts_its_prompt(
    tiny_engine_parts: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # counts rode on text chunks only: a deadline during a long prefill (or a Stop before the first text) was logged
    # and counted with prompt_tokens 0
    from chatstream_asgi import TransformersEngine

    model, tokenizer = tiny_engine_parts
    forward = model.forward

    def slow_forward(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.5)  # a prefill longer than the deadline
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", slow_forward)
    engine = TransformersEngine(model, tokenizer, max_batch_size=2)
    app = build(engine, generation_timeout=0.2)  # type: ignore[arg-type]
    try:
        with caplog.at_level(logging.INFO, logger="chatstream_asgi.requests"):
            send = await call(app, "POST", "/chat_stream", payload={"user_input": "count my prompt"})
        assert send.status == 504
        logged = next(r.chatstream for r in caplog.records if r.name == "chatstream_asgi.requests")  # type: ignore[attr-defined]
        assert logged["outcome"] == "timeout" and logged["prompt_tokens"] > 3
        assert samples(app)["chatstream_prompt_tokens_total"] == logged["prompt_tokens"]
    finally:
        await engine.close()


async def test_openai_route_is_measured_too() -> None:
    app = build()
    payload = {"model": "mock", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    send = await call(app, "POST", "/v1/chat/completions", payload=payload)
    assert send.status == 200
    values = samples(app)
    assert values['chatstream_http_requests_total{route="/v1/chat/completions",status="200"}'] == 1
    assert values["chatstream_generation_tokens_total"] == len(REPLY.split())
    assert values["chatstream_time_to_first_token_seconds_count"] == 1


async def test_require_api_key_works_without_the_openai_routes() -> None:
    app = build(openai_prefix=None, api_keys=["sk-0123456789"], require_api_key=True)
    assert (await chat(app)).status == 401


async def test_gc_pauses_are_observed_while_the_middleware_serves() -> None:
    app = build()
    key = 'chatstream_gc_pause_seconds_count{generation="2"}'
    await app.startup()
    try:
        gc.collect()  # a full collection: generation 2
        assert samples(app)[key] >= 1
    finally:
        await app.shutdown()
    after_shutdown = samples(app)[key]
    gc.collect()  # the callback is gone with the shutdown
    assert samples(app)[key] == after_shutdown


async def test_a_pause_users_would_feel_is_logged_at_most_once_a_minute(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import prometheus_client

    from chatstream_asgi.ops import gc_pauses

    monkeypatch.setattr(gc_pauses, "FELT_PAUSE", 0.0)  # every collection counts as felt
    watch = gc_pauses.GCPauses(prometheus_client.CollectorRegistry())
    watch.install()
    try:
        with caplog.at_level(logging.WARNING, logger="chatstream_asgi"):
            gc.collect()
            gc.collect()
    finally:
        watch.uninstall()
    assert caplog.text.count("the garbage collector stopped this process") == 1
