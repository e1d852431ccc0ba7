"""Setting a transformers model up for serving: argument checks, dtype and device placement, EOS ids, its name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigurationError


def positive(name: str, value: int) -> int:
    if not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be a positive int, got {value!r}")
    return value


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ConfigurationError(f"dtype={dtype!r} is not a torch dtype; pass e.g. 'float32' or torch.bfloat16")
    return resolved


def placed(model: Any, device: str | torch.device | None, dtype: torch.dtype | None) -> Any:
    """``model`` moved or cast only where asked and needed (quantized models refuse a no-op cast).

    With no ``dtype``, a float32 model on a CUDA device that has bf16 runs in bfloat16: half the weight bytes
    to read per decode step, which is what bounds it, and what every serving engine does there.
    """
    if device == "auto":  # the command line's default: the GPU when there is one
        device = "cuda" if torch.cuda.is_available() else None
    if device is not None and torch.device(device) != model.device:
        model = model.to(device)
    on_cuda = model.device.type == "cuda"
    if dtype is None and model.dtype == torch.float32 and on_cuda and torch.cuda.is_bf16_supported():
        dtype = torch.bfloat16
    if dtype is not None and dtype != model.dtype:
        model = model.to(dtype=dtype)
    return model


def eos_token_ids(tokenizer: Any, model: Any) -> frozenset[int]:
    """The tokenizer's EOS plus every id in ``model.generation_config.eos_token_id`` (int or list)."""
    ids: set[int] = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, (list, tuple)):
        ids.update(int(i) for i in configured)
    return frozenset(ids)


def default_name(model: Any) -> str:
    name = str(getattr(getattr(model, "config", None), "name_or_path", "") or "")
    return Path(name.rstrip("/")).name or "model"
