"""``ProcessEngine`` on real processes: same replies as in-thread, cancellation across the boundary, one engine
shared by several web processes, and a killed engine that ends running replies in-band, answers 503 while it
restarts, and comes back by itself."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from chatstream_asgi.engines._link import EngineLink
from chatstream_asgi.engines.base import SamplingParams
from chatstream_asgi.engines.process import ProcessEngine
from chatstream_asgi.engines.replicas import EngineReplicas
from chatstream_asgi.engines.transformers import TransformersEngine
from chatstream_asgi.errors import ConfigurationError, EngineError, EngineNotReady, EngineUnavailable

from .servers import chat, chat_app, get_load, not_found_app, wait_for_load, wait_until

GREEDY = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)
LONG = SamplingParams(max_new_tokens=480, temperature=0.0, ignore_eos=True)
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest_asyncio.fixture
async def process_engine(tiny_model_dir: Path) -> AsyncIterator[ProcessEngine]:
    engine = ProcessEngine.from_pretrained(tiny_model_dir, max_batch_size=4, dtype="float32", stream_interval=0)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.close()


def engine_pid(engine: ProcessEngine) -> int:
    assert engine._link is not None
    pid: int = engine._link.info["pid"]
    return pid


async def reply(engine: Any, params: SamplingParams = GREEDY, content: str = "What is the capital of France?") -> str:
    return "".join([chunk.text async for chunk in engine.stream([{"role": "user", "content": content}], params)])


@pytest.mark.asyncio
async def test_replies_equal_the_in_thread_engine_token_for_token(
    process_engine: ProcessEngine, tiny_engine_parts: tuple[Any, Any]
) -> None:
    model, tokenizer = tiny_engine_parts
    local = TransformersEngine(model, tokenizer, max_batch_size=4)
    contents = ["hi", "What is the capital of France?", "東京は日本の首都です。😀"]
    try:
        expected = [await reply(local, content=c) for c in contents]
        got = await asyncio.gather(*(reply(process_engine, content=c) for c in contents))
    finally:
        await local.close()
    assert got == expected
    assert process_engine.model_name == tiny_model_name(process_engine)


def tiny_model_name(engine: ProcessEngine) -> str:
    return Path(engine.launcher.spec["path"]).name


@pytest.mark.asyncio
async def test_a_closed_stream_is_cancelled_in_the_engine_process(tiny_model_dir: Path) -> None:
    engine = ProcessEngine.from_pretrained(tiny_model_dir, max_batch_size=1, stream_interval=0)
    await engine.start()
    try:
        long_reply = engine.stream(MESSAGES, LONG)
        await anext(aiter(long_reply))
        await long_reply.aclose()
        # One batch slot: had the long reply kept running, the next one would wait for its 480 tokens.
        started = time.monotonic()
        await reply(engine)
        assert time.monotonic() - started < 2.0
        assert engine.running_count == 0
    finally:
        await engine.close()


@pytest.mark.asyncio
async def test_engines_naming_one_address_share_one_engine_process(tiny_model_dir: Path, tmp_path: Path) -> None:
    address = tmp_path / "engine.sock"
    engines = [ProcessEngine.from_pretrained(tiny_model_dir, address=address, linger=1.0) for _ in range(3)]
    try:
        await asyncio.gather(*(engine.start() for engine in engines))
        assert len({engine_pid(engine) for engine in engines}) == 1
        # each one's Retry-After during a restart is what this engine took to start, also for those that did not
        # start it (they said 11 s, a default, where a restart took 5)
        loaded = [engine.launcher.load_seconds for engine in engines]
        assert len(set(loaded)) == 1 and loaded[0] > 0 and loaded[0] != 10.0
        replies = await asyncio.gather(*(reply(engine) for engine in engines))
        assert len(set(replies)) == 1 and replies[0]
    finally:
        for engine in engines:
            await engine.close()
    starters = [engine.launcher.process for engine in engines if engine.launcher.process is not None]
    assert len(starters) == 1  # one of them started it, under the lock; the others connected
    await wait_until(lambda: starters[0].poll() is not None, timeout=10)  # idle for `linger` s, it exits by itself
    assert not address.exists()  # and takes its socket file along: a stale one looked like a dead engine


@pytest.mark.asyncio
async def test_each_web_process_sees_the_shared_engines_whole_batch(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Per web process, admission counts only its own chats; an operator of 4 workers sharing an engine needs the
    engine's load (``/metrics``' ``chatstream_engine_sequences_running``, ``/get_load``'s ``engine``): an idle
    worker hears it change too, without a frame per step."""
    address = tmp_path / "engine.sock"
    busy, idle = (ProcessEngine.from_pretrained(tiny_model_dir, address=address, linger=1.0) for _ in range(2))
    try:
        await asyncio.gather(busy.start(), idle.start())
        streams = [busy.stream(MESSAGES, LONG) for _ in range(3)]
        await asyncio.gather(*(anext(aiter(stream)) for stream in streams))
        await wait_until(lambda: idle.stats.running == 3, timeout=10)
        assert busy.stats.running == 3 and idle.running_count == 0
        for stream in streams:
            await stream.aclose()  # type: ignore[attr-defined]
        await wait_until(lambda: idle.stats.running == 0 and busy.stats.running == 0, timeout=10)
        assert idle.stats.steps == busy.stats.steps > 0  # the step count rides along once the batch changes
    finally:
        await asyncio.gather(busy.close(), idle.close())
    starter = next(engine.launcher.process for engine in (busy, idle) if engine.launcher.process is not None)
    await wait_until(lambda: starter.poll() is not None, timeout=10)  # idle for `linger` s, it exits by itself


