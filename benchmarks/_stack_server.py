"""The served contenders of ``stack.py``: the middleware around a tiny Starlette app, on uvicorn, 127.0.0.1.

    python benchmarks/_stack_server.py --port P --engine thread|process|mock --batch N [--model DIR] [--stack h11]

``thread``: ``TransformersEngine`` (its worker thread in this process); ``process``: ``ProcessEngine``
(the model in a process of its own); ``mock``: ``MockEngine`` replying ``--mock-tokens`` words with no
delay, the client's capacity check. The wrapped app answers ``/hello`` (polled during the load) and
``/bench_info`` (what the numbers depend on; the driver waits for it). Access logs off, as in production
behind a proxy that logs; the middleware's own metrics stay on. ``--stack`` picks uvicorn's event loop and
HTTP parser: ``auto`` (uvicorn's choice: uvloop and httptools when installed), ``h11`` (asyncio + h11) or
``fast`` (uvloop + httptools). ``--trace-gc`` records every garbage collection of this process (start on
the monotonic clock, duration, generation), served at ``/gc_pauses``, so that ``hello_tail.py`` can tell the
slow polls that a collection stopped the loop.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # run from a checkout without `pip install -e .`

import uvicorn  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from chatstream_asgi import ChatStreamMiddleware  # noqa: E402

SECRET_KEY = "stack-benchmark-secret-key"
STACKS = {"auto": {}, "h11": {"loop": "asyncio", "http": "h11"}, "fast": {"loop": "uvloop", "http": "httptools"}}


class GcPauses:
    """A ``gc.callbacks`` entry: ``(monotonic start, seconds, generation)`` of every collection in this process."""

    def __init__(self) -> None:
        self.pauses: list[tuple[float, float, int]] = []
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.monotonic()
        else:
            self.pauses.append((self._started, time.monotonic() - self._started, info["generation"]))


def wrapped_app(info: dict[str, Any], gc_pauses: GcPauses | None = None) -> Starlette:
    async def hello(request: Request) -> JSONResponse:
        return JSONResponse({"hello": "from the wrapped app"})

    async def bench_info(request: Request) -> JSONResponse:
        return JSONResponse(info)

    async def garbage_collections(request: Request) -> JSONResponse:
        return JSONResponse(gc_pauses.pauses if gc_pauses is not None else [])

    routes = [Route("/hello", hello), Route("/bench_info", bench_info), Route("/gc_pauses", garbage_collections)]
    return Starlette(routes=routes)


def build_engine(args: argparse.Namespace) -> Any:
    if args.engine == "mock":
        from chatstream_asgi.engines.mock import MockEngine

        return MockEngine(" ".join(["word"] * args.mock_tokens), token_delay=0.0, max_batch_size=args.batch)
    if args.engine == "process":
        from chatstream_asgi.engines.process import ProcessEngine

        return ProcessEngine.from_pretrained(args.model, max_batch_size=args.batch)
    from chatstream_asgi.engines.transformers import TransformersEngine

    return TransformersEngine.from_pretrained(args.model, max_batch_size=args.batch)


def runtime_info(engine: str) -> dict[str, Any]:
    info: dict[str, Any] = {"engine": engine, "pid": os.getpid(), "cpu_count": os.cpu_count()}
    if "torch" in sys.modules:  # the mock server never imports it
        import torch

        info["torch_threads"] = [torch.get_num_threads(), torch.get_num_interop_threads()]
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--engine", choices=["thread", "process", "mock"], required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--model", default=None)
    parser.add_argument("--mock-tokens", type=int, default=200)
    parser.add_argument("--stack", choices=sorted(STACKS), default="auto")
    parser.add_argument("--trace-gc", action="store_true", help="record every garbage collection (/gc_pauses)")
    args = parser.parse_args()
    gc_pauses = GcPauses() if args.trace_gc else None
    if gc_pauses is not None:
        gc.callbacks.append(gc_pauses)
    engine = build_engine(args)
    app = ChatStreamMiddleware(
        wrapped_app(runtime_info(args.engine), gc_pauses),
        engine=engine,
        secret_key=SECRET_KEY,
        max_concurrency=args.batch,
        max_queue=args.batch,
        queue_timeout=None,
        generation_timeout=None,
    )
    stack = STACKS[args.stack]
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False, **stack)


if __name__ == "__main__":
    main()
