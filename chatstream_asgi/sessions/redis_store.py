"""``RedisHistoryStore``: chat history in Redis, so several replicas behind any load balancer share it.

redis-py's asyncio client is an optional dependency (``pip install 'chatstream-asgi[redis]'``), imported
when a store is built. Each session is one string key holding the messages as JSON, written with
``SET ... EX ttl`` and read with ``GETEX ... EX ttl``, so the TTL counts from the last load or save as in
``MemoryHistoryStore`` and Redis does the eviction. A save replaces the whole list, which keeps a session
coherent across replicas: a turn is saved once, after its reply, and a second concurrent turn of one session
is refused on every replica (``409``), through a lock key per streaming session (``TurnLock``: ``SET NX`` with
an expiry the streaming replica renews, so a replica that dies frees its sessions within ``TURN_LOCK_SECONDS``).

Failures are bounded and explicit: short socket timeouts and one immediate retry (a pooled connection
that died with a Redis restart gets one fresh try), then ``HistoryStoreError``, which the routes answer
with ``503`` + ``Retry-After``. Nothing hangs, nothing crashes.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import ConfigurationError, HistoryStoreError
from .history import DEFAULT_TTL, Message, copy_messages, trim_turns

logger = logging.getLogger("chatstream_asgi")

DEFAULT_URL = "redis://127.0.0.1:6379/0"
DEFAULT_PREFIX = "chatstream:history:"
LOCK_INFIX = "turn:"  # the turn lock of a session: <prefix>turn:<id>, beside its history <prefix><id>
# compare-and-set on the lock's holder, atomic in Redis: a turn never extends or frees another turn's lock
RENEW_SCRIPT = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
)
RELEASE_SCRIPT = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
DEFAULT_TIMEOUT = 2.0
INSTALL_HINT = "pip install 'chatstream-asgi[redis]'"


class RedisHistoryStore:
    """Server-side chat history in Redis, shared by every replica that points at the same server.

    Args:
        url: a redis-py URL, e.g. ``redis://host:6379/0`` or ``rediss://...`` for TLS.
        ttl: seconds since a session's last load or save after which Redis forgets it; None keeps it.
        max_turns: user/assistant pairs kept per session (leading system messages stay); None keeps all.
        key_prefix: prepended to the session id to make the key (separate apps on one Redis by prefix).
        timeout: socket connect and read timeout in seconds; a slower Redis counts as down.
        client: an existing ``redis.asyncio.Redis`` to use instead of ``url`` (its options are yours).
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        ttl: float | None = DEFAULT_TTL,
        max_turns: int | None = None,
        key_prefix: str = DEFAULT_PREFIX,
        timeout: float = DEFAULT_TIMEOUT,
        client: Any = None,
    ) -> None:
        _check_args(ttl, max_turns, timeout)
        self.ttl = None if ttl is None else max(1, math.ceil(ttl))
        self.max_turns = max_turns
        self.key_prefix = key_prefix
        self._client = client if client is not None else _connect(url, timeout)
        self._errors = _redis_errors()

    async def load(self, session_id: str) -> list[Message]:
        key = self.key_prefix + session_id
        raw = await self._call(self._client.getex(key, ex=self.ttl) if self.ttl else self._client.get(key))
        if raw is None:
            return []
        try:
            return copy_messages(json.loads(raw))
        except (ValueError, TypeError, RecursionError) as exc:  # RecursionError: JSON nested past Python's stack
            # A 503 as for any store failure, but the value goes: kept, every retry failed the same way (each load
            # renewed its TTL) until the user cleared the chat. The retry starts the session afresh.
            logger.error("a session's history in Redis was not valid JSON messages (%s); removed", type(exc).__name__)
            await self._call(self._client.delete(key))
            raise HistoryStoreError(f"this session's history in Redis was unreadable ({type(exc).__name__})") from exc

    async def save(self, session_id: str, messages: Iterable[Mapping[str, str]]) -> None:
        stored = trim_turns(copy_messages(messages), self.max_turns)
        data = json.dumps(stored, ensure_ascii=False)
        await self._call(self._client.set(self.key_prefix + session_id, data, ex=self.ttl))

    async def clear(self, session_id: str) -> None:
        await self._call(self._client.delete(self.key_prefix + session_id))

    async def claim_turn(self, session_id: str, holder: str, seconds: float) -> bool:
        """The session's turn lock (``TurnLock``): ``SET ... NX PX``, so replicas refuse a second concurrent turn."""
        key = self._lock_key(session_id)
        return bool(await self._call(self._client.set(key, holder, nx=True, px=milliseconds(seconds))))

    async def renew_turn(self, session_id: str, holder: str, seconds: float) -> bool:
        key = self._lock_key(session_id)
        return bool(await self._call(self._client.eval(RENEW_SCRIPT, 1, key, holder, milliseconds(seconds))))

    async def release_turn(self, session_id: str, holder: str) -> None:
        await self._call(self._client.eval(RELEASE_SCRIPT, 1, self._lock_key(session_id), holder))

    def _lock_key(self, session_id: str) -> str:
        return self.key_prefix + LOCK_INFIX + session_id

    async def ping(self) -> bool:
        """True when Redis answers (for readiness checks of your own)."""
        try:
            return bool(await self._call(self._client.ping()))
        except HistoryStoreError:
            return False

    async def aclose(self) -> None:
        """Close the connection pool (call it on shutdown)."""
        await self._client.aclose()

    def __repr__(self) -> str:
        return f"RedisHistoryStore(key_prefix={self.key_prefix!r}, ttl={self.ttl}, max_turns={self.max_turns})"

    async def _call(self, call: Any) -> Any:
        try:
            return await call
        except self._errors as exc:
            # the message names the failure, never the URL (it may carry a password)
            raise HistoryStoreError(f"Redis is unreachable or failed ({type(exc).__name__}); retry shortly") from exc


def _connect(url: str, timeout: float) -> Any:
    try:
        import redis.asyncio as redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
    except ImportError as exc:
        raise ConfigurationError(f"RedisHistoryStore needs redis-py: {INSTALL_HINT}") from exc
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 1),
        decode_responses=True,
    )


def _redis_errors() -> tuple[type[BaseException], ...]:
    try:
        from redis.exceptions import RedisError
    except ImportError:  # a duck-typed client without redis-py installed
        return (OSError,)
    return (RedisError, OSError)


def _check_args(ttl: float | None, max_turns: int | None, timeout: float) -> None:
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl < math.inf):
        raise ConfigurationError(f"ttl must be seconds > 0 or None to never expire (got {ttl!r}); pass e.g. 86400")
    if max_turns is not None and (isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < 1):
        raise ConfigurationError(f"max_turns must be an int >= 1 or None to keep all (got {max_turns!r})")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise ConfigurationError(f"timeout must be seconds > 0 (got {timeout!r}); pass e.g. 2.0")


def milliseconds(seconds: float) -> int:
    """A Redis expiry in ms (at least 1: PX 0 is an error)."""
    return max(1, int(seconds * 1000))
