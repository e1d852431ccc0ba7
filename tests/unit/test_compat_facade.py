"""The ChatStream facade's pieces that need no HTTP: ``mock_params`` and ``handle_console_input``, as ChatStream's
docs use them (its console chat and mock-response pages)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from chatstream_asgi.compat import ChatPromptTogetherRedPajamaINCITEChat, ChatStream
from chatstream_asgi.compat.facade import MOCK_REPLY, MOCK_ROUND
from chatstream_asgi.errors import ConfigurationError

KEY = "k" * 32


async def console_turn(chat_stream: ChatStream, text: str) -> list[tuple[str, str, str]]:
    return [piece async for piece in chat_stream.handle_console_input(text)]


@pytest.mark.asyncio
async def test_console_chat_streams_begin_mid_end_and_keeps_the_conversation() -> None:
    echo = {"type": "echo", "time_per_token_sec": 0}
    chat_stream = ChatStream(use_mock_response=True, mock_params=echo, secret_key=KEY)
    pieces = await console_turn(chat_stream, "the cat sat on the mat")
    assert [pos for _, _, pos in pieces] == ["begin", "mid", "mid", "mid", "mid", "mid", "end"]
    assert "".join(updated for _, updated, _ in pieces) == "the cat sat on the mat"
    assert [text for text, _, _ in pieces][-2:] == ["the cat sat on the mat<::EOS::>"] * 2  # the end repeats it
    await console_turn(chat_stream, "again")
    assert [m["content"] for m in chat_stream.console_history] == ["the cat sat on the mat"] * 2 + ["again"] * 2


@pytest.mark.asyncio
async def test_two_console_turns_at_once_take_their_turns() -> None:
    chat_stream = ChatStream(use_mock_response=True, mock_params={"type": "echo", "time_per_token_sec": 0.01})
    await asyncio.gather(console_turn(chat_stream, "first question"), console_turn(chat_stream, "second question"))
    contents = [m["content"] for m in chat_stream.console_history]
    assert contents == ["first question"] * 2 + ["second question"] * 2  # the first exchange was lost


@pytest.mark.asyncio
async def test_console_chat_on_a_model_sends_the_whole_conversation(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    chat_stream = ChatStream(
        model=model, tokenizer=tokenizer, device="cpu", chat_prompt_clazz=ChatPromptTogetherRedPajamaINCITEChat,
        max_new_tokens=6, temperature=0.0, secret_key=KEY,
    )  # fmt: skip
    try:
        first = await console_turn(chat_stream, "hello there")
        second = await console_turn(chat_stream, "and now")
        for pieces in (first, second):
            assert pieces[0][2] == "begin" and pieces[-1][2] == "end"
            assert pieces[-1][0] == "".join(updated for _, updated, _ in pieces) + "<::EOS::>"
        reply = first[-1][0].removesuffix("<::EOS::>")
        prompt = chat_stream.engine.render_prompt(chat_stream.console_history, chat_stream.default_params)
        assert "<human>: hello there" in prompt and "<human>: and now" in prompt
        assert chat_stream.console_history[1] == {"role": "assistant", "content": reply}
    finally:
        await chat_stream.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("type_key", ["type", type])  # ChatStream's own default was {type: "round"}
async def test_mock_params_round_answers_each_turn_in_turn(type_key: Any) -> None:
    chat_stream = ChatStream(use_mock_response=True, mock_params={type_key: "round", "time_per_token_sec": 0})
    replies = [(await console_turn(chat_stream, f"q{i}"))[-1][0] for i in range(len(MOCK_ROUND) + 1)]
    assert replies == [f"{text}<::EOS::>" for text in (*MOCK_ROUND, MOCK_ROUND[0])]


@pytest.mark.asyncio
async def test_mock_params_waits_as_asked_and_without_them_the_mock_says_its_sentence() -> None:
    slow = ChatStream(
        use_mock_response=True, mock_params={"type": "echo", "initial_wait_sec": 0.3, "time_per_token_sec": 0.01}
    )
    started = time.perf_counter()
    pieces = slow.handle_console_input("one two three")
    assert (await anext(pieces))[1] == "one "
    assert time.perf_counter() - started >= 0.3
    assert [p async for p in pieces][-1][0] == "one two three<::EOS::>"
    plain = ChatStream(use_mock_response=True, secret_key=KEY)
    assert (await console_turn(plain, "hi"))[-1][0] == MOCK_REPLY + "<::EOS::>"


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"type": "poem"}, '"type" must be "round", "long" or "echo"'),
        ({"time_per_token_sec": -1}, "'time_per_token_sec' must be seconds >= 0"),
        ({"initial_wait_sec": "1"}, "'initial_wait_sec' must be seconds >= 0"),
    ],
)
def test_bad_mock_params_are_refused_with_what_to_fix(params: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigurationError, match=says):
        ChatStream(use_mock_response=True, mock_params=params, secret_key=KEY)
