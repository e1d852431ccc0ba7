"""What the host has to spare: its memory, read with psutil when installed, from ``sysconf`` otherwise.

The engines size their prefix cache from it; ``ops.resource_usage`` reports it. Never imports torch.
"""

from __future__ import annotations

import os


def host_memory() -> tuple[int, int]:
    """(total, available) bytes."""
    try:
        import psutil

        memory = psutil.virtual_memory()
        return int(memory.total), int(memory.available)
    except ImportError:
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page
