"""The models and prompts of ``gpu.py``: random weights of real shapes, built on the device, nothing downloaded.

The tokenizer is a byte-level BPE trained offline on a small corpus (so prompts tokenize like text)
whose vocabulary is then padded with filler entries (two- and three-letter strings) up to the
model's width: whatever id a random model emits decodes to a little text, as a real model's would.
Shared with ``_gpu_server.py``, which builds the same model in the server process; imports
nothing from ``chatstream_asgi`` but ``engine_module``, which needs torch and transformers only.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import string
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _fast_model import CHAT_TEMPLATE  # one template for every benchmark model

REPO = Path(__file__).resolve().parents[1]
SEED = 1234
SPECIALS = ["<|pad|>", "<|bos|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Explain in detail how photosynthesis turns sunlight into chemical energy in the leaves of plants.",
    "Write a long story about a lighthouse keeper who finds a message in a bottle on a stormy night.",
    "Describe step by step how to bake a loaf of sourdough bread at home, from the starter to the oven.",
    "What are the main causes of the French Revolution? Explain each one and how they fed each other.",
    "Explain how a car engine works, from the fuel tank through the pistons to the wheels on the road.",
    "Give me a detailed plan for learning to play the guitar in six months, with a weekly practice routine.",
    "Describe the water cycle and why it matters for life on Earth, for farming and for the climate.",
    "Compare cats and dogs as pets, with their advantages and drawbacks for a family in a small flat.",
]


@dataclass(frozen=True)
class Shape:
    """A Llama shape: the real model's dimensions, or tiny ones with the same vocabulary (``--smoke``)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool

    def tiny(self) -> Shape:
        return Shape(64, 2, 4, 2, 128, self.vocab, self.tied)


SHAPES = {
    "smollm2": Shape(576, 30, 9, 3, 1536, 49152, True),
    "llama1b": Shape(2048, 16, 32, 8, 8192, 128256, True),
    "llama8b": Shape(4096, 32, 32, 8, 14336, 128256, False),
}
LABELS = {"smollm2": "SmolLM2-135M", "llama1b": "Llama-3.2-1B", "llama8b": "Llama-3.1-8B"}


def build_tokenizer(vocab: int) -> Any:
    """A chat tokenizer of exactly ``vocab`` ids (trained merges first, filler after)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 8, trainer=trainer)
    spec = json.loads(backend.to_str())
    table: dict[str, int] = spec["model"]["vocab"]
    filler = ("".join(c) for n in (2, 3) for c in itertools.product(string.ascii_letters, repeat=n))
    for text in filler:
        if len(table) >= vocab:
            break
        table.setdefault(text, len(table))
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token="<|bos|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHAT_TEMPLATE,
    )


def build_model(name: str, device: str, *, smoke: bool) -> tuple[Any, Any]:
    """``(model, tokenizer)``: random bf16 weights initialised on ``device`` (float32 for a smoke run on a CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    shape = SHAPES[name].tiny() if smoke else SHAPES[name]
    tokenizer = build_tokenizer(shape.vocab)
    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=shape.tied,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    dtype = torch.float32 if smoke and device == "cpu" else torch.bfloat16
    torch.manual_seed(SEED)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = None  # fixed-length replies everywhere (ignore_eos)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def engine_factory(name: str, device: str, smoke: bool, max_batch: int) -> Any:
    """The engine process's factory for the ``ProcessEngine`` row (``_gpu_server.py --engine process``): the same
    random model as every other row, built in that process, on ``device``."""
    from chatstream_asgi.engines.transformers import TransformersEngine

    model, tokenizer = build_model(name, device, smoke=smoke)
    return TransformersEngine(model, tokenizer, max_batch_size=max_batch)


def prompt_texts(count: int) -> list[str]:
    """``count`` user turns of one to three corpus sentences (30 to 80 tokens once templated)."""
    return [" ".join(CORPUS[(i + j) % len(CORPUS)] for j in range(1 + i % 3)) for i in range(count)]


def prompt_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """The token ids of each text as a chat prompt, as the engine renders it."""
    out = []
    for text in texts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def engine_module() -> types.ModuleType:
    """``chatstream_asgi.engines.transformers`` from this checkout, without the web dependencies.

    The package's ``__init__`` imports the middleware (starlette, itsdangerous, asgiref); the engine
    itself needs torch and transformers only. Where those are missing, a bare package object stands
    in for ``chatstream_asgi`` so that only the engine's own modules load.
    """
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    web = ("starlette", "itsdangerous", "asgiref")
    if "chatstream_asgi" not in sys.modules and any(importlib.util.find_spec(name) is None for name in web):
        stub = types.ModuleType("chatstream_asgi")
        stub.__path__ = [str(REPO / "chatstream_asgi")]
        sys.modules["chatstream_asgi"] = stub
    import chatstream_asgi.engines.transformers as module

    return module
