"""The prefix cache: the KV of ended sequences, kept under their token ids for the requests that start the same way.

A chat's next turn re-sends the whole conversation; its prompt starts with the previous turn's prompt
and reply, whose KV the engine computed a moment ago. When a sequence leaves the batch (finished, cut
by a stop string or cancelled) its row of the KV cache, stripped of batch padding, is copied here under
the tokens it holds. A new request looks up the longest cached prefix of its own tokens (``PrefixIndex``:
tokens, never session ids, so a template that re-renders an earlier turn simply matches less, and a
cleared session reuses nothing of its own but what any conversation with the same tokens could),
copies that much KV into its prefill and computes only the rest.

Memory is a byte budget, evicted least recently used first. A hit copies the prefix into the batch's
own cache in the step that admits the request, so no entry is ever in use across steps and any entry
may be evicted. When a conversation's next turn ends, the entry it grew from is superseded: dropped at
once when the new entry holds all of it, else (a template that rewrote part of it) moved to the front
of the eviction order. Only the worker thread calls these methods; ``stats`` may be read from anywhere.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ._cache import LayerKV
from ._prefix_index import BLOCK_TOKENS, PrefixIndex
from .base import PrefixCacheStats
from .host import host_memory

#: the default budget: this share of the memory free on the model's device when the engine is built, capped.
DEFAULT_FRACTION = 0.1
DEFAULT_CAP = 4 << 30



@dataclass(eq=False)
class CachedPrefix:
    """One entry: the KV of ``tokens`` (of which the first ``prompt_len`` were its request's prompt)."""

    id: int
    tokens: list[int]
    prompt_len: int
    layers: LayerKV
    nbytes: int


class PrefixSource(NamedTuple):
    """The entry a request started from (by id) and how many of its tokens matched."""

    entry_id: int
    length: int


@dataclass(frozen=True)
class PrefixHit:
    """A request may reuse the first ``length`` tokens of ``entry``'s KV."""

    entry: CachedPrefix
    length: int


def default_prefix_cache_bytes(device: torch.device) -> int:
    """A tenth of the memory free on ``device`` (GPU memory, or the host's available RAM), at most 4 GiB."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        _, free = host_memory()
    return int(min(free * DEFAULT_FRACTION, DEFAULT_CAP))


def kv_bytes(layers: LayerKV) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)


class PrefixCache:
    """KV of ended sequences under a byte budget, found by the longest shared token prefix.

    Args:
        capacity_bytes: the most KV bytes held at once; 0 turns the cache off.
    """

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[int, CachedPrefix] = OrderedDict()  # least recently used first
        self._index = PrefixIndex()
        self._ids = itertools.count()
        self._bytes = self._peak = self._queries = self._hits = self._evictions = 0

    @property
    def enabled(self) -> bool:
        return self.capacity_bytes > 0

    @property
    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(
            self.capacity_bytes, self._bytes, self._peak, len(self._entries), self._queries, self._hits,
            self._evictions,
        )  # fmt: skip

    def lookup(self, tokens: Seq[int]) -> PrefixHit | None:
        """The longest cached prefix of ``tokens``, leaving at least the last token to compute (its logits
        choose the first reply token)."""
        found = self._index.longest(tokens, len(tokens) - 1) if self._entries else None
        return None if found is None else PrefixHit(self._entries[found[0]], found[1])

    def record(self, prompt_tokens: int, reused: int, hit: PrefixHit | None) -> PrefixSource | None:
        """Count an admitted request, ``reused`` of whose ``prompt_tokens`` came from ``hit``; returns what the
        request must hand back to ``insert`` (an id, not the entry: an evicted entry's memory must go)."""
        self._queries += prompt_tokens
        self._hits += reused
        if hit is None:
            return None
        if reused and hit.entry.id in self._entries:
            self._entries.move_to_end(hit.entry.id)
        return PrefixSource(hit.entry.id, hit.length)

    def insert(
        self,
        tokens: list[int],
        prompt_len: int,
        nbytes: int,
        copy_kv: Callable[[], LayerKV],
        source: PrefixSource | None = None,
    ) -> None:
        """Keep the KV of ``tokens`` (``nbytes``, copied by ``copy_kv`` once room is made: the cache never holds
        more than its budget); ``source`` is the entry the sequence started from, superseded by this one when it
        was that conversation's previous turn."""
        if not self.enabled or len(tokens) < BLOCK_TOKENS:
            return
        old = self._entries.get(source.entry_id) if source is not None else None
        if old is not None and source is not None and source.length > old.prompt_len:
            self._supersede(old, tokens)  # it reused the old entry's reply: the same conversation
        covering = self._index.longest(tokens, len(tokens))
        if covering is not None and covering[1] == len(tokens):
            self._entries.move_to_end(covering[0])  # already held whole by a longer entry
            return
        if nbytes > self.capacity_bytes:
            return
        while self._bytes + nbytes > self.capacity_bytes:
            self._drop(next(iter(self._entries.values())))
            self._evictions += 1
        entry = CachedPrefix(next(self._ids), tokens, prompt_len, copy_kv(), nbytes)
        self._entries[entry.id] = entry
        self._index.add(entry.id, tokens)
        self._bytes += nbytes
        self._peak = max(self._peak, self._bytes)

    def clear(self) -> None:
        for entry in list(self._entries.values()):
            self._drop(entry)

    def _supersede(self, old: CachedPrefix, tokens: list[int]) -> None:
        if tokens[: len(old.tokens)] == old.tokens:
            self._drop(old)  # the new entry serves every lookup the old one could
        else:
            self._entries.move_to_end(old.id, last=False)  # the next to go

    def _drop(self, entry: CachedPrefix) -> None:
        del self._entries[entry.id]
        self._index.remove(entry.id)
        self._bytes -= entry.nbytes
