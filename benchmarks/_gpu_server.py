"""The HTTP contenders of ``gpu.py``: ``ChatStreamMiddleware`` on a real uvicorn, over ``TransformersEngine`` in
this process (``--engine thread``) or in an engine process of its own (``--engine process``, ``ProcessEngine``).

Builds the same random model as the driver (same shape, seed and tokenizer) on the device (in the engine
process with ``--engine process``) and serves it on 127.0.0.1; the wrapped app answers 404 to anything the
middleware does not take. Run by ``_gpu_http.py`` in its own process so that the server's event loop is not
the clients'.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # run from a checkout without `pip install -e .`

import uvicorn  # noqa: E402
from _gpu_models import build_model  # noqa: E402

from chatstream_asgi import ChatStreamMiddleware  # noqa: E402

SECRET_KEY = "gpu-benchmark-secret-key"


async def not_found(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        raise ValueError("the benchmark's wrapped app speaks HTTP only")  # the middleware owns the lifespan
    await send({"type": "http.response.start", "status": 404, "headers": [(b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


def build_engine(args: argparse.Namespace) -> Any:
    if args.engine == "process":
        from chatstream_asgi.engines.process import ProcessEngine

        # The engine process imports the factory's module and this package from the checkout, as this one does.
        paths = [str(HERE), str(HERE.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
        os.environ["PYTHONPATH"] = os.pathsep.join(paths)
        kwargs = {"name": args.model, "device": args.device, "smoke": args.smoke, "max_batch": args.max_batch}
        return ProcessEngine.from_factory(
            "_gpu_models:engine_factory", max_batch_size=args.max_batch, model_name=args.model, factory_kwargs=kwargs
        )
    from chatstream_asgi.engines.transformers import TransformersEngine

    model, tokenizer = build_model(args.model, args.device, smoke=args.smoke)
    return TransformersEngine(model, tokenizer, max_batch_size=args.max_batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-batch", type=int, required=True)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--engine", choices=["thread", "process"], default="thread")
    args = parser.parse_args()
    app = ChatStreamMiddleware(
        not_found,
        engine=build_engine(args),
        secret_key=SECRET_KEY,
        max_concurrency=args.max_batch,
        max_queue=args.max_batch,
        queue_timeout=None,
        drain_on_signals=False,
    )
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
