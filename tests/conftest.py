"""Shared fixtures: a tiny random Llama with an offline-trained tokenizer, built once per session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the tiny model and tokenizer, as ``save_pretrained`` writes them."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_engine_parts(tiny_model_dir: Path) -> tuple[Any, Any]:
    """``(model, tokenizer)`` loaded through the real ``from_pretrained`` path, float32 on CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return model.eval(), tokenizer
