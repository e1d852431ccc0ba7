"""The engine protocol: what the middleware needs from anything that generates text.

An engine turns a list of chat messages into an async stream of text deltas. The stream is
an async generator: the consumer cancels a generation simply by closing it (``aclose()``) or by
cancelling the task that iterates it; the engine must then drop the sequence at its next step.
Engines never run model code on the event loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from ..errors import ConfigurationError

FinishReason = Literal["stop", "length"]


#: ``{"role": "user" | "assistant" | "system", "content": str}``
ChatMessage = dict[str, str]


GREEDY_BELOW = 1e-5  # a temperature under this decodes greedily
MIN_REPETITION_PENALTY = 0.01  # a smaller one divides float32 logits into inf, or is 0 in float32: sampling reads NaN


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation parameters.

    Args:
        max_new_tokens: upper bound on generated tokens; the finish reason is ``"length"`` when hit.
        temperature: 0 means greedy decoding, and so does any value below ``GREEDY_BELOW`` (1e-5, vLLM's cut too):
            float32 logits divided by a smaller one overflow to inf and sampling would read NaN.
        top_p: nucleus sampling mass, in (0, 1].
        top_k: keep the k most likely tokens; 0 disables (the HTTP routes take vLLM's -1 for it too).
        repetition_penalty: 1.0 disables; > 1 penalises tokens already in prompt or reply.
        seed: makes sampling reproducible for this request, independent of other requests.
        stop: strings that end the reply; the matched stop string is not part of the reply.
        ignore_eos: keep generating past EOS (benchmarks use it to get fixed-length replies).
    """

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


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
    if not MIN_REPETITION_PENALTY <= params.repetition_penalty:
        raise ConfigurationError(
            f"repetition_penalty must be >= {MIN_REPETITION_PENALTY} (1 disables it), got {params.repetition_penalty}"
        )


@dataclass(frozen=True)
class GenerationChunk:
    """One piece of a streamed reply.

    Every chunk but the last has ``finish_reason is None``; the last one carries the reason and
    the token counts of the whole request (its ``text`` may be empty): ``cached_tokens`` of the
    ``prompt_tokens`` were read from the engine's prefix cache instead of computed. The other chunks
    may carry the counts so far (``completion_tokens`` > 0: the mock, an upstream's chunk count), so
    a reply cut short still has them; 0 means not counted. The in-thread and process engines
    announce a live counts object instead (``live_counts``), which covers a reply cut before its
    first text too.
    """

    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass(frozen=True)
class PrefixCacheStats:
    """Counters and gauges of one cache (or the sum over replicas).

    Args:
        capacity_bytes: the budget; 0 means the cache is off.
        bytes: KV bytes held now. peak_bytes: the most ever held.
        entries: sequences held now.
        queries_tokens: prompt tokens of the requests admitted since start; hit_tokens: how many of them were
            read from the cache instead of computed (vLLM's ``prefix_cache_queries`` and ``hits``).
        evictions: entries dropped to make room.
    """

    capacity_bytes: int = 0
    bytes: int = 0
    peak_bytes: int = 0
    entries: int = 0
    queries_tokens: int = 0
    hit_tokens: int = 0
    evictions: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __add__(self, other: PrefixCacheStats) -> PrefixCacheStats:
        mine, theirs = self.as_dict().values(), other.as_dict().values()
        return PrefixCacheStats(*(a + b for a, b in zip(mine, theirs, strict=True)))


@dataclass(frozen=True)
class SchedulerStats:
    """A snapshot for load reporting and tests.

    Args:
        running: unfinished sequences holding a batch slot (decoding, or prefilling a long prompt).
        waiting: sequences queued inside the engine for a slot.
        batch_rows: rows in the running batch's KV cache; finished or cancelled sequences leave it
            at the worker's next step, so this lags ``running`` by at most one step.
        steps: worker steps taken since start.
        cache_width: columns in the running batch's KV cache (max real length of its rows).
    """

    running: int = 0
    waiting: int = 0
    batch_rows: int = 0
    steps: int = 0
    cache_width: int = 0

    def __add__(self, other: SchedulerStats) -> SchedulerStats:
        """The sum over replicas (the widest cache of them)."""
        return SchedulerStats(
            running=self.running + other.running,
            waiting=self.waiting + other.waiting,
            batch_rows=self.batch_rows + other.batch_rows,
            steps=self.steps + other.steps,
            cache_width=max(self.cache_width, other.cache_width),
        )


#: Set by a stream's consumer (the HTTP layer) to a list: an engine that counts as it goes appends the object that
#: holds its reply's counts (``prompt_tokens``, ``completion_tokens``, ``cached_tokens``) when the reply starts, so
#: that a reply cut before its first text (a deadline in a long prefill, a Stop) still has its prompt counted.
live_counts: ContextVar[list[Any] | None] = ContextVar("chatstream_live_counts", default=None)


def announce_counts(counts: object) -> None:
    """Hand ``counts`` to the consumer that asked for them through ``live_counts``, if any."""
    holder = live_counts.get()
    if holder is not None:
        holder.append(counts)


def first_engine(engine: object) -> object:
    """The engine itself, or the first of ``EngineReplicas``: where the tokenizer and the context length are read."""
    engines = getattr(engine, "engines", None)
    return engines[0] if engines else engine


def engine_stats(engine: object) -> SchedulerStats | None:
    """The figures of the engine's batch (all its clients: every web process sharing an engine process), or None
    for an engine without one (mock, OpenAI upstream)."""
    stats = getattr(engine, "stats", None)
    return stats if isinstance(stats, SchedulerStats) else None


def engine_restarts(engine: object) -> int | None:
    """How often the engine's process was restarted after it went away (summed over replicas), or None for an engine
    that runs in this process."""
    engines = getattr(engine, "engines", None) or [engine]
    counts = [engine.restarts for engine in engines if isinstance(getattr(engine, "restarts", None), int)]
    return sum(counts) if counts else None


def prefix_cache_stats(engine: object) -> PrefixCacheStats | None:
    """The engine's prefix cache figures, or None for an engine without one (mock, OpenAI upstream)."""
    stats = getattr(engine, "prefix_cache_stats", None)
    return stats() if callable(stats) else None


@runtime_checkable
class Engine(Protocol):
    """What the middleware needs from a text generator."""

    #: the name served by ``/v1/models`` and put in OpenAI responses.
    model_name: str
    #: how many sequences the engine generates at once; admission should not exceed it.
    max_batch_size: int

    async def start(self) -> None:
        """Load or warm up; idempotent. Called from the ASGI lifespan or on first use."""

    async def close(self) -> None:
        """Stop workers and cancel running sequences; idempotent."""

    @property
    def ready(self) -> bool:
        """True once the model is loaded and the engine accepts work."""

    def render_prompt(self, messages: Sequence[ChatMessage], params: SamplingParams) -> str:
        """The exact prompt text the engine would generate from (for ``/get_prompt``)."""

    def stream(self, messages: Sequence[ChatMessage], params: SamplingParams) -> AsyncIterator[GenerationChunk]:
        """Generate a reply to ``messages``; closing the iterator cancels the generation."""
