"""The ASGI lifespan in front of the wrapped app: the middleware starts its engine on startup and drains and
closes it on shutdown, whether or not the wrapped app speaks the lifespan protocol.

- An app that does (FastAPI, Starlette, Litestar, Quart) gets every lifespan message after the middleware has
  acted on it, and answers the server itself.
- An app that does not, and says so before it reads a message (Django's handler raises ``ValueError`` for any
  scope but HTTP; others just return), is left out: the middleware answers the server alone. Otherwise the
  server would give up on the lifespan (or, with ``--lifespan on``, refuse to start) and the engine would never
  be started, drained or closed: ``/readyz`` would say 503 until the first chat, and a shutdown would cut every
  stream.
- A startup of ours that fails is reported to the server by us, and the app never hears of a startup; a shutdown of
  ours that fails still lets the app shut down, and the app's answer is turned into ``lifespan.shutdown.failed``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: ops sits below http, whose module owns the ASGI aliases
    from ..http.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("chatstream_asgi")
Hook = Callable[[], Awaitable[None]]


class Lifespan:
    """Runs ``on_startup`` / ``on_shutdown`` around the wrapped app's own lifespan, or instead of it.

    Args:
        on_startup: runs when the server starts, before the app hears of it.
        on_shutdown: runs when the server stops, before the app hears of it.
    """

    def __init__(self, on_startup: Hook, on_shutdown: Hook) -> None:
        self.on_startup = on_startup
        self.on_shutdown = on_shutdown

    async def __call__(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        heard = False  # whether the app read a lifespan message: then the lifespan is the app's to answer
        shutdown_failure: str | None = None

        async def wrapped() -> Message:
            nonlocal heard, shutdown_failure
            message = await receive()
            heard = True
            try:
                await self.act_on(message)
            except Exception as exc:
                logger.exception("lifespan %s failed", message["type"])
                failure = f"{type(exc).__name__}: {exc}"
                if message["type"] != "lifespan.startup":
                    shutdown_failure = failure  # the app still shuts down; the server hears of it in the answer
                    return message
                # Told by us, the server exits. Raised into the app alone, the failure would escape it (Starlette's
                # first receive is outside its try) and uvicorn's default `--lifespan auto` would take that for an app
                # without lifespan and serve on, with the app's startup skipped and no engine.
                await send({"type": "lifespan.startup.failed", "message": failure})
                raise
            return message

        async def answering(message: Message) -> None:
            if message["type"] == "lifespan.shutdown.complete" and shutdown_failure is not None:
                message = {"type": "lifespan.shutdown.failed", "message": shutdown_failure}
            elif message["type"] == "lifespan.startup.failed":
                # the app's own startup failed after ours: the server exits without a shutdown, so undo ours now
                # (an engine process or an upstream client would be left running)
                try:
                    await self.on_shutdown()
                except Exception:
                    logger.exception("undoing the startup after the app's own startup failed")
            await send(message)

        try:
            await app(scope, wrapped, answering)
        except Exception as exc:
            if heard:
                raise
            logger.info("the wrapped app does not take the lifespan (%s); the middleware answers it alone", exc)
        else:
            if heard:
                return
        await self.answer_alone(receive, send)

    async def act_on(self, message: Message) -> None:
        if message["type"] == "lifespan.startup":
            await self.on_startup()
        elif message["type"] == "lifespan.shutdown":
            await self.on_shutdown()

    async def answer_alone(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            kind = message["type"]
            try:
                await self.act_on(message)
            except Exception as exc:
                logger.exception("lifespan %s failed", kind)
                await send({"type": f"{kind}.failed", "message": f"{type(exc).__name__}: {exc}"})
                return
            await send({"type": f"{kind}.complete"})
            if kind == "lifespan.shutdown":
                return
