from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import torch

from chatstream_asgi.engines.base import Engine, GenerationChunk, SamplingParams
from chatstream_asgi.engines.prompts import PromptTooLong
from chatstream_asgi.engines.transformers import TransformersEngine
from chatstream_asgi.errors import ConfigurationError, EngineError, EngineNotReady
from tests.engine_helpers import TokenLog, tokens_of, wait_until

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=24)
LONG_TEXT = "Streaming replies token by token keeps the user interface responsive. " * 12
PROMPTS = ["hi", "What is the capital of France? Tell me now, please.", "東京は日本の首都です。😀", LONG_TEXT]

Parts = tuple[Any, Any]


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def collect(
    engine: TransformersEngine, text: str, params: SamplingParams = GREEDY
) -> tuple[str, GenerationChunk]:
    out = ""
    async for chunk in engine.stream(user(text), params):
        out += chunk.text
        last = chunk
    return out, last


async def running_task(engine: TransformersEngine, text: str, params: SamplingParams) -> asyncio.Task[str]:
    """Start a stream and return once its first chunk arrived (so it is surely in the batch)."""
    stream = engine.stream(user(text), params)
    first = await stream.__anext__()

    async def rest() -> str:
        return first.text + "".join([chunk.text async for chunk in stream])

    return asyncio.create_task(rest())


def reference_greedy(parts: Parts, prompt: list[int], params: SamplingParams) -> list[int]:
    """``model.generate`` greedy tokens, cut after the first EOS like the engine does."""
    model, tokenizer = parts
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
        do_sample=False,
        max_new_tokens=params.max_new_tokens,
        repetition_penalty=params.repetition_penalty,
        eos_token_id=None if params.ignore_eos else tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    tokens: list[int] = out[0, len(prompt) :].tolist()
    return tokens


async def solo_tokens(parts: Parts, texts: list[str], params: SamplingParams, log: TokenLog) -> list[list[int]]:
    engine = TransformersEngine(*parts, max_batch_size=1)
    try:
        for text in texts:
            await collect(engine, text, params)
        return [tokens_of(log, engine.fit_prompt(user(t), params).token_ids) for t in texts]
    finally:
        await engine.close()
        log.clear()


@pytest.fixture
def faulty_forward(tiny_engine_parts: Parts, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """``arm(when)``: the model's next forward for which ``when(kwargs)`` holds raises once."""
    model = tiny_engine_parts[0]
    forward = model.forward
    armed: list[Callable[[dict[str, Any]], bool]] = []

    def maybe_failing(*args: Any, **kwargs: Any) -> Any:
        if armed and armed[0](kwargs):
            armed.clear()
            raise RuntimeError("injected fault")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", maybe_failing)
    yield lambda when=lambda kwargs: True: armed.append(when)


def test_engine_satisfies_the_protocol(tiny_engine_parts: Parts) -> None:
    engine = TransformersEngine(*tiny_engine_parts, model_name="tiny")
    assert isinstance(engine, Engine)
    assert engine.model_name == "tiny"
    assert engine.context_len == 512
    assert not engine.ready


@pytest.mark.asyncio
async def test_mixed_batch_greedy_equals_solo_and_generate(tiny_engine_parts: Parts, token_log: TokenLog) -> None:
    solo = await solo_tokens(tiny_engine_parts, PROMPTS, GREEDY, token_log)
    engine = TransformersEngine(*tiny_engine_parts, max_batch_size=8)
    widest = 0

    async def watch() -> None:
        nonlocal widest
        while True:
            widest = max(widest, engine.running_count)
            await asyncio.sleep(0.001)

    watcher = asyncio.create_task(watch())
    first = asyncio.create_task(collect(engine, PROMPTS[0]))
    await wait_until(lambda: engine.stats.steps >= 3)  # the others join while the first one runs
    second = asyncio.create_task(collect(engine, PROMPTS[1]))
    await wait_until(lambda: engine.stats.steps >= 7)
    rest = [asyncio.create_task(collect(engine, p)) for p in PROMPTS[2:]]
    await asyncio.gather(first, second, *rest)
    watcher.cancel()
    await engine.close()
    prompts = [engine.fit_prompt(user(p), GREEDY).token_ids for p in PROMPTS]
    assert widest >= 3
    for prompt, expected in zip(prompts, solo, strict=True):
        assert tokens_of(token_log, prompt) == expected
        assert expected == reference_greedy(tiny_engine_parts, prompt, GREEDY)


@pytest.mark.asyncio
async def test_seeded_sampling_is_the_same_solo_and_in_a_batch(tiny_engine_parts: Parts) -> None:
    seeded = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, max_new_tokens=20, seed=42, ignore_eos=True)
    engine = TransformersEngine(*tiny_engine_parts)
    alone, _ = await collect(engine, PROMPTS[1], seeded)
    again, _ = await collect(engine, PROMPTS[1], seeded)
    other_seed = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, max_new_tokens=20, seed=7, ignore_eos=True)
    batched = await asyncio.gather(
        collect(engine, PROMPTS[0], other_seed),
        collect(engine, PROMPTS[1], seeded),
        collect(engine, PROMPTS[2], GREEDY),
        collect(engine, PROMPTS[1], other_seed),
    )
    await engine.close()
    assert alone == again == batched[1][0]
    assert batched[3][0] != alone  # the seed is what makes it reproducible


