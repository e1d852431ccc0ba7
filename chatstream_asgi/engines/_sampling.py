"""Logits to tokens for a whole batch at once, each row with its own parameters and RNG.

Rows are grouped by the work they need and each group is one set of batched tensor ops: greedy
rows without a repetition penalty share one ``argmax``; penalised rows share one masked rescale;
sampled rows share temperature, top-k (one ``topk``), top-p (one sort) and one exponential race,
``argmax(probs / q)`` with ``q ~ Exp(1)``, which picks token ``i`` with probability ``probs[i]``
(of independent exponentials with rates ``probs``, the smallest is token ``i``'s with probability
``probs[i]``). A seeded row draws its ``q`` from its own ``torch.Generator``, so what it samples
never depends on the other rows of the batch; unseeded rows share one draw from the device's
default generator. The order follows transformers' ``generate``: repetition penalty, temperature,
top-k, top-p.

Nothing here waits for the device but the final ``tolist()``: per-row parameters travel as
non-blocking copies from pinned memory (a blocking copy to a GPU first drains its queue, i.e. waits
for the forward), no index is a boolean mask, and tokens are observed as host ints. The penalty's
seen-token state is one ``[rows, vocab]`` bool matrix on the device per penalised group, reused
while the group stays the same rows in the same order and restacked when rows join or leave.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .base import SamplingParams

NEG_INF = float("-inf")


class RowSampler:
    """One sequence's sampling state: its parameters, seeded generator and penalised tokens.

    Args:
        params: the sequence's sampling parameters.
        prompt_ids: the prompt, which the repetition penalty covers too.
    """

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int]) -> None:
        self.params = params
        self.penalised = params.repetition_penalty != 1.0
        self.needs_row_work = self.penalised or not params.greedy
        # Penalised tokens not yet in the device mask: the prompt at first, then each observed token.
        self.unmasked: list[int] = list(prompt_ids) if self.penalised else []
        self.mask: torch.Tensor | None = None  # the seen-token matrix of the group this row was last in
        self.mask_row = 0
        self._generator: torch.Generator | None = None

    def observe(self, token_id: int) -> None:
        """Record a generated token (the repetition penalty covers it from the next step on)."""
        if self.penalised:
            self.unmasked.append(token_id)

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The row's own generator when it has a seed, created on ``device`` at first use."""
        if self.params.seed is None:
            return None
        if self._generator is None:
            self._generator = torch.Generator(device=device).manual_seed(self.params.seed)
        return self._generator


