"""ChatStream's prompt presets under ChatStream's own class names, for models without a chat template.

Written from the formats ChatStream documents (each preset's expected prompt strings), not from its code.
Where ChatStream had a bug, the documented output wins: its OpenCALM and Stockmark presets repeated the
previous message in place of the empty responder turn; these render nothing there.
"""

from __future__ import annotations

from .legacy_prompts import AbstractChatPrompt, ChatContent, PromptTTL, RoleType

__all__ = [
    "ChatPromptCyberAgentOpenCalm",
    "ChatPromptDatabricksDolly",
    "ChatPromptLineCorpJpLargeLmInstSft",
    "ChatPromptMatsuoLabJpGptNeoxInstSft",
    "ChatPromptMetaLlamaLlama2Chat",
    "ChatPromptMosaicmlMptChat",
    "ChatPromptOpenlmrOpenLlama",
    "ChatPromptRinnaJpGptNeoxInstSft",
    "ChatPromptStabilityAiJpGptNeoxInstSft",
    "ChatPromptStockmarkGptNeoxJp",
    "ChatPromptTogetherRedPajamaINCITEChat",
]

LLAMA2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe. "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information."
)
JA_INSTRUCTION_SYSTEM = (
    "以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。"
)
DOLLY_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)



class ChatPromptTogetherRedPajamaINCITEChat(AbstractChatPrompt):
    """togethercomputer/RedPajama-INCITE-Chat: ``<human>: ...\\n<bot>:``."""

    def __init__(self) -> None:
        super().__init__()
        self.set_requester("<human>")
        self.set_responder("<bot>")
        self.set_prefix_as_stop_str_enabled(True)

    def get_stop_strs(self) -> list[str] | None:
        return ["<|endoftext|>"]


class ChatPromptMosaicmlMptChat(AbstractChatPrompt):
    """mosaicml/mpt-chat, as ChatStream prompted it: ``<human>: ...\\n<bot>:``."""

    def __init__(self) -> None:
        super().__init__()
        self.set_requester("<human>")
        self.set_responder("<bot>")
        self.set_prefix_as_stop_str_enabled(True)


class ChatPromptOpenlmrOpenLlama(AbstractChatPrompt):
    """openlm-research/open_llama: ``Q: ...\\nA:``."""

    def __init__(self) -> None:
        super().__init__()
        self.set_requester("Q")
        self.set_responder("A")

    def get_stop_strs(self) -> list[str] | None:
        return ["\nQ:", "\nB:", "\nC:"] if self.chat_mode else None


class ChatPromptRinnaJpGptNeoxInstSft(AbstractChatPrompt):
    """rinna/japanese-gpt-neox-instruction-sft: ``ユーザー: ...<NL>システム: ``; newlines travel as ``<NL>``."""

    def __init__(self) -> None:
        super().__init__()
        self.set_requester("ユーザー")
        self.set_responder("システム")

    def get_stop_strs(self) -> list[str] | None:
        return [] if self.chat_mode else None

    def get_replacement_when_input(self) -> list[tuple[str, str]] | None:
        return [("\n", "<NL>")]

    def get_replacement_when_output(self) -> list[tuple[str, str]] | None:
        return [("<NL>", "\n")]

    def format_content(self, content: ChatContent) -> str:
        return f"{content.role}: {content.message}<NL>" if content.message else f"{content.role}: "


class ChatPromptCyberAgentOpenCalm(AbstractChatPrompt):
    """cyberagent/open-calm: plain text continuation, the messages concatenated."""

    def format_content(self, content: ChatContent) -> str:
        return content.message or ""


class ChatPromptStockmarkGptNeoxJp(ChatPromptCyberAgentOpenCalm):
    """stockmark/gpt-neox-japanese: plain text continuation, the messages concatenated."""

    def get_stop_strs(self) -> list[str] | None:
        return [] if self.chat_mode else None


