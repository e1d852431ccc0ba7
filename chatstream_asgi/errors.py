"""The package's exception hierarchy: every message says what to do about it."""

from __future__ import annotations


class ChatStreamError(Exception):
    """Base class of every error raised by chatstream_asgi."""


class ConfigurationError(ChatStreamError, ValueError):
    """A constructor argument is wrong; the message says what to pass instead."""


class EngineError(ChatStreamError):
    """Generation failed inside an engine (model error, upstream failure)."""


class EngineNotReady(EngineError):
    """The engine was used before ``start()`` or after ``close()``."""


class EngineUnavailable(EngineError):
    """The engine cannot take work right now (its process is restarting); answered 503 with ``Retry-After``."""

    status = 503
    error_type = "engine_unavailable"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(max(1, retry_after))}


class HistoryStoreError(ChatStreamError):
    """The history store could not be reached or answered garbage."""


class HTTPError(ChatStreamError):
    """A request the middleware answers with an error status and a JSON body.

    Args:
        status: the HTTP status code.
        error_type: a stable machine-readable name, e.g. ``"invalid_request"``.
        message: what the client should fix.
        headers: extra response headers, e.g. ``Allow`` or ``Retry-After``.
    """

    def __init__(self, status: int, error_type: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.headers = headers or {}


class ClientDisconnected(ChatStreamError):
    """The client went away before the request body was read or the reply was sent."""