@pytest.mark.asyncio
async def test_cancelled_stream_leaves_within_a_step_and_others_are_unaffected(
    tiny_engine_parts: Parts, token_log: TokenLog
) -> None:
    # 150 tokens: past the first buffer reallocation of the cache (HEADROOM columns)
    params = SamplingParams(temperature=0.0, max_new_tokens=150, ignore_eos=True)
    [expected] = await solo_tokens(tiny_engine_parts, [PROMPTS[1]], params, token_log)
    engine = TransformersEngine(*tiny_engine_parts)
    survivor = asyncio.create_task(collect(engine, PROMPTS[1], params))
    doomed = engine.stream(user(PROMPTS[2]), params)
    for _ in range(3):
        await doomed.__anext__()
    assert engine.running_count == 2
    await doomed.aclose()  # type: ignore[attr-defined]
    cancelled_at = engine.stats.steps
    assert engine.running_count == 1
    await wait_until(lambda: engine.stats.steps >= cancelled_at + 2)
    assert engine.stats.batch_rows == 1
    assert not survivor.done()
    await survivor
    await engine.close()
    assert tokens_of(token_log, engine.fit_prompt(user(PROMPTS[1]), params).token_ids) == expected


@pytest.mark.asyncio
async def test_cancelling_the_consumer_task_drops_the_sequence(tiny_engine_parts: Parts) -> None:
    engine = TransformersEngine(*tiny_engine_parts)
    task = asyncio.create_task(collect(engine, PROMPTS[0], SamplingParams(max_new_tokens=400, ignore_eos=True)))
    await wait_until(lambda: engine.running_count == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until(lambda: engine.running_count == 0)
    await engine.close()


@pytest.mark.asyncio
async def test_stop_string_ends_reply_before_it(tiny_engine_parts: Parts) -> None:
    engine = TransformersEngine(*tiny_engine_parts)
    free = SamplingParams(temperature=0.0, max_new_tokens=30, ignore_eos=True)
    full, _ = await collect(engine, PROMPTS[1], free)
    stop = full[12:15]
    chunks = [c async for c in engine.stream(user(PROMPTS[1]), SamplingParams(**{**free.__dict__, "stop": (stop,)}))]
    await engine.close()
    text = "".join(c.text for c in chunks)
    assert text == full[: full.index(stop)]
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].completion_tokens < 30


@pytest.mark.asyncio
async def test_max_new_tokens_gives_length(tiny_engine_parts: Parts) -> None:
    engine = TransformersEngine(*tiny_engine_parts)
    _, last = await collect(engine, PROMPTS[0], SamplingParams(temperature=0.0, max_new_tokens=5, ignore_eos=True))
    await engine.close()
    prompt = engine.fit_prompt(user(PROMPTS[0]), GREEDY).token_ids
    assert (last.finish_reason, last.completion_tokens, last.prompt_tokens) == ("length", 5, len(prompt))


