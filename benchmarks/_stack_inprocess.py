"""Contenders 1-4 of ``stack.py``, run in the driver's process: no HTTP, no client process.

1. the bare forward loop: the N prompts left-padded and prefilled together, then one decode forward per
   step over a ``DynamicCache``, argmax, one ``.tolist()`` a step (what a server must hand out per token):
   the ceiling of any server on this model;
2. ``model.generate`` on the same static batch (greedy, ``min_new_tokens = max_new_tokens``);
3. ``TransformersEngine`` and 4. ``ProcessEngine``: N closed-loop consumers of ``engine.stream()`` in one
   asyncio loop, tokens from the last chunk's ``completion_tokens``.

The static contenders run ``requests`` batches back to back, so each contender makes the same tokens.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _fast_model import PROMPTS, load_fast_model


@dataclass
class Measure:
    """One timed run of one contender; ``client_cpu`` and ``window`` only for the HTTP rows."""

    tokens: int
    seconds: float
    ttfts: list[float] = field(default_factory=list)
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    client_cpu: float | None = None
    window: tuple[float, float] | None = None
    chunks: int = 0
    other_cores: float = 0.0
    loop_cpu_wait: float | None = None  # seconds the server's event-loop thread waited for a core, per second

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def prompt_for(index: int, turn: int) -> str:
    """Client ``index``'s prompt at its ``turn``: the same in every contender, the HTTP client included."""
    return PROMPTS[(index + turn) % len(PROMPTS)]


class StaticBatch:
    """The bare loop and ``generate`` over one model, on batches of the chat-templated prompts."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer
        tokenizer.padding_side = "left"
        params = inspect.signature(model.forward).parameters
        # transformers 5.x renamed ``past_key_values`` to ``cache`` (the engine checks the same way).
        self.cache_kw = "cache" if "cache" in params else "past_key_values"

    def batch(self, n: int, turn: int) -> Any:
        messages = [[{"role": "user", "content": prompt_for(i, turn)}] for i in range(n)]
        texts = [self.tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
        return self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)

    def bare_loop(self, n: int, requests: int, new_tokens: int) -> Measure:
        import torch

        batches = [self.batch(n, turn) for turn in range(requests)]
        ttfts: list[float] = []
        started = time.perf_counter()
        with torch.inference_mode():
            for encoded in batches:
                first = self.decode(encoded, new_tokens)
                ttfts += [first] * n
        return Measure(n * requests * new_tokens, time.perf_counter() - started, ttfts)

    def decode(self, encoded: Any, new_tokens: int) -> float:
        """Prefill then decode ``new_tokens`` for the batch; return the seconds to its first tokens."""
        from transformers import DynamicCache

        started = time.perf_counter()
        mask, cache = encoded["attention_mask"], DynamicCache()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ids = encoded["input_ids"]
        for step in range(new_tokens):
            kwargs = {self.cache_kw: cache, "logits_to_keep": 1}
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
            next_ids = logits.logits[:, -1].argmax(-1)
            next_ids.tolist()  # what a server needs per step: the ids on the host
            if step == 0:
                first = time.perf_counter() - started
            ids, positions = next_ids[:, None], positions[:, -1:] + 1
            mask = torch_cat_ones(mask)
        return first

    def generate(self, n: int, requests: int, new_tokens: int) -> Measure:
        import torch

        batches = [self.batch(n, turn) for turn in range(requests)]
        tokens, started = 0, time.perf_counter()
        with torch.inference_mode():
            for encoded in batches:
                out = self.model.generate(
                    **encoded,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
                tokens += n * (out.shape[1] - encoded["input_ids"].shape[1])
        return Measure(tokens, time.perf_counter() - started)


def torch_cat_ones(mask: Any) -> Any:
    import torch

    return torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)


async def stream_closed_loop(engine: Any, n: int, requests: int, new_tokens: int) -> Measure:
    """N consumers of ``engine.stream``; each starts its next request when its previous one ends."""
    from chatstream_asgi.engines.base import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    measure = Measure(0, 0.0)

    async def consumer(index: int) -> None:
        for turn in range(requests):
            sent, first, last = time.perf_counter(), None, None
            try:
                async for chunk in engine.stream([{"role": "user", "content": prompt_for(index, turn)}], params):
                    first = first or time.perf_counter()
                    last = chunk
            except Exception as exc:  # a failed stream is a failed request of the row, not a crashed run
                measure.failed += 1
                measure.errors.append(f"{type(exc).__name__}: {exc}"[:300])
                continue
            measure.tokens += last.completion_tokens if last is not None else 0
            if first is not None:
                measure.ttfts.append(first - sent)

    started = time.perf_counter()
    await asyncio.gather(*(consumer(i) for i in range(n)))
    measure.seconds = time.perf_counter() - started
    return measure


def process_engine_class() -> tuple[Any, str]:
    """``(ProcessEngine, "")`` or ``(None, why not)``: the class is being written alongside this benchmark."""
    try:
        from chatstream_asgi.engines.process import ProcessEngine
    except ImportError as exc:
        return None, f"not available ({exc})"
    return ProcessEngine, ""


def thread_engine(path: Path, n: int) -> Any:
    """``TransformersEngine`` on a model of its own (the static contenders' copy stays untouched)."""
    from chatstream_asgi.engines.transformers import TransformersEngine

    model, tokenizer = load_fast_model(path)
    return TransformersEngine(model, tokenizer, max_batch_size=n)
