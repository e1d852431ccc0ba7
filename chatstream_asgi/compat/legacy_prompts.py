"""ChatStream's prompt builder (``AbstractChatPrompt``), for models without a chat template.

A prompt class renders a conversation the ChatStream way: ``system`` first, then one piece per message, the
last piece being the responder's empty turn that the model completes. ``final_stop_strs()`` is what
ChatStream stopped generation on: the requester's prefix (where the preset enables it) plus the preset's
own stop strings. ``LegacyPromptTokenizer`` plugs any such class into ``TransformersEngine``.
The presets themselves are in ``legacy_presets.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum, auto
from typing import Any

from chatstream_asgi import ChatMessage, Engine, GenerationChunk, SamplingParams


class RoleType(Enum):
    REQUESTER = auto()
    RESPONDER = auto()


class PromptTTL(Enum):
    MULTI_TURN = auto()  # the prompt holds the whole conversation
    SINGLE_TURN = auto()  # the prompt holds only the last question


@dataclass
class ChatContent:
    role: str
    role_type: RoleType
    message: str | None
    child_messages: list[str] | None = None

    # ChatStream's accessors: prompt classes written from its docs read contents through them
    def get_role(self) -> str:
        return self.role

    def get_role_type(self) -> RoleType:
        return self.role_type

    def get_message(self) -> str | None:
        return self.message

    def get_child_messages(self) -> list[str] | None:
        return self.child_messages

    def has_child_messages(self) -> bool:
        return bool(self.child_messages)


class AbstractChatPrompt:
    """ChatStream's prompt builder: subclass it and override ``format_content`` (and ``head``) for a new model."""

    def __init__(self) -> None:
        self.system = ""
        self.requester = ""
        self.responder = ""
        self.chat_mode = True
        self.chat_contents: list[ChatContent] = []
        self.prompt_ttl_mode = PromptTTL.MULTI_TURN
        self.responder_prefix_as_stop_str: str | None = None

    def set_system(self, system: str) -> None:
        self.system = system

    def set_requester(self, requester: str) -> None:
        self.requester = requester

    def set_responder(self, responder: str) -> None:
        self.responder = responder

    def set_prompt_ttl(self, prompt_ttl: PromptTTL) -> None:
        self.prompt_ttl_mode = prompt_ttl

    def set_chat_mode_enabled(self, enabled: bool) -> None:
        self.chat_mode = enabled

    def clear_history(self) -> None:
        self.chat_contents = []

    def add_requester_msg(self, message: str | None, child_message: str | None = None) -> None:
        if message is not None:
            message = replace_all(message, self.get_replacement_when_input())
        children = [child_message] if child_message is not None else None
        self.chat_contents.append(ChatContent(self.requester, RoleType.REQUESTER, message, children))

    def add_responder_msg(self, message: str | None) -> None:
        self.chat_contents.append(ChatContent(self.responder, RoleType.RESPONDER, message))

    def get_requester_last_msg(self) -> str | None:
        requests = [c for c in self.chat_contents if c.role_type is RoleType.REQUESTER]
        return requests[-1].message if requests else None

    def get_contents(self, opts: Mapping[str, Any] | None = None) -> list[ChatContent]:
        """The contents a prompt is built from; ``{"omit_last_message": True}`` leaves the last one out, as in
        ChatStream (whose ``to_message_id`` needs message ids, which this history does not keep)."""
        contents = self.chat_contents[-2:] if self.prompt_ttl_mode is PromptTTL.SINGLE_TURN else self.chat_contents
        if opts and opts.get("omit_last_message"):
            contents = contents[:-1]
        return list(contents)

    def build_initial_prompt(self, chat_prompt: AbstractChatPrompt) -> None:
        """Add an initial context (ChatStream calls it once on a new conversation's prompt): override to add
        requester/responder messages that every conversation starts from."""

    def set_prefix_as_stop_str_enabled(self, enabled: bool) -> None:
        """Stop generating where the model starts the requester's next turn (for models unsteady at EOS)."""
        self.responder_prefix_as_stop_str = None
        if enabled:
            saved, self.chat_contents = self.chat_contents, []
            before = self.create_prompt()
            self.add_requester_msg(None)
            after = self.create_prompt()
            self.chat_contents = saved
            prefix = after[len(before) :] if after.startswith(before) else after
            if not prefix:
                raise ValueError("set the requester and responder before enabling the prefix as a stop string")
            self.responder_prefix_as_stop_str = prefix

    def get_stop_strs(self) -> list[str] | None:
        return None

    def get_replacement_when_input(self) -> list[tuple[str, str]] | None:
        return None

    def get_replacement_when_output(self) -> list[tuple[str, str]] | None:
        return None

    def final_stop_strs(self) -> list[str]:
        stops = [self.responder_prefix_as_stop_str] if self.responder_prefix_as_stop_str else []
        return stops + list(self.get_stop_strs() or [])

    def head(self) -> str:
        return self.system

    def format_content(self, content: ChatContent) -> str:
        """``role: message\\n`` for a message, ``role:`` for the turn the model completes."""
        if not content.role:
            return ""
        return f"{content.role}: {content.message}\n" if content.message else f"{content.role}:"

    def create_prompt(self, opts: Mapping[str, Any] | None = None) -> str:
        if not self.chat_mode:
            return self.get_requester_last_msg() or ""
        return self.head() + "".join(self.format_content(c) for c in self.get_contents(opts))


