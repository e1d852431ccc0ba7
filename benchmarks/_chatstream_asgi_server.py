"""Contenders 1 and 2 of ``serving.py``, and each mode of ``multiturn.py``: this project's middleware with
``TransformersEngine`` on uvicorn. ``--prefix-cache-bytes``: ``default`` (the engine's own budget), ``off`` (0)
or a number of bytes.

The wrapped app is a tiny Starlette app with the passthrough route the driver polls (``/hello``)
and ``/bench_info`` (torch threads and versions, for RESULTS.md). With ``--hello-only`` it serves that
app alone, without model or middleware: the reference for ``/hello`` while another process loads the CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # run from a checkout without `pip install -e .`

import uvicorn  # noqa: E402
from _bench_common import HELLO_PATH, INFO_PATH, load_model, runtime_info  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from chatstream_asgi import ChatStreamMiddleware  # noqa: E402
from chatstream_asgi.engines.transformers import TransformersEngine  # noqa: E402

SECRET_KEY = "serving-benchmark-secret-key"


def wrapped_app(info: dict[str, Any]) -> Starlette:
    async def hello(request: Request) -> JSONResponse:
        return JSONResponse({"hello": "from the wrapped app"})

    async def bench_info(request: Request) -> JSONResponse:
        return JSONResponse(info)

    return Starlette(routes=[Route(HELLO_PATH, hello), Route(INFO_PATH, bench_info)])


def build_app(args: argparse.Namespace) -> ChatStreamMiddleware:
    model, tokenizer = load_model()
    budget = args.prefix_cache_bytes
    cache = {"prefix_cache_bytes": 0 if budget == "off" else None if budget == "default" else int(budget)}
    engine = TransformersEngine(model, tokenizer, max_batch_size=args.batch_size, **cache)
    info = {**runtime_info(), "contender": "chatstream_asgi", "max_batch_size": args.batch_size, **cache}
    info["model_threads"] = engine.torch_threads  # its worker thread's (None: torch's own), not the process's
    return ChatStreamMiddleware(
        wrapped_app(info),
        engine=engine,
        secret_key=SECRET_KEY,
        max_concurrency=args.max_concurrency,
        max_queue=args.max_queue,
        queue_timeout=None,  # a closed loop of N clients on a batch of 1 waits long; that is what we measure
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--max-concurrency", type=int, default=1)
    parser.add_argument("--max-queue", type=int, default=1)
    parser.add_argument("--prefix-cache-bytes", default="default", help="default, off, or a budget in bytes")
    parser.add_argument("--hello-only", action="store_true")
    args = parser.parse_args()
    app = wrapped_app({"contender": "hello-only"}) if args.hello_only else build_app(args)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
