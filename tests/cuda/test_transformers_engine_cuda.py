from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from chatstream_asgi.engines._sampling import RowSampler, pick_tokens
from chatstream_asgi.engines.base import GenerationChunk, SamplingParams
from chatstream_asgi.engines.transformers import TransformersEngine
from chatstream_asgi.errors import EngineError
from tests.engine_helpers import TokenLog, tokens_of, wait_until

LONG_TEXT = "Streaming replies token by token keeps the user interface responsive. " * 12
PROMPTS = ["hi", "What is the capital of France? Tell me now, please.", "東京は日本の首都です。😀", LONG_TEXT]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=48, ignore_eos=True)
#: bf16 logits of the tiny model are a few units wide and carry 8 bits of mantissa.
BF16_NEAR_TIE = 0.25

Parts = tuple[Any, Any]
DEVICE_WAIT = 30.0  # seconds: a first CUDA step loads kernels


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def collect(engine: TransformersEngine, text: str, params: SamplingParams) -> tuple[str, GenerationChunk]:
    out = ""
    async for chunk in engine.stream(user(text), params):
        out += chunk.text
        last = chunk
    return out, last


def generate_greedy(parts: Parts, prompt: list[int], new_tokens: int) -> list[int]:
    model, tokenizer = parts
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=new_tokens,
        eos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
    )
    tokens: list[int] = out[0, len(prompt) :].tolist()
    return tokens


async def staggered_batch(parts: Parts, device: torch.device, log: TokenLog) -> dict[str, list[int]]:
    """PROMPTS joining one running engine at different steps; each prompt's greedy tokens."""
    engine = TransformersEngine(*parts, device=device, max_batch_size=8)
    widest = 0

    def watch() -> bool:
        nonlocal widest
        widest = max(widest, engine.running_count)
        return False

    first = asyncio.create_task(collect(engine, PROMPTS[0], GREEDY))
    await wait_until(lambda: watch() or engine.stats.steps >= 3, timeout=DEVICE_WAIT)
    second = asyncio.create_task(collect(engine, PROMPTS[1], GREEDY))
    await wait_until(lambda: watch() or engine.stats.steps >= 7, timeout=DEVICE_WAIT)
    rest = [asyncio.create_task(collect(engine, p, GREEDY)) for p in PROMPTS[2:]]
    while not all(t.done() for t in [first, second, *rest]):
        watch()
        await asyncio.sleep(0.001)
    await asyncio.gather(first, second, *rest)
    await engine.close()
    assert widest >= 3, "the requests did not overlap"
    return {p: tokens_of(log, engine.fit_prompt(user(p), GREEDY).token_ids) for p in PROMPTS}


@pytest.mark.asyncio
async def test_float32_greedy_equals_generate_for_each_row_of_a_staggered_batch(
    float32_parts: Parts, device: torch.device, token_log: TokenLog
) -> None:
    tokens = await staggered_batch(float32_parts, device, token_log)
    tokenizer = float32_parts[1]
    for text, got in tokens.items():
        prompt = tokenizer.apply_chat_template(user(text), add_generation_prompt=True)["input_ids"]
        assert got == generate_greedy(float32_parts, prompt, GREEDY.max_new_tokens), text


def bf16_gap(parts: Parts, prompt: list[int], a: int, b: int) -> float:
    """How far apart tokens ``a`` and ``b`` are in the bf16 model's next-token logits after ``prompt``."""
    model = parts[0]
    with torch.inference_mode():
        logits = model(torch.tensor([prompt], device=model.device)).logits[0, -1].float()
    return abs(float(logits[a] - logits[b]))


@pytest.mark.asyncio
async def test_bfloat16_greedy_follows_generate_up_to_near_ties(
    bfloat16_parts: Parts, device: torch.device, token_log: TokenLog
) -> None:
    # Batched bf16 matmuls round differently from solo ones: the engine may leave generate's path,
    # but only where two tokens were within bf16 rounding of each other.
    tokens = await staggered_batch(bfloat16_parts, device, token_log)
    tokenizer = bfloat16_parts[1]
    agreed = []
    for text, got in tokens.items():
        prompt = tokenizer.apply_chat_template(user(text), add_generation_prompt=True)["input_ids"]
        expected = generate_greedy(bfloat16_parts, prompt, GREEDY.max_new_tokens)
        same = next((i for i, (g, e) in enumerate(zip(got, expected, strict=True)) if g != e), len(got))
        agreed.append(same)
        if same < len(got):
            gap = bf16_gap(bfloat16_parts, prompt + expected[:same], got[same], expected[same])
            assert gap < BF16_NEAR_TIE, f"{text!r}: left generate at token {same} where the gap was {gap}"
    assert sum(agreed) >= len(PROMPTS) * 2  # the first tokens agree, not just near-ties everywhere


