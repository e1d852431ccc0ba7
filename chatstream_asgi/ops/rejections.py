"""Why a request was not admitted: each rejection carries its HTTP status and a ``Retry-After`` estimate."""

from __future__ import annotations

from typing import ClassVar

from ..errors import ChatStreamError, HTTPError

DRAINING_MESSAGE = "the server is shutting down; retry later or on another replica"


class Rejected(ChatStreamError):
    """A request was not admitted; ``status`` and ``retry_after`` say how to answer the client.

    Args:
        message: what happened and what the client should do.
        retry_after: seconds the client should wait before retrying (the ``Retry-After`` header).
    """

    reason: ClassVar[str] = "rejected"
    status: ClassVar[int] = 503

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def http_error(self) -> HTTPError:
        """The answer to the client: its status, the reason as the error type, and ``Retry-After``."""
        return HTTPError(self.status, self.reason, str(self), {"Retry-After": str(self.retry_after)})


class QueueFull(Rejected):
    """Every slot is busy and the queue holds ``max_queue`` requests already (HTTP 429)."""

    reason = "queue_full"
    status = 429


class QueueTimeout(Rejected):
    """The request waited in the queue longer than ``queue_timeout`` (HTTP 503)."""

    reason = "queue_timeout"
    status = 503


class Draining(Rejected):
    """The server is shutting down and admits nothing new (HTTP 503)."""

    reason = "draining"
    status = 503
