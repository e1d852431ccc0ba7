"""The attention kinds the engine serves, against ``model.generate`` token for token, and the ones it refuses.

Sliding-window layers (Mistral, Phi-3: every layer; Gemma 2/3, Qwen2: one of two here): the engine keeps every
column and masks the ones past the window, so prompts and replies far longer than the window (8 tokens here) give
greedy replies equal to ``generate`` (whose cache drops those columns), in a mixed batch, from the prefix cache and
prefilled in chunks, with SDPA (the engine's own decode mask where every layer has the window, transformers' masks
for the mixed ones) and eager attention (transformers' masks; Gemma 2 has no SDPA). ALiBi (Falcon) gets the 2-D
mask it builds its bias from; chunked attention (Llama 4) is refused by name."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from chatstream_asgi.engines.base import SamplingParams
from chatstream_asgi.engines.transformers import TransformersEngine
from chatstream_asgi.errors import ConfigurationError
from tests.engine_helpers import TokenLog, tokens_of
from tests.tiny_model import train_tokenizer

WINDOW = 8
# a repetition penalty keeps the random models from repeating one token, which no mask change would alter
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=30, ignore_eos=True, repetition_penalty=1.5)
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
        Phi3Config,
        Phi3ForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
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
    elif kind == "phi3":
        model = Phi3ForCausalLM(Phi3Config(**shape, attn_implementation=attention))
    elif kind == "qwen2":  # its window on, from layer 1 on: one full layer, one sliding
        config = Qwen2Config(**shape, use_sliding_window=True, max_window_layers=1, attn_implementation=attention)
        model = Qwen2ForCausalLM(config)
    elif kind == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(**shape, head_dim=16, layer_types=layers, attn_implementation=attention))
    else:
        config = Gemma3TextConfig(**shape, head_dim=16, layer_types=layers, attn_implementation=attention)
        model = Gemma3ForCausalLM(config)
    return model.eval()


def reference_greedy(model: Any, tokenizer: Any, prompt: list[int], params: SamplingParams) -> list[int]:
    out = model.generate(
        torch.tensor([prompt], device=model.device),
        attention_mask=torch.ones((1, len(prompt)), dtype=torch.long, device=model.device),
        do_sample=False,
        max_new_tokens=params.max_new_tokens,
        repetition_penalty=params.repetition_penalty,
        eos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
    )
    return list(out[0, len(prompt) :].tolist())


KINDS = [("mistral", "sdpa"), ("mistral", "eager"), ("phi3", "sdpa"), ("gemma2", "eager"), ("gemma3", "sdpa")]


@pytest.mark.parametrize(("kind", "attention"), [*KINDS, ("qwen2", "sdpa")])
@pytest.mark.asyncio
async def test_replies_past_the_window_equal_generate_in_a_batch_and_from_the_prefix_cache(
    kind: str, attention: str, tokenizer: Any, token_log: TokenLog
) -> None:
    await check_replies_past_the_window(windowed_model(kind, tokenizer, attention), tokenizer, token_log)


async def check_replies_past_the_window(model: Any, tokenizer: Any, token_log: TokenLog) -> None:
    """Also run on the GPU by ``tests/cuda`` (float32: greedy picks there equal generate's too)."""
    engine = TransformersEngine(model, tokenizer, max_batch_size=4, dtype="float32")  # a GPU would cast to bf16
    assert engine.context_len == 512  # the model's positions, not its window
    conversations = [[{"role": "user", "content": text}] for text in TEXTS]
    try:
        replies = await asyncio.gather(*(_reply(engine, c) for c in conversations))  # rows of different lengths
        # a second turn: its prompt starts with the first turn's, read back from the prefix cache
        answer, question = {"role": "assistant", "content": replies[1]}, {"role": "user", "content": "Why?"}
        follow_up = [*conversations[1], answer, question]
        conversations.append(follow_up)
        await _reply(engine, follow_up)
        reused = engine.prefix_cache_stats().hit_tokens
    finally:
        await engine.close()
    assert reused > WINDOW, "the second turn did not reuse the first one's KV"
    prompts = [engine.fit_prompt(conversation, GREEDY).token_ids for conversation in conversations]
    assert min(len(p) for p in prompts) + GREEDY.max_new_tokens > WINDOW and max(len(p) for p in prompts) > 2 * WINDOW
    for prompt in prompts:
        assert tokens_of(token_log, prompt) == reference_greedy(model, tokenizer, prompt, GREEDY)


async def _reply(engine: TransformersEngine, messages: list[dict[str, str]]) -> str:
    return "".join([chunk.text async for chunk in engine.stream(messages, GREEDY)])


@pytest.mark.parametrize(("kind", "attention"), [("mistral", "sdpa"), ("gemma3", "sdpa"), ("gemma2", "eager")])
@pytest.mark.asyncio
async def test_a_prompt_prefilled_in_chunks_past_the_window_equals_generate(
    kind: str, attention: str, tokenizer: Any, token_log: TokenLog
) -> None:
    # chunks of 16 tokens: each chunk's queries see the window over the chunks before it, from the cache
    model = windowed_model(kind, tokenizer, attention)
    engine = TransformersEngine(model, tokenizer, max_batch_size=4, prefill_chunk_tokens=16, prefix_cache_bytes=0)
    long_text = "The quick brown fox jumps over the lazy dog. 東京は日本の首都です。" * 3
    conversations = [[{"role": "user", "content": text}] for text in ("hi", long_text)]
    try:
        running = asyncio.create_task(_reply(engine, conversations[0]))
        await asyncio.sleep(0.01)  # the long prompt joins while the short one decodes
        await asyncio.gather(running, _reply(engine, conversations[1]))
    finally:
        await engine.close()
    prompts = [engine.fit_prompt(conversation, GREEDY).token_ids for conversation in conversations]
    assert len(prompts[1]) > 3 * 16
    for prompt in prompts:
        assert tokens_of(token_log, prompt) == reference_greedy(model, tokenizer, prompt, GREEDY)


@pytest.mark.asyncio
async def test_an_alibi_model_under_sdpa_equals_generate(tokenizer: Any, token_log: TokenLog) -> None:
    # Falcon builds its ALiBi bias from the 2-D mask (batch, length): the engine's 4-D decode mask crashed a step
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(1234)
    config = FalconConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, alibi=True,
        max_position_embeddings=512, initializer_range=0.2, attn_implementation="sdpa",
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )  # fmt: skip
    model = FalconForCausalLM(config).eval()
    engine = TransformersEngine(model, tokenizer, max_batch_size=4, prefix_cache_bytes=0)
    conversations = [[{"role": "user", "content": text}] for text in TEXTS]
    try:
        await asyncio.gather(*(_reply(engine, c) for c in conversations))
    finally:
        await engine.close()
    for conversation in conversations:
        prompt = engine.fit_prompt(conversation, GREEDY).token_ids
        assert tokens_of(token_log, prompt) == reference_greedy(model, tokenizer, prompt, GREEDY)


