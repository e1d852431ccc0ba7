"""The signed session cookie: it carries only a random session id, never history.

History lives server-side (see ``history.py``) because the ``Set-Cookie`` header leaves before the first
token, so a reply could never ride in the cookie of the response that streams it. Anything wrong with an
incoming cookie (tampered, expired, garbled) means "no session": the caller starts a fresh one.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable, Iterator, Sequence

from itsdangerous import BadSignature, TimestampSigner

from ..errors import ConfigurationError

SALT = "chatstream_asgi.session"
SESSION_ID_BYTES = 18
MIN_SECRET_LENGTH = 16
MAX_COOKIE_VALUE_LENGTH = 256  # a signed id is ~60 chars; anything far longer is not ours
SAME_SITE_VALUES = {"lax": "Lax", "strict": "Strict", "none": "None"}
EXPIRED = "Thu, 01 Jan 1970 00:00:00 GMT"

_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{24}")  # the shape of secrets.token_urlsafe(SESSION_ID_BYTES)
_SIGNED_VALUE = re.compile(r"[A-Za-z0-9_\-.]+")
_COOKIE_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 6265 cookie-name (an RFC 2616 token)
_ATTRIBUTE_VALUE = re.compile(r"[\x21-\x3a\x3c-\x7e]+")  # printable ASCII without ';' or spaces
_GENERATE_KEY = 'python -c "import secrets; print(secrets.token_urlsafe(32))"'

SecretKey = str | bytes


class _ClockSigner(TimestampSigner):
    """A ``TimestampSigner`` whose clock can be injected, so tests freeze time instead of sleeping."""

    def __init__(self, secret_keys: list[bytes], clock: Callable[[], float]) -> None:
        super().__init__(secret_keys, salt=SALT)
        self._clock = clock

    def get_timestamp(self) -> int:
        return int(self._clock())


class SessionCookie:
    """Issues and verifies the signed session-id cookie.

    Args:
        secret_key: signing key, or a list of keys for rotation: the first signs, any of them verifies.
            Each must be at least 16 characters; generate one with
            ``python -c "import secrets; print(secrets.token_urlsafe(32))"``.
        cookie_name: the cookie's name (an RFC 6265 token).
        max_age: seconds a cookie stays valid, enforced on verification and sent as ``Max-Age``.
        path: the cookie's ``Path``.
        https_only: add ``Secure``; required with ``same_site="none"``.
        same_site: ``"lax"``, ``"strict"`` or ``"none"`` (any case).
        domain: the cookie's ``Domain``, or None for host-only.
        clock: wall clock in seconds (tests inject a frozen one).
    """

    def __init__(
        self,
        secret_key: SecretKey | Sequence[SecretKey],
        *,
        cookie_name: str = "chatstream_session",
        max_age: int = 14 * 24 * 3600,
        path: str = "/",
        https_only: bool = False,
        same_site: str = "lax",
        domain: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        keys = _check_keys(secret_key)
        same_site_flag = _check_same_site(same_site, https_only)
        _check_attributes(cookie_name, max_age, path, domain)
        self.cookie_name = cookie_name
        self.max_age = max_age
        self.path = path
        self.https_only = https_only
        self.same_site = same_site.lower()
        self.domain = domain
        # itsdangerous signs with its *last* key; our API puts the current key first, as people list them
        self._signer = _ClockSigner(list(reversed(keys)), clock)
        self._attributes = _cookie_attributes(path, domain, same_site_flag, https_only)

    def new_session_id(self) -> str:
        return secrets.token_urlsafe(SESSION_ID_BYTES)

    def session_id_from_headers(self, headers: Sequence[tuple[bytes, bytes]]) -> str | None:
        """The verified session id from raw ASGI headers, or None for a missing or bad cookie (never raises)."""
        return self.session_from_headers(headers)[0]

    def session_from_headers(self, headers: Sequence[tuple[bytes, bytes]]) -> tuple[str | None, bool]:
        """The verified session id (or None), and whether its cookie is past half its ``max_age``: then a response
        sends it again, signed now, so that a session in use does not end ``max_age`` after its first visit.

        At most ``MAX_CANDIDATES`` values are verified (an HMAC per key each): a header of 100,000 copies held the
        event loop for seconds. A browser sends two or three cookies of one name at most (parent paths).
        """
        tried = 0
        for name, value in headers:
            if name.lower() != b"cookie":
                continue
            for candidate in _cookie_values(value, self.cookie_name):
                if tried == MAX_CANDIDATES:
                    return None, False
                tried += 1
                verified = self._verify(candidate)
                if verified is not None:
                    session_id, signed_at = verified
                    return session_id, self._signer.get_timestamp() - signed_at > self.max_age / 2
        return None, False

    def set_cookie_header(self, session_id: str) -> tuple[bytes, bytes]:
        if not _SESSION_ID.fullmatch(session_id):
            raise ValueError("session_id must come from new_session_id() or session_id_from_headers()")
        signed = self._signer.sign(session_id).decode("ascii")
        value = f"{self.cookie_name}={signed}; Max-Age={self.max_age}; {self._attributes}"
        return b"set-cookie", value.encode("latin-1")

    def clear_cookie_header(self) -> tuple[bytes, bytes]:
        value = f"{self.cookie_name}=; Max-Age=0; Expires={EXPIRED}; {self._attributes}"
        return b"set-cookie", value.encode("latin-1")

    def __repr__(self) -> str:
        return (
            f"SessionCookie(cookie_name={self.cookie_name!r}, max_age={self.max_age}, path={self.path!r}, "
            f"https_only={self.https_only}, same_site={self.same_site!r}, domain={self.domain!r})"
        )

    def _verify(self, signed: str) -> tuple[str, float] | None:
        """The session id a cookie value carries and when it was signed (seconds), or None."""
        if len(signed) > MAX_COOKIE_VALUE_LENGTH or not _SIGNED_VALUE.fullmatch(signed):
            return None
        try:
            value, signed_at = self._signer.unsign(signed, max_age=self.max_age, return_timestamp=True)
            session_id = value.decode("ascii")
        except (BadSignature, ValueError):  # SignatureExpired is a BadSignature; UnicodeError a ValueError
            return None
        return (session_id, signed_at.timestamp()) if _SESSION_ID.fullmatch(session_id) else None


MAX_CANDIDATES = 8  # session-cookie values verified per request


def _cookie_values(header: bytes, cookie_name: str) -> Iterator[str]:
    """Every value of ``cookie_name`` in one ``cookie`` header, tolerant of junk around it.

    Not Starlette's ``cookie_parser``: it keeps one value per name (the last), while a browser sends two cookies
    of one name when another app on the host set one for a parent path; each must be tried, or a stale one
    would log the user out.
    """
    # latin-1 maps every byte, so decoding cannot fail; non-ASCII then fails the shape checks instead
    text = header.decode("latin-1")
    for part in text.split(";"):
        name, sep, value = part.partition("=")
        if sep and name.strip() == cookie_name:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            yield value


def _check_keys(secret_key: SecretKey | Sequence[SecretKey]) -> list[bytes]:
    raw: list[object]
    if isinstance(secret_key, (str, bytes)):
        raw = [secret_key]
    elif isinstance(secret_key, Sequence):
        raw = list(secret_key)
    else:  # None, or a wrong type that the loop below names
        raw = [] if secret_key is None else [secret_key]
    if not raw:
        raise ConfigurationError(f"secret_key is required; generate one with: {_GENERATE_KEY}")
    keys = []
    for key in raw:
        if not isinstance(key, (str, bytes)):
            raise ConfigurationError(f"secret_key must be str or bytes (or a list of them), not {type(key).__name__}")
        if len(key) < MIN_SECRET_LENGTH:
            # the key itself never appears in the message
            raise ConfigurationError(
                f"each secret_key must be at least {MIN_SECRET_LENGTH} characters; generate one with: {_GENERATE_KEY}"
            )
        keys.append(key.encode("utf-8") if isinstance(key, str) else key)
    return keys


def _check_same_site(same_site: str, https_only: bool) -> str:
    flag = SAME_SITE_VALUES.get(same_site.lower()) if isinstance(same_site, str) else None
    if flag is None:
        raise ConfigurationError(f"same_site must be 'lax', 'strict' or 'none' (got {same_site!r})")
    if flag == "None" and not https_only:
        raise ConfigurationError("same_site='none' requires https_only=True (browsers drop it without Secure)")
    return flag


def _check_attributes(cookie_name: str, max_age: int, path: str, domain: str | None) -> None:
    if not isinstance(cookie_name, str) or not _COOKIE_TOKEN.fullmatch(cookie_name):
        raise ConfigurationError(
            f"cookie_name must be a cookie token such as 'chatstream_session' (got {cookie_name!r})"
        )
    if isinstance(max_age, bool) or not isinstance(max_age, int) or max_age < 1:
        raise ConfigurationError(f"max_age must be whole seconds >= 1 (got {max_age!r}); pass e.g. 14 * 24 * 3600")
    if not isinstance(path, str) or not path.startswith("/") or not _ATTRIBUTE_VALUE.fullmatch(path):
        raise ConfigurationError(f"path must start with '/' and hold no ';' or spaces (got {path!r})")
    if domain is not None and (not isinstance(domain, str) or not _ATTRIBUTE_VALUE.fullmatch(domain)):
        raise ConfigurationError(f"domain must be a host name such as 'example.com' or None (got {domain!r})")


def _cookie_attributes(path: str, domain: str | None, same_site: str, https_only: bool) -> str:
    attributes = [f"Path={path}"]
    if domain is not None:
        attributes.append(f"Domain={domain}")
    attributes += ["HttpOnly", f"SameSite={same_site}"]
    if https_only:
        attributes.append("Secure")
    return "; ".join(attributes)