class ChatPromptDatabricksDolly(AbstractChatPrompt):
    """databricks/dolly-v2: ``### Instruction:\\n...\\n\\n### Response:\\n``."""

    def __init__(self) -> None:
        super().__init__()
        self.set_system(DOLLY_SYSTEM)
        self.set_requester("Instruction")
        self.set_responder("Response")
        self.set_prefix_as_stop_str_enabled(True)

    def head(self) -> str:
        return self.system + "\n\n"

    def format_content(self, content: ChatContent) -> str:
        return f"### {content.role}:\n{content.message}\n\n" if content.message else f"### {content.role}:\n"


class ChatPromptStabilityAiJpGptNeoxInstSft(AbstractChatPrompt):
    """stabilityai/japanese-stablelm-instruct: ``### 指示: \\n...\\n\\n[### 入力: \\n...\\n\\n]### 応答: ``."""

    def __init__(self) -> None:
        super().__init__()
        self.set_system(JA_INSTRUCTION_SYSTEM)
        self.set_requester("指示")
        self.set_responder("応答")
        self.set_prefix_as_stop_str_enabled(True)

    def head(self) -> str:
        return self.system + "\n\n"

    def format_content(self, content: ChatContent) -> str:
        if not content.message:
            return f"### {content.role}: "
        text = f"### {content.role}: \n{content.message}\n\n"
        if content.child_messages:
            text += "### 入力: \n" + "".join(f"{child}\n\n" for child in content.child_messages)
        return text


class ChatPromptMatsuoLabJpGptNeoxInstSft(ChatPromptStabilityAiJpGptNeoxInstSft):
    """matsuo-lab/weblab-10b-instruction-sft: the StableLM format, one question at a time."""

    def __init__(self) -> None:
        super().__init__()
        self.set_prompt_ttl(PromptTTL.SINGLE_TURN)

    def get_stop_strs(self) -> list[str] | None:
        return ["Q:"] if self.chat_mode else None


class ChatPromptLineCorpJpLargeLmInstSft(AbstractChatPrompt):
    """line-corporation/japanese-large-lm-instruction-sft: ``ユーザー: ...\\nシステム: ``."""

    def __init__(self) -> None:
        super().__init__()
        self.set_requester("ユーザー")
        self.set_responder("システム")
        self.set_prefix_as_stop_str_enabled(True)

    def format_content(self, content: ChatContent) -> str:
        if not content.message:
            return f"{content.role}: "
        newline = "\n" if content.role_type is RoleType.REQUESTER else ""
        return f"{content.role}: {content.message}{newline}"


class ChatPromptMetaLlamaLlama2Chat(AbstractChatPrompt):
    """meta-llama/Llama-2-chat: ``<s>[INST] <<SYS>>\\n...\\n<</SYS>>\\n\\n... [/INST] ... </s><s>[INST] ...``."""

    def __init__(self) -> None:
        super().__init__()
        self.set_system(LLAMA2_SYSTEM)

    def get_stop_strs(self) -> list[str] | None:
        return [] if self.chat_mode else None

    def head(self) -> str:
        return f"<s>[INST] <<SYS>>\n{self.system}\n<</SYS>>\n\n"

    def format_content(self, content: ChatContent) -> str:
        if not content.message:
            return ""
        if content.role_type is RoleType.REQUESTER:
            return f"{content.message} [/INST] "
        return f"{content.message} </s><s>[INST] "


PRESETS: tuple[type[AbstractChatPrompt], ...] = (
    ChatPromptTogetherRedPajamaINCITEChat,
    ChatPromptMetaLlamaLlama2Chat,
    ChatPromptMosaicmlMptChat,
    ChatPromptDatabricksDolly,
    ChatPromptStabilityAiJpGptNeoxInstSft,
    ChatPromptOpenlmrOpenLlama,
    ChatPromptRinnaJpGptNeoxInstSft,
    ChatPromptCyberAgentOpenCalm,
    ChatPromptLineCorpJpLargeLmInstSft,
    ChatPromptStockmarkGptNeoxJp,
    ChatPromptMatsuoLabJpGptNeoxInstSft,
)