def test_chunked_attention_is_refused_by_name(tokenizer: Any) -> None:
    # transformers 5 gives Llama 4's chunked layers the sliding-window cache layer: served as a window, its replies
    # were wrong from the second token
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    config = Llama4TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, intermediate_size_mlp=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_chunk_size=8,
        no_rope_layers=[1, 1], num_local_experts=2, num_experts_per_tok=1, interleave_moe_layer_step=1,
    )  # fmt: skip
    with pytest.raises(ConfigurationError, match="chunked attention"):
        TransformersEngine(Llama4ForCausalLM(config).eval(), tokenizer)


def test_the_context_length_is_read_under_the_name_the_family_uses(tokenizer: Any) -> None:
    from transformers import MptConfig, MptForCausalLM

    config = MptConfig(vocab_size=len(tokenizer), d_model=64, n_heads=4, n_layers=2, max_seq_len=300)
    assert TransformersEngine(MptForCausalLM(config).eval(), tokenizer).context_len == 300  # was "no context length"


def test_models_the_batch_layout_cannot_serve_exactly_are_refused_at_construction(tokenizer: Any) -> None:
    # both were accepted and failed later: GPT-1 keeps no cache (an opaque shape error at the first decode step);
    # BART-style decoders derive positions from the cache length, so a left-padded row's reply was wrong
    from transformers import BartConfig, BartForCausalLM, OpenAIGPTConfig, OpenAIGPTLMHeadModel

    gpt = OpenAIGPTLMHeadModel(OpenAIGPTConfig(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4))
    with pytest.raises(ConfigurationError, match="keeps no KV cache"):
        TransformersEngine(gpt.eval(), tokenizer)
    bart = BartForCausalLM(
        BartConfig(vocab_size=len(tokenizer), d_model=64, decoder_layers=2, decoder_attention_heads=4,
                   decoder_ffn_dim=128, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128)
    )  # fmt: skip
    with pytest.raises(ConfigurationError, match="takes no position_ids"):
        TransformersEngine(bart.eval(), tokenizer)


