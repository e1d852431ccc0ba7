"""``EngineReplicas``: one engine per device; a chat's next turn goes where its history is cached, else least loaded.

Batching stays inside each engine (one worker thread or engine process per device); this layer only chooses
where a new sequence runs. A chat's next turn goes to the replica that served its previous one while that
replica has room (``_affinity``: its prefix cache holds the conversation's KV); anything else goes to the
least loaded. Only ready replicas are chosen: one whose engine process died gets no chats until it is back.
Load is the number of streams a replica is serving right now, counted here, so it is exact and costs nothing
per token; ties rotate, so an idle pool still spreads its first requests. Set the
middleware's ``max_concurrency`` to the sum of the replicas' batch sizes (``max_batch_size``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError
from ._affinity import ConversationAffinity
from .base import ChatMessage, Engine, GenerationChunk, PrefixCacheStats, SamplingParams, SchedulerStats, engine_stats


class EngineReplicas:
    """Several engines serving one model, used as one engine.

    Args:
        engines: the replicas (e.g. one ``TransformersEngine`` per GPU); they must serve the same model.
    """

    def __init__(self, engines: Sequence[Engine]) -> None:
        engines = list(engines)
        if not engines:
            raise ConfigurationError("EngineReplicas needs at least one engine; pass e.g. [engine_gpu0, engine_gpu1]")
        names = {engine.model_name for engine in engines}
        if len(names) > 1:
            raise ConfigurationError(f"replicas must serve one model, got {sorted(names)}; give them one model_name")
        self.engines = engines
        self.loads = [0] * len(engines)
        self.served = [0] * len(engines)  # streams started per replica, for tests and dashboards
        self.affine = 0  # streams sent to a replica for the conversation it holds rather than for its load
        self.affinity = ConversationAffinity()
        self.model_name = engines[0].model_name
        self.max_batch_size = sum(engine.max_batch_size for engine in engines)
        self._next = 0

    @classmethod
    def from_pretrained(
        cls, path_or_dir: str | Path, *, devices: Sequence[str], process: bool = False, **kwargs: Any
    ) -> EngineReplicas:
        """One ``TransformersEngine.from_pretrained(path_or_dir, device=d, **kwargs)`` per device in ``devices``;
        with ``process=True`` each in its own engine process (``ProcessEngine``)."""
        if isinstance(devices, str) or not devices:
            raise ConfigurationError(f"devices must be a list such as ['cuda:0', 'cuda:1'], got {devices!r}")
        if process:
            from .process import ProcessEngine as engine_class
        else:
            from .transformers import TransformersEngine as engine_class  # type: ignore[assignment]

        return cls([engine_class.from_pretrained(path_or_dir, device=device, **kwargs) for device in devices])

    @property
    def ready(self) -> bool:
        """Ready while any replica is: one engine process restarting (or a lost device) leaves the others serving."""
        return any(engine.ready for engine in self.engines)

    @property
    def replicas_ready(self) -> tuple[int, int]:
        """(replicas ready, replicas), for ``/readyz``."""
        return sum(engine.ready for engine in self.engines), len(self.engines)

    async def start(self) -> None:
        await asyncio.gather(*(engine.start() for engine in self.engines))

    async def close(self) -> None:
        await asyncio.gather(*(engine.close() for engine in self.engines))

    def render_prompt(self, messages: Sequence[ChatMessage], params: SamplingParams) -> str:
        return self.engines[0].render_prompt(messages, params)

    def prefix_cache_stats(self) -> PrefixCacheStats:
        """The replicas' prefix cache figures, summed."""
        stats = [getattr(engine, "prefix_cache_stats", PrefixCacheStats)() for engine in self.engines]
        return sum(stats, PrefixCacheStats())

    @property
    def stats(self) -> SchedulerStats | None:
        """The replicas' batch figures, summed (None when none of them has a batch to report: mocks, upstreams)."""
        stats = [found for engine in self.engines if (found := engine_stats(engine)) is not None]
        return sum(stats[1:], stats[0]) if stats else None

    def choose(self, messages: Sequence[ChatMessage]) -> int:
        """The replica for a new stream: the one that served the conversation's last turn while it has room
        (its prefix cache holds the history), else the least loaded."""
        index = self.affinity.replica_of(messages)
        if index is not None and self.engines[index].ready and self.loads[index] < self.engines[index].max_batch_size:
            self.affine += 1
        else:
            index = self.least_loaded()
        self.affinity.served(messages, index)
        return index

    def least_loaded(self) -> int:
        """The index of the ready replica serving the fewest streams; ties go round-robin. With none ready, any:
        its engine answers (an engine process that is restarting: 503 with ``Retry-After``)."""
        count = len(self.engines)
        order = [(self._next + step) % count for step in range(count)]
        ready = [index for index in order if self.engines[index].ready] or order
        chosen = min(ready, key=lambda index: self.loads[index])
        self._next = (chosen + 1) % count
        return chosen

    async def stream(self, messages: Sequence[ChatMessage], params: SamplingParams) -> AsyncIterator[GenerationChunk]:
        index = self.choose(messages)
        self.loads[index] += 1
        self.served[index] += 1
        chunks = self.engines[index].stream(messages, params)
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            self.loads[index] -= 1
            closer = getattr(chunks, "aclose", None)
            if closer is not None:
                with contextlib.suppress(RuntimeError):  # already closed or running: nothing to stop
                    await closer()

    def __repr__(self) -> str:
        return f"EngineReplicas({len(self.engines)} x {self.model_name!r}, loads={self.loads})"


def as_engine(engine: Engine | Sequence[Engine]) -> Engine:
    """``engine`` itself, or ``EngineReplicas`` over a list of engines."""
    if isinstance(engine, Sequence) and not isinstance(engine, (str, bytes)):
        return engine[0] if len(engine) == 1 else EngineReplicas(engine)
    return engine
