"""Longest-prefix search over token sequences by chained block keys (how vLLM finds cached KV blocks).

A sequence's tokens are cut into blocks of ``BLOCK_TOKENS``; block j's key hashes its tokens together
with block j-1's key, so one key stands for the whole prefix up to the end of block j, and the index
maps each key to the sequences that start that way. A query walks its own block keys while some stored
sequence shares them, confirms the match token by token (a hash collision can never hand out a wrong
prefix) and extends it into the first block that differs: a prefix may end anywhere, not only at a
block edge. A query costs one hash per block of its own length, whatever the number of sequences.
"""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Sequence as Seq

#: tokens per block: a match must share at least one whole block to count.
BLOCK_TOKENS = 16
_ROOT = 0x5EED


def block_keys(tokens: Seq[int], limit: int) -> Iterator[int]:
    """The chained key of each whole block within the first ``limit`` tokens."""
    key = _ROOT
    for start in range(0, limit - BLOCK_TOKENS + 1, BLOCK_TOKENS):
        key = hash((key, *tokens[start : start + BLOCK_TOKENS]))
        yield key


def common_length(a: Seq[int], b: Seq[int], start: int, limit: int) -> int:
    """How far ``a`` and ``b`` agree, given that they agree on ``[0, start)``, up to ``limit``."""
    end = min(limit, len(a), len(b))
    while start < end and a[start] == b[start]:
        start += 1
    return start


class PrefixIndex:
    """Token sequences under integer ids; ``longest`` finds the one sharing the longest prefix with a query."""

    def __init__(self) -> None:
        self._tokens: dict[int, list[int]] = {}
        self._keys: dict[int, list[int]] = {}
        self._by_key: dict[int, dict[int, None]] = {}  # block key -> ids of the sequences with that prefix

    def __len__(self) -> int:
        return len(self._tokens)

    def __contains__(self, item: int) -> bool:
        return item in self._tokens

    def add(self, item: int, tokens: Seq[int]) -> None:
        self._tokens[item] = list(tokens)
        keys = self._keys[item] = list(block_keys(tokens, len(tokens)))
        for key in keys:
            self._by_key.setdefault(key, {})[item] = None

    def remove(self, item: int) -> None:
        del self._tokens[item]
        for key in self._keys.pop(item):
            holders = self._by_key[key]
            del holders[item]
            if not holders:
                del self._by_key[key]

    def tokens(self, item: int) -> list[int]:
        return self._tokens[item]

    def longest(self, tokens: Seq[int], limit: int) -> tuple[int, int] | None:
        """``(id, length)`` of the stored sequence sharing the longest prefix (at most ``limit`` tokens) with
        ``tokens``; None when none shares a whole block."""
        holders: dict[int, None] | None = None
        blocks = 0
        for key in block_keys(tokens, limit):
            found = self._by_key.get(key)
            if found is None:
                break
            holders, blocks = found, blocks + 1
        if holders is None:
            return None
        shared = blocks * BLOCK_TOKENS
        query = list(tokens[:shared])
        best: tuple[int, int] | None = None
        for item in reversed(holders):  # the latest first: among equals, the most recently stored wins
            stored = self._tokens[item]
            # a hash collision (keys equal, tokens not) is compared token by token: it matches only what is equal
            length = common_length(stored, tokens, shared if stored[:shared] == query else 0, limit)
            if length >= BLOCK_TOKENS and (best is None or length > best[1]):
                best = (item, length)
        return best
