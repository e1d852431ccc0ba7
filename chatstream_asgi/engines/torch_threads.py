"""How many CPU threads torch runs the model on, and giving the model's thread its own count.

On the CPU, torch's default (one OpenMP thread per core) puts a thread on the core the web server's event
loop runs on, and every parallel region then waits at its barrier while the loop works: on 2 cores, SmolLM2
at batch 8 kept 1.9 cores busy for 59-65 tokens/s and the host app's ``/hello`` p99 went to 8-9x idle; on
one thread it streamed 58-62 tokens/s on 1.0 core, ``/hello`` p99 1.4-1.6x idle (in-thread engine; the
engine process: 60 -> 67-76 tokens/s, p99 5-8x -> 1.3-1.4x). So the model gets every core but one. Where
cores are this few it costs the model some speed (``make bench``'s server: 0.93-0.97x the static batch on
all cores, against 0.97-1.00x on two threads); ``torch_threads=os.cpu_count()`` takes them all back.

torch keeps the count per thread: ``torch.set_num_threads`` sets the calling thread's OpenMP count and a
process-wide value that threads take when they first run a parallel region. ``use_in_this_thread`` gives
the engine's worker thread its count and puts the process-wide value back, so an engine inside a host
app changes nothing for the app's own threads. No torch import at module level: web workers of an engine
process import this without it.
"""

from __future__ import annotations

import os
import threading

from ..errors import ConfigurationError


def engine_threads(requested: int | None) -> int | None:
    """The model's torch threads: ``requested``, else all the cores this process may use but one
    (``None``, torch's own choice, where ``OMP_NUM_THREADS`` says how many)."""
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ConfigurationError(f"torch_threads must be a positive int or None, got {requested!r}")
        return requested
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores - 1)


def use_in_this_thread(threads: int) -> None:
    """Run this thread's torch ops on ``threads`` threads; threads started later keep the process's count."""
    import torch

    process_wide = torch.get_num_threads()  # what this thread got when it started: the process's value
    torch.set_num_threads(threads)
    if process_wide != threads:
        # set_num_threads also changed the value later threads start with: a short-lived thread sets it
        # back (its own count goes with it), this thread's stays.
        restorer = threading.Thread(target=torch.set_num_threads, args=(process_wide,), name="torch-threads")
        restorer.start()
        restorer.join()
