from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from chatstream_asgi.errors import ChatStreamError
from chatstream_asgi.prompts import (
    PromptTooLong,
    fit_prompt,
    model_context_len,
    render_chat,
    with_system_prompt,
)

SYSTEM = {"role": "system", "content": "You are terse."}


def conversation(turns: int) -> list[dict[str, str]]:
    messages = [SYSTEM]
    for i in range(turns):
        messages.append({"role": "user", "content": f"question number {i} about the quick brown fox"})
        messages.append({"role": "assistant", "content": f"answer number {i}: the lazy dog sleeps"})
    messages.append({"role": "user", "content": "and the last question?"})
    return messages


def n_tokens(tokenizer: Any, messages: list[dict[str, str]]) -> int:
    return len(tokenizer.encode(render_chat(tokenizer, messages), add_special_tokens=False))


@pytest.fixture
def tokenizer(tiny_engine_parts: tuple[Any, Any]) -> Any:
    return tiny_engine_parts[1]


def test_render_chat_uses_template_with_generation_prompt(tokenizer: Any) -> None:
    text = render_chat(tokenizer, [{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_prompt_that_fits_is_kept_whole(tokenizer: Any) -> None:
    messages = conversation(3)
    prompt = fit_prompt(tokenizer, messages, max_new_tokens=10, context_len=10_000)
    assert prompt.messages == messages
    assert prompt.dropped == 0
    assert prompt.text == render_chat(tokenizer, messages)
    assert prompt.token_ids == tokenizer.encode(prompt.text, add_special_tokens=False)


def test_truncation_drops_oldest_turns_and_keeps_system_and_last_user(tokenizer: Any) -> None:
    messages = conversation(5)
    keep_two = [SYSTEM, *messages[-5:]]  # the last two full turns and the final question
    context_len = n_tokens(tokenizer, keep_two) + 16
    prompt = fit_prompt(tokenizer, messages, max_new_tokens=16, context_len=context_len)
    assert prompt.messages == keep_two
    assert prompt.dropped == 6
    assert len(prompt.token_ids) + 16 <= context_len
    # minimal: one more turn would have been over budget
    assert n_tokens(tokenizer, [SYSTEM, *messages[-7:]]) + 16 > context_len


def test_truncation_never_starts_history_with_an_assistant_reply(tokenizer: Any) -> None:
    messages = conversation(4)
    context_len = n_tokens(tokenizer, [SYSTEM, *messages[-2:]]) + 30
    prompt = fit_prompt(tokenizer, messages, max_new_tokens=30, context_len=context_len)
    assert [m["role"] for m in prompt.messages][:2] == ["system", "user"]
    assert prompt.messages[-1] == messages[-1]


def test_truncation_can_keep_only_system_and_last_user(tokenizer: Any) -> None:
    messages = conversation(3)
    context_len = n_tokens(tokenizer, [SYSTEM, messages[-1]]) + 8
    prompt = fit_prompt(tokenizer, messages, max_new_tokens=8, context_len=context_len)
    assert prompt.messages == [SYSTEM, messages[-1]]


def test_prompt_too_long_says_how_many_tokens_over(tokenizer: Any) -> None:
    messages = [SYSTEM, {"role": "user", "content": "a long question " * 40}]
    needed = n_tokens(tokenizer, messages)
    with pytest.raises(PromptTooLong) as caught:
        fit_prompt(tokenizer, [*conversation(2)[:-1], messages[-1]], max_new_tokens=50, context_len=needed + 10)
    assert caught.value.over_by == 40
    assert "40 tokens over" in str(caught.value)
    assert isinstance(caught.value, ChatStreamError)


def test_conversation_without_system_message(tokenizer: Any) -> None:
    messages = conversation(3)[1:]
    context_len = n_tokens(tokenizer, messages[-3:]) + 4
    prompt = fit_prompt(tokenizer, messages, max_new_tokens=4, context_len=context_len)
    assert prompt.messages == messages[-3:]


def test_with_system_prompt_prepends_only_when_missing() -> None:
    user = [{"role": "user", "content": "hi"}]
    assert with_system_prompt(user, "be nice") == [{"role": "system", "content": "be nice"}, *user]
    assert with_system_prompt([SYSTEM, *user], "be nice") == [SYSTEM, *user]
    assert with_system_prompt(user, None) == user


def test_model_context_len_reads_config_or_override() -> None:
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=2048))
    assert model_context_len(model) == 2048
    assert model_context_len(model, 512) == 512
    with pytest.raises(ChatStreamError, match="context_len"):
        model_context_len(SimpleNamespace(config=SimpleNamespace()))
