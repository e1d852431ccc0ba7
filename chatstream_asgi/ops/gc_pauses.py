"""How long Python's garbage collector stops the process: ``chatstream_gc_pause_seconds{generation}``.

A collection runs with the GIL held, so while it runs nothing else in the process moves: the event loop (every
stream, every request of the host app) and an in-thread engine's model loop. The middleware freezes the startup
heap (``Timeouts.freeze_gc``) so that full collections stay short; this histogram shows whether they do, and a
pause long enough for users to feel is also logged, at most once a minute.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import time
from typing import Any

logger = logging.getLogger("chatstream_asgi")
PAUSE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
FELT_PAUSE = 0.05  # seconds: a stall a streaming client or the host app's callers notice
LOG_INTERVAL = 60.0


class GCPauses:
    """Observes every collection's duration into a histogram of ``registry`` while installed.

    The callback costs one clock read per collection phase and one histogram observe per collection.
    """

    def __init__(self, registry: Any) -> None:
        import prometheus_client as prom

        histogram = prom.Histogram(
            "chatstream_gc_pause_seconds",
            "Seconds the garbage collector stopped the process, by generation (2: a full collection).",
            ["generation"],
            registry=registry,
            buckets=PAUSE_BUCKETS,
        )
        self._observe = [histogram.labels(str(generation)).observe for generation in range(3)]
        self._started = 0.0
        self._logged_at = -math.inf

    def install(self) -> None:
        if self._on_collection not in gc.callbacks:
            gc.callbacks.append(self._on_collection)

    def uninstall(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._on_collection)

    def _on_collection(self, phase: str, info: dict[str, int]) -> None:
        now = time.perf_counter()
        if phase == "start":
            self._started = now
            return
        seconds = now - self._started
        generation = info["generation"]
        self._observe[generation](seconds)
        if seconds >= FELT_PAUSE and now - self._logged_at >= LOG_INTERVAL:
            self._logged_at = now
            logger.warning(
                "the garbage collector stopped this process for %.0f ms (generation %d, %d objects collected); "
                "every stream waited. Is freeze_gc off, or does the app keep many objects made after startup?",
                seconds * 1e3,
                generation,
                info.get("collected", 0),
            )