def family_model(model_type: str, tokenizer: Any) -> Any:
    """A tiny random model of one architecture, in the shape its config class takes."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    ids["bos_token_id"] = tokenizer.bos_token_id
    shape: dict[str, Any] = {
        "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512, "initializer_range": 0.2,
        "tie_word_embeddings": False, **ids,
    }  # fmt: skip
    extra: dict[str, dict[str, Any]] = {
        "qwen3": {"head_dim": 16, "sliding_window": WINDOW, "use_sliding_window": True, "max_window_layers": 1},
        "starcoder2": {"sliding_window": WINDOW},
        "mixtral": {"sliding_window": WINDOW, "num_local_experts": 4, "num_experts_per_tok": 2},
        "cohere2": {"head_dim": 16, "sliding_window": WINDOW, "layer_types": ["sliding_attention", "full_attention"]},
    }
    if model_type in ("gpt2", "gpt_bigcode"):
        shape = {"vocab_size": len(tokenizer), "n_embd": 64, "n_layer": 3, "n_head": 4, "n_positions": 512, **ids}
        shape["initializer_range"] = 0.2
    elif model_type == "opt":
        shape = {"vocab_size": len(tokenizer), "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4}
        shape.update(ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=512, init_std=0.2, **ids)
    elif model_type in ("gpt_neox", "phi"):
        del shape["num_key_value_heads"]
    if model_type == "cohere2":
        shape["num_hidden_layers"] = 2
    torch.manual_seed(1234)
    config = CONFIG_MAPPING[model_type](**shape, **extra.get(model_type, {}))
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


FAMILIES = ["qwen3", "mixtral", "starcoder2", "cohere2", "olmo2", "phi", "gpt2", "gpt_neox", "gpt_bigcode", "opt"]


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.asyncio
async def test_other_architectures_equal_generate_in_a_mixed_batch(
    model_type: str, tokenizer: Any, token_log: TokenLog
) -> None:
    # a regression guard drawn from a sweep of ~60 architectures (window, MoE, MQA, learned positions, parallel blocks)
    model = family_model(model_type, tokenizer)
    engine = TransformersEngine(model, tokenizer, max_batch_size=4, prefix_cache_bytes=0)
    conversations = [[{"role": "user", "content": text}] for text in TEXTS]
    try:
        first = asyncio.create_task(_reply(engine, conversations[0]))
        await asyncio.sleep(0.02)  # the others join while it decodes
        await asyncio.gather(first, *(_reply(engine, c) for c in conversations[1:]))
    finally:
        await engine.close()
    for conversation in conversations:
        prompt = engine.fit_prompt(conversation, GREEDY).token_ids
        assert tokens_of(token_log, prompt) == reference_greedy(model, tokenizer, prompt, GREEDY)
