"""The scheduler's side of the prefix cache: what a waiting prompt can reuse, what its prefill did reuse, and
what a sequence leaving the batch leaves behind (see ``_prefix_cache`` for the cache itself)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

from transformers import DynamicCache

from ._batch import KVBatch, ModelRunner, prefix_cache, reused_columns
from ._cache import LayerKV, bytes_per_token
from ._prefix_cache import PrefixCache
from ._prefix_index import BLOCK_TOKENS
from ._sequence import Sequence

logger = logging.getLogger(__name__)


class PrefixReuse:
    """Finds, counts and keeps cached prefixes for one scheduler; a no-op without a cache (or with one of 0 bytes)."""

    def __init__(self, cache: PrefixCache | None) -> None:
        self.cache = cache if cache is not None and cache.enabled else None

    def find(self, seq: Sequence) -> int:
        """Look up ``seq``'s longest cached prefix (kept on ``seq.hit``); return the prompt tokens left to compute."""
        seq.hit = self.cache.lookup(seq.prompt_ids) if self.cache is not None else None
        return left_to_compute(seq)

    def for_group(self, group: list[Sequence]) -> list[tuple[LayerKV | None, int]]:
        """Each row's ``(cached layers, matched tokens)`` for one ``prefill`` call, counting what it reuses."""
        reused: list[tuple[LayerKV | None, int]] = [
            (s.hit.entry.layers, s.hit.length) if s.hit else (None, 0) for s in group
        ]
        counts = reused_columns([s.prompt_ids for s in group], [n for _, n in reused])
        for seq, n in zip(group, counts, strict=True):
            self._count(seq, n)
        return reused

    def for_chunks(self, runner: ModelRunner, seq: Sequence) -> tuple[DynamicCache, int]:
        """The cache a long prompt's chunked prefill starts from, and the offset of its first uncached token."""
        hit = seq.hit
        self._count(seq, hit.length if hit else 0)
        if hit is None:
            return runner.new_cache(), 0
        return prefix_cache(runner, hit.entry.layers, hit.length), hit.length

    def _count(self, seq: Sequence, reused: int) -> None:
        seq.cached_tokens = reused
        if self.cache is not None:
            seq.source = self.cache.record(len(seq.prompt_ids), reused, seq.hit)
        seq.hit = None  # its KV is being copied: holding the entry would keep it alive past an eviction

    def keep_rows(self, batch: KVBatch, rows: list[int]) -> None:
        """Keep the KV of the sequences in ``rows``, which are leaving ``batch``."""
        for row in rows:
            self.keep(batch.seqs[row], batch.lengths[row], batch.cache, partial(batch.row_kv, row))

    def keep(self, seq: Sequence, length: int, kv: DynamicCache, copy_kv: Callable[[], LayerKV]) -> None:
        """Keep the first ``length`` tokens of ``seq`` (in ``kv``; ``copy_kv`` copies them out)."""
        if self.cache is None or length < BLOCK_TOKENS:
            return
        try:
            nbytes = length * bytes_per_token(kv)
            self.cache.insert(seq.tokens_in_cache(length), len(seq.prompt_ids), nbytes, copy_kv, seq.source)
        except Exception:  # e.g. no memory left for the copy: a lost cache entry costs a recompute, nothing else
            logger.warning("could not keep a finished sequence's KV in the prefix cache", exc_info=True)


def left_to_compute(seq: Sequence) -> int:
    """Prompt tokens left to compute once its cached prefix (``seq.hit``) is reused."""
    return len(seq.prompt_ids) - (seq.hit.length if seq.hit else 0)
