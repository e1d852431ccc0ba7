"""The app of ``workers.py`` for ``uvicorn --workers W``: the middleware around a ``/hello`` app, configured by
environment variables as a deployment would be (like ``tests/integration/process_app.py``).

- ``WORKERS_BENCH_ENGINE``: ``process`` (every worker wraps ``ProcessEngine`` on one address: one engine
  process, one model copy, one batch) or ``thread`` (every worker loads its own ``TransformersEngine``);
- ``WORKERS_BENCH_MODEL``: the model folder; ``WORKERS_BENCH_GGUF``: a GGUF file in it (optional);
- ``WORKERS_BENCH_BATCH``: ``max_batch_size`` of the shared engine (process) or of each worker's own (thread);
- ``WORKERS_BENCH_ADDRESS``, ``WORKERS_BENCH_LINGER``: the shared engine's Unix socket and idle linger (process);
- ``WORKERS_BENCH_CONCURRENCY``: ``max_concurrency`` and ``max_queue`` of each worker's middleware;
- ``WORKERS_BENCH_STATE``: a folder where each worker writes ``<pid>.json`` once its lifespan startup is done
  (its engine started or connected): the driver's readiness check and its list of worker pids.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from chatstream_asgi import ChatStreamMiddleware

SECRET_KEY = "workers-benchmark-secret-key"
MODE = os.environ["WORKERS_BENCH_ENGINE"]
MODEL = os.environ["WORKERS_BENCH_MODEL"]
GGUF = os.environ.get("WORKERS_BENCH_GGUF") or None
BATCH = int(os.environ["WORKERS_BENCH_BATCH"])
CONCURRENCY = int(os.environ["WORKERS_BENCH_CONCURRENCY"])
STATE = Path(os.environ["WORKERS_BENCH_STATE"])


def build_engine() -> Any:
    gguf = {"gguf_file": GGUF} if GGUF else {}
    if MODE == "process":
        from chatstream_asgi.engines.process import ProcessEngine

        address, linger = os.environ["WORKERS_BENCH_ADDRESS"], float(os.environ.get("WORKERS_BENCH_LINGER", "5"))
        return ProcessEngine.from_pretrained(MODEL, address=address, linger=linger, max_batch_size=BATCH, **gguf)
    from chatstream_asgi.engines.transformers import TransformersEngine

    return TransformersEngine.from_pretrained(MODEL, max_batch_size=BATCH, **gguf)


def worker_info() -> dict[str, Any]:
    info: dict[str, Any] = {"pid": os.getpid(), "engine": MODE, "holds_model": MODE == "thread", "batch": BATCH}
    if "torch" in sys.modules:
        import torch

        info["torch_threads"] = [torch.get_num_threads(), torch.get_num_interop_threads()]
    return info


@asynccontextmanager
async def announce_ready(app: Starlette) -> AsyncIterator[None]:
    # The middleware starts its engine before the wrapped app hears of the startup: a marker here means ready.
    (STATE / f"{os.getpid()}.json").write_text(json.dumps(worker_info()))
    yield


async def hello(request: Request) -> JSONResponse:
    return JSONResponse({"hello": "from the wrapped app", "pid": os.getpid()})


app = ChatStreamMiddleware(
    Starlette(routes=[Route("/hello", hello)], lifespan=announce_ready),
    engine=build_engine(),
    secret_key=SECRET_KEY,
    max_concurrency=CONCURRENCY,
    max_queue=CONCURRENCY,
    queue_timeout=None,
    generation_timeout=None,
    drain_timeout=2,
)
