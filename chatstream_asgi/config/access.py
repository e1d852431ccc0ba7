"""Who a request belongs to and who may send it: the session cookie and stores, API keys and the CSRF check,
and the host app's callbacks."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import ConfigurationError
from ..http.hooks import Interceptor, OnFinish
from ..http.security import check_keys, check_origin
from ..http.session_routes import OnFeedback
from ..sessions.history import HistoryStore
from ..sessions.state import SessionStateStore
from ._checks import check_bool, check_callable, check_int

COOKIE_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 6265 cookie-name
SAME_SITE = ("lax", "strict", "none")


@dataclass(frozen=True)
class SessionConfig:
    """The session cookie and where a session's history and state live.

    Args:
        cookie_name: the session cookie's name.
        cookie_max_age: seconds the cookie lives (its ``Max-Age``, also how old a signature may be).
        https_only: add ``Secure``; required with ``same_site="none"``.
        same_site: ``"lax"``, ``"strict"`` or ``"none"`` (any case).
        history_store: where chat histories live; None: a bounded in-memory ``MemoryHistoryStore()`` per
            middleware; ``RedisHistoryStore`` for several replicas.
        state_store: where per-session generation params and feedback live; None: a bounded in-memory
            ``SessionStateStore()`` per middleware.
    """

    cookie_name: str = "chatstream_session"
    cookie_max_age: int = 14 * 24 * 3600
    https_only: bool = False
    same_site: str = "lax"
    history_store: HistoryStore | None = None
    state_store: SessionStateStore | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.cookie_name, str) or not COOKIE_TOKEN.fullmatch(self.cookie_name):
            raise ConfigurationError(
                f"cookie_name must be a cookie token such as 'chatstream_session' (got {self.cookie_name!r})"
            )
        check_int("cookie_max_age", self.cookie_max_age, example=14 * 24 * 3600)
        check_bool("https_only", self.https_only)
        if not isinstance(self.same_site, str) or self.same_site.lower() not in SAME_SITE:
            raise ConfigurationError(f"same_site must be 'lax', 'strict' or 'none' (got {self.same_site!r})")
        if self.same_site.lower() == "none" and not self.https_only:
            raise ConfigurationError("same_site='none' requires https_only=True (browsers drop it without Secure)")
        if self.history_store is not None and not isinstance(self.history_store, HistoryStore):
            raise ConfigurationError(
                "history_store must have async load, save and clear (a HistoryStore such as MemoryHistoryStore() "
                f"or RedisHistoryStore(...)); got {type(self.history_store).__name__}, or pass None"
            )
        if self.state_store is not None and not isinstance(self.state_store, SessionStateStore):
            raise ConfigurationError(
                f"state_store must be a SessionStateStore (got {type(self.state_store).__name__}), or None"
            )


@dataclass(frozen=True)
class SecurityConfig:
    """API keys and the CSRF check in front of the routes.

    Args:
        api_keys: Bearer keys (``Authorization: Bearer <key>``) the OpenAI routes require; a string is one key;
            None requires none.
        require_api_key: the chat routes too need a key from ``api_keys`` (non-browser deployments); otherwise
            browsers use the session cookie.
        allowed_origins: origins (``https://app.example.com``) besides this server's own allowed to POST with
            the session cookie (CSRF check).
        csrf: set False to turn the ``Origin`` / ``Sec-Fetch-Site`` check off (e.g. behind a gateway doing it).
    """

    api_keys: str | Sequence[str] | None = field(default=None, repr=False)  # a logged config shows no key
    require_api_key: bool = False
    allowed_origins: Sequence[str] = ()
    csrf: bool = True

    def __post_init__(self) -> None:
        check_keys(self.api_keys)
        check_bool("require_api_key", self.require_api_key)
        if self.require_api_key and self.api_keys is None:
            raise ConfigurationError("require_api_key=True needs api_keys, e.g. api_keys=['<a long random key>']")
        if isinstance(self.allowed_origins, str):
            raise ConfigurationError(f"allowed_origins must be a list of origins, e.g. [{self.allowed_origins!r}]")
        for origin in self.allowed_origins:
            check_origin(origin)
        check_bool("csrf", self.csrf)


@dataclass(frozen=True)
class Hooks:
    """The host app's callbacks; each may be a plain or an ``async`` function.

    Args:
        on_finish: ``on_finish(session_id, user_input, reply, stats)`` after every turn that streamed, once its
            stream is over, as its own task; what it raises is logged. ``stats["outcome"]`` is the request log's
            (``completed``, ``disconnected``, ``stopped``, ``error``, ``timeout``, ``drained``, ``cancelled``).
        request_interceptor: ``request_interceptor(scope, session_id, body)`` sees each ``/chat_stream`` body
            before validation; returns a replacement dict (None keeps it) or raises ``HTTPError`` to refuse.
        on_feedback: ``on_feedback(session_id, feedback)`` for each ``POST /set_feedback``.
    """

    on_finish: OnFinish | None = None
    request_interceptor: Interceptor | None = None
    on_feedback: OnFeedback | None = None

    def __post_init__(self) -> None:
        check_callable("on_finish", self.on_finish)
        check_callable("request_interceptor", self.request_interceptor)
        check_callable("on_feedback", self.on_feedback)
