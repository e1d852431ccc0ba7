"""The GPU path of ``TransformersEngine``: every test in this folder is marked ``cuda``.

They run on ``cuda`` when ``torch.cuda.is_available()`` and are skipped otherwise, unless
``CHATSTREAM_CUDA_TESTS_ON_CPU=1`` runs them on ``cpu`` (proof that they are not broken, on any
machine): ``CHATSTREAM_CUDA_TESTS_ON_CPU=1 python -m pytest tests/cuda -q``.

On a bare CUDA machine (torch, transformers, pytest, pytest-timeout, httpx, anyio, h11 and click
installed, nothing else of ours) the root ``tests/conftest.py`` and the package also need uvicorn,
starlette, itsdangerous, asgiref and pytest-asyncio: carry their wheels as the module docstring of
``benchmarks/gpu.py`` shows, then ``python -m pytest tests/cuda -q`` from the repository root (under
a minute on an H200).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

HERE = Path(__file__).parent
ON_CPU = os.environ.get("CHATSTREAM_CUDA_TESTS_ON_CPU") == "1"
SKIP = pytest.mark.skip(reason="needs a CUDA GPU (CHATSTREAM_CUDA_TESTS_ON_CPU=1 runs these tests on the CPU)")



def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.cuda)
            if not (torch.cuda.is_available() or ON_CPU):
                item.add_marker(SKIP)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_parts(path: Path, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """A fresh ``(model, tokenizer)`` on ``device`` (not the session's CPU model: ``.to`` moves in place)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def float32_parts(tiny_model_dir: Path, device: torch.device) -> tuple[Any, Any]:
    return load_parts(tiny_model_dir, device, torch.float32)


@pytest.fixture(scope="session")
def bfloat16_parts(tiny_model_dir: Path, device: torch.device) -> tuple[Any, Any]:
    return load_parts(tiny_model_dir, device, torch.bfloat16)


def raise_out_of_memory(device: torch.device) -> None:
    """A real allocator OOM on a GPU (a petabyte); on the CPU, the exception a GPU would raise."""
    if device.type == "cuda":
        torch.empty(1 << 50, dtype=torch.uint8, device=device)
    raise torch.cuda.OutOfMemoryError("CUDA out of memory (raised on the CPU in place of a GPU)")


@pytest.fixture
def out_of_memory_once(
    float32_parts: tuple[Any, Any], device: torch.device, monkeypatch: pytest.MonkeyPatch
) -> Callable[[Callable[[dict[str, Any]], bool]], None]:
    """``arm(when)``: the model's next forward for which ``when(kwargs)`` holds runs out of memory."""
    model = float32_parts[0]
    forward = model.forward
    armed: list[Callable[[dict[str, Any]], bool]] = []

    def maybe_out_of_memory(*args: Any, **kwargs: Any) -> Any:
        if armed and armed[0](kwargs):
            armed.clear()
            raise_out_of_memory(device)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", maybe_out_of_memory)
    return armed.append
