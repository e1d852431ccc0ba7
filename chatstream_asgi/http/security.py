"""Request checks in front of the chat routes: optional Bearer API keys and a CSRF check on cookie POSTs.

- API keys are for non-browser clients and are compared in constant time (every key, every time). With
  ``require_api_key`` the chat routes refuse requests without a valid key (401); without it a browser keeps
  using its session cookie, and a request that does send ``Authorization: Bearer`` must send a valid key.
- A POST authenticated by the session cookie could be forged by another site (CSRF): the browser attaches
  the cookie. Browsers say where a request comes from (``Sec-Fetch-Site``, ``Origin``), so a POST is
  accepted when it is same-origin, comes from an origin in ``allowed_origins``, or carries neither header
  (not a browser, so not a forgery: curl, a backend). A valid Bearer key skips the check: a page on
  another site cannot make a browser attach one.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from ..engines.base import first_engine
from ..errors import ConfigurationError, HTTPError
from .asgi import header
from .types import Scope

BEARER = "bearer "
TRUSTED_FETCH_SITES = frozenset({"same-origin", "none"})  # "none": typed in the address bar, a bookmark


class RequestGuard:
    """Checks one request against the API keys and the CSRF rules; raises ``HTTPError`` 401/403.

    Args:
        api_keys: Bearer keys accepted; None: no key checks (a Bearer header is then the host app's, and ignored).
        require_api_key: refuse requests without a valid key (needs ``api_keys``).
        allowed_origins: origins (``https://app.example.com``) allowed to POST besides the server's own.
        csrf: set False to turn the origin check off (e.g. behind a gateway that does it).
    """

    def __init__(
        self,
        api_keys: str | Sequence[str] | None = None,
        *,
        require_api_key: bool = False,
        allowed_origins: Sequence[str] = (),
        csrf: bool = True,
    ) -> None:
        self.api_keys = check_keys(api_keys)
        if require_api_key and not self.api_keys:
            raise ConfigurationError("require_api_key=True needs api_keys, e.g. api_keys=['<a long random key>']")
        self.require_api_key = require_api_key
        self.allowed_origins = frozenset(check_origin(origin) for origin in allowed_origins)
        self.csrf = csrf

    def allow_origins(self, origins: Sequence[str]) -> None:
        """Also accept cookie POSTs from ``origins`` (e.g. those a CORS middleware lets in)."""
        self.allowed_origins = self.allowed_origins | {check_origin(origin) for origin in origins}

    def check(self, scope: Scope) -> None:
        """Raise 401 for a missing (when required) or wrong key, 403 for a cross-site cookie POST."""
        if self.bearer_ok(scope):
            return
        if self.csrf and scope["method"] == "POST":
            self.check_origin(scope)

    def bearer_ok(self, scope: Scope) -> bool:
        given = bearer_key(scope)
        if given is None:
            if self.require_api_key:
                raise unauthorized("send 'Authorization: Bearer <key>'")
            return False
        if not self.api_keys:
            return False  # no keys configured: the header is the host app's (its own token), not meant for us
        if not key_matches(given, self.api_keys):
            raise unauthorized("wrong API key")
        return True

    def check_origin(self, scope: Scope) -> None:
        site = (header(scope, b"sec-fetch-site") or "").lower()
        if site in TRUSTED_FETCH_SITES:
            return
        origin = header(scope, b"origin")
        if origin is None:
            if not site:
                return  # neither header: not a browser, so not a forged cross-site request
            raise forbidden(f"a {site} request without Origin")
        if origin.rstrip("/") in self.allowed_origins or same_host(origin, scope):
            return
        raise forbidden(f"origin {origin[:100]!r}")

    def __repr__(self) -> str:
        keys = len(self.api_keys)  # never the keys themselves
        return f"RequestGuard(api_keys=<{keys}>, require_api_key={self.require_api_key}, csrf={self.csrf})"


def same_host(origin: str, scope: Scope) -> bool:
    """The Origin names this server (host and port; the scheme may differ behind a TLS proxy)."""
    host = header(scope, b"host")
    try:
        netloc = urlsplit(origin).netloc
    except ValueError:
        return False
    return host is not None and netloc.lower() == host.lower()


def check_keys(api_keys: str | Sequence[str] | None) -> list[bytes]:
    keys = [api_keys] if isinstance(api_keys, str) else list(api_keys or [])
    if api_keys is not None and (not keys or not all(isinstance(k, str) and k.strip() for k in keys)):
        raise ConfigurationError("api_keys must be None (no auth) or a list of non-empty strings, e.g. ['sk-...']")
    return [key.strip().encode("utf-8") for key in keys]


def bearer_key(scope: Scope) -> bytes | None:
    """The key of an ``Authorization: Bearer <key>`` header (stripped), or None without one."""
    value = header(scope, b"authorization")
    if value is None or not value.lower().startswith(BEARER):
        return None
    return value[len(BEARER) :].strip().encode("latin-1")


def key_matches(given: bytes, keys: Sequence[bytes]) -> bool:
    """Whether ``given`` is one of ``keys``: compared with every key, so the time taken tells not which came close."""
    matches = [hmac.compare_digest(given, key) for key in keys]
    return bool(given) and any(matches)


def check_origin(origin: str) -> str:
    parts = urlsplit(origin) if isinstance(origin, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
        raise ConfigurationError(f"allowed_origins takes origins such as 'https://app.example.com', got {origin!r}")
    return origin.rstrip("/")


def unauthorized(why: str) -> HTTPError:
    error = HTTPError(401, "invalid_api_key", f"missing or wrong API key ({why}); send 'Authorization: Bearer <key>'")
    error.headers["WWW-Authenticate"] = "Bearer"
    return error


def forbidden(what: str) -> HTTPError:
    return HTTPError(
        403, "cross_site_request", f"{what} may not POST here; add the page's origin to allowed_origins"
    )


def token_counter(engine: object) -> Callable[[str], int] | None:
    """A function counting the tokens of a text with the engine's tokenizer (replicas: the first one's), if any."""
    tokenizer = getattr(first_engine(engine), "tokenizer", None)
    encode = getattr(tokenizer, "encode", None)
    if encode is None:
        return None
    return lambda text: len(encode(text, add_special_tokens=False))


async def check_input_tokens(count: Callable[[str], int] | None, text: str | None, limit: int | None) -> None:
    """400 when ``text`` has more than ``limit`` tokens; counted off the event loop (a long text takes a while)."""
    if count is None or limit is None or text is None:
        return
    tokens = await asyncio.to_thread(count, text)
    if tokens > limit:
        raise HTTPError(400, "invalid_request", f"'user_input' has {tokens} tokens; the limit is {limit}")