@pytest.mark.asyncio
async def test_seeded_sampling_is_the_same_solo_and_batched_on_the_device(
    float32_parts: Parts, device: torch.device
) -> None:
    seeded = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, max_new_tokens=32, seed=42, ignore_eos=True)
    other = SamplingParams(temperature=1.1, top_k=0, top_p=0.9, max_new_tokens=32, seed=7, ignore_eos=True)
    penalised = SamplingParams(temperature=0.8, repetition_penalty=1.3, max_new_tokens=32, ignore_eos=True)
    engine = TransformersEngine(*float32_parts, device=device)
    alone, _ = await collect(engine, PROMPTS[1], seeded)
    batched = await asyncio.gather(
        collect(engine, PROMPTS[0], other),
        collect(engine, PROMPTS[2], penalised),
        collect(engine, PROMPTS[1], seeded),
        collect(engine, PROMPTS[3], GREEDY),
        collect(engine, PROMPTS[1], other),
    )
    await engine.close()
    assert batched[2][0] == alone
    assert batched[4][0] != alone


@pytest.mark.asyncio
async def test_cancel_frees_the_row_and_the_other_stream_matches_solo(
    float32_parts: Parts, device: torch.device, token_log: TokenLog
) -> None:
    params = SamplingParams(temperature=0.0, max_new_tokens=300, ignore_eos=True)  # crosses cache regrowths
    engine = TransformersEngine(*float32_parts, device=device)
    await collect(engine, PROMPTS[1], params)
    prompt = engine.fit_prompt(user(PROMPTS[1]), params).token_ids
    solo = tokens_of(token_log, prompt)
    token_log.clear()
    survivor = asyncio.create_task(collect(engine, PROMPTS[1], params))
    doomed = engine.stream(user(PROMPTS[2]), params)
    for _ in range(3):
        await doomed.__anext__()
    # the survivor may join a step or two later
    await wait_until(lambda: engine.stats.batch_rows == 2, timeout=DEVICE_WAIT)
    await doomed.aclose()  # type: ignore[attr-defined]
    await wait_until(lambda: engine.stats.batch_rows == 1, timeout=DEVICE_WAIT)
    assert not survivor.done()
    await survivor
    await engine.close()
    assert tokens_of(token_log, prompt) == solo


@pytest.mark.asyncio
async def test_out_of_memory_in_decode_fails_its_streams_and_the_engine_keeps_serving(
    float32_parts: Parts, device: torch.device, out_of_memory_once: Callable[..., None]
) -> None:
    engine = TransformersEngine(*float32_parts, device=device)
    expected, _ = await collect(engine, PROMPTS[1], GREEDY)
    streams = [engine.stream(user(p), SamplingParams(max_new_tokens=300, ignore_eos=True)) for p in PROMPTS[:2]]
    for stream in streams:
        await stream.__anext__()
    out_of_memory_once(lambda kwargs: kwargs["input_ids"].shape == (2, 1))
    for stream in streams:
        with pytest.raises(EngineError, match="OutOfMemoryError") as failure:
            async for _ in stream:
                pass
        assert isinstance(failure.value.__cause__, torch.cuda.OutOfMemoryError)
    assert engine.stats.batch_rows == 0
    assert (await collect(engine, PROMPTS[1], GREEDY))[0] == expected
    await engine.close()


