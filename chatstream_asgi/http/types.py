"""ASGI types: asgiref's HTTP event TypedDicts inside the routes, loose mappings at the framework boundary.

Every route handler reads and sends asgiref's events (``asgiref.typing``), so mypy checks each message the
package builds: a response start without ``trailers`` or a body without ``more_body`` is a type error, and
``message["type"] == "http.disconnect"`` narrows what ``receive`` returned.

The scope, the wrapped app and the ``receive``/``send`` a server hands the middleware stay loose
``MutableMapping`` types. Frameworks (Starlette, FastAPI, Litestar) type their apps and middleware factories that
way, and a TypedDict is not a ``MutableMapping`` to mypy, so typing the boundary with asgiref would make the
middleware unacceptable to ``app.add_middleware``. The boundary narrows once, with ``http_channels``, when it hands
an HTTP request to a route (``ChatStreamMiddleware.__call__``, the ChatStream facade's response).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, cast

from asgiref.typing import HTTPDisconnectEvent, HTTPRequestEvent, HTTPResponseBodyEvent, HTTPResponseStartEvent

# The framework boundary (the wrapped app, the lifespan, the server's own channels).
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Inside the routes: an HTTP scope's channels carry these events only.
HTTPReceiveEvent = HTTPRequestEvent | HTTPDisconnectEvent
HTTPSendEvent = HTTPResponseStartEvent | HTTPResponseBodyEvent
HTTPReceive = Callable[[], Awaitable[HTTPReceiveEvent]]
HTTPSend = Callable[[HTTPSendEvent], Awaitable[None]]
Handler = Callable[[Scope, HTTPReceive, HTTPSend], Awaitable[None]]
RawHeaders = list[tuple[bytes, bytes]]


def http_channels(scope: Scope, receive: Receive, send: Send) -> tuple[HTTPReceive, HTTPSend]:
    """A server's ``receive``/``send`` for an HTTP scope, typed as the events the ASGI spec says they carry."""
    assert scope["type"] == "http", "only an HTTP scope's channels carry HTTP events"
    return cast(HTTPReceive, receive), cast(HTTPSend, send)


def response_start(status: int, headers: RawHeaders) -> HTTPResponseStartEvent:
    return {"type": "http.response.start", "status": status, "headers": headers, "trailers": False}


def response_body(body: bytes, more_body: bool = False) -> HTTPResponseBodyEvent:
    return {"type": "http.response.body", "body": body, "more_body": more_body}
