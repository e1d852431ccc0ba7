"""``GET /get_resource_usage``'s figures: this process's memory, the host's CPU and memory, GPU memory if any.

psutil is used when installed, ``/proc`` otherwise; torch is asked about GPUs only if something already
imported it (this module never imports torch). Sizes are in GiB, rounded as ChatStream did.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from ..engines.host import host_memory

GIB = 1024**3


def gib(value: float) -> float:
    return round(value / GIB, 2)


def process_rss() -> int:
    try:
        import psutil

        return int(psutil.Process(os.getpid()).memory_info().rss)
    except ImportError:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_usage() -> dict[str, Any]:
    usage: dict[str, Any] = {"count": os.cpu_count()}
    try:
        usage["load_average_1m"] = round(os.getloadavg()[0], 2)
    except OSError:  # not on every platform
        pass
    try:
        import psutil

        usage["percent"] = psutil.cpu_percent(interval=None)
    except ImportError:
        pass
    return usage


def gpu_usage() -> list[dict[str, Any]]:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        gpus.append(
            {
                "index": index,
                "name": torch.cuda.get_device_name(index),
                "total_memory": gib(total),
                "used_memory": gib(total - free),
                "allocated_by_this_process": gib(torch.cuda.memory_allocated(index)),
            }
        )
    return gpus


def resource_usage(name: str) -> dict[str, Any]:
    """One entry of ChatStream's ``memory_usage`` list, plus CPU figures."""
    total, available = host_memory()
    gpus = gpu_usage()
    return {
        "name": name,
        "num_gpus": len(gpus),
        "gpus": gpus,
        "cpu": {
            "total_memory": gib(total),
            "used_memory": gib(process_rss()),
            "host_used_memory": gib(total - available),
            **cpu_usage(),
        },
    }