@pytest.mark.asyncio
async def test_eos_gives_stop_and_ignore_eos_runs_on(
    tiny_engine_parts: Parts, token_log: TokenLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer = tiny_engine_parts
    free = SamplingParams(temperature=0.0, max_new_tokens=30, ignore_eos=True)
    [tokens] = await solo_tokens(tiny_engine_parts, [PROMPTS[1]], free, token_log)
    eos_at = tokens.index(tokens[4])
    # The generation config may list several EOS ids; make one the greedy reply reaches.
    monkeypatch.setattr(model.generation_config, "eos_token_id", [tokenizer.eos_token_id, tokens[4]])
    engine = TransformersEngine(*tiny_engine_parts)
    text, last = await collect(engine, PROMPTS[1], SamplingParams(temperature=0.0, max_new_tokens=30))
    _, ignored = await collect(engine, PROMPTS[1], free)
    await engine.close()
    assert (last.finish_reason, last.completion_tokens) == ("stop", eos_at + 1)
    assert text == tokenizer.decode(tokens[:eos_at], skip_special_tokens=True)
    assert (ignored.finish_reason, ignored.completion_tokens) == ("length", 30)


@pytest.mark.asyncio
async def test_long_prompt_is_prefilled_in_chunks_between_decode_steps(
    tiny_engine_parts: Parts, token_log: TokenLog
) -> None:
    params = SamplingParams(temperature=0.0, max_new_tokens=20, ignore_eos=True)
    [unchunked] = await solo_tokens(tiny_engine_parts, [LONG_TEXT], params, token_log)
    engine = TransformersEngine(*tiny_engine_parts, prefill_chunk_tokens=32)
    long_prompt = engine.fit_prompt(user(LONG_TEXT), params).token_ids
    runner_prompt = engine.fit_prompt(user(PROMPTS[0]), params).token_ids
    runner = asyncio.create_task(collect(engine, PROMPTS[0], SamplingParams(temperature=0.0, max_new_tokens=300)))
    await wait_until(lambda: len(token_log) >= 2)
    submitted_at = len(token_log)
    await collect(engine, LONG_TEXT, params)
    first_long = next(i for i, (key, _) in enumerate(token_log) if key == tuple(long_prompt))
    interleaved = [key for key, _ in token_log[submitted_at:first_long] if key == tuple(runner_prompt)]
    runner.cancel()
    await engine.close()
    assert len(long_prompt) > 4 * 32
    assert len(interleaved) >= len(long_prompt) // 32 - 1  # the runner kept decoding during the chunks
    assert tokens_of(token_log, long_prompt) == unchunked == reference_greedy(tiny_engine_parts, long_prompt, params)


@pytest.mark.asyncio
async def test_cache_columns_are_trimmed_when_a_long_sequence_leaves(
    tiny_engine_parts: Parts, token_log: TokenLog
) -> None:
    engine = TransformersEngine(*tiny_engine_parts)
    runner_prompt = engine.fit_prompt(user(PROMPTS[0]), GREEDY).token_ids
    long_prompt = engine.fit_prompt(user(LONG_TEXT), GREEDY).token_ids
    runner = await running_task(engine, PROMPTS[0], SamplingParams(max_new_tokens=450, ignore_eos=True))
    widths: list[int] = []
    long_done = asyncio.create_task(collect(engine, LONG_TEXT, SamplingParams(max_new_tokens=3, ignore_eos=True)))
    while not long_done.done():
        widths.append(engine.stats.cache_width)
        await asyncio.sleep(0.001)
    steps = engine.stats.steps
    await wait_until(lambda: engine.stats.steps >= steps + 2)
    after = engine.stats.cache_width
    runner_length = len(runner_prompt) + len(tokens_of(token_log, runner_prompt))
    runner.cancel()
    await engine.close()
    assert max(widths) >= len(long_prompt)
    assert runner_length < len(long_prompt)  # else the runner itself is the widest row
    assert after in range(runner_length - 3, runner_length + 1)  # the runner's real columns, give or take a step


@pytest.mark.asyncio
async def test_max_batch_size_caps_running_and_extras_wait(tiny_engine_parts: Parts, token_log: TokenLog) -> None:
    params = SamplingParams(temperature=0.0, max_new_tokens=15, ignore_eos=True)
    solo = await solo_tokens(tiny_engine_parts, PROMPTS, params, token_log)
    engine = TransformersEngine(*tiny_engine_parts, max_batch_size=2)
    seen: list[tuple[int, int]] = []
    tasks = [asyncio.create_task(collect(engine, p, params)) for p in PROMPTS]
    while not all(t.done() for t in tasks):
        seen.append((engine.stats.running, engine.stats.waiting))
        await asyncio.sleep(0.001)
    await engine.close()
    assert max(r for r, _ in seen) == 2
    assert max(w for _, w in seen) >= 1
    for prompt, expected in zip(PROMPTS, solo, strict=True):
        assert tokens_of(token_log, engine.fit_prompt(user(prompt), params).token_ids) == expected


@pytest.mark.asyncio
async def test_decode_fault_fails_the_batch_and_the_worker_keeps_serving(
    tiny_engine_parts: Parts, faulty_forward: Callable[..., None]
) -> None:
    engine = TransformersEngine(*tiny_engine_parts)
    expected, _ = await collect(engine, PROMPTS[1])
    streams = [engine.stream(user(p), SamplingParams(max_new_tokens=200, ignore_eos=True)) for p in PROMPTS[:2]]
    for s in streams:
        await s.__anext__()
    faulty_forward(lambda kwargs: kwargs["input_ids"].shape == (2, 1))
    for s in streams:
        with pytest.raises(EngineError, match="injected fault"):
            async for _ in s:
                pass
    assert (await collect(engine, PROMPTS[1]))[0] == expected
    await engine.close()


@pytest.mark.asyncio
async def test_prefill_fault_fails_only_the_new_sequence(
    tiny_engine_parts: Parts, faulty_forward: Callable[..., None]
) -> None:
    engine = TransformersEngine(*tiny_engine_parts)
    params = SamplingParams(temperature=0.0, max_new_tokens=60, ignore_eos=True)
    expected, _ = await collect(engine, PROMPTS[0], params)
    runner = await running_task(engine, PROMPTS[0], params)
    faulty_forward(lambda kwargs: kwargs["input_ids"].shape[1] > 1)
    with pytest.raises(EngineError):
        await collect(engine, PROMPTS[1])
    assert await runner == expected
    await engine.close()


@pytest.mark.asyncio
async def test_event_loop_keeps_ticking_while_the_model_runs(
    tiny_engine_parts: Parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_engine_parts[0]
    forward = model.forward

    def slow_forward(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.03)  # a blocking model: if it ran on the loop, no tick could happen meanwhile
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", slow_forward)
    engine = TransformersEngine(*tiny_engine_parts)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.002)
            ticks += 1

    ticking = asyncio.create_task(ticker())
    at_chunk = [ticks async for _ in engine.stream(user(PROMPTS[1]), SamplingParams(max_new_tokens=8, ignore_eos=True))]
    ticking.cancel()
    await engine.close()
    assert len(at_chunk) >= 3
    assert all(later > earlier for earlier, later in zip(at_chunk, at_chunk[1:], strict=False))


@pytest.mark.asyncio
async def test_close_ends_in_flight_streams_and_start_again_works(tiny_engine_parts: Parts) -> None:
    engine = TransformersEngine(*tiny_engine_parts)
    stream: AsyncIterator[GenerationChunk] = engine.stream(user("hi"), SamplingParams(max_new_tokens=400))
    await stream.__anext__()  # lazily started
    assert engine.ready
    await engine.close()
    with pytest.raises(EngineNotReady):
        async for _ in stream:
            pass
    assert not engine.ready
    with pytest.raises(EngineNotReady):
        await collect(engine, "hi")
    await engine.start()
    _, last = await collect(engine, "hi", SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert last.finish_reason == "length"
    await engine.close()
    await engine.close()  # idempotent


@pytest.mark.asyncio
async def test_prompt_is_truncated_and_too_long_raises(tiny_engine_parts: Parts) -> None:
    engine = TransformersEngine(*tiny_engine_parts, context_len=64, system_prompt="Be brief.")
    history = [{"role": "user", "content": LONG_TEXT[:150]}, {"role": "assistant", "content": "ok"}, *user("hi")]
    text = engine.render_prompt(history, SamplingParams(max_new_tokens=8))
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(PromptTooLong):
        await collect(engine, LONG_TEXT)
    await engine.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "bad",
    [{"max_new_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_k": -1}, {"repetition_penalty": 0.0}],
)
async def test_invalid_sampling_params_are_rejected(tiny_engine_parts: Parts, bad: dict[str, Any]) -> None:
    engine = TransformersEngine(*tiny_engine_parts)
    with pytest.raises(ConfigurationError):
        await collect(engine, "hi", SamplingParams(**bad))
    assert not engine.ready  # rejected before the worker was started


def test_invalid_constructor_arguments_are_rejected(tiny_engine_parts: Parts, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigurationError, match="max_batch_size"):
        TransformersEngine(*tiny_engine_parts, max_batch_size=0)
    with pytest.raises(ConfigurationError, match="dtype"):
        TransformersEngine(*tiny_engine_parts, dtype="float99")
    model, tokenizer = tiny_engine_parts
    monkeypatch.setattr(tokenizer, "chat_template", None)
    with pytest.raises(ConfigurationError, match="chat template"):
        TransformersEngine(model, tokenizer)


@pytest.mark.asyncio
async def test_greedy_repetition_penalty_matches_generate(tiny_engine_parts: Parts, token_log: TokenLog) -> None:
    params = SamplingParams(temperature=0.0, max_new_tokens=24, repetition_penalty=1.5, ignore_eos=True)
    engine = TransformersEngine(*tiny_engine_parts)
    await asyncio.gather(*(collect(engine, p, params) for p in PROMPTS[:3]))
    await engine.close()
    for text in PROMPTS[:3]:
        prompt = engine.fit_prompt(user(text), params).token_ids
        assert tokens_of(token_log, prompt) == reference_greedy(tiny_engine_parts, prompt, params)


@pytest.mark.asyncio
async def test_from_pretrained_loads_model_and_tokenizer(tiny_model_dir: Any) -> None:
    engine = TransformersEngine.from_pretrained(tiny_model_dir, max_batch_size=3, dtype="float32")
    assert engine.max_batch_size == 3
    assert engine.model_name == tiny_model_dir.name
    _, last = await collect(engine, "hi", SamplingParams(max_new_tokens=4, ignore_eos=True))
    await engine.close()
    assert last.completion_tokens == 4


def test_growing_cache_layer_matches_concatenation() -> None:
    from transformers import LlamaConfig

    from chatstream_asgi.engines._cache import HEADROOM, GrowingLayer, append_rows, compaction, keep_rows, new_cache

    torch.manual_seed(2)
    config = LlamaConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=2, num_key_value_heads=1)
    cache, other = new_cache(config), new_cache(config)
    layer = cache.layers[0]
    assert isinstance(layer, GrowingLayer)
    expected = torch.randn(3, 1, 5, 4)
    layer.update(expected, expected.clone())
    for _ in range(HEADROOM + 20):  # crosses a reallocation
        step = torch.randn(3, 1, 1, 4)
        keys, values = layer.update(step, step.clone())
        expected = torch.cat([expected, step], dim=-2)
        assert torch.equal(keys, expected) and torch.equal(values, expected)
    order, moves = compaction(3, [1, 2])
    assert (order, moves) == ([2, 1], [(2, 0)])  # the last row fills the hole: one row copied, not the cache
    keep_rows(cache, moves, len(order), cut=3)
    expected = expected[order, :, 3:]
    assert torch.equal(layer.keys, expected)
    joined = torch.randn(1, 1, 7, 4)
    other.layers[0].update(joined, joined.clone())
    append_rows(cache, other, width=expected.shape[-2])
    padded = torch.cat([torch.zeros(1, 1, expected.shape[-2] - 7, 4), joined], dim=-2)
    merged = torch.cat([expected, padded])
    assert torch.equal(layer.keys, merged)
    step = torch.randn(3, 1, 1, 4)
    assert torch.equal(layer.update(step, step.clone())[0], torch.cat([merged, step], dim=-2))


