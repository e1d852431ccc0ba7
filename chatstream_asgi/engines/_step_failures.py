"""What a failed forward does: its sequences end with an ``EngineError`` each, and some CUDA errors stop the worker."""

from __future__ import annotations

import logging

import torch

from ..errors import EngineError
from ._sequence import Sequence

logger = logging.getLogger(__name__)


def fail_step(seqs: list[Sequence], exc: BaseException) -> None:
    """Fail every sequence of a forward that raised (its cache may be half-updated)."""
    logger.error("generation step failed for %d sequence(s)", len(seqs), exc_info=exc)
    for seq in seqs:
        # One instance per stream: each consumer raises it and gets its own traceback.
        error = EngineError(f"Generation failed in the model worker: {type(exc).__name__}: {exc}")
        error.__cause__ = exc
        seq.fail(error)
    # torch.cuda's name: torch.OutOfMemoryError is the same class, but only from torch 2.4 (we support 2.2 up)
    if isinstance(exc, torch.cuda.OutOfMemoryError) and torch.cuda.is_available():
        torch.cuda.empty_cache()  # give the failed batch's blocks back before the next step allocates


def poisons_the_device(exc: BaseException) -> bool:
    """A CUDA error other than OOM (an illegal address, a device-side assert) leaves the context unusable:
    every later step would fail too, so the worker stops (an engine process then exits and is restarted)."""
    accelerator_error = getattr(torch, "AcceleratorError", ())
    return isinstance(exc, accelerator_error) and not isinstance(exc, torch.cuda.OutOfMemoryError)
