"""What the engine tests (unit and cuda) share: the token log type, reading it, and a tight poll."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

#: every token the engine's worker accepted, in order, keyed by its sequence's prompt ids (``token_log`` fixture)
TokenLog = list[tuple[tuple[int, ...], int]]


def tokens_of(log: TokenLog, prompt: list[int]) -> list[int]:
    return [token for key, token in log if key == tuple(prompt)]


async def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll every millisecond: the engine tests act between two steps of a model that takes a few ms a step."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.001)