def test_growing_cache_survives_any_mix_of_steps_leaves_and_joins() -> None:
    """Rows leave and join in place: after every operation each layer equals the same batch rebuilt by
    concatenation, its padding zeros (never the garbage of reused memory), whatever the buffers' room."""
    from transformers import LlamaConfig

    from chatstream_asgi.engines._cache import append_rows, compaction, keep_rows, new_cache

    rng = random.Random(7)
    torch.manual_seed(7)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=8, num_attention_heads=2, num_key_value_heads=1)

    def filled(rows: int, width: int) -> tuple[Any, list[list[torch.Tensor]]]:
        cache, tensors = new_cache(config), []
        for layer in cache.layers:
            keys, values = torch.randn(rows, 1, width, 4), torch.randn(rows, 1, width, 4)
            layer.update(keys, values)
            tensors.append([keys.clone(), values.clone()])
        return cache, tensors

    def padded(t: torch.Tensor, width: int) -> torch.Tensor:
        return torch.cat([torch.zeros(*t.shape[:2], width - t.shape[2], t.shape[3]), t], dim=2)

    cache, expected = filled(3, 5)
    buffers = set()
    for _ in range(1500):
        rows, width = expected[0][0].shape[0], expected[0][0].shape[2]
        roll = rng.random()
        if roll < 0.6:  # a decode step
            for layer, kv in zip(cache.layers, expected, strict=True):
                step = [torch.randn(rows, 1, 1, 4), torch.randn(rows, 1, 1, 4)]
                layer.update(*step)
                kv[:] = [torch.cat([old, new], dim=2) for old, new in zip(kv, step, strict=True)]
        elif roll < 0.8 and rows > 1:  # some rows leave, some columns become padding for all
            order, moves = compaction(rows, sorted(rng.sample(range(rows), rng.randint(1, rows))))
            cut = rng.randint(0, min(3, width - 1))
            keep_rows(cache, moves, len(order), cut)
            expected = [[t[order][:, :, cut:] for t in kv] for kv in expected]
        else:  # rows join, narrower or wider than the batch
            other, joined = filled(rng.randint(1, 6), rng.randint(1, width + 3))
            width = max(width, joined[0][0].shape[2])
            append_rows(cache, other, width)
            expected = [
                [torch.cat([padded(a, width), padded(b, width)]) for a, b in zip(mine, theirs, strict=True)]
                for mine, theirs in zip(expected, joined, strict=True)
            ]
        for layer, (keys, values) in zip(cache.layers, expected, strict=True):
            assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
        buffers.add(cache.layers[0]._key_buffer.shape)
    assert len(buffers) > 50  # the mix grew and shrank the buffers many times


