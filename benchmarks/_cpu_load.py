"""CPU accounting every benchmark driver shares: the machine's busy seconds and this run's own seconds.

Their difference over a window is the CPU that processes outside the benchmark took, which each
driver reports beside its figures (a busy machine makes every number worse).
"""

from __future__ import annotations

import contextlib
import os

import psutil


def busy_seconds() -> float:
    """Seconds all cores spent busy since boot (idle and I/O wait left out)."""
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


def our_cpu_seconds() -> float:
    """CPU of this process, its live descendants (servers, engine workers, poller) and its waited-for children."""
    me, total = psutil.Process(), 0.0
    for proc in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    finished = os.times()
    return total + finished.children_user + finished.children_system
