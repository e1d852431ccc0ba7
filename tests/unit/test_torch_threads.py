"""The model's torch threads: every core but one by default on the CPU, set in the engine's worker thread only,
so the host app's threads (and those it starts later) keep their own count."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import pytest
import torch

from chatstream_asgi.engines.base import SamplingParams
from chatstream_asgi.engines.torch_threads import engine_threads, use_in_this_thread
from chatstream_asgi.engines.transformers import TransformersEngine
from chatstream_asgi.errors import ConfigurationError

CORES = len(os.sched_getaffinity(0))


def threads_of_a_new_thread() -> int:
    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return seen[0]


def test_use_in_this_thread_sets_that_thread_and_no_other() -> None:
    in_main, in_new = torch.get_num_threads(), threads_of_a_new_thread()
    asked = in_new + 1  # differs from what a new thread gets
    seen: list[int] = []

    def worker() -> None:
        use_in_this_thread(asked)
        seen.append(torch.get_num_threads())
        torch.ones(256, 256) @ torch.ones(256, 256)  # a parallel region, on the thread's own count
        seen.append(torch.get_num_threads())

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [asked, asked]
    assert (torch.get_num_threads(), threads_of_a_new_thread()) == (in_main, in_new)


def test_the_default_leaves_a_core_unless_the_environment_says(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert (engine_threads(None), engine_threads(3)) == (max(1, CORES - 1), 3)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert (engine_threads(None), engine_threads(3)) == (None, 3)
    for wrong in (0, -1, 1.5, True, "2"):
        with pytest.raises(ConfigurationError, match="torch_threads must be a positive int"):
            engine_threads(wrong)  # type: ignore[arg-type]


def test_a_cpu_engine_takes_all_cores_but_one_or_what_it_is_told(
    tiny_engine_parts: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert TransformersEngine(*tiny_engine_parts).torch_threads == max(1, CORES - 1)
    assert TransformersEngine(*tiny_engine_parts, torch_threads=3).torch_threads == 3
    with pytest.raises(ConfigurationError, match="torch_threads"):
        TransformersEngine(*tiny_engine_parts, torch_threads=0)


@pytest.mark.asyncio
async def test_the_worker_runs_the_model_on_its_count_and_the_host_keeps_its_own(
    tiny_engine_parts: tuple[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    in_main, in_new = torch.get_num_threads(), threads_of_a_new_thread()
    asked = in_new + 1
    engine = TransformersEngine(*tiny_engine_parts, torch_threads=asked)
    params = SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True)
    with caplog.at_level(logging.INFO, logger="chatstream_asgi.engines._scheduler"):
        try:
            chunks = [chunk async for chunk in engine.stream([{"role": "user", "content": "hi"}], params)]
        finally:
            await engine.close()
    assert chunks[-1].completion_tokens == 4
    assert f"the model runs on {asked} torch thread(s)" in caplog.messages  # counted inside the worker
    assert (torch.get_num_threads(), threads_of_a_new_thread()) == (in_main, in_new)