@pytest.mark.asyncio
async def test_out_of_memory_in_prefill_fails_only_the_new_stream(
    float32_parts: Parts, device: torch.device, out_of_memory_once: Callable[..., None]
) -> None:
    engine = TransformersEngine(*float32_parts, device=device)
    params = SamplingParams(temperature=0.0, max_new_tokens=200, ignore_eos=True)
    expected, _ = await collect(engine, PROMPTS[0], params)
    runner = engine.stream(user(PROMPTS[0]), params)
    first = await runner.__anext__()
    out_of_memory_once(lambda kwargs: kwargs["input_ids"].shape[1] > 1)
    with pytest.raises(EngineError, match="OutOfMemoryError"):
        await collect(engine, PROMPTS[3], GREEDY)
    rest = "".join([chunk.text async for chunk in runner])
    assert first.text + rest == expected
    await engine.close()


@contextlib.contextmanager
def no_sync_allowed(device: torch.device) -> Iterator[None]:
    """Any host-device synchronisation inside raises (on a GPU; the CPU has none to catch)."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_picking_tokens_never_waits_for_the_device(device: torch.device) -> None:
    vocab = 49152
    samplers = [
        RowSampler(SamplingParams(temperature=0.0), []),
        RowSampler(SamplingParams(temperature=0.0, repetition_penalty=1.2), [1, 2, 3]),
        RowSampler(SamplingParams(seed=1), []),
        RowSampler(SamplingParams(top_k=0, top_p=0.8), []),
        RowSampler(SamplingParams(top_k=20, top_p=1.0, repetition_penalty=1.1, seed=2), [5]),
        RowSampler(SamplingParams(top_k=0, top_p=1.0), []),
    ]
    logits = torch.randn(len(samplers), vocab, device=device) * 3
    picked = []
    for step in range(3):
        rows = samplers if step < 2 else samplers[1:]  # the last step restacks the penalty mask
        with no_sync_allowed(device):
            tokens = pick_tokens(logits[: len(rows)], rows)
        picked.append(tokens.tolist())
        for sampler, token in zip(rows, picked[-1], strict=True):
            sampler.observe(token)
    assert all(0 <= token < vocab for tokens in picked for token in tokens)
    assert picked[0][0] == picked[1][0] == int(logits[0].argmax())


@pytest.mark.asyncio
async def test_float32_prefix_cache_replies_equal_the_uncached_ones_on_the_device(
    float32_parts: Parts, device: torch.device
) -> None:
    async def converse(engine: TransformersEngine) -> list[GenerationChunk | str]:
        history: list[dict[str, str]] = []
        out: list[GenerationChunk | str] = []
        for text in PROMPTS[1:]:  # opening with "hi" would leave less than a 16-token block to match
            history.append({"role": "user", "content": text})
            reply = ""
            async for chunk in engine.stream(history, GREEDY):
                reply += chunk.text
            history.append({"role": "assistant", "content": reply})
            out += [reply, chunk]
        await engine.close()
        return out

    cached = await converse(TransformersEngine(*float32_parts, device=device, prefix_cache_bytes=1 << 28))
    plain = await converse(TransformersEngine(*float32_parts, device=device, prefix_cache_bytes=0))
    assert cached[0::2] == plain[0::2]
    ends = [end for end in cached[1::2] if isinstance(end, GenerationChunk)]
    assert ends[0].cached_tokens == 0 and all(end.cached_tokens > 0 for end in ends[1:])


def test_the_command_lines_default_device_is_the_gpu_when_there_is_one(tiny_model_dir: Any, device: Any) -> None:
    from chatstream_asgi.cli import build_parser, load_engine

    engine = load_engine(build_parser().parse_args(["serve", "--model", str(tiny_model_dir)]))
    assert engine.model.device.type == device.type  # type: ignore[attr-defined]  # cuda here; its CPU run: cpu


@pytest.mark.parametrize("kind", ["mistral", "gemma3"])
@pytest.mark.asyncio
async def test_sliding_window_models_past_their_window_equal_generate_on_the_device(
    kind: str, device: torch.device, token_log: TokenLog
) -> None:
    # Mistral: the engine's own SDPA decode mask with the window; Gemma 3 (window and full layers): transformers'
    from tests.tiny_model import train_tokenizer
    from tests.unit.test_attention_kinds import check_replies_past_the_window, windowed_model

    tokenizer = train_tokenizer()
    model = windowed_model(kind, tokenizer, "sdpa").to(device)
    await check_replies_past_the_window(model, tokenizer, token_log)
