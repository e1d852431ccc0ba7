"""Readiness and graceful drain: what ``/readyz`` answers and how the middleware stops (``http.ops_routes``
serves ``/healthz``, ``/readyz`` and ``/metrics``).

- ``readiness``: ready once the engine is ready and the middleware is not draining; otherwise not, so a load
  balancer stops sending new chats to a replica that is loading or shutting down.
- ``drain(grace)``: admission stops (new generations get 503 + ``Retry-After``, the queue is emptied the
  same way), running streams get ``grace`` seconds to finish; after that each ends at once with an
  in-band ``draining`` error (the response is still completed properly, its slot freed), also one
  waiting on an engine that sends nothing.

uvicorn waits for open connections *before* it sends the lifespan shutdown, so the middleware also starts the
drain on SIGTERM/SIGINT (``signals.py``); with that off, call ``drain()`` from a pre-stop hook instead.
A reply ended by the drain is counted and logged with the outcome ``drained``.
"""

from __future__ import annotations

import logging
from typing import Any

from ..engines.base import Engine
from ..errors import ConfigurationError
from .admission import Admission
from .metrics import Observer

logger = logging.getLogger("chatstream_asgi")
CANCEL_WAIT = 5.0  # seconds streams get to notice a cancelling drain before the caller goes on


def readiness(engine: Engine, admission: Admission) -> tuple[bool, dict[str, Any]]:
    """Whether this replica takes new chats, and the body ``/readyz`` answers with."""
    if admission.draining:
        return False, {"status": "draining"}
    if not engine.ready:
        return False, {"status": "loading"}
    body: dict[str, Any] = {"status": "ready", "model": engine.model_name}
    replicas = getattr(engine, "replicas_ready", None)  # EngineReplicas: ready while any one is, says how many
    if replicas is not None:
        body["replicas_ready"] = f"{replicas[0]}/{replicas[1]}"
    return True, body


async def drain(admission: Admission, observer: Observer, grace: float) -> bool:
    """Stop admitting, give running streams ``grace`` seconds, then end them; True if all ended in time."""
    if grace < 0:
        raise ConfigurationError(f"the drain grace period must be seconds >= 0, got {grace!r}")
    admission.drain()
    if await admission.wait_idle(grace):
        return True
    observer.cancelling = True  # a stream that gets a token ends there; every stream is also told to end now, so
    for end_now in list(observer.running):  # that one waiting on an engine that sends nothing (a hung one) ends too
        try:
            end_now()
        except Exception:  # one stream's state must not stop the drain (and the shutdown after it)
            logger.exception("could not end a stream for the drain")
    return await admission.wait_idle(CANCEL_WAIT)
