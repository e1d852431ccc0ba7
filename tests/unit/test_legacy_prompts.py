"""ChatStream's prompt presets: the exact prompt strings ChatStream documents, stop strings, and the adapters."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from chatstream_asgi.compat import (
    ChatPromptCyberAgentOpenCalm,
    ChatPromptDatabricksDolly,
    ChatPromptLineCorpJpLargeLmInstSft,
    ChatPromptMatsuoLabJpGptNeoxInstSft,
    ChatPromptMetaLlamaLlama2Chat,
    ChatPromptMosaicmlMptChat,
    ChatPromptOpenlmrOpenLlama,
    ChatPromptRinnaJpGptNeoxInstSft,
    ChatPromptStabilityAiJpGptNeoxInstSft,
    ChatPromptStockmarkGptNeoxJp,
    ChatPromptTogetherRedPajamaINCITEChat,
)
from chatstream_asgi.compat.legacy_presets import JA_INSTRUCTION_SYSTEM, LLAMA2_SYSTEM, PRESETS
from chatstream_asgi.compat.legacy_prompts import (
    AbstractChatPrompt,
    LegacyPromptTokenizer,
    OutputReplacingEngine,
    render_legacy,
)
from chatstream_asgi.engines.base import ChatMessage, GenerationChunk, SamplingParams
from chatstream_asgi.engines.mock import MockEngine

ONE_TURN = [{"role": "user", "content": "Who is Alan Turing"}]
TWO_TURNS = [
    {"role": "user", "content": "What spots do you recommend?"},
    {"role": "assistant", "content": "Sensoji Temple."},
    {"role": "user", "content": "Any restaurants nearby?"},
]
DOLLY = "Below is an instruction that describes a task. Write a response that appropriately completes the request."

EXPECTED: list[tuple[type[AbstractChatPrompt], list[ChatMessage], str]] = [
    (ChatPromptTogetherRedPajamaINCITEChat, ONE_TURN, "<human>: Who is Alan Turing\n<bot>:"),
    (
        ChatPromptTogetherRedPajamaINCITEChat,
        TWO_TURNS,
        "<human>: What spots do you recommend?\n<bot>: Sensoji Temple.\n<human>: Any restaurants nearby?\n<bot>:",
    ),
    (ChatPromptMosaicmlMptChat, ONE_TURN, "<human>: Who is Alan Turing\n<bot>:"),
    (
        ChatPromptMetaLlamaLlama2Chat,
        TWO_TURNS,
        f"<s>[INST] <<SYS>>\n{LLAMA2_SYSTEM}\n<</SYS>>\n\nWhat spots do you recommend? [/INST] Sensoji Temple. "
        "</s><s>[INST] Any restaurants nearby? [/INST] ",
    ),
    (ChatPromptDatabricksDolly, ONE_TURN, f"{DOLLY}\n\n### Instruction:\nWho is Alan Turing\n\n### Response:\n"),
    (
        ChatPromptDatabricksDolly,
        TWO_TURNS,
        f"{DOLLY}\n\n### Instruction:\nWhat spots do you recommend?\n\n### Response:\nSensoji Temple.\n\n"
        "### Instruction:\nAny restaurants nearby?\n\n### Response:\n",
    ),
    (
        ChatPromptStabilityAiJpGptNeoxInstSft,
        [{"role": "user", "content": "大規模言語モデルについて説明してください。"}],
        f"{JA_INSTRUCTION_SYSTEM}\n\n### 指示: \n大規模言語モデルについて説明してください。\n\n### 応答: ",
    ),
    (ChatPromptOpenlmrOpenLlama, ONE_TURN, "Q: Who is Alan Turing\nA:"),
    (
        ChatPromptOpenlmrOpenLlama,
        [{"role": "user", "content": "What is the largest animal?"}, {"role": "assistant", "content": "Whale."}],
        "Q: What is the largest animal?\nA: Whale.\nA:",
    ),
    (
        ChatPromptRinnaJpGptNeoxInstSft,
        [
            {"role": "user", "content": "一行目\n二行目"},
            {"role": "assistant", "content": "はい"},
            {"role": "user", "content": "次"},
        ],
        "ユーザー: 一行目<NL>二行目<NL>システム: はい<NL>ユーザー: 次<NL>システム: ",
    ),
    (
        ChatPromptCyberAgentOpenCalm,
        [{"role": "user", "content": "AIによって私達の暮らしは、"}],
        "AIによって私達の暮らしは、",
    ),
    (
        ChatPromptStockmarkGptNeoxJp,
        [{"role": "user", "content": "AIによって私達の暮らしは、"}, {"role": "assistant", "content": "豊かになった"}],
        "AIによって私達の暮らしは、豊かになった",
    ),
    (
        ChatPromptLineCorpJpLargeLmInstSft,
        [{"role": "user", "content": "四国の県名を全て列挙してください。"}],
        "ユーザー: 四国の県名を全て列挙してください。\nシステム: ",
    ),
    (
        ChatPromptLineCorpJpLargeLmInstSft,
        [
            {"role": "user", "content": "四国の県名を全て列挙してください。"},
            {"role": "assistant", "content": "高知県、徳島県、香川県、愛媛県"},
            {"role": "user", "content": "一番大きいのは？"},
        ],
        "ユーザー: 四国の県名を全て列挙してください。\nシステム: 高知県、徳島県、香川県、愛媛県"
        "ユーザー: 一番大きいのは？\nシステム: ",
    ),
    (
        ChatPromptMatsuoLabJpGptNeoxInstSft,
        [
            {"role": "user", "content": "古い質問"},
            {"role": "assistant", "content": "古い答え"},
            {"role": "user", "content": "新しい質問"},
        ],
        f"{JA_INSTRUCTION_SYSTEM}\n\n### 指示: \n新しい質問\n\n### 応答: ",  # one question at a time
    ),
]


@pytest.mark.parametrize(("preset", "messages", "expected"), EXPECTED, ids=lambda v: getattr(v, "__name__", None))
def test_preset_renders_the_documented_prompt(
    preset: type[AbstractChatPrompt], messages: list[ChatMessage], expected: str
) -> None:
    assert render_legacy(preset, messages) == expected


def test_every_preset_is_tested_and_importable_under_its_chatstream_name() -> None:
    import chatstream_asgi.compat as compat

    assert {preset for preset, _, _ in EXPECTED} == set(PRESETS)
    assert all(getattr(compat, preset.__name__) is preset for preset in PRESETS)


@pytest.mark.parametrize(
    ("preset", "stops"),
    [
        (ChatPromptTogetherRedPajamaINCITEChat, ["<human>:", "<|endoftext|>"]),
        (ChatPromptMosaicmlMptChat, ["<human>:"]),
        (ChatPromptDatabricksDolly, ["### Instruction:\n"]),
        (ChatPromptStabilityAiJpGptNeoxInstSft, ["### 指示: "]),
        (ChatPromptMatsuoLabJpGptNeoxInstSft, ["### 指示: ", "Q:"]),
        (ChatPromptLineCorpJpLargeLmInstSft, ["ユーザー: "]),
        (ChatPromptOpenlmrOpenLlama, ["\nQ:", "\nB:", "\nC:"]),
        (ChatPromptMetaLlamaLlama2Chat, []),
        (ChatPromptRinnaJpGptNeoxInstSft, []),
        (ChatPromptCyberAgentOpenCalm, []),
        (ChatPromptStockmarkGptNeoxJp, []),
    ],
)
def test_preset_stop_strings(preset: type[AbstractChatPrompt], stops: list[str]) -> None:
    assert preset().final_stop_strs() == stops


def test_a_system_message_replaces_the_preset_system_text() -> None:
    prompt = render_legacy(ChatPromptDatabricksDolly, [{"role": "system", "content": "Be brief."}, *ONE_TURN])
    assert prompt == "Be brief.\n\n### Instruction:\nWho is Alan Turing\n\n### Response:\n"


def test_a_custom_subclass_works_like_in_chatstream() -> None:
    class Vicuna(AbstractChatPrompt):
        def __init__(self) -> None:
            super().__init__()
            self.set_system("A chat.\n")
            self.set_requester("USER")
            self.set_responder("ASSISTANT")
            self.set_prefix_as_stop_str_enabled(True)

    assert render_legacy(Vicuna, ONE_TURN) == "A chat.\nUSER: Who is Alan Turing\nASSISTANT:"
    assert Vicuna().final_stop_strs() == ["USER:"]


def test_chat_mode_off_sends_only_the_last_question() -> None:
    prompt = ChatPromptTogetherRedPajamaINCITEChat()
    prompt.set_chat_mode_enabled(False)
    prompt.add_requester_msg("first")
    prompt.add_responder_msg("answer")
    prompt.add_requester_msg("second")
    assert prompt.create_prompt() == "second"


def test_prefix_as_stop_needs_roles() -> None:
    with pytest.raises(ValueError, match="requester"):
        AbstractChatPrompt().set_prefix_as_stop_str_enabled(True)


class FakeTokenizer:
    chat_template = None
    eos_token_id = 7

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]


def test_legacy_tokenizer_renders_with_the_prompt_class_and_passes_the_rest_through() -> None:
    tokenizer = LegacyPromptTokenizer(FakeTokenizer(), ChatPromptTogetherRedPajamaINCITEChat)
    assert tokenizer.chat_template  # TransformersEngine requires one
    text = tokenizer.apply_chat_template(ONE_TURN, tokenize=False, add_generation_prompt=True)
    assert text == "<human>: Who is Alan Turing\n<bot>:"
    assert tokenizer.apply_chat_template(ONE_TURN, tokenize=True) == [ord(c) for c in text]
    assert tokenizer.eos_token_id == 7


class PiecesEngine(MockEngine):
    def __init__(self, pieces: list[str]) -> None:
        super().__init__()
        self.pieces = pieces

    async def stream(self, messages: Sequence[ChatMessage], params: SamplingParams) -> AsyncIterator[GenerationChunk]:
        for piece in self.pieces:
            yield GenerationChunk(piece)
        yield GenerationChunk("", "stop", 1, len(self.pieces))


@pytest.mark.parametrize(
    "pieces", [["a<NL>b"], ["a<", "NL>b"], ["a<N", "L", ">b<"], ["<", "N", "L", ">", "<NL", ">"], ["a<b", "c"]]
)
@pytest.mark.asyncio
async def test_output_replacement_holds_back_a_split_pattern(pieces: list[str]) -> None:
    engine = OutputReplacingEngine(PiecesEngine(pieces), [("<NL>", "\n")])
    chunks: list[Any] = [chunk async for chunk in engine.stream(ONE_TURN, SamplingParams())]
    text = "".join(chunk.text for chunk in chunks)
    assert text == "".join(pieces).replace("<NL>", "\n")
    assert all("<NL>" not in chunk.text for chunk in chunks)
    assert chunks[-1].finish_reason == "stop" and engine.model_name == "mock"


class DocumentedCustomPrompt(AbstractChatPrompt):
    """The shape of ChatStream's "how to implement a chat prompt" doc: ``create_prompt(opts)`` over
    ``get_contents(opts)`` and the contents' getters, and an initial context from ``build_initial_prompt``."""

    def __init__(self) -> None:
        super().__init__()
        self.set_requester("User")
        self.set_responder("System")

    def create_prompt(self, opts: Any = None) -> str:
        text = self.system
        for content in self.get_contents(opts or {}):
            role, message = content.get_role(), content.get_message()
            if role:
                text += f"{role}: {message}<NL>" if message else f"{role}: "
        return text

    def build_initial_prompt(self, chat_prompt: AbstractChatPrompt) -> None:
        chat_prompt.add_requester_msg("Do you know about the Titanic movie?")
        chat_prompt.add_responder_msg("Yes.")


