"""Device errors in the worker: an out-of-memory fails only the affected streams; a poisoned device stops it."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from chatstream_asgi.engines.base import SamplingParams
from chatstream_asgi.engines.transformers import TransformersEngine
from chatstream_asgi.errors import EngineError
from tests.integration.faulty_engine import PoisonOnce

GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
MESSAGES = [{"role": "user", "content": "hi"}]


class RaiseOnce(PoisonOnce):
    def __init__(self, model: Any, error: BaseException) -> None:
        super().__init__(model, fail_at=2)
        self.error = error

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == self.fail_at:
            raise self.error
        return self.model(*args, **kwargs)


async def reply(engine: TransformersEngine) -> str:
    return "".join([chunk.text async for chunk in engine.stream(MESSAGES, GREEDY)])


@pytest.mark.asyncio
async def test_out_of_memory_fails_the_affected_stream_and_the_engine_keeps_serving(
    tiny_engine_parts: tuple[Any, Any],
) -> None:
    model, tokenizer = tiny_engine_parts
    engine = TransformersEngine(model, tokenizer, max_batch_size=2)
    engine._runner.model = RaiseOnce(model, torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    try:
        with pytest.raises(EngineError, match="OutOfMemoryError"):
            await reply(engine)
        assert engine.ready
        assert len(await reply(engine)) > 0
    finally:
        await engine.close()


@pytest.mark.asyncio
async def test_a_poisoned_device_stops_the_worker_so_readiness_fails(tiny_engine_parts: tuple[Any, Any]) -> None:
    model, tokenizer = tiny_engine_parts
    engine = TransformersEngine(model, tokenizer, max_batch_size=2)
    engine._runner.model = RaiseOnce(model, torch.AcceleratorError("CUDA error: device-side assert triggered"))
    try:
        with pytest.raises(EngineError, match="AcceleratorError"):
            await reply(engine)
        assert engine._scheduler is not None
        engine._scheduler.join(5)
        assert not engine.ready  # /readyz now answers 503, and an engine process would be restarted
    finally:
        await engine.close()
