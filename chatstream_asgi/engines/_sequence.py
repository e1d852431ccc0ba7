"""One request's life inside the engine: its prompt, sampler, reply text and event sink.

The worker thread owns every field but ``cancelled``, which the event loop sets when the consumer
goes away; the worker reads it once per step. Events leave through the sequence's ``Channel``
(``_delivery``), which the scheduler flushes once per step.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence as Seq
from typing import Any

from ._delivery import Channel, Event, FirstToken
from ._prefix_cache import PrefixHit, PrefixSource
from ._sampling import RowSampler
from .base import FinishReason, GenerationChunk, SamplingParams
from .detokenizer import DecoderSpec, IncrementalDetokenizer, ReplyText


class Sequence:
    """A request as the worker sees it; ``accept`` feeds it one generated token at a time."""

    def __init__(
        self,
        prompt_ids: Seq[int],
        params: SamplingParams,
        channel: Channel,
        key: Any,
        *,
        decoder: DecoderSpec,
        eos_ids: frozenset[int],
        detokenize: bool = True,
    ) -> None:
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.sampler = RowSampler(params, self.prompt_ids)
        self.completion_tokens = 0
        self.generated: list[int] = []  # the reply's token ids: with the prompt, what a prefix cache entry holds
        self.cached_tokens = 0  # prompt tokens reused from the prefix cache
        self.hit: PrefixHit | None = None  # the cached prefix found for it, until its prefill copied it
        self.source: PrefixSource | None = None  # the cache entry it started from, by id
        self.done = False
        self._sent_text = False
        # None: token ids leave as they are and the consumer detokenizes (and watches the stop strings)
        self._text = ReplyText(decoder, params.stop) if detokenize else None
        # Ids alone: the reply's first ids are still decoded here until they make text, so that ids before the
        # first text (a character split over byte tokens: an emoji, a rare CJK one) go out at once, as text
        # would, instead of waiting out the stream interval. Usually the first id makes text: one decode a reply.
        self._until_text = IncrementalDetokenizer(decoder) if not detokenize else None
        self._eos = frozenset() if params.ignore_eos else eos_ids
        self.channel = channel
        self.key = key  # who the channel delivers to: a ReplyBuffer, or a request id across a process boundary
        self._cancelled = threading.Event()

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def finished(self) -> bool:
        """Nothing more to compute for this sequence: it ended, failed or its consumer left."""
        return self.done or self._cancelled.is_set()

    def cancel(self) -> None:
        """Thread-safe: the worker drops the sequence at its next step."""
        self._cancelled.set()

    def accept(self, token_id: int) -> bool:
        """Take one generated token, emit the text it completes; True when the reply is over."""
        self.completion_tokens += 1
        self.generated.append(token_id)
        if self._text is None:
            return self._accept_id(token_id)
        if token_id in self._eos:
            return self._finish("stop", self._text.finish())
        text = self._text.push(token_id)
        if self._text.stopped:
            return self._finish("stop", text)
        if self.completion_tokens >= self.params.max_new_tokens:
            text += self._text.finish()
            return self._finish("stop" if self._text.stopped else "length", text)
        if text:
            self._emit(text, urgent=not self._sent_text)
            self._sent_text = True
        return False

    def _accept_id(self, token_id: int) -> bool:
        if token_id in self._eos:
            return self._finish("stop", "")
        first = self.completion_tokens == 1  # it tells the consumer what the prefill reused, too
        urgent = first or self._until_text is not None
        if self._until_text is not None and self._until_text.push(token_id):
            self._until_text = None  # the first text is complete: later ids may wait for the interval
        self._emit(FirstToken(token_id, self.cached_tokens) if first else token_id, urgent=urgent)
        if self.completion_tokens >= self.params.max_new_tokens:
            return self._finish("length", "")
        return False

    def tokens_in_cache(self, length: int) -> list[int]:
        """The first ``length`` tokens of prompt and reply: what its KV cache row holds once ``length`` long."""
        prompt = self.prompt_ids
        return prompt[:length] if length <= len(prompt) else prompt + self.generated[: length - len(prompt)]

    def fail(self, error: BaseException) -> None:
        """End the stream with ``error`` (raised by the consumer); no-op once the reply is over."""
        if not self.done:
            self.done = True
            self._emit(error)

    def _finish(self, reason: FinishReason, text: str) -> bool:
        self.done = True
        self._emit(GenerationChunk(text, reason, len(self.prompt_ids), self.completion_tokens, self.cached_tokens))
        return True

    def _emit(self, event: Event, urgent: bool = True) -> None:
        if not self.channel.post(self.key, event, urgent):
            self._cancelled.set()  # nobody listens any more (the consumer's loop or connection is gone)
