"""Incremental detokenization and stop strings: token ids in, text deltas out.

``IncrementalDetokenizer`` is the offset-based decoder of TGI and vLLM: each step re-decodes only a
short window (the last emitted token(s) plus the new ones) and emits the part of the window text
that lies past the previously decoded prefix. Work per token is therefore O(1) in the reply length,
and the concatenation of all deltas equals ``tokenizer.decode(ids, skip_special_tokens=True)``.

Why not ``tokenizers.decoders.DecodeStream``: it has no flush, so a reply that ends inside an
incomplete UTF-8 sequence loses the U+FFFD that ``decode`` produces, and it groups byte-fallback
tokens only within its window, while ``decode`` groups every run of adjacent ``<0xNN>`` tokens (an
invalid run becomes one U+FFFD per byte). Both break the invariant; the tests pin it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

REPLACEMENT_CHAR = "\ufffd"
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def _decode_function(tokenizer: Any) -> Callable[[list[int]], str]:
    """The cheapest call that decodes exactly like ``tokenizer.decode(ids, skip_special_tokens=True)``."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        # The Rust decoder is what transformers calls underneath; skipping the Python wrapper
        # saves tens of microseconds per token and row.
        return lambda ids: str(backend.decode(ids, skip_special_tokens=True))
    return lambda ids: str(tokenizer.decode(ids, skip_special_tokens=True))


def _byte_fallback_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of ``<0xNN>`` tokens when the decoder groups them (``ByteFallback``), else empty."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or "ByteFallback" not in repr(backend.decoder):
        return frozenset()
    vocab: dict[str, int] = backend.get_vocab(with_added_tokens=False)
    return frozenset(i for token, i in vocab.items() if _BYTE_TOKEN.match(token))


class DecoderSpec:
    """What an ``IncrementalDetokenizer`` needs from a tokenizer, computed once per engine."""

    def __init__(self, tokenizer: Any) -> None:
        self.decode = _decode_function(tokenizer)
        self.byte_ids = _byte_fallback_ids(tokenizer)
        self.special_ids = frozenset(int(i) for i in getattr(tokenizer, "all_special_ids", ()))


class IncrementalDetokenizer:
    """Token ids in, text deltas out; never emits U+FFFD for an incomplete UTF-8 sequence.

    Args:
        tokenizer: a transformers tokenizer, or a ``DecoderSpec`` built from one (shared by rows).
    """

    def __init__(self, tokenizer: Any) -> None:
        self._spec = tokenizer if isinstance(tokenizer, DecoderSpec) else DecoderSpec(tokenizer)
        self._ids: list[int] = []
        self._prefix = 0  # start of the window that gives the decoder its context
        self._read = 0  # ids before this are already emitted
        self._held_byte = False  # the last decodable id is a byte-fallback token

    @property
    def token_ids(self) -> list[int]:
        return self._ids

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (often ``""`` while bytes are pending)."""
        return self.push_many((token_id,))

    def push_many(self, token_ids: Sequence[int]) -> str:
        """Add several ids at once (one engine frame's); the same text as pushing them one by one, joined.

        One window decode for the run instead of one per id: the web side of an engine process gets a
        stream's ids in runs of up to one per step of the stream interval.
        """
        if not token_ids:
            return ""
        self._ids.extend(token_ids)
        # A run of <0xNN> tokens decodes as one group, so text is final only after the run ends: the held-byte
        # state is the last decodable id's.
        for token_id in reversed(token_ids):
            if token_id not in self._spec.special_ids:
                self._held_byte = token_id in self._spec.byte_ids
                break
        return self._emit()

    def _emit(self) -> str:
        """The text the ids so far complete, unless it may still change (a byte run, a partial character)."""
        if self._held_byte:
            return ""
        prefix_text, new_text = self._window()
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        return self._advance(prefix_text, new_text)

    def flush(self) -> str:
        """Return whatever is still held back (the reply ended); may contain U+FFFD."""
        if self._read == len(self._ids):
            return ""
        prefix_text, new_text = self._window()
        return self._advance(prefix_text, new_text)

    def _window(self) -> tuple[str, str]:
        ids, decode = self._ids, self._spec.decode
        return decode(ids[self._prefix : self._read]), decode(ids[self._prefix :])

    def _advance(self, prefix_text: str, new_text: str) -> str:
        self._prefix, self._read = self._read, len(self._ids)
        return new_text[len(prefix_text) :]


class StopMatcher:
    """Cuts a text stream before the first stop string, holding back possible stop-string starts.

    Args:
        stops: the stop strings; empty strings are ignored.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False

    @property
    def active(self) -> bool:
        return bool(self._stops)

    def feed(self, text: str) -> str:
        """Return the part of ``text`` that is safe to emit; sets ``stopped`` on a match."""
        if not self._stops:
            return text
        text = self._held + text
        cut = min((i for i in (text.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held, self.stopped = "", True
            return text[:cut]
        keep = self._partial_match_len(text)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def flush(self) -> str:
        """Release the held-back text: the stream ended without completing a stop string."""
        held, self._held = self._held, ""
        return held

    def _partial_match_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if stop.startswith(text[-n:]):
                    longest = n
                    break
        return longest


class ReplyText:
    """Detokenizer and stop strings together: what one sequence's reply text goes through."""

    def __init__(self, spec: DecoderSpec, stops: Sequence[str]) -> None:
        self._detok = IncrementalDetokenizer(spec)
        self._stops = StopMatcher(stops)

    @property
    def stopped(self) -> bool:
        return self._stops.stopped

    @property
    def watches_stops(self) -> bool:
        """Whether there are stop strings (then ids go in one by one, to end the reply at the right token)."""
        return self._stops.active

    def push(self, token_id: int) -> str:
        return self._stops.feed(self._detok.push(token_id))

    def push_many(self, token_ids: Sequence[int]) -> str:
        return self._stops.feed(self._detok.push_many(token_ids))

    def finish(self) -> str:
        """The text still held back when the reply ends for another reason than a stop string."""
        text = self._stops.feed(self._detok.flush())
        return text if self._stops.stopped else text + self._stops.flush()