def test_a_prompt_class_written_from_chatstreams_docs_renders_with_its_initial_context() -> None:
    # get_contents() took no opts and the contents had no getters: every chat was a 500; build_initial_prompt was
    # never called, so the initial context was silently missing
    rendered = render_legacy(DocumentedCustomPrompt, [{"role": "user", "content": "Who starred?"}])
    assert rendered == "User: Do you know about the Titanic movie?<NL>System: Yes.<NL>User: Who starred?<NL>System: "
    prompt = DocumentedCustomPrompt()
    prompt.add_requester_msg("a")
    prompt.add_responder_msg("b")
    assert prompt.create_prompt({"omit_last_message": True}) == "User: a<NL>"


@pytest.mark.parametrize(
    "pieces",
    [[" He", " was", " here. "], ["  ", " He<", "NL> was ", " ", "here.", "  "], ["\n", "He", " ", " ", "was here.\n"]],
)
@pytest.mark.asyncio
async def test_stripped_replies_stream_without_surrounding_whitespace(pieces: list[str]) -> None:
    # ChatStream stripped every reply: a model's leading space made the next prompt "<bot>:  He" here
    engine = OutputReplacingEngine(PiecesEngine(pieces), [("<NL>", "\n")], strip=True)
    chunks: list[Any] = [chunk async for chunk in engine.stream(ONE_TURN, SamplingParams())]
    text = "".join(chunk.text for chunk in chunks)
    assert text == "".join(pieces).replace("<NL>", "\n").strip()
    assert not chunks[0].text[:1].isspace() and chunks[-1].finish_reason == "stop"
    assert engine.running == 0  # the wrapped engine's own attributes show through (its tokenizer, its load...)


def test_a_tokenizer_that_adds_bos_gets_one_bos_before_the_legacy_prompt() -> None:
    # ChatStream encoded presets with the tokenizer's special tokens: Llama/OpenLLaMA prompts began with BOS; ours
    # were encoded without it
    from tokenizers.processors import TemplateProcessing

    from chatstream_asgi.compat import ChatPromptOpenlmrOpenLlama
    from chatstream_asgi.engines.prompts import fit_prompt
    from tests.tiny_model import BOS, train_tokenizer

    plain: Any = train_tokenizer()
    with_bos: Any = train_tokenizer()
    with_bos.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, with_bos.bos_token_id)]
    )
    for tokenizer, bos_first in ((with_bos, True), (plain, False)):
        legacy = LegacyPromptTokenizer(tokenizer, ChatPromptOpenlmrOpenLlama)
        ids = fit_prompt(legacy, ONE_TURN, max_new_tokens=8, context_len=512).token_ids
        assert (ids[0] == tokenizer.bos_token_id) is bos_first and ids[1] != tokenizer.bos_token_id
