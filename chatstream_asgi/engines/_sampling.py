"""Per-row logits processing: each sequence in a batch samples with its own parameters and RNG.

Greedy rows without a repetition penalty share one batched ``argmax``; only rows that need it pay
for per-row work. Each sampling row owns a ``torch.Generator`` so that what it draws never depends
on which other rows share the batch. The processing order follows transformers' ``generate``:
repetition penalty, temperature, top-k, top-p.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch

from ..errors import ConfigurationError
from .base import SamplingParams


def check_params(params: SamplingParams) -> None:
    """Raise ``ConfigurationError`` for parameters no sampler can honour."""
    if params.max_new_tokens < 1:
        raise ConfigurationError(f"max_new_tokens must be >= 1, got {params.max_new_tokens}")
    if params.temperature < 0:
        raise ConfigurationError(f"temperature must be >= 0 (0 = greedy), got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise ConfigurationError(f"top_p must be in (0, 1], got {params.top_p}")
    if params.top_k < 0:
        raise ConfigurationError(f"top_k must be >= 0 (0 disables it), got {params.top_k}")
    if params.repetition_penalty <= 0:
        raise ConfigurationError(f"repetition_penalty must be > 0 (1 disables it), got {params.repetition_penalty}")


class RowSampler:
    """Chooses the next token of one sequence from its logits row.

    Args:
        params: the sequence's sampling parameters.
        prompt_ids: the prompt, which the repetition penalty covers too.
    """

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int]) -> None:
        self.params = params
        self._penalised = params.repetition_penalty != 1.0
        self.needs_row_work = self._penalised or not params.greedy
        self._prompt_ids = list(prompt_ids) if self._penalised else []
        self._seen: torch.Tensor | None = None
        self._generator: torch.Generator | None = None

    def observe(self, token_id: int) -> None:
        """Record a generated token (the repetition penalty covers it from the next step on)."""
        if self._seen is not None:
            self._seen[token_id] = True
        elif self._penalised:
            self._prompt_ids.append(token_id)

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token id (a 0-d tensor) from one float32 logits row."""
        if self._penalised:
            logits = self._penalise(logits)
        if self.params.greedy:
            return logits.argmax()
        probs = _filtered_probs(logits / self.params.temperature, self.params.top_k, self.params.top_p)
        return torch.multinomial(probs, 1, generator=self._rng(logits.device))[0]

    def _penalise(self, logits: torch.Tensor) -> torch.Tensor:
        if self._seen is None:
            # Built lazily because the vocabulary width is known only from the first logits row.
            self._seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
            self._seen[torch.tensor(self._prompt_ids, dtype=torch.long, device=logits.device)] = True
            self._prompt_ids = []
        penalty = self.params.repetition_penalty
        return torch.where(self._seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)

    def _rng(self, device: torch.device) -> torch.Generator:
        if self._generator is None:
            seed = self.params.seed if self.params.seed is not None else secrets.randbits(63)
            self._generator = torch.Generator(device=device).manual_seed(seed)
        return self._generator


def _filtered_probs(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - top_p
        drop[-1] = False  # always keep the most likely token
        logits = logits.masked_fill(torch.empty_like(drop).scatter_(0, order, drop), float("-inf"))
    return logits.softmax(-1)


def choose_tokens(logits: torch.Tensor, samplers: Sequence[RowSampler]) -> list[int]:
    """One token per row of ``logits`` (``[rows, vocab]``, float32), with one device sync."""
    tokens = logits.argmax(-1)
    for row, sampler in enumerate(samplers):
        if sampler.needs_row_work:
            tokens[row] = sampler.choose(logits[row])
    chosen: list[int] = tokens.tolist()
    for token, sampler in zip(chosen, samplers, strict=True):
        sampler.observe(token)
    return chosen
