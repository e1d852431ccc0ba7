"""MockEngine: scripted replies without a model, for development and tests of everything else."""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import AsyncIterator, Callable, Iterable, Sequence

from ..errors import ConfigurationError, EngineError
from .base import ChatMessage, GenerationChunk, SamplingParams

# A "token" of the mock is a word with its trailing spaces, so replies stream in readable pieces.
TOKEN_PATTERN = re.compile(r"\S+\s*|\s+")
Reply = str | Callable[[Sequence[ChatMessage]], str]


class MockEngine:
    """An engine that streams fixed or scripted replies word by word.

    Args:
        reply: the reply to every request, or a function of the messages that returns it.
        replies: replies used in turn, cycling (overrides ``reply``).
        token_delay: seconds between two tokens, to imitate a model's speed.
        first_token_delay: seconds more before the first token, to imitate a prefill.
        fail_after: raise ``EngineError`` after this many tokens (to test error paths).
        model_name: the name served by ``/v1/models``.
        max_batch_size: how many streams the mock accepts at once.
    """

    def __init__(
        self,
        reply: Reply = "Hello! This is a mock reply from chatstream_asgi.",
        *,
        replies: Iterable[str] | None = None,
        token_delay: float = 0.0,
        first_token_delay: float = 0.0,
        fail_after: int | None = None,
        model_name: str = "mock",
        max_batch_size: int = 64,
    ) -> None:
        if token_delay < 0 or first_token_delay < 0:
            raise ConfigurationError("token_delay and first_token_delay must be >= 0 seconds")
        self._replies = itertools.cycle(list(replies)) if replies is not None else None
        self._reply = reply
        self.token_delay = token_delay
        self.first_token_delay = first_token_delay
        self.fail_after = fail_after
        self.model_name = model_name
        self.max_batch_size = max_batch_size
        self.running = 0
        self.cancelled = 0
        self._ready = False

    async def start(self) -> None:
        self._ready = True

    async def close(self) -> None:
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    def render_prompt(self, messages: Sequence[ChatMessage], params: SamplingParams) -> str:
        turns = [f"<|{m['role']}|>\n{m['content']}" for m in messages]
        return "\n".join([*turns, "<|assistant|>\n"])

    def reply_for(self, messages: Sequence[ChatMessage]) -> str:
        if self._replies is not None:
            return next(self._replies)
        return self._reply(messages) if callable(self._reply) else self._reply

    async def stream(self, messages: Sequence[ChatMessage], params: SamplingParams) -> AsyncIterator[GenerationChunk]:
        self._ready = True
        prompt_tokens = len(TOKEN_PATTERN.findall(self.render_prompt(messages, params)))
        tokens = TOKEN_PATTERN.findall(self.reply_for(messages))
        self.running += 1
        try:
            sent, count, finish_reason = "", 0, "stop"
            for token in tokens:
                if count == params.max_new_tokens:
                    finish_reason = "length"
                    break
                if self.fail_after is not None and count >= self.fail_after:
                    raise EngineError(f"mock failure after {self.fail_after} tokens")
                await asyncio.sleep(self.token_delay + (self.first_token_delay if count == 0 else 0.0))
                count += 1
                candidate = sent + token
                cut = first_stop(candidate, params.stop)
                if cut is not None:
                    if cut > len(sent):
                        yield GenerationChunk(candidate[len(sent) : cut], None, prompt_tokens, count)
                    break
                sent = candidate
                yield GenerationChunk(token, None, prompt_tokens, count)  # the counts so far, as the real engines
            yield GenerationChunk("", finish_reason, prompt_tokens, count)  # type: ignore[arg-type]
        except (GeneratorExit, asyncio.CancelledError):
            self.cancelled += 1
            raise
        finally:
            self.running -= 1


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    positions = [text.find(s) for s in stops if s in text]
    return min(positions) if positions else None