def upload(values: list[Any], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` as a tensor on ``device``, copied without waiting for the device."""
    if device.type != "cuda":  # nothing to overlap with: one plain tensor, no pinning or copy
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def _restacked(group: list[RowSampler], vocab: int, device: torch.device) -> torch.Tensor:
    """The group's seen-token matrix: its rows' current masks stacked, blank rows for newcomers."""
    mask = group[0].mask
    if mask is not None and mask.shape[0] == len(group):
        if all(s.mask is mask and s.mask_row == j for j, s in enumerate(group)):
            return mask
    blank = torch.zeros(vocab, dtype=torch.bool, device=device)
    mask = torch.stack([blank if s.mask is None else s.mask[s.mask_row] for s in group])
    for j, sampler in enumerate(group):
        sampler.mask, sampler.mask_row = mask, j
    return mask


def seen_tokens(group: list[RowSampler], vocab: int, device: torch.device) -> torch.Tensor:
    """The ``[len(group), vocab]`` mask of the tokens each row's penalty covers, brought up to date."""
    mask = _restacked(group, vocab, device)
    flat = [j * vocab + token for j, s in enumerate(group) for token in s.unmasked]
    if flat:
        mask.view(-1).index_fill_(0, upload(flat, torch.long, device), True)
        for sampler in group:
            sampler.unmasked = []
    return mask


def _index(rows: list[int], total: int, device: torch.device) -> torch.Tensor | None:
    """``rows`` as a device index, or None when they are all ``total`` rows (nothing to gather)."""
    return None if len(rows) == total else upload(rows, torch.long, device)


def _penalise(x: torch.Tensor, group: list[RowSampler]) -> torch.Tensor:
    """transformers' repetition penalty: seen tokens' logits divided (if > 0) or multiplied by it."""
    rows = [j for j, s in enumerate(group) if s.penalised]
    if not rows:
        return x
    penalised = [group[j] for j in rows]
    seen = seen_tokens(penalised, x.shape[-1], x.device)
    penalty = upload([[s.params.repetition_penalty] for s in penalised], torch.float32, x.device)
    where = _index(rows, len(group), x.device)
    part = x if where is None else x.index_select(0, where)
    part = torch.where(seen, torch.where(part < 0, part * penalty, part / penalty), part)
    return part if where is None else x.index_copy(0, where, part)


def _top_k(x: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """Mask what is below each row's k-th largest logit (``k == vocab``: keep all); ties stay."""
    vocab = x.shape[-1]
    widest = max(k for k in ks if k < vocab)
    kth = x.topk(widest).values.gather(1, upload([[min(k, widest) - 1] for k in ks], torch.long, x.device))
    if widest < max(ks):
        kth.masked_fill_(upload([[k == vocab] for k in ks], torch.bool, x.device), NEG_INF)
    return x.masked_fill(x < kth, NEG_INF)


def _top_p(x: torch.Tensor, top_ps: list[float]) -> torch.Tensor:
    """Mask the least likely tokens whose cumulative probability stays within ``1 - top_p``.

    As transformers' warper: ascending sort, softmax, cumsum; the most likely token always stays.
    The sort is stable so that ties fall the same way whatever the other rows of the batch.
    """
    ordered, order = x.sort(dim=-1, stable=True)
    drop = ordered.softmax(-1).cumsum_(-1) <= upload([[1 - p] for p in top_ps], torch.float32, x.device)
    drop[:, -1].fill_(False)
    return torch.empty_like(x).scatter_(1, order, ordered.masked_fill_(drop, NEG_INF))


def _filtered(x: torch.Tensor, group: list[RowSampler]) -> torch.Tensor:
    vocab = x.shape[-1]
    ks = [s.params.top_k if 0 < s.params.top_k < vocab else vocab for s in group]
    if min(ks) < vocab:
        # First, as in generate; it also makes the top-p sort cheap on a CPU (mostly equal -inf keys).
        x = _top_k(x, ks)
    top_ps = [s.params.top_p for s in group]
    return _top_p(x, top_ps) if min(top_ps) < 1.0 else x


def _race_noise(probs: torch.Tensor, group: list[RowSampler]) -> torch.Tensor:
    """``q ~ Exp(1)`` per element: seeded rows from their own generator, the others in one draw.

    Drawn as ``-log(u)`` with ``u ~ U[0, 1)``: ``exponential_`` is 5x slower on a CPU, and ``q`` is
    then never 0 (``u = 0`` gives ``q = inf``: that token cannot win), so ``0 / q`` is never NaN.
    """
    u = torch.empty_like(probs)
    generators = [s.generator(probs.device) for s in group]
    unseeded = [row for row, g in enumerate(generators) if g is None]
    if len(unseeded) == len(group):
        u.uniform_()
    elif unseeded:
        fresh = torch.rand((len(unseeded), u.shape[1]), device=u.device)
        u.index_copy_(0, upload(unseeded, torch.long, u.device), fresh)
    for row, generator in enumerate(generators):
        if generator is not None:
            u[row].uniform_(generator=generator)
    return u.log_().neg_()


def _sample(x: torch.Tensor, group: list[RowSampler]) -> torch.Tensor:
    temperature = upload([[s.params.temperature] for s in group], torch.float32, x.device)
    probs = _filtered(x / temperature, group).softmax(-1)
    return probs.div_(_race_noise(probs, group)).argmax(-1)


def _pick_group(x: torch.Tensor, group: list[RowSampler]) -> torch.Tensor:
    """Tokens for rows that all need work: penalty, then greedy or sampled per row."""
    x = _penalise(x, group)
    sampled = [j for j, s in enumerate(group) if not s.params.greedy]
    if not sampled:
        return x.argmax(-1)
    where = _index(sampled, len(group), x.device)
    picks = _sample(x if where is None else x.index_select(0, where), [group[j] for j in sampled])
    return picks if where is None else x.argmax(-1).index_copy_(0, where, picks)


def pick_tokens(logits: torch.Tensor, samplers: Sequence[RowSampler]) -> torch.Tensor:
    """The next token of each row of ``logits`` as a device tensor; queues work, never waits for it."""
    work = [i for i, s in enumerate(samplers) if s.needs_row_work]
    if not work:
        return logits.argmax(-1)
    where = _index(work, len(samplers), logits.device)
    picks = _pick_group(logits if where is None else logits.index_select(0, where), [samplers[i] for i in work])
    return picks if where is None else logits.argmax(-1).index_copy_(0, where, picks)


def choose_tokens(logits: torch.Tensor, samplers: Sequence[RowSampler]) -> list[int]:
    """One token per row of ``logits`` (``[rows, vocab]``, float32); the one device sync of a step."""
    chosen: list[int] = pick_tokens(logits, samplers).tolist()
    for token, sampler in zip(chosen, samplers, strict=True):
        sampler.observe(token)
    return chosen
