"""How long a request holds its slot, and so how long a client turned away should wait before retrying.

``Admission`` records the hold time of every request that ran; the ``Retry-After`` of a 429 or 503 is
estimated from their moving average. It lives apart from the slot and queue bookkeeping because it is an
estimate, tuned on its own, while that bookkeeping must stay exact.
"""

from __future__ import annotations

import math

DEFAULT_HOLD_SECONDS = 1.0  # assumed slot hold time until one has been measured
HOLD_EWMA_ALPHA = 0.2
MIN_RETRY_AFTER = 1
MAX_RETRY_AFTER = 300


class HoldTime:
    """The exponentially weighted mean of slot hold times, and the ``Retry-After`` it implies."""

    def __init__(self) -> None:
        self._mean: float | None = None

    @property
    def mean(self) -> float:
        """Average seconds a slot is held, or the default before any measurement."""
        return DEFAULT_HOLD_SECONDS if self._mean is None else self._mean

    def record(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        if self._mean is None:
            self._mean = seconds
        else:
            self._mean += HOLD_EWMA_ALPHA * (seconds - self._mean)

    def retry_after(self, ahead: int, slots: int) -> int:
        """Seconds until a request behind ``ahead`` others, sharing ``slots`` slots, would likely start."""
        estimate = math.ceil((ahead + 1) * self.mean / slots)
        return max(MIN_RETRY_AFTER, min(MAX_RETRY_AFTER, estimate))
