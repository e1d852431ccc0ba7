"""The in-process contenders of ``gpu.py``: each decodes a batch of prompts greedily, a fixed number of tokens.

Every function returns the generated token count and the wall seconds of one timed run, prefill
included (the prompts are 30 to 80 tokens, so decode dominates); each is preceded by a short
warm-up run at the same batch size, so kernel selection and allocator growth stay out of the time.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

Timed = tuple[int, float]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, run: Callable[[], int]) -> Timed:
    sync(device)
    start = time.perf_counter()
    tokens = run()
    sync(device)
    return tokens, time.perf_counter() - start


def left_padded(prompts: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


def bare_loop(model: Any, prompts: list[list[int]], new_tokens: int, pad: int) -> Timed:
    """The floor of any Python server: forward, argmax, one ``tolist()`` per step, a plain DynamicCache."""
    from transformers import DynamicCache

    device = model.device
    cache_kw = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"

    def run() -> int:
        ids, mask = left_padded(prompts, pad, device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=model.config)
        for _ in range(new_tokens):
            kwargs = {cache_kw: cache, "logits_to_keep": 1, "use_cache": True}
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs).logits
            tokens = logits[:, -1].argmax(-1)
            tokens.tolist()  # what a server must do each step to stream the tokens
            ids, positions = tokens[:, None], positions[:, -1:] + 1
            mask = torch.cat([mask, mask.new_ones((len(prompts), 1))], dim=1)
        return len(prompts) * new_tokens

    with torch.inference_mode():
        return timed(device, run)


def generate_static(model: Any, prompts: list[list[int]], new_tokens: int, pad: int) -> Timed:
    """``model.generate`` on the whole batch at once: the static-batching reference."""
    ids, mask = left_padded(prompts, pad, model.device)

    def run() -> int:
        out = model.generate(
            ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            eos_token_id=None,
            pad_token_id=pad,
        )
        return int(out.shape[0] * (out.shape[1] - ids.shape[1]))

    with torch.inference_mode():
        return timed(model.device, run)


def generate_batch(model: Any, prompts: list[list[int]], new_tokens: int, pad: int) -> Timed:
    """transformers' own continuous batching (``generate_batch``), timed after a warm-up call that
    builds and keeps its manager (paged cache, CUDA graphs); its manager is destroyed afterwards."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=pad)
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.ERROR)  # its warnings about our own choices

    def run() -> int:
        results = model.generate_batch(inputs=prompts, generation_config=config, persistent_manager=True)
        failed = [r.error for r in results.values() if getattr(r, "error", None)]
        if failed or len(results) != len(prompts):
            raise RuntimeError(f"{len(results)} results for {len(prompts)} prompts; errors: {failed[:1]}")
        return sum(len(r.generated_tokens) for r in results.values())

    try:
        run()  # sized by the same workload as the timed call, whose manager it becomes
        return timed(model.device, run)
    finally:
        model.destroy_cached_continuous_batching_manager()


def engine_run(engine_cls: type, params: Any, model: Any, tokenizer: Any, texts: list[str]) -> Timed:
    """``TransformersEngine``: one ``stream()`` consumer per prompt, all in one asyncio loop."""

    async def consume(engine: Any, text: str) -> int:
        last = None
        async for chunk in engine.stream([{"role": "user", "content": text}], params):
            last = chunk
        return int(last.completion_tokens) if last is not None else 0

    async def run() -> Timed:
        engine = engine_cls(model, tokenizer, max_batch_size=len(texts))
        try:
            start = time.perf_counter()
            counts = await asyncio.gather(*(consume(engine, t) for t in texts))
            return sum(counts), time.perf_counter() - start
        finally:
            await engine.close()

    return asyncio.run(run())


def copy_bandwidth(device: torch.device) -> float:
    """Bytes read plus written per second by a large device-to-device copy (best of 10)."""
    size = (2 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(11):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size / best


def bytes_per_step(model: Any, rows: int, width: int) -> tuple[int, int]:
    """Weight bytes and KV-cache bytes one decode step reads, at an average cache ``width``."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if not model.config.tie_word_embeddings:  # the input table is only gathered from, a few rows a step
        embedding = model.get_input_embeddings().weight
        weights -= embedding.numel() * embedding.element_size()
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * model.dtype.itemsize
    return weights, rows * width * per_token


def decode_step_syncs(model: Any, prompts: list[list[int]], pad: int) -> str:
    """Where one engine decode step (mixed greedy, sampled, seeded, penalised rows) waits for the GPU.

    Runs the engine's own pieces (prefill, ``KVBatch.step``, ``choose_tokens``) under
    ``torch.cuda.set_sync_debug_mode("warn")``; each warning names the Python line that synced.
    """
    import importlib

    batching = importlib.import_module("chatstream_asgi.engines._batch")
    sampling = importlib.import_module("chatstream_asgi.engines._sampling")
    params = importlib.import_module("chatstream_asgi.engines.base").SamplingParams
    mix = [params(temperature=0.0), params(seed=1, repetition_penalty=1.1), params()]
    samplers = [sampling.RowSampler(mix[i % len(mix)], p) for i, p in enumerate(prompts)]
    runner = batching.ModelRunner(model)
    places: Counter[str] = Counter()

    def record(message: Warning | str, category: type[Warning], filename: str, lineno: int, *_: Any, **__: Any) -> None:
        places[f"{'/'.join(filename.split('/')[-2:])}:{lineno}"] += 1

    with torch.inference_mode():
        cache, logits = batching.prefill(runner, prompts, pad)
        batch = batching.KVBatch([], cache, [len(p) for p in prompts], sampling.choose_tokens(logits, samplers))
        batch.next_tokens = sampling.choose_tokens(batch.step(runner), samplers)
        sync(model.device)
        on_gpu = model.device.type == "cuda"
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            if on_gpu:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                batch.next_tokens = sampling.choose_tokens(batch.step(runner), samplers)
            finally:
                if on_gpu:
                    torch.cuda.set_sync_debug_mode("default")
    return ", ".join(f"{place} x{count}" for place, count in places.most_common()) or "none"