def replace_all(text: str, pairs: Sequence[tuple[str, str]] | None) -> str:
    for old, new in pairs or ():
        text = text.replace(old, new)
    return text


def render_legacy(prompt_class: type[AbstractChatPrompt], messages: Sequence[Mapping[str, str]]) -> str:
    """The prompt ``prompt_class`` builds for ``messages`` (a system message replaces the preset's system text),
    after the initial context its ``build_initial_prompt`` adds."""
    prompt = prompt_class()
    prompt.build_initial_prompt(prompt)
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "system":
            prompt.set_system(content)
        elif role == "user":
            prompt.add_requester_msg(content)
        else:
            prompt.add_responder_msg(content)
    prompt.add_responder_msg(None)
    return prompt.create_prompt()


class LegacyPromptTokenizer:
    """A tokenizer whose "chat template" is a ChatStream prompt class; everything else is the wrapped tokenizer's.

    Args:
        tokenizer: the model's transformers tokenizer.
        prompt_class: ``ChatPromptTogetherRedPajamaINCITEChat`` or any ``AbstractChatPrompt`` subclass.
    """

    def __init__(self, tokenizer: Any, prompt_class: type[AbstractChatPrompt]) -> None:
        self._tokenizer = tokenizer
        self.prompt_class = prompt_class
        self.chat_template = f"chatstream legacy prompt: {prompt_class.__name__}"
        # ChatStream encoded the prompt with the tokenizer's special tokens: a BOS where the tokenizer adds one
        # (Llama, OpenLLaMA). The engine encodes rendered text without them, so the text starts with it instead.
        self._bos = bos_text(tokenizer)

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], **kwargs: Any) -> Any:
        text = render_legacy(self.prompt_class, messages)
        if self._bos and not text.startswith(self._bos):  # the Llama-2 preset writes its own "<s>"
            text = self._bos + text
        return self._tokenizer.encode(text, add_special_tokens=False) if kwargs.get("tokenize") else text

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


def bos_text(tokenizer: Any) -> str:
    """The BOS token's text if ``tokenizer`` puts it before what it encodes by default, else ""."""
    bos_id, bos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "bos_token", None)
    if bos_id is None or not isinstance(bos, str):
        return ""
    try:
        ids = list(tokenizer.encode("a", add_special_tokens=True))
    except Exception:  # a tokenizer that cannot say: as before, no BOS added
        return ""
    return bos if ids[:1] == [bos_id] else ""


class OutputReplacingEngine:
    """An engine whose streamed text has ``replacements`` applied (rinna's ``<NL>`` becomes a newline) and, with
    ``strip``, no whitespace around the reply: what ChatStream did to every reply, so that history renders as in
    its prompt docs (``<bot>: He was...``, where a model's leading space made ``<bot>:  He``).

    Text that could be the start of a pattern is held back until the next chunk decides it; with ``strip``, so is
    whitespace at the end of a chunk, until text follows it (or the reply ends and it is dropped).
    """

    def __init__(self, engine: Engine, replacements: Sequence[tuple[str, str]], strip: bool = False) -> None:
        self.engine = engine
        self.replacements = list(replacements)
        self.strip = strip
        self.model_name = engine.model_name
        self.max_batch_size = engine.max_batch_size

    async def start(self) -> None:
        await self.engine.start()

    async def close(self) -> None:
        await self.engine.close()

    @property
    def ready(self) -> bool:
        return self.engine.ready

    def render_prompt(self, messages: Sequence[ChatMessage], params: SamplingParams) -> str:
        return self.engine.render_prompt(messages, params)

    async def stream(self, messages: Sequence[ChatMessage], params: SamplingParams) -> AsyncIterator[GenerationChunk]:
        pending, spaces, started = "", "", not self.strip  # held for a pattern; trailing whitespace; text began
        chunks = self.engine.stream(messages, params)
        try:
            async for chunk in chunks:
                text = replace_all(pending + chunk.text, self.replacements)
                last = chunk.finish_reason is not None
                keep = 0 if last else self.held_back(text)
                pending, text = (text[len(text) - keep :] if keep else ""), text[: len(text) - keep]
                if self.strip:
                    text = spaces + text if started else text.lstrip()
                    started = started or bool(text)
                    kept = text.rstrip()
                    spaces, text = ("" if last else text[len(kept) :]), kept
                yield dataclasses.replace(chunk, text=text)
        finally:
            closer = getattr(chunks, "aclose", None)
            if closer is not None:
                await closer()

    def __getattr__(self, name: str) -> Any:
        # the rest is the wrapped engine's: its tokenizer and context for token limits and /get_token_count, its
        # prefix cache figures, its load
        return getattr(self.engine, name)

    def held_back(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a pattern."""
        longest = 0
        for old, _ in self.replacements:
            for size in range(min(len(old) - 1, len(text)), longest, -1):
                if old.startswith(text[-size:]):
                    longest = size
                    break
        return longest
