"""``PrefixIndex`` and ``PrefixCache`` alone: longest token-prefix matches, the byte budget, LRU, superseding."""

from __future__ import annotations

import pytest
import torch

from chatstream_asgi.engines import _prefix_index
from chatstream_asgi.engines._cache import LayerKV
from chatstream_asgi.engines._prefix_cache import PrefixCache, PrefixSource, kv_bytes
from chatstream_asgi.engines._prefix_index import BLOCK_TOKENS, PrefixIndex

B = BLOCK_TOKENS


def kv(tokens: int, layers: int = 2) -> LayerKV:
    """Fake KV of ``tokens`` positions whose values say which position they hold (to check slicing)."""
    keys = torch.arange(tokens, dtype=torch.float32).view(1, 1, tokens, 1).expand(1, 2, tokens, 4).clone()
    return [(keys.clone(), keys.clone() + 0.5) for _ in range(layers)]


def insert(cache: PrefixCache, tokens: list[int], prompt_len: int, source: PrefixSource | None = None) -> None:
    layers = kv(len(tokens))
    cache.insert(tokens, prompt_len, kv_bytes(layers), lambda: layers, source)


def cache_with(*sequences: list[int], capacity: int = 1 << 30) -> PrefixCache:
    cache = PrefixCache(capacity)
    for tokens in sequences:
        insert(cache, tokens, len(tokens))
    return cache


def test_longest_match_extends_past_the_last_shared_block() -> None:
    index = PrefixIndex()
    index.add(1, list(range(100)))
    index.add(2, list(range(40)) + [999] * 60)
    query = list(range(70)) + [5, 5, 5]
    assert index.longest(query, len(query)) == (1, 70)  # not a multiple of the block
    assert index.longest(list(range(45)) + [7], 46) == (1, 45)
    assert index.longest(list(range(40)) + [999, 999, 1], 43) == (2, 42)


def test_no_match_shorter_than_a_block_and_the_limit_is_respected() -> None:
    index = PrefixIndex()
    index.add(1, list(range(64)))
    assert index.longest(list(range(B - 1)) + [-1] * 10, 100) is None
    assert index.longest(list(range(64)), 63) == (1, 63)
    assert index.longest(list(range(64)), 64) == (1, 64)


def test_a_hash_collision_never_hands_out_a_wrong_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_prefix_index, "hash", lambda value: 42, raising=False)  # every block key collides
    index = PrefixIndex()
    index.add(1, [1] * 48)
    assert index.longest([2] * 48, 48) is None
    assert index.longest([1] * 40 + [2] * 8, 48) == (1, 40)


def test_removed_sequences_are_not_found() -> None:
    index = PrefixIndex()
    index.add(1, list(range(50)))
    index.add(2, list(range(50)))
    index.remove(1)
    assert index.longest(list(range(50)), 50) == (2, 50) and len(index) == 1
    index.remove(2)
    assert index.longest(list(range(50)), 50) is None and index._by_key == {}


def test_lookup_leaves_the_last_prompt_token_to_compute() -> None:
    cache = cache_with(list(range(40)))
    hit = cache.lookup(list(range(40)))
    assert hit is not None and hit.length == 39
    assert cache.lookup(list(range(B))) is None  # one block, minus the last token: no whole block left


def test_cache_off_keeps_nothing() -> None:
    cache = cache_with(list(range(40)), capacity=0)
    assert not cache.enabled and cache.lookup(list(range(60))) is None and cache.stats.entries == 0


def test_budget_evicts_least_recently_used_and_never_exceeds_it() -> None:
    size = kv_bytes(kv(40))
    cache = PrefixCache(2 * size)
    first, second, third = ([n] * 40 for n in (1, 2, 3))
    insert(cache, first, 20)
    insert(cache, second, 20)
    cache.record(41, 39, cache.lookup(first + [0]))  # first is used again: second is now the oldest
    insert(cache, third, 20)
    stats = cache.stats
    assert stats.entries == 2 and stats.bytes == 2 * size == stats.peak_bytes and stats.evictions == 1
    assert cache.lookup(second + [0]) is None
    assert cache.lookup(first + [0]) is not None and cache.lookup(third + [0]) is not None
    assert (stats.queries_tokens, stats.hit_tokens) == (41, 39)


def test_an_entry_over_the_whole_budget_is_not_kept() -> None:
    cache = PrefixCache(kv_bytes(kv(40)) - 1)
    insert(cache, [1] * 40, 20)
    assert cache.stats.entries == 0 and cache.stats.bytes == 0


def test_the_next_turn_supersedes_the_entry_it_grew_from() -> None:
    turn1 = list(range(50))  # a prompt of 30 tokens and its reply
    cache = PrefixCache(1 << 30)
    insert(cache, turn1, 30)
    hit = cache.lookup(turn1 + [7, 8])
    assert hit is not None and hit.length == 50
    turn2 = turn1 + list(range(100, 140))
    insert(cache, turn2, 52, PrefixSource(hit.entry.id, 50))
    assert cache.stats.entries == 1  # turn 1 is held whole by turn 2
    again = cache.lookup(turn1 + [9])
    assert again is not None and again.entry.tokens == turn2


def test_a_rewritten_earlier_turn_is_evicted_first_not_dropped() -> None:
    prompt = list(range(30))
    turn1 = prompt + [500] * 20  # prompt and reply
    other = [9] * 40
    cache = cache_with(other)
    insert(cache, turn1, len(prompt))
    turn2 = prompt + [500] * 10 + [600] * 30  # the template re-rendered the end of the reply
    hit = cache.lookup(turn2)
    assert hit is not None and hit.length == 40 > hit.entry.prompt_len
    insert(cache, turn2, 45, PrefixSource(hit.entry.id, hit.length))
    assert cache.stats.entries == 3
    assert next(iter(cache._entries.values())).tokens == turn1  # the next to go, before the older `other`


def test_another_conversation_sharing_only_the_prompt_start_does_not_supersede() -> None:
    system = list(range(32))
    alice = system + [1] * 20
    cache = cache_with(alice)
    hit = cache.lookup(system + [2] * 20)
    assert hit is not None and hit.length == 32 <= hit.entry.prompt_len
    insert(cache, system + [2] * 30, 52, PrefixSource(hit.entry.id, hit.length))
    assert [e.tokens for e in cache._entries.values()] == [alice, system + [2] * 30]


def test_a_sequence_already_held_whole_is_not_stored_twice() -> None:
    cache = cache_with(list(range(80)))
    insert(cache, list(range(60)), 60)
    assert cache.stats.entries == 1 and cache.stats.bytes == kv_bytes(kv(80))


def test_room_is_made_before_the_copy_and_a_held_sequence_is_not_copied_again() -> None:
    size = kv_bytes(kv(40))
    cache = PrefixCache(size)
    insert(cache, [1] * 40, 20)
    copies: list[int] = []

    def copy_kv() -> LayerKV:
        copies.append(cache.stats.bytes)  # what the cache held when the copy was made
        return kv(40)

    cache.insert([2] * 40, 20, size, copy_kv)
    cache.insert([2] * 30, 20, kv_bytes(kv(30)), copy_kv)  # held whole by the entry just made
    assert copies == [0] and cache.stats.peak_bytes == size
