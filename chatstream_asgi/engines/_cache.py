"""The batch's KV cache: full-attention layers that append a decode step without copying the cache.

``DynamicLayer.update`` concatenates, so every decode step copies every layer's whole cache (what
``generate`` does too): O(batch x width) bytes per step, O(width^2) per reply. ``GrowingLayer``
keeps its keys and values as views into a buffer with spare columns; a step writes one column,
and the buffer is reallocated only when full (every ``HEADROOM`` steps). Rows joining or leaving
rebuild the tensors anyway, so only those events copy the cache.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..errors import ConfigurationError

#: spare columns allocated when a layer's buffer is full.
HEADROOM = 128
LayerKV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys and values, [1, heads, tokens, head_dim]


class GrowingLayer(DynamicLayer):  # type: ignore[no-untyped-call]
    """A ``DynamicLayer`` whose ``keys``/``values`` are views of buffers with spare columns."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def replace(self, keys: torch.Tensor, values: torch.Tensor, used: int | None = None) -> None:
        """Hold these buffers, of which the first ``used`` columns are filled (default all: no spare room, the
        next update reallocates)."""
        self._key_buffer, self._value_buffer = keys, values
        self.keys, self.values = keys[..., :used, :], values[..., :used, :]
        self.device, self.is_initialized = keys.device, True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._key_buffer is None or self._value_buffer is None or self.keys is None:
            self.replace(key_states, value_states)
            return key_states, value_states
        used, new = self.keys.shape[-2], key_states.shape[-2]
        if used + new > self._key_buffer.shape[-2]:
            self._key_buffer = _grown(self._key_buffer[..., :used, :], used + new + HEADROOM)
            self._value_buffer = _grown(self._value_buffer[..., :used, :], used + new + HEADROOM)
        self._key_buffer[..., used : used + new, :] = key_states
        self._value_buffer[..., used : used + new, :] = value_states
        self.keys = self._key_buffer[..., : used + new, :]
        self.values = self._value_buffer[..., : used + new, :]
        return self.keys, self.values


def _grown(t: torch.Tensor, capacity: int) -> torch.Tensor:
    out = t.new_empty((*t.shape[:-2], capacity, t.shape[-1]))
    out[..., : t.shape[-2], :] = t
    return out


def new_cache(config: Any) -> DynamicCache:
    """A ``DynamicCache`` for ``config`` made of ``GrowingLayer``s; full attention only."""
    cache = DynamicCache(config=config)
    kinds = {type(layer) for layer in cache.layers}
    if kinds - {DynamicLayer}:
        names = sorted(k.__name__ for k in kinds)
        raise ConfigurationError(
            f"TransformersEngine batches full-attention KV caches only; this model uses {names}. "
            "Serve it with a dedicated engine (vLLM, TGI) through the OpenAI upstream engine."
        )
    cache.layers = [GrowingLayer() for _ in cache.layers]
    cache.layer_class_to_replicate = GrowingLayer if not cache.layers else None
    return cache


def _layers(cache: DynamicCache) -> list[GrowingLayer]:
    return cast("list[GrowingLayer]", cache.layers)


def _kv(layer: GrowingLayer) -> tuple[torch.Tensor, torch.Tensor]:
    assert layer.keys is not None and layer.values is not None
    return layer.keys, layer.values


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    # Zeros, not garbage: masked columns still multiply their values by a 0 weight, and 0 * NaN = NaN.
    return t if t.shape[-2] == width else F.pad(t, (0, 0, width - t.shape[-2], 0))


def keep_rows(cache: DynamicCache, rows: list[int], cut: int) -> None:
    """Keep batch ``rows`` and drop the ``cut`` leftmost columns of every layer."""
    layers = _layers(cache)
    index = torch.tensor(rows, dtype=torch.long, device=_kv(layers[0])[0].device)
    for layer in layers:
        keys, values = _kv(layer)
        layer.replace(keys[index, :, cut:, :], values[index, :, cut:, :])


def append_rows(cache: DynamicCache, other: DynamicCache, width: int) -> None:
    """Append ``other``'s rows to ``cache``, both left-padded to ``width`` columns."""
    for mine, theirs in zip(_layers(cache), _layers(other), strict=True):
        (my_keys, my_values), (their_keys, their_values) = _kv(mine), _kv(theirs)
        mine.replace(
            torch.cat([_pad_left(my_keys, width), _pad_left(their_keys, width)]),
            torch.cat([_pad_left(my_values, width), _pad_left(their_values, width)]),
        )


def bytes_per_token(cache: DynamicCache) -> int:
    """KV bytes one token of one row takes, over all layers."""
    total = 0
    for layer in _layers(cache):
        keys, values = _kv(layer)
        total += (
            keys.shape[1] * keys.shape[3] * keys.element_size()
            + values.shape[1] * values.shape[3] * values.element_size()
        )
    return total


def row_kv(cache: DynamicCache, row: int, start: int, stop: int) -> LayerKV:
    """Copies of columns ``[start, stop)`` of batch row ``row`` in every layer, to keep once the row has left."""
    copies = []
    for layer in _layers(cache):
        keys, values = _kv(layer)
        copies.append((keys[row : row + 1, :, start:stop, :].clone(), values[row : row + 1, :, start:stop, :].clone()))
    return copies


def seed_cache(
    cache: DynamicCache, prefixes: list[tuple[LayerKV | None, int]], room: int = 0
) -> int:
    """Fill an empty cache with each row's reused prefix: row ``i`` gets the first ``n`` columns of its
    ``prefixes[i] = (layers, n)``, right-aligned, zeros on the left (see ``_pad_left``), with ``room`` spare
    columns after them for the tokens about to be fed (no reallocation then). Returns the width."""
    width = max(n for _, n in prefixes)
    template = next(layers for layers, n in prefixes if layers is not None and n)
    for index, layer in enumerate(_layers(cache)):
        key_like, value_like = template[index]
        keys = key_like.new_zeros((len(prefixes), key_like.shape[1], width + room, key_like.shape[3]))
        values = value_like.new_zeros((len(prefixes), value_like.shape[1], width + room, value_like.shape[3]))
        for row, (layers, n) in enumerate(prefixes):
            if layers is not None and n:
                keys[row, :, width - n : width, :] = layers[index][0][0, :, :n, :]
                values[row, :, width - n : width, :] = layers[index][1][0, :, :n, :]
        layer.replace(keys, values, width)
    return width
