"""The server of ``multiturn.py``: the middleware with ``TransformersEngine`` on uvicorn, prefix cache on or off.

The same app as ``_chatstream_asgi_server.py`` (``/hello``, ``/bench_info`` passthrough routes), plus
``--prefix-cache-bytes``: ``off`` (0), ``default`` (None: the engine's own budget) or a number of bytes.
An engine without the option serves ``off`` without the keyword and refuses the others.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # run from a checkout without `pip install -e .`

import uvicorn  # noqa: E402
from _bench_common import load_model, runtime_info  # noqa: E402
from _chatstream_asgi_server import SECRET_KEY, wrapped_app  # noqa: E402

from chatstream_asgi import ChatStreamMiddleware  # noqa: E402
from chatstream_asgi.engines.transformers import TransformersEngine  # noqa: E402


def cache_kwargs(budget: str) -> dict[str, Any]:
    """The engine keyword for ``budget``; without the feature only ``off`` is possible (and needs no keyword)."""
    supported = "prefix_cache_bytes" in inspect.signature(TransformersEngine.__init__).parameters
    if not supported:
        if budget != "off":
            raise SystemExit("TransformersEngine has no prefix_cache_bytes option yet: only --prefix-cache-bytes off")
        return {}
    value = 0 if budget == "off" else None if budget == "default" else int(budget)
    return {"prefix_cache_bytes": value}


def build_app(args: argparse.Namespace) -> ChatStreamMiddleware:
    model, tokenizer = load_model()
    cache = cache_kwargs(args.prefix_cache_bytes)
    engine = TransformersEngine(model, tokenizer, max_batch_size=args.batch_size, **cache)
    info = {**runtime_info(), "contender": "chatstream_asgi", "max_batch_size": args.batch_size, **cache}
    return ChatStreamMiddleware(
        wrapped_app(info),
        engine=engine,
        secret_key=SECRET_KEY,
        max_concurrency=args.batch_size,
        max_queue=args.batch_size,
        queue_timeout=None,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--prefix-cache-bytes", default="off", help="off, default, or a budget in bytes")
    args = parser.parse_args()
    uvicorn.run(build_app(args), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
