"""The running batch: sequences that share one left-padded KV cache, and the forward calls on it.

Every row's real tokens are right-aligned in the cache: row ``i`` holds ``lengths[i]`` real
columns at the right end and padding on the left. That keeps the attention mask a function of
``lengths`` alone (rebuilt each step, O(rows x width) integers, no state) and makes trimming
simple: when rows leave, the leftmost ``width - max(lengths)`` columns are padding for every
remaining row and are cut. Rows joining or leaving copy only their own rows' KV, and the order of
the rows may change when some leave (see ``_cache.GrowingLayer``).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence as Seq
from typing import Any, cast

import torch
from transformers import DynamicCache

from ..errors import ConfigurationError
from ._cache import (
    HEADROOM,
    LayerKV,
    append_rows,
    attention_windows,
    compaction,
    keep_rows,
    new_cache,
    row_kv,
    seed_cache,
)
from ._sampling import upload
from ._sequence import Sequence


class ModelRunner:
    """Calls the model's forward with the keyword names this transformers version expects."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.device: torch.device = model.device
        params = inspect.signature(type(model).forward).parameters
        check_batchable(model, params)
        # transformers 5.x renamed ``past_key_values`` to ``cache``; accept either generation.
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_last = "logits_to_keep" in params
        # With SDPA the decode mask is built here, ready to use: transformers' own mask building from a 2-D
        # mask cost a tenth of a fast model's step. One 4-D mask serves every layer when they share one window
        # (none: most models; all the same: Mistral), and it hides the columns past that window; a model that
        # mixes them (Gemma 2/3) and other attention kernels get the 2-D mask, from which transformers builds
        # each layer kind's own (the sliding ones over the same column layout: a row's tokens are contiguous).
        # ALiBi models (Falcon with alibi=True) build their position bias from the 2-D mask itself.
        windows = attention_windows(model.config)
        sdpa = getattr(model.config, "_attn_implementation", None) == "sdpa"
        self.sdpa = sdpa and len(windows) == 1 and not uses_alibi(model.config)
        self.window = next(iter(windows)) if len(windows) == 1 else None

    def new_cache(self) -> DynamicCache:
        return new_cache(self.model.config)

    def forward(
        self, input_ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        """Run the model; return the float32 logits of each row's last position (``[rows, vocab]``)."""
        kwargs: dict[str, Any] = {self._cache_kw: cache}
        if self._keep_last:
            kwargs["logits_to_keep"] = 1
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
        return cast(torch.Tensor, out.logits[:, -1, :].float())


#: ALiBi models (beside Falcon's ``alibi=True``): no positions at all, the bias follows the mask, so left padding
#: moves nothing; and they build that bias from the 2-D mask
ALIBI_MODEL_TYPES = frozenset({"bloom", "mpt"})


def uses_alibi(config: Any) -> bool:
    return bool(getattr(config, "alibi", False)) or getattr(config, "model_type", None) in ALIBI_MODEL_TYPES


def check_batchable(model: Any, forward_params: Any) -> None:
    """Raise ``ConfigurationError`` for a model the engine's batch layout cannot serve exactly.

    The layout needs a KV cache the forward takes, and per-row ``position_ids``: rows are left-padded, and a
    model that derives positions from the cache length (BART/Marian-style decoders) would shift every padded
    row's positions by its padding.
    """
    config = model.config
    if "cache" not in forward_params and "past_key_values" not in forward_params:
        raise ConfigurationError(f"{type(model).__name__} keeps no KV cache (its forward takes none); it cannot stream")
    if "position_ids" not in forward_params and not uses_alibi(config):
        raise ConfigurationError(
            f"{type(model).__name__} takes no position_ids, and the engine batches left-padded rows, whose "
            "positions it must set; serve this model with a dedicated engine through the OpenAI upstream engine"
        )
    new_cache(config)  # raises ConfigurationError for caches it cannot batch


def prefill(
    runner: ModelRunner, prompts: Seq[Seq[int]], pad_id: int, reused: Seq[tuple[LayerKV | None, int]] | None = None
) -> tuple[DynamicCache, torch.Tensor]:
    """Prefill prompts as one left-padded batch; return the new cache and last logits.

    ``reused[i] = (layers, n)``: row i's first ``n`` tokens are already computed (a cached prefix) and only
    the rest is fed. All rows feed the same number of columns, so a row whose uncomputed tail is shorter than
    the widest one reuses less (its prefix's last columns are fed again) and the row's tokens stay contiguous:
    the batch keeps its layout (real tokens right-aligned, padding only on the left).
    """
    cached = reused_columns(prompts, [n for _, n in reused] if reused else [0] * len(prompts))
    feed = max(len(p) - n for p, n in zip(prompts, cached, strict=True))
    cache = runner.new_cache()
    if reused and any(cached):
        past = seed_cache(cache, [(r[0], n) for r, n in zip(reused, cached, strict=True)], room=feed + HEADROOM)
    else:
        past = 0
    ids = torch.full((len(prompts), feed), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), past + feed), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        fed = prompt[cached[row] :]
        ids[row, feed - len(fed) :] = torch.tensor(fed, dtype=torch.long)
        mask[row, past + feed - len(prompt) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
    dev = runner.device
    logits = runner.forward(ids.to(dev), mask.to(dev), positions.to(dev), cache)
    return cache, logits


def reused_columns(prompts: Seq[Seq[int]], hits: Seq[int]) -> list[int]:
    """How many cached tokens each row of one ``prefill`` group really reuses (see ``prefill``)."""
    feed = max(len(p) - n for p, n in zip(prompts, hits, strict=True))
    return [max(0, len(p) - feed) for p in prompts]


def prefix_cache(runner: ModelRunner, layers: LayerKV, length: int) -> DynamicCache:
    """A one-row cache holding the first ``length`` tokens of a cached prefix (a long prompt's chunks follow)."""
    cache = runner.new_cache()
    seed_cache(cache, [(layers, length)], room=HEADROOM)
    return cache


def prefill_chunk(runner: ModelRunner, cache: DynamicCache, chunk: Seq[int], offset: int) -> torch.Tensor:
    """Prefill the next ``chunk`` of one long prompt whose first ``offset`` tokens are cached."""
    dev = runner.device
    ids = torch.tensor([list(chunk)], dtype=torch.long, device=dev)
    mask = torch.ones((1, offset + len(chunk)), dtype=torch.long, device=dev)
    positions = torch.arange(offset, offset + len(chunk), device=dev).unsqueeze(0)
    return runner.forward(ids, mask, positions, cache)


class KVBatch:
    """Rows decoding together; ``next_tokens[i]`` is row i's last sampled token, not yet cached."""

    def __init__(self, seqs: list[Sequence], cache: DynamicCache, lengths: list[int], next_tokens: list[int]) -> None:
        self.seqs = seqs
        self.cache = cache
        self.lengths = lengths
        self.next_tokens = next_tokens
        self.width = max(lengths)

    def step(self, runner: ModelRunner) -> torch.Tensor:
        """One decode forward for every row; return the ``[rows, vocab]`` logits."""
        dev, width = runner.device, self.width
        # pinned, non-blocking copies: a plain copy to a GPU would first wait for the work queued before it
        lengths = upload(self.lengths, torch.long, dev)
        tokens = upload(self.next_tokens, torch.long, dev).unsqueeze(1)
        columns = torch.arange(width + 1, device=dev)
        attend = columns.unsqueeze(0) >= (width - lengths).unsqueeze(1)  # [rows, width + 1]: the row's real columns
        if runner.sdpa:
            if runner.window is not None:  # transformers' sliding window: a query sees the keys less than it behind
                attend &= columns > width - runner.window
            # SDPA takes a boolean [rows, 1, query, key] mask as it is (True = attend), exactly what it would build.
            mask = attend[:, None, None, :]
        else:
            mask = attend.long()
        logits = runner.forward(tokens, mask, lengths.unsqueeze(1), self.cache)
        self.lengths = [n + 1 for n in self.lengths]
        self.width = width + 1
        return logits

    def row_kv(self, row: int) -> LayerKV:
        """A copy of row ``row``'s KV without the batch's padding (for the prefix cache)."""
        return row_kv(self.cache, row, self.width - self.lengths[row], self.width)

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (ascending; their order may change) and cut the columns that became padding for
        all of them."""
        order, moves = compaction(len(self.seqs), rows)
        lengths = [self.lengths[i] for i in order]
        cut = self.width - max(lengths)
        keep_rows(self.cache, moves, len(order), cut)
        self.seqs = [self.seqs[i] for i in order]
        self.next_tokens = [self.next_tokens[i] for i in order]
        self.lengths = lengths
        self.width -= cut

    def merge(self, other: KVBatch) -> None:
        """Append ``other``'s rows, left-padding whichever cache is narrower."""
        width = max(self.width, other.width)
        append_rows(self.cache, other.cache, width)
        self.seqs = self.seqs + other.seqs
        self.next_tokens = self.next_tokens + other.next_tokens
        self.lengths = self.lengths + other.lengths
        self.width = width
