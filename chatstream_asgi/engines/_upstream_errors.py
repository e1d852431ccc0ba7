"""How an OpenAI-compatible upstream's failures become ``UpstreamError``: which HTTP status our client gets
for each upstream answer, and what the message quotes of it.

Kept apart from ``openai_upstream`` so the engine module reads as the request it sends and the stream it
reads; the status mapping and the quoting of error bodies are policy that changes on its own.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from ..errors import EngineError

if TYPE_CHECKING:
    import httpx

MAX_ERROR_BODY = 2000  # characters of an upstream error body quoted in our message
RETRY_STATUSES = {429: 503, 503: 503, 408: 504, 504: 504}  # upstream status -> ours
# The upstream refused the request itself (vLLM's 400 for a prompt over its context, a 422 for a parameter it does
# not take): our client's 400, so that it is fixed rather than retried. As a 502 the openai SDK sent it three times.
# 401/403/404 stay 502s: they say this server is configured wrong (key, base_url, model), not the request.
REQUEST_STATUSES = {400, 413, 422}
STATUS_HINTS = {
    401: "check api_key",
    403: "check api_key",
    404: "check base_url (it usually ends in /v1) and model",
}


class UpstreamError(EngineError):
    """The upstream server failed; ``status`` and ``error_type`` say how the middleware answers.

    Args:
        message: what went wrong upstream and what to check.
        status: the HTTP status for our client: 400 (the upstream refused the request itself), 502, 503 or 504.
        error_type: a stable name such as ``upstream_unreachable`` or ``upstream_timeout``.
        retry_after: seconds for a ``Retry-After`` header (an overloaded upstream).
    """

    def __init__(self, message: str, *, status: int = 502, error_type: str = "upstream_error", retry_after: int = 0):
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.headers = {"Retry-After": str(retry_after)} if retry_after else {}


async def check_response(response: httpx.Response) -> None:
    """Raise ``UpstreamError`` unless the upstream answered 200 with an event stream."""
    if response.status_code == 200:
        if "text/event-stream" not in response.headers.get("content-type", ""):
            content_type = response.headers.get("content-type")
            raise protocol_error(f"expected a text/event-stream response, got {content_type!r}")
        return
    detail = (await response.aread()).decode("utf-8", "replace")
    with_message = json_error_message(detail) or detail[:MAX_ERROR_BODY]
    status = response.status_code
    hint = STATUS_HINTS.get(status, "")
    message = f"the upstream answered {status}: {with_message}" + (f" ({hint})" if hint else "")
    if status in RETRY_STATUSES:
        ours = RETRY_STATUSES[status]
        kind = "upstream_overloaded" if ours == 503 else "upstream_timeout"
        raise UpstreamError(
            message, status=ours, error_type=kind, retry_after=retry_after(response) if ours == 503 else 0
        )
    if status in REQUEST_STATUSES:
        raise UpstreamError(message, status=400, error_type="upstream_bad_request")
    raise UpstreamError(message, error_type="upstream_rejected" if status < 500 else "upstream_error")


def json_error_message(text: str) -> str | None:
    try:
        data = json.loads(text)
    except ValueError:
        return None
    error = data.get("error") if isinstance(data, dict) else None
    message = error.get("message") if isinstance(error, dict) else error  # TGI sends {"error": "..."}
    return message if isinstance(message, str) else None


def retry_after(response: httpx.Response) -> int:
    value = response.headers.get("retry-after", "")
    return max(1, min(300, int(value))) if value.isdigit() else 1


def protocol_error(message: str) -> UpstreamError:
    return UpstreamError(
        f"the upstream broke the OpenAI stream format: {message}", error_type="upstream_protocol_error"
    )
