"""Start the drain on SIGTERM or SIGINT, before the server begins its own shutdown.

uvicorn (and gunicorn's ``UvicornWorker``, which runs uvicorn's ``Server``) answers SIGTERM/SIGINT by closing
its listening socket and waiting for every open connection to end; only then does it send the lifespan
shutdown that drains the middleware. A reply streaming for minutes holds the process that long, and the drain
comes too late to matter. So at lifespan startup the middleware chains onto the Python-level handlers of both
signals (``signal.signal``, no patching of the server):

- The first signal starts the drain at once and is held while it runs; then the server's own handler gets it
  and shuts down as usual, finding the streams already ended. While the signal is held the server still
  listens: ``/readyz`` answers 503 and new chats 503 + ``Retry-After``, where a closed socket would refuse
  them; a load balancer sees the replica go unready instead of failing connections.
- A second SIGINT passes the held one on, then itself: a second Ctrl+C still force-quits uvicorn. A second
  SIGTERM while the drain runs is the same request again (a process-group kill reaches a gunicorn worker twice)
  and changes nothing, as in uvicorn.
- Only in the main thread (Python runs handlers nowhere else, so a server in a test's thread is left alone),
  only over a Python handler (under ``SIG_DFL`` or ``SIG_IGN`` no server is waiting to shut down gracefully),
  and the previous handlers come back at lifespan shutdown.

Hypercorn is not covered: it takes the signal in its parent process and shuts its worker down through an event
(the worker's handlers never run), closes its socket at once and cancels what is still open after its
``--graceful-timeout`` (3 s by default), before the lifespan shutdown drains. Behind hypercorn, call
``drain()`` from a pre-stop hook, or keep ``drain_timeout`` below its graceful timeout.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any

logger = logging.getLogger("chatstream_asgi")
SIGNALS = (signal.SIGTERM, signal.SIGINT)
SignalHandler = Callable[[int, FrameType | None], Any]


class DrainOnSignals:
    """Chains onto SIGTERM/SIGINT: the first one runs ``drain`` and reaches the previous handler once it ends.

    Args:
        drain: the coroutine function to run, e.g. the middleware's ``drain``.
        enabled: False makes ``install`` do nothing.
    """

    def __init__(self, drain: Callable[[], Awaitable[object]], *, enabled: bool = True) -> None:
        self.drain = drain
        self.enabled = enabled
        self.previous: dict[int, SignalHandler] = {}
        self.installed = False
        self.fired = False
        self.held: int | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Task[object] | None = None  # the drain a signal started, for the shutdown to join

    def install(self) -> bool:
        """Chain onto the current handlers (call it on the server's loop); True if any signal is now watched."""
        if not self.installed:  # a new start of the same app: the last run's signal and drain are over
            self.fired, self.held, self.task = False, None, None
        if not self.enabled or self.installed or threading.current_thread() is not threading.main_thread():
            return False
        self.loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            handler = signal.getsignal(sig)
            if callable(handler):
                self.previous[sig] = handler
                signal.signal(sig, self.handle)
        self.installed = bool(self.previous)
        return self.installed

    def uninstall(self) -> None:
        """Put the previous handlers back; one chained onto ours since stays (it still calls us, and we pass on)."""
        if not self.installed:
            return
        self.installed = False
        for sig, handler in self.previous.items():
            if signal.getsignal(sig) == self.handle:
                signal.signal(sig, handler)

    def handle(self, sig: int, frame: FrameType | None) -> None:
        # a handler runs between two bytecodes of the main thread, not as a loop callback: schedule, do not await
        loop = self.loop
        if self.installed and not self.fired and loop is not None and loop.is_running():
            self.fired, self.held = True, sig
            loop.call_soon_threadsafe(self.start_drain, signal.Signals(sig).name)
            return
        if sig == signal.SIGTERM and self.held is not None:
            # the same request again, not an escalation: systemd and `timeout` signal the whole process group, so a
            # gunicorn worker gets its SIGTERM twice (the master forwards one); uvicorn too only lets a second
            # SIGINT cut the shutdown short
            return
        self.release()
        self.pass_on(sig, frame)

    def start_drain(self, name: str) -> None:
        logger.info("%s: draining chat streams before the server shuts down", name)
        self.task = asyncio.ensure_future(self.drain_then_release())

    async def drain_then_release(self) -> object:
        try:
            return await self.drain()
        finally:
            self.release()

    def release(self) -> None:
        """Pass the held signal on to the previous handler, if one is held."""
        sig, self.held = self.held, None
        if sig is not None:
            self.pass_on(sig, None)

    def pass_on(self, sig: int, frame: FrameType | None) -> None:
        handler = self.previous.get(sig)
        if handler is not None:
            handler(sig, frame)
