"""Keep Python's cyclic garbage collector off the serving path: freeze the heap a process has at startup.

A process that imports torch and transformers holds some 300,000 GC-tracked objects (modules, functions,
classes), and every full (generation 2) collection walks all of them: 135 ms on the 2-core CPU this project is
measured on. Allocation-heavy streaming triggers such a collection every few seconds, and while it runs the
event loop (every stream and every other request of the host app) and, in the engine process, the model
loop stand still. ``gc.freeze()`` moves everything alive at startup into a permanent generation the collector
never walks, so a full collection then costs what the objects made since cost (microseconds). vLLM and SGLang
do the same after their engines warm up.

What is frozen is never collected as cyclic garbage; it is still freed by reference counting. So the heap is
collected once first, and frozen once per process (a second startup, as in tests, changes nothing).
"""

from __future__ import annotations

import gc
import logging
import time

logger = logging.getLogger("chatstream_asgi")
_frozen = False


def freeze_startup_heap(context: str) -> bool:
    """Collect, then freeze every object alive now; False when this process already did (then nothing is done)."""
    global _frozen
    if _frozen:
        return False
    started = time.perf_counter()
    gc.collect()
    collect_ms = (time.perf_counter() - started) * 1e3
    gc.freeze()
    _frozen = True
    logger.info(
        "%s: froze %d objects out of the garbage collector's reach (a full collection walked them in %.0f ms)",
        context,
        gc.get_freeze_count(),
        collect_ms,
    )
    return True