@pytest.mark.asyncio
async def test_a_web_process_connecting_to_a_busy_engine_gets_its_hello_first(tiny_model_dir: Path) -> None:
    """A connection was flushed by the engine's steps before its hello was answered: a step frame came first, and
    about one start in six of a worker beside a streaming engine failed."""
    engine = ProcessEngine.from_pretrained(tiny_model_dir, max_batch_size=4, stream_interval=0)
    await engine.start()
    try:
        streams = [engine.stream(MESSAGES, LONG) for _ in range(4)]
        await asyncio.gather(*(anext(aiter(stream)) for stream in streams))
        for _ in range(30):
            link = await EngineLink.open(engine.address, on_lost=lambda _: None)
            assert link.info["model_name"] == engine.model_name
            await link.close()
        for stream in streams:
            await stream.aclose()  # type: ignore[attr-defined]
    finally:
        await engine.close()


@pytest.mark.asyncio
async def test_a_web_process_asking_for_another_model_on_a_shared_address_is_refused(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # a rolling deploy to a new model (or batch size) silently attached to the old engine that still lingered
    address = tmp_path / "engine.sock"
    serving = ProcessEngine.from_pretrained(tiny_model_dir, address=address, linger=1.0, max_batch_size=2)
    relative = os.path.relpath(tiny_model_dir)  # the same model named another way is the same model
    same = ProcessEngine.from_pretrained(relative, address=address, linger=1.0, max_batch_size=2)
    other = ProcessEngine.from_pretrained(tiny_model_dir, address=address, linger=1.0, max_batch_size=4)
    try:
        await serving.start()
        await same.start()
        assert engine_pid(same) == engine_pid(serving)
        with pytest.raises(ConfigurationError, match="give each model .* an address of its own") as refused:
            await other.start()
        assert "('max_batch_size', 4)" in str(refused.value) and "('max_batch_size', 2)" in str(refused.value)
        assert not other.ready and await reply(serving)
    finally:
        for engine in (serving, same, other):
            await engine.close()
    started = serving.launcher.process
    assert started is not None
    await wait_until(lambda: started.poll() is not None, timeout=10)  # idle for `linger` s, it exits by itself


@pytest.mark.asyncio
async def test_the_engine_process_leaves_a_core_to_the_web_process_unless_told_its_threads(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    default = ProcessEngine.from_pretrained(tiny_model_dir, max_batch_size=1)
    chosen = ProcessEngine.from_pretrained(tiny_model_dir, max_batch_size=1, torch_threads=3)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the environment's choice, where nothing was asked
    from_environment = ProcessEngine.from_pretrained(tiny_model_dir, max_batch_size=1)
    engines = [default, chosen, from_environment]
    try:
        await asyncio.gather(*(engine.start() for engine in engines))
        threads = [engine._link.info["torch_threads"] for engine in engines if engine._link is not None]
    finally:
        for engine in engines:
            await engine.close()
    assert threads == [max(1, len(os.sched_getaffinity(0)) - 1), 3, 2]
    for wrong in (0, -1, 1.5, True):
        with pytest.raises(ConfigurationError, match="torch_threads"):
            ProcessEngine.from_pretrained(tiny_model_dir, torch_threads=wrong)


@pytest.mark.asyncio
async def test_a_killed_engine_fails_running_replies_answers_503_then_restarts(
    process_engine: ProcessEngine,
) -> None:
    running = process_engine.stream(MESSAGES, LONG)
    await anext(aiter(running))
    os.kill(engine_pid(process_engine), signal.SIGKILL)
    with pytest.raises(EngineError, match="engine process ended"):
        async for _ in running:
            pass
    assert process_engine.stats.running == 0  # the dead engine's batch is not shown for the whole restart
    with pytest.raises(EngineUnavailable) as unavailable:
        await reply(process_engine)
    assert int(unavailable.value.headers["Retry-After"]) >= 1
    await wait_until(lambda: process_engine.ready, timeout=60)
    assert await reply(process_engine)
    assert process_engine.restarts == 1


def gone_or_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as status:
            return "\nState:\tZ" in status.read()
    except FileNotFoundError:
        return True


@pytest.mark.asyncio
async def test_a_stopped_engine_is_taken_for_hung_killed_and_restarted(tiny_model_dir: Path) -> None:
    """A stopped (or stuck) engine process keeps its socket open: nothing ended the streams waiting on it before
    generation_timeout (300 s), and /readyz said ready all along."""
    engine = ProcessEngine.from_pretrained(tiny_model_dir, max_batch_size=4, hang_timeout=2, stream_interval=0)
    await engine.start()
    stopped = engine_pid(engine)
    try:
        running = engine.stream(MESSAGES, LONG)
        await anext(aiter(running))
        os.kill(stopped, signal.SIGSTOP)
        started = time.monotonic()
        await wait_until(lambda: not engine.ready, timeout=10)  # /readyz: 503 from hang_timeout on
        with pytest.raises(EngineError, match="engine process ended"):
            async for _ in running:
                pass
        assert 2 <= time.monotonic() - started < 15
        await wait_until(lambda: gone_or_zombie(stopped), timeout=10)  # killed, not left holding the model
        await wait_until(lambda: engine.ready, timeout=60)
        assert engine_pid(engine) != stopped and engine.restarts == 1
        assert await reply(engine)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stopped, signal.SIGCONT)
        await engine.close()


@pytest.mark.asyncio
async def test_starting_against_a_stopped_engine_fails_within_start_timeout(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A stopped process still accepts connections (the listen backlog), and the wait for its answer had no end: a
    web worker starting beside it never finished its startup."""
    address = tmp_path / "engine.sock"
    first = ProcessEngine.from_pretrained(tiny_model_dir, address=address, linger=1.0, hang_timeout=None)
    await first.start()
    os.kill(engine_pid(first), signal.SIGSTOP)
    try:
        second = ProcessEngine.from_pretrained(tiny_model_dir, address=address, start_timeout=3)
        started = time.monotonic()
        with pytest.raises(EngineNotReady, match="did not answer"):
            await second.start()
        assert time.monotonic() - started < 10
        await second.close()
    finally:
        os.kill(engine_pid(first), signal.SIGCONT)
        await first.close()
    assert first.launcher.process is not None
    await wait_until(lambda: first.launcher.process.poll() is not None, timeout=10)  # type: ignore[union-attr]


@pytest.mark.asyncio
@pytest.mark.parametrize("bad", [{"temperature": -1.0}, {"top_p": 0.0}, {"max_new_tokens": 0}])
async def test_bad_sampling_parameters_are_a_configuration_error_as_in_the_thread(
    tiny_model_dir: Path, bad: dict[str, Any]
) -> None:
    # they went to the engine process and came back as an EngineError: a 500 instead of a caller's error
    engine = ProcessEngine.from_pretrained(tiny_model_dir)
    with pytest.raises(ConfigurationError):
        await anext(aiter(engine.stream(MESSAGES, SamplingParams(**bad))))
    assert engine.launcher.process is None  # refused before anything started
    await engine.close()


def test_an_engine_never_started_or_closed_leaves_no_private_folder(tiny_model_dir: Path) -> None:
    engine = ProcessEngine.from_pretrained(tiny_model_dir)
    folder = Path(engine.address).parent
    assert folder.is_dir()
    del engine
    gc.collect()
    assert not folder.exists()  # 439 of them were left in /tmp by scripts and tests that never closed theirs


@pytest.mark.asyncio
async def test_a_reply_sent_to_an_engine_that_just_died_is_a_503_too(process_engine: ProcessEngine) -> None:
    assert await reply(process_engine)
    os.kill(engine_pid(process_engine), signal.SIGKILL)
    # at once: the request goes out before this loop's reader has seen the connection end (it was a 500 then)
    with pytest.raises(EngineUnavailable) as unavailable:
        await reply(process_engine)
    assert int(unavailable.value.headers["Retry-After"]) >= 1
    await wait_until(lambda: process_engine.ready, timeout=60)
    assert await reply(process_engine) and process_engine.restarts == 1


@pytest.mark.asyncio
async def test_over_http_a_killed_engine_ends_the_stream_in_band_and_new_chats_get_503(
    tiny_model_dir: Path, serve: Any
) -> None:
    # started and closed by the server's lifespan, on the server's own loop
    process_engine = ProcessEngine.from_pretrained(tiny_model_dir, max_batch_size=4, stream_interval=0)
    server = serve(chat_app(not_found_app, process_engine, max_concurrency=4), fail_on_errors=False, start_timeout=90)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        fields = {"max_new_tokens": 480, "temperature": 0, "ignore_eos": True}
        async with client.stream("POST", "/chat_stream", json={"user_input": "hi", **fields}) as response:
            assert response.status_code == 200
            chunks = response.aiter_raw()
            await anext(chunks)
            os.kill(engine_pid(process_engine), signal.SIGKILL)
            rest = b"".join([chunk async for chunk in chunks])
        assert b"[error: generation_error]" in rest and b"engine process ended" in rest
        refused = await client.post("/chat_stream", json={"user_input": "hi"})
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["type"] == "engine_unavailable"
        assert int(refused.headers["retry-after"]) >= 1
        assert (await client.get("/readyz")).status_code == 503
        await wait_until(lambda: process_engine.ready, timeout=60)
        again = await chat(client, "hi")
        assert again.status == 200 and again.text
        load = await wait_for_load(client, running=0, waiting=0)
        assert load["running"] == 0 and load["engine"]["restarts"] == 1  # what an operator alerts on
        assert "chatstream_engine_restarts_total 1.0" in (await client.get("/metrics")).text
        assert (await get_load(client))["waiting"] == 0


@pytest.mark.asyncio
async def test_token_limits_use_the_tokenizer_the_engine_process_sends(tiny_model_dir: Path, serve: Any) -> None:
    """``from_pretrained`` loads nothing in the web process; the limits find the tokenizer once the engine answers."""
    process_engine = ProcessEngine.from_pretrained(tiny_model_dir, max_batch_size=2, stream_interval=0)
    assert process_engine.tokenizer is None and process_engine.context_len is None
    app = chat_app(not_found_app, process_engine, max_concurrency=2, max_input_tokens=8)
    server = serve(app, start_timeout=90)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        long_input = "The quick brown fox jumps over the lazy dog. " * 4
        refused = await client.post("/chat_stream", json={"user_input": long_input})
        assert refused.status_code == 400, refused.text
        assert "tokens" in refused.json()["error"]["message"]
        messages = [{"role": "user", "content": long_input}]
        refused = await client.post("/v1/chat/completions", json={"model": "m", "messages": messages})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"
        ok = await chat(client, "hi", max_new_tokens=4)
        assert ok.status == 200 and ok.text
    assert process_engine.context_len == 512  # the tiny model's max_position_embeddings, from the engine


def test_a_web_process_never_imports_torch(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The web side of an engine process streams with the tokenizer the engine pickled: no torch in its memory."""
    if unpickling_imports_torch(tiny_model_dir, tmp_path):
        pytest.skip("this transformers imports torch to unpickle a tokenizer (up to 5.17 its tokenizer module does)")
    script = f"""
import asyncio, sys
from chatstream_asgi.engines.process import ProcessEngine
from chatstream_asgi.engines._link import EngineLink
from chatstream_asgi.engines.base import SamplingParams

async def main():
    engine = ProcessEngine.from_pretrained({str(tiny_model_dir)!r}, max_batch_size=1, stream_interval=0)
    await engine.start()
    params = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    text = "".join([c.text async for c in engine.stream([{{"role": "user", "content": "hi"}}], params)])
    await engine.close()
    print(bool(text), "torch" in sys.modules, "transformers.modeling_utils" in sys.modules)

asyncio.run(main())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", "False", "False"], done.stdout


def unpickling_imports_torch(model_dir: Path, tmp_path: Path) -> bool:
    """Whether transformers itself imports torch to unpickle its tokenizer: then no web process can do without."""
    from transformers import AutoTokenizer

    pickled = tmp_path / "tokenizer.pickle"
    pickled.write_bytes(pickle.dumps(AutoTokenizer.from_pretrained(model_dir)))
    script = f"import pickle, sys; pickle.loads(open({str(pickled)!r}, 'rb').read()); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip() == "True"


@pytest.mark.asyncio
async def test_a_cuda_error_restarts_the_engine_process_instead_of_failing_every_later_request(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "poisoned-once"
    engine = ProcessEngine.from_factory(
        "tests.integration.faulty_engine:build",
        max_batch_size=2,
        model_name="tiny",
        factory_kwargs={"model_dir": str(tiny_model_dir), "marker": str(marker)},
    )
    await engine.start()
    try:
        first_pid = engine_pid(engine)
        with pytest.raises(EngineError, match="AcceleratorError|engine process ended"):
            await reply(engine)  # its third forward raises what a poisoned CUDA context raises
        await wait_until(lambda: engine.ready and engine_pid(engine) != first_pid, timeout=60)
        assert await reply(engine)  # the new process works
        assert engine.restarts == 1 and marker.exists()
    finally:
        await engine.close()


FACTORY_MODULE = """
from chatstream_asgi.engines.transformers import TransformersEngine


def build(model_dir):
    return TransformersEngine.from_pretrained(model_dir, max_batch_size=2, stream_interval=0)
"""


@pytest.mark.asyncio
async def test_a_factory_module_found_only_on_the_web_processs_path_loads_in_the_engine_process(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # what uvicorn --app-dir or a sys.path.insert does: the module is on no path a fresh interpreter has
    app_dir, elsewhere = tmp_path / "app", tmp_path / "elsewhere"
    app_dir.mkdir()
    elsewhere.mkdir()
    (app_dir / "app_only_factory.py").write_text(FACTORY_MODULE)
    monkeypatch.syspath_prepend(str(app_dir))
    monkeypatch.chdir(elsewhere)
    engine = ProcessEngine.from_factory(
        "app_only_factory:build", max_batch_size=2, model_name="tiny", factory_kwargs={"model_dir": str(tiny_model_dir)}
    )
    await engine.start()
    try:
        assert await reply(engine)
    finally:
        await engine.close()


@pytest.mark.asyncio
async def test_replicas_of_engine_processes_split_the_chats(tiny_model_dir: Path) -> None:
    replicas = EngineReplicas.from_pretrained(tiny_model_dir, devices=["cpu", "cpu"], process=True, max_batch_size=2)
    await replicas.start()
    try:
        pids = {engine_pid(engine) for engine in replicas.engines}  # type: ignore[arg-type]
        replies = await asyncio.gather(*(reply(replicas) for _ in range(4)))
    finally:
        await replicas.close()
    assert len(pids) == 2
    assert len(set(replies)) == 1 and replies[0]
    assert replicas.served == [2, 2]


@pytest.mark.asyncio
async def test_an_engine_process_that_cannot_load_its_model_fails_start_with_a_clear_error(tmp_path: Path) -> None:
    engine = ProcessEngine({"path": str(tmp_path / "no-such-model"), "kwargs": {}}, model_name="missing")
    with pytest.raises(EngineError, match="exited with code 1 before serving"):
        await engine.start()
    assert not engine.ready
    await engine.close()


@pytest.mark.asyncio
async def test_stop_strings_end_the_reply_in_the_web_process_like_the_in_thread_engine(
    process_engine: ProcessEngine, tiny_engine_parts: tuple[Any, Any]
) -> None:
    model, tokenizer = tiny_engine_parts
    local = TransformersEngine(model, tokenizer, max_batch_size=4)
    try:
        full = await reply(local)
        stop = full[len(full) // 2 : len(full) // 2 + 3]  # the engine process sends ids; the web side must cut here
        params = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True, stop=(stop,))
        expected = [chunk async for chunk in local.stream(MESSAGES, params)]
        got = [chunk async for chunk in process_engine.stream(MESSAGES, params)]
    finally:
        await local.close()
    assert "".join(c.text for c in got) == "".join(c.text for c in expected) == full[: full.index(stop)]
    assert got[-1].finish_reason == expected[-1].finish_reason == "stop"
    assert got[-1].completion_tokens == expected[-1].completion_tokens
    assert process_engine.running_count == 0


@pytest.mark.asyncio
async def test_a_web_process_refuses_an_engine_of_another_wire_version(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from chatstream_asgi.engines import _link

    monkeypatch.setattr(_link, "WIRE_VERSION", _link.WIRE_VERSION + 1)  # as if this web process were newer
    engine = ProcessEngine.from_pretrained(tiny_model_dir, max_batch_size=2)
    try:
        with pytest.raises(EngineNotReady, match="speaks wire version"):
            await engine.start()
    finally:
        await engine.close()


@pytest.mark.asyncio
async def test_the_engine_process_prefix_cache_reports_cached_tokens_and_its_figures(
    process_engine: ProcessEngine, tiny_engine_parts: tuple[Any, Any]
) -> None:
    # the budget is known from the engine's hello: /get_load showed all zeros, capacity too, until a first step
    assert process_engine.prefix_cache_stats().capacity_bytes > 0
    history = [{"role": "user", "content": "What is the capital of France?"}]
    ends = []
    for follow_up in ("Hello, world! How are you today?", "Tell me about cats."):
        text = ""
        async for chunk in process_engine.stream(history, GREEDY):
            text += chunk.text
        ends.append(chunk)
        history += [{"role": "assistant", "content": text}, {"role": "user", "content": follow_up}]
    reference = TransformersEngine(*tiny_engine_parts, prefix_cache_bytes=0)
    try:
        expected = "".join([chunk.text async for chunk in reference.stream(history[:3], GREEDY)])
    finally:
        await reference.close()
    assert history[3]["content"] == expected  # the second turn, cached in the engine process, equals the uncached
    assert ends[0].cached_tokens == 0 and ends[1].cached_tokens >= ends[0].prompt_tokens
    await wait_until(lambda: process_engine.prefix_cache_stats().hit_tokens == ends[1].cached_tokens)
    stats = process_engine.prefix_cache_stats()
    assert stats.queries_tokens == ends[0].prompt_tokens + ends[1].prompt_tokens and stats.entries >= 1


@pytest.mark.parametrize("kind", ["process", "thread"])
@pytest.mark.asyncio
async def test_a_reply_cut_by_its_client_is_logged_and_counted_with_its_token_counts(
    kind: str, tiny_model_dir: Path, tiny_engine_parts: tuple[Any, Any], serve: Any, caplog: Any
) -> None:
    # the counts came only with a reply's last chunk: a reply its client left was logged with prompt_tokens 0 and
    # counted in chatstream_generation_tokens_total as its number of text chunks, not its tokens
    options = {"max_batch_size": 4, "stream_interval": 0.05}
    engine: Any = TransformersEngine(*tiny_engine_parts, **options)
    if kind == "process":  # started and closed by the server's lifespan, on the server's own loop
        engine = ProcessEngine.from_pretrained(tiny_model_dir, dtype="float32", **options)
    server = serve(chat_app(not_found_app, engine, max_concurrency=4), start_timeout=90)
    fields = {"user_input": "count me", "max_new_tokens": 400, "temperature": 0, "ignore_eos": True}
    with caplog.at_level("INFO", logger="chatstream_asgi.requests"):
        async with httpx.AsyncClient(base_url=server.url, timeout=30.0) as client:
            async with client.stream("POST", "/chat_stream", json=fields) as response:
                async for _ in response.aiter_raw():
                    break  # leave after the first chunk
            await wait_for_load(client, running=0)
            metrics = (await client.get("/metrics")).text
    logged = next(r.chatstream for r in caplog.records if getattr(r, "chatstream", {}).get("outcome"))
    assert logged["outcome"] == "disconnected"
    assert logged["prompt_tokens"] > 3 and 1 <= logged["completion_tokens"] < 400
    counted = next(line for line in metrics.splitlines() if line.startswith("chatstream_generation_tokens_total"))
    assert float(counted.split()[-1]) == logged["completion_tokens"]