def test_streams_from_two_live_loops_in_turn_use_one_channel_each(tiny_engine_parts: Parts) -> None:
    # every switch of loop made a new channel and forgot the old one, whose loop still ran: the worker flushed
    # one more channel at every step, without end
    engine = TransformersEngine(*tiny_engine_parts, max_batch_size=2, stream_interval=0)
    params = SamplingParams(max_new_tokens=2, temperature=0.0)
    loops = [asyncio.new_event_loop() for _ in range(2)]
    threads = [threading.Thread(target=loop.run_forever, daemon=True) for loop in loops]
    for thread in threads:
        thread.start()
    try:
        for turn in range(12):
            asyncio.run_coroutine_threadsafe(collect(engine, f"hi {turn}", params), loops[turn % 2]).result(30)
        assert engine._scheduler is not None
        assert len(engine._scheduler._intake._channels) == 2 and len(engine._channels) == 2
        for _ in range(3):  # a loop per request (asyncio.run), each closed after: nothing piles up either
            asyncio.run(collect(engine, "once", params))
        assert len(engine._channels) == 3  # the two live loops and the last one; the closed ones went
    finally:
        for loop in loops:
            loop.call_soon_threadsafe(loop.stop)
        for thread, loop in zip(threads, loops, strict=True):
            thread.join(5)
            loop.close()
        asyncio.run(engine.close())
