"""The batch's KV cache: attention layers (full or sliding-window) whose rows come and go cheaply.

``DynamicLayer.update`` concatenates, so every decode step copies every layer's whole cache (what
``generate`` does too): O(batch x width) bytes per step, O(width^2) per reply. A ``GrowingLayer``
keeps its keys and values as views ``[:rows, :, start:used]`` of buffers with spare rows and columns:
- a decode step writes one column; the buffers are reallocated only when full (every ``HEADROOM`` steps);
- rows leaving move the last rows into their places (one row's copy each: ``compaction``), and columns that
  became padding for every row are dropped by moving ``start``;
- rows joining are written into the spare rows, only their own bytes.
With clients arriving at their own pace a row leaves or joins on most steps at batch 64, and copying the
whole cache for each of those events (then once more to regain spare columns) was an eighth of the engine
process's time on a fast model.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from ..errors import ConfigurationError

#: spare columns allocated when a layer's buffer is full.
HEADROOM = 128
#: spare rows allocated when rows join a layer whose buffer has no room for them.
ROW_HEADROOM = 8
LayerKV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys and values, [1, heads, tokens, head_dim]


class GrowingLayer(DynamicLayer):  # type: ignore[no-untyped-call]
    """A ``DynamicLayer`` whose ``keys``/``values`` are views of buffers with spare rows and columns."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None
        self._rows = self._start = self._used = 0

    def replace(self, keys: torch.Tensor, values: torch.Tensor, used: int | None = None) -> None:
        """Hold these buffers, all of whose rows and the first ``used`` columns are filled (default all: no
        spare room, the next update reallocates)."""
        self._key_buffer, self._value_buffer = keys, values
        self._rows, self._start, self._used = keys.shape[0], 0, keys.shape[-2] if used is None else used
        self.device, self.is_initialized = keys.device, True
        self._expose()

    def _expose(self) -> None:
        assert self._key_buffer is not None and self._value_buffer is not None
        self.keys = self._key_buffer[: self._rows, :, self._start : self._used, :]
        self.values = self._value_buffer[: self._rows, :, self._start : self._used, :]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._key_buffer is None or self._value_buffer is None:
            self.replace(key_states, value_states)
            return key_states, value_states
        new = key_states.shape[-2]
        if self._used + new > self._key_buffer.shape[-2]:
            self._reallocate(self._key_buffer.shape[0], self._used - self._start + new + HEADROOM)
        self._key_buffer[: self._rows, :, self._used : self._used + new, :] = key_states
        self._value_buffer[: self._rows, :, self._used : self._used + new, :] = value_states
        self._used += new
        self._expose()
        return cast(torch.Tensor, self.keys), cast(torch.Tensor, self.values)

    def _reallocate(self, rows: int, columns: int, left: int = 0) -> None:
        """Copy the visible rows and columns into new buffers of ``rows`` x ``columns``, ``left`` of them
        zeros before the visible ones."""
        assert self.keys is not None and self.values is not None
        width = self._used - self._start
        keys, values = _buffer(self.keys, rows, columns), _buffer(self.values, rows, columns)
        keys[: self._rows, :, :left].zero_()
        values[: self._rows, :, :left].zero_()
        keys[: self._rows, :, left : left + width] = self.keys
        values[: self._rows, :, left : left + width] = self.values
        self._key_buffer, self._value_buffer = keys, values
        self._start, self._used = 0, left + width
        self._expose()

    def keep(self, moves: list[tuple[int, int]], rows: int, cut: int) -> None:
        """Copy row ``src`` over row ``dst`` for each of ``moves``, keep the first ``rows`` rows and drop the
        ``cut`` leftmost columns."""
        assert self._key_buffer is not None and self._value_buffer is not None
        for src, dst in moves:
            self._key_buffer[dst, :, self._start : self._used] = self._key_buffer[src, :, self._start : self._used]
            self._value_buffer[dst, :, self._start : self._used] = self._value_buffer[src, :, self._start : self._used]
        self._rows, self._start = rows, self._start + cut
        self._expose()
        if 4 * rows < self._key_buffer.shape[0] - ROW_HEADROOM:  # most rows left: give their memory back
            self._reallocate(rows + ROW_HEADROOM, self._used - self._start + HEADROOM)

    def append(self, keys: torch.Tensor, values: torch.Tensor, width: int) -> None:
        """Add rows whose real columns are right-aligned in ``keys``/``values``; the layer becomes ``width``
        columns wide (at least as wide as both)."""
        assert self._key_buffer is not None and self._value_buffer is not None
        rows, added = self._rows, keys.shape[0]
        widen = width - (self._used - self._start)
        if rows + added > self._key_buffer.shape[0] or widen > self._start:
            spare_columns = max(self._key_buffer.shape[-2] - self._used, HEADROOM // 2)
            rows_wanted = max(self._key_buffer.shape[0], rows + added + ROW_HEADROOM)
            self._reallocate(rows_wanted, width + spare_columns, max(widen, 0))
        elif widen > 0:  # the new rows are wider: uncover columns on the left, as padding of the old rows
            self._key_buffer[:rows, :, self._start - widen : self._start].zero_()
            self._value_buffer[:rows, :, self._start - widen : self._start].zero_()
            self._start -= widen
        theirs = keys.shape[-2]
        for buffer, new in ((self._key_buffer, keys), (self._value_buffer, values)):
            # Zeros, not garbage, on the padding: masked columns still multiply their values by a 0 weight, and
            # 0 * NaN = NaN (new_empty memory, or a failed row's values, may hold NaN).
            buffer[rows : rows + added, :, self._start : self._used - theirs].zero_()
            buffer[rows : rows + added, :, self._used - theirs : self._used] = new
        self._rows = rows + added
        self._expose()


def _buffer(like: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    return like.new_empty((rows, like.shape[1], columns, like.shape[3]))


def compaction(count: int, kept: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
    """How ``count`` rows shrink to the ``kept`` ones (ascending) by moving rows, not copying the cache.

    Each row that leaves from below ``len(kept)`` takes the last kept row: returns the new row order (old
    indices) and the ``(src, dst)`` row moves, one per hole.
    """
    size = len(kept)
    holes = sorted(set(range(size)) - set(kept))
    tails = [row for row in kept if row >= size]
    order = list(range(size))
    for hole, tail in zip(holes, tails, strict=True):
        order[hole] = tail
    return order, list(zip(tails, holes, strict=True))


def new_cache(config: Any) -> DynamicCache:
    """A ``DynamicCache`` for ``config`` made of ``GrowingLayer``s.

    Sliding-window layers (Mistral, Gemma 2/3, Phi-3) keep every column too, and the attention masks hide the
    columns past their window (see ``ModelRunner``): one batch layout serves every layer, at the price of keeping
    KV that a window layer no longer reads. Other layer kinds (chunked attention, recurrent state) are refused.
    """
    try:
        cache = DynamicCache(config=config)
    except (KeyError, ValueError, TypeError) as exc:  # a layer type this transformers has no cache layer for
        raise unserved(f"layers transformers cannot cache ({exc})") from exc
    kinds = {type(layer) for layer in cache.layers}
    if kinds - {DynamicLayer, DynamicSlidingWindowLayer}:
        raise unserved(str(sorted(k.__name__ for k in kinds)))
    # Llama 4's chunked attention gets the sliding-window cache layer in transformers 5, but its mask is another
    if "chunked_attention" in (getattr(config.get_text_config(decoder=True), "layer_types", None) or ()):
        raise unserved("chunked attention layers")
    cache.layers = [GrowingLayer() for _ in cache.layers]
    cache.layer_class_to_replicate = GrowingLayer if not cache.layers else None
    return cache


def unserved(what: str) -> ConfigurationError:
    return ConfigurationError(
        f"TransformersEngine batches full-attention and sliding-window KV caches only; this model uses {what}. "
        "Serve it with a dedicated engine (vLLM, TGI) through the OpenAI upstream engine."
    )


def attention_windows(config: Any) -> set[int | None]:
    """The sliding windows of the model's attention layers; None stands for full attention."""
    return {
        int(layer.sliding_window) if isinstance(layer, DynamicSlidingWindowLayer) else None
        for layer in DynamicCache(config=config).layers
    }


def _layers(cache: DynamicCache) -> list[GrowingLayer]:
    return cast("list[GrowingLayer]", cache.layers)


def _kv(layer: GrowingLayer) -> tuple[torch.Tensor, torch.Tensor]:
    assert layer.keys is not None and layer.values is not None
    return layer.keys, layer.values


def keep_rows(cache: DynamicCache, moves: list[tuple[int, int]], rows: int, cut: int) -> None:
    """Apply a ``compaction``'s row ``moves``, keep the first ``rows`` rows and drop the ``cut`` leftmost
    columns of every layer."""
    for layer in _layers(cache):
        layer.keep(moves, rows, cut)


def append_rows(cache: DynamicCache, other: DynamicCache, width: int) -> None:
    """Append ``other``'s rows to ``cache``, both left-padded to ``width`` columns."""
    for mine, theirs in zip(_layers(cache), _layers(other), strict=True):
        mine.append(*_kv(theirs), width)


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


def seed_cache(cache: DynamicCache, prefixes: list[tuple[LayerKV | None, int]], room: int = 0) -> int:
    """Fill an empty cache with each row's reused prefix: row ``i`` gets the first ``n`` columns of its
    ``prefixes[i] = (layers, n)``, right-aligned, zeros on the left (see ``GrowingLayer.append``), with
    ``room`` spare columns after them for the tokens about to be fed (no reallocation then). Returns the width."""
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
