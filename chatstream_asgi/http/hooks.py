"""What the host app can plug into a chat turn (ChatStream's "finish callback" and "intercept"), and the
per-session extras the turn reads and writes.

- ``request_interceptor(scope, session_id, data)`` sees the parsed JSON body of ``POST /chat_stream`` before
  validation and may return a replacement dict (None keeps it) or raise ``HTTPError`` to refuse the turn.
- ``on_finish(session_id, user_input, reply, stats)`` runs once per turn after the slot is free, as its own
  task: it can neither delay the last byte nor break the stream, and whatever it raises is only logged.
Either may be a plain function or a coroutine function. A plain function runs in asgiref's thread-sensitive
executor (``sync_to_async``), never on the event loop: a slow hook cannot stall the host app's other requests,
and one that uses Django's ORM runs where Django allows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from asgiref.sync import iscoroutinefunction, sync_to_async

from ..engines.base import SamplingParams
from ..errors import HTTPError
from ..sessions.state import SessionStateStore
from .encoders import WIRES, Wire
from .requests import parse_json_object
from .turns import TurnMessages, reply_count
from .types import HTTPReceive, HTTPReceiveEvent, HTTPSend, HTTPSendEvent, Scope, response_body

logger = logging.getLogger("chatstream_asgi")
OnFinish = Callable[[str, str, str, dict[str, Any]], Awaitable[None] | None]
Interceptor = Callable[[Scope, str, dict[str, Any]], Awaitable[dict[str, Any] | None] | dict[str, Any] | None]
SAMPLING_NAMES = frozenset(f.name for f in fields(SamplingParams))


@dataclass
class ChatHooks:
    """The host app's callbacks, the chat wire format, and the per-session extras, for ``ChatRoutes``."""

    on_finish: OnFinish | None = None
    request_interceptor: Interceptor | None = None
    wire: Wire = "delta"
    extras: SessionStateStore = field(default_factory=SessionStateStore)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    stops: dict[str, TurnStop] = field(default_factory=dict)  # session id -> its running turn's stop switch

    def __post_init__(self) -> None:
        if self.wire not in WIRES:
            raise ValueError(f"wire must be one of {list(WIRES)}, got {self.wire!r}")
        for name in ("on_finish", "request_interceptor"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise ValueError(f"{name} must be a function (or None), got {type(value).__name__}")

    @contextlib.asynccontextmanager
    async def stoppable(
        self, session_id: str, receive: HTTPReceive, send: HTTPSend
    ) -> AsyncIterator[tuple[HTTPReceive, HTTPSend]]:
        """Let ``stop(session_id)`` end this turn as if its client had left, then complete the response."""
        switch = self.stops[session_id] = TurnStop(receive, send)
        try:
            yield switch.receive, switch.send
        finally:
            if self.stops.get(session_id) is switch:
                del self.stops[session_id]
            await switch.complete()
            switch.over.set()

    def arm_stop(self, session_id: str) -> None:
        """The turn holds its slot now: from here on a stop ends it (a queued turn just leaves when its fetch does)."""
        switch = self.stops.get(session_id)
        if switch is not None:
            switch.armed = True

    def stopped(self, session_id: str) -> bool:
        """True when ``stop(session_id)`` ended the session's running turn."""
        switch = self.stops.get(session_id)
        return switch is not None and switch.stopped.is_set()

    def stop(self, session_id: str) -> bool:
        """End the session's running turn (``POST /stop_generation``); False if none runs."""
        switch = self.stops.get(session_id)
        if switch is None:
            return False
        switch.stop()
        return True

    async def wait_until_over(self, session_id: str, timeout: float) -> bool:
        """Wait (up to ``timeout`` s) until the session's turn has ended and its reply is saved; False if it hasn't."""
        switch = self.stops.get(session_id)
        if switch is None:
            return True
        try:
            async with asyncio.timeout(timeout):
                await switch.over.wait()
        except TimeoutError:
            return False
        return True

    def defaults_for(self, session_id: str | None, defaults: SamplingParams) -> SamplingParams:
        """The server defaults with this session's ``/set_generation_params`` overrides on top."""
        overrides = {k: v for k, v in self.extras.params(session_id).items() if k in SAMPLING_NAMES}
        return replace(defaults, **overrides) if overrides else defaults

    async def intercept(self, scope: Scope, session_id: str, body: bytes) -> bytes:
        """The body after the interceptor (unchanged without one, or when it returns None)."""
        if self.request_interceptor is None:
            return body
        data = parse_json_object(body)
        try:
            result = await call_hook(self.request_interceptor, scope, session_id, data)
        except HTTPError:
            raise
        except Exception as exc:
            logger.exception("the request interceptor failed")
            raise HTTPError(500, "interceptor_error", f"the request interceptor failed: {type(exc).__name__}") from exc
        if result is None:
            return json.dumps(data).encode()
        if not isinstance(result, Mapping):
            raise HTTPError(500, "interceptor_error", "the request interceptor must return a dict or None")
        return json.dumps(dict(result)).encode()

    def reply_saved(self, session_id: str, messages: TurnMessages, reply_id: str) -> None:
        """Remember the id of a reply saved to the history (feedback names it), never raising; before the last
        byte goes out, so that the client's very next request (its rating) finds it."""
        try:
            first = self.extras.first_reply_number(session_id, messages.stored_replies)
            self.extras.record_reply(session_id, reply_id, first + reply_count(messages.history))
        except Exception:
            logger.exception("could not record the reply id")

    def turn_ended(
        self, session_id: str, messages: TurnMessages, reply: str, reply_id: str, stats: dict[str, Any]
    ) -> None:
        """Tell ``on_finish`` (as a task of its own), once the turn's stream is over."""
        if self.on_finish is None:
            return
        user_input = messages.history[-1]["content"] if messages.history else ""
        stats = {**stats, "reply_id": reply_id}
        task = asyncio.ensure_future(self.call_on_finish(session_id, user_input, reply, stats))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def call_on_finish(self, session_id: str, user_input: str, reply: str, stats: dict[str, Any]) -> None:
        assert self.on_finish is not None
        try:
            await call_hook(self.on_finish, session_id, user_input, reply, stats)
        except Exception:
            logger.exception("the on_finish callback failed (the stream and its slot were not affected)")


async def call_hook(hook: Callable[..., Any], *args: Any) -> Any:
    """Call one of the host app's callbacks: await a coroutine function; run a plain function off the event loop.

    ``thread_sensitive=True`` is asgiref's (and Django's) default: every plain hook runs in one shared thread, the
    one Django's ORM needs. Whatever a plain function returns that is awaitable (a lambda returning a coroutine)
    is awaited too.
    """
    if iscoroutinefunction(hook) or iscoroutinefunction(type(hook).__call__):  # or an object's async __call__
        return await hook(*args)
    result = await sync_to_async(hook, thread_sensitive=True)(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


class TurnStop:
    """A turn's ``receive`` that also says ``http.disconnect`` once ``stopped`` is set, and a ``send`` that
    remembers whether the response is complete. Browsers may keep reading an aborted fetch (to reuse the
    connection), so the chat page's Stop also asks the server to stop: the slot is freed at once either way."""

    def __init__(self, receive: HTTPReceive, send: HTTPSend) -> None:
        self.stopped = asyncio.Event()
        self.over = asyncio.Event()  # set once the turn has ended, its reply saved and its response completed
        self._receive, self._send = receive, send
        self.started = self.ended = False
        self.armed = False  # until then a stop does not interrupt a receive (a queued turn leaves with its fetch)
        self._receiving: asyncio.Task[object] | None = None  # the task waiting in an armed receive
        self._interrupted = False  # stop() cancelled that task

    def stop(self) -> None:
        """End the turn: a receive waiting now is interrupted, a later one says ``http.disconnect`` at once.

        The waiting receive is cancelled rather than raced against the stop in two extra tasks and a wait, which
        every chat request paid for (its disconnect listener waits in ``receive`` for the whole reply).
        """
        self.stopped.set()
        task = self._receiving
        if task is not None and not self._interrupted:
            self._interrupted = True
            task.cancel()

    async def receive(self) -> HTTPReceiveEvent:
        if self.stopped.is_set():
            return {"type": "http.disconnect"}
        if not self.armed:
            return await self._receive()
        task = self._receiving = asyncio.current_task()
        try:
            return await self._receive()
        except asyncio.CancelledError:
            # our own cancel, and nobody else's: the stop, as the client leaving (the server's receive is safe to
            # cancel; what it was about to return can only have been http.disconnect once the body is read)
            if self._interrupted and task is not None and task.uncancel() == 0:
                return {"type": "http.disconnect"}
            raise
        finally:
            self._receiving = None
            self._interrupted = False

    async def send(self, message: HTTPSendEvent) -> None:
        await self._send(message)
        self.started = True
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.ended = True

    async def complete(self) -> None:
        """After a stop the client may still be there: end its response properly."""
        if self.stopped.is_set() and self.started and not self.ended:
            with contextlib.suppress(OSError):
                await self.send(response_body(b""))
