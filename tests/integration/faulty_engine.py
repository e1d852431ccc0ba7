"""A ``ProcessEngine`` factory whose model raises a CUDA error (``torch.AcceleratorError``) once, on CPU.

The first engine process built from it creates ``marker`` and fails its third forward with the error a
poisoned CUDA context raises; the engine process started after that finds the marker and works. That is
what a device-side assert or an illegal memory access does on a GPU, without needing one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from chatstream_asgi.engines.transformers import TransformersEngine


class PoisonOnce(torch.nn.Module):
    def __init__(self, model: Any, fail_at: int) -> None:
        super().__init__()
        self.model = model
        self.calls = 0
        self.fail_at = fail_at

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == self.fail_at:
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)


def build(model_dir: str, marker: str) -> TransformersEngine:
    engine = TransformersEngine.from_pretrained(model_dir, max_batch_size=2, stream_interval=0)
    if not Path(marker).exists():
        Path(marker).touch()
        engine._runner.model = PoisonOnce(engine._runner.model, fail_at=3)
    return engine
