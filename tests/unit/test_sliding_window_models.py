"""Models with sliding-window attention layers (Mistral: every layer; Gemma 2 and 3: one layer of two here) are
served within their window, where the window changes nothing: the engine's context is capped there, and greedy
replies in a mixed batch equal ``model.generate`` token for token, with SDPA (the engine's own decode mask) and eager
attention (transformers' masks; Gemma 2 has no SDPA)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from chatstream_asgi.engines.base import SamplingParams
from chatstream_asgi.engines.prompts import PromptTooLong
from chatstream_asgi.engines.transformers import TransformersEngine
from chatstream_asgi.errors import ConfigurationError
from tests.engine_helpers import TokenLog, tokens_of
from tests.tiny_model import train_tokenizer

WINDOW = 96
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=30, ignore_eos=True)
TEXTS = ["hi", "What is the capital of France? Tell me now.", "東京は日本の首都です。😀 and the quick brown fox"]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return train_tokenizer()


def windowed_model(kind: str, tokenizer: Any, attention: str) -> Any:
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        MistralConfig,
        MistralForCausalLM,
    )

    shape = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "sliding_window": WINDOW,
        "initializer_range": 0.2,  # logits far apart: greedy picks robust to batched matmuls' last bits
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    torch.manual_seed(1234)
    layers = ["sliding_attention", "full_attention"]
    if kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**shape, attn_implementation=attention))
    elif kind == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(**shape, head_dim=16, layer_types=layers, attn_implementation=attention))
    else:
        config = Gemma3TextConfig(**shape, head_dim=16, layer_types=layers, attn_implementation=attention)
        model = Gemma3ForCausalLM(config)
    return model.eval()


def reference_greedy(model: Any, tokenizer: Any, prompt: list[int], params: SamplingParams) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
        do_sample=False,
        max_new_tokens=params.max_new_tokens,
        eos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
    )
    return list(out[0, len(prompt) :].tolist())


@pytest.mark.parametrize(
    ("kind", "attention"), [("mistral", "sdpa"), ("mistral", "eager"), ("gemma2", "eager"), ("gemma3", "sdpa")]
)
@pytest.mark.asyncio
async def test_a_sliding_window_model_is_served_within_its_window_equal_to_generate(
    kind: str, attention: str, tokenizer: Any, token_log: TokenLog
) -> None:
    model = windowed_model(kind, tokenizer, attention)
    engine = TransformersEngine(model, tokenizer, max_batch_size=4, prefix_cache_bytes=0)
    assert engine.context_len == WINDOW  # not the 512 positions: past the window the layers would differ
    messages = [[{"role": "user", "content": text}] for text in TEXTS]
    try:
        replies = await asyncio.gather(*(_reply(engine, m) for m in messages))
        with pytest.raises(PromptTooLong):  # a prompt past the window is refused, never computed wrongly
            await _reply(engine, [{"role": "user", "content": "the quick brown fox " * 40}])
    finally:
        await engine.close()
    assert all(replies)
    for conversation in messages:
        prompt = engine.fit_prompt(conversation, GREEDY).token_ids
        assert len(prompt) + GREEDY.max_new_tokens <= WINDOW
        assert tokens_of(token_log, prompt) == reference_greedy(model, tokenizer, prompt, GREEDY)


async def _reply(engine: TransformersEngine, messages: list[dict[str, str]]) -> str:
    return "".join([chunk.text async for chunk in engine.stream(messages, GREEDY)])


def test_a_context_over_the_window_is_refused_and_one_within_it_kept(tokenizer: Any) -> None:
    model = windowed_model("mistral", tokenizer, "sdpa")
    with pytest.raises(ConfigurationError, match=f"sliding attention window of {WINDOW} tokens"):
        TransformersEngine(model, tokenizer, context_len=WINDOW + 1)
    assert TransformersEngine(model, tokenizer, context_len=64).context_len == 64
