"""``python -m chatstream_asgi serve``: a demo app behind the middleware, on uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from .config import GenerationConfig, Limits, RoutesConfig, Timeouts
from .engines.base import Engine, SamplingParams
from .engines.mock import MockEngine
from .engines.replicas import EngineReplicas
from .errors import ChatStreamError, ConfigurationError
from .middleware import ChatStreamMiddleware

logger = logging.getLogger("chatstream_asgi.cli")
SECRET_ENV = "CHATSTREAM_SECRET_KEY"
# Greedy for the embedded 135M model (Q4_1): for "What is the capital of France?" it puts "The" and "L" nearly even on
# the first token (p 0.15 vs 0.14), so any sampling (even its card's temperature 0.2) often wanders off into French
# ("L'Étoile, la Cité, ..."); greedy answers "The capital of France is Paris.". The penalty keeps long answers from
# looping.
EMBEDDED_PARAMS = SamplingParams(temperature=0.0, repetition_penalty=1.1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m chatstream_asgi", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a demo app with the chat routes")
    server = serve.add_argument_group("server", "where uvicorn listens")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=port_number, default=8000, help="0-65535 (0: any free port)")
    add_engine_options(serve.add_argument_group("engine", "the model that generates replies"))
    limits = serve.add_argument_group("limits", "Limits: slots and queue")
    limits.add_argument("--max-concurrency", type=int, default=4, help="generations at once per device (batch size)")
    limits.add_argument("--max-queue", type=int, default=8, help="requests waiting for a slot (default: 8)")
    timeouts = serve.add_argument_group("timeouts", "Timeouts: how long a shutdown (or a GC pause) may take")
    timeouts.add_argument("--drain-timeout", type=float, default=25.0, help="seconds replies may finish on shutdown")
    timeouts.add_argument(
        "--no-drain-on-signals", dest="drain_on_signals", action="store_false", help="drain on lifespan shutdown only"
    )
    timeouts.add_argument(
        "--no-freeze-gc", dest="freeze_gc", action="store_false", help="leave the garbage collector's heap unfrozen"
    )
    sessions = serve.add_argument_group("sessions", "SessionConfig and the key that signs the session cookie")
    sessions.add_argument("--secret-key", default=os.environ.get(SECRET_ENV), help=f"cookie key (or ${SECRET_ENV})")
    generation = serve.add_argument_group("generation", "GenerationConfig: what every turn is generated with")
    generation.add_argument("--system-prompt", default=None)
    generation.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="default sampling temperature (0: greedy; default: greedy for the embedded SmolLM2, else 0.7)",
    )
    routes = serve.add_argument_group("routes", "RoutesConfig: the chat page")
    routes.add_argument("--ui-path", default="/", help="where the chat page is served (default: /)")
    routes.add_argument("--no-ui", dest="ui_path", action="store_const", const=None, help="serve no chat page")
    return parser


def add_engine_options(engine: argparse._ArgumentGroup) -> None:
    source = engine.add_mutually_exclusive_group()
    source.add_argument("--model", metavar="DIR", help="a transformers model folder (default: embedded SmolLM2)")
    source.add_argument("--gguf", metavar="FILE", help="a GGUF model file")
    source.add_argument("--mock", action="store_true", help="no model: stream a scripted reply")
    engine.add_argument(
        "--device",
        default=None,
        help="torch device, e.g. cuda:0 (default: cuda if present); a list (cuda:0,cuda:1) serves one model per device",
    )
    engine.add_argument(
        "--engine-process",
        action="store_true",
        help="run the model in its own process (one per device): the web server never shares a GIL with it",
    )
    engine.add_argument(
        "--engine-hang-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="with --engine-process: seconds without a word from the engine process after which it is taken for "
        "hung, killed and restarted (default 60; 0: never)",
    )
    engine.add_argument(
        "--engine-threads",
        type=int,
        default=None,
        metavar="N",
        help="torch threads of the model (in its own process with --engine-process, else in its worker thread; "
        "default: all cores but one, which is left to the web server)",
    )
    engine.add_argument(
        "--prefix-cache-bytes",
        type=int,
        default=None,
        help="KV bytes kept from ended replies so a chat's next turn computes only its new tokens "
        "(0: off; default: a tenth of the device's free memory, at most 4 GiB)",
    )
    engine.add_argument("--mock-token-delay", type=float, default=0.05, help="seconds between two --mock tokens")


def load_engine(args: argparse.Namespace) -> Engine:
    if args.mock:
        return MockEngine(token_delay=args.mock_token_delay, max_batch_size=args.max_concurrency)
    devices = devices_of(args)
    if len(devices) > 1:  # one replica per device; each new chat goes to the least loaded
        return EngineReplicas([load_model(args, device) for device in devices])
    return load_model(args, devices[0])


def devices_of(args: argparse.Namespace) -> list[str | None]:
    if args.device is None:
        return ["auto"]  # resolved where the model loads (an engine process's web side never imports torch)
    devices = [device.strip() for device in str(args.device).split(",")]
    if not all(devices):
        raise SystemExit(f"--device takes a device or a comma-separated list (cuda:0,cuda:1), got {args.device!r}")
    return list(devices)


def load_model(args: argparse.Namespace, device: str | None) -> Engine:
    if args.engine_process:
        from .engines.process import ProcessEngine as engine_class
    else:
        from .engines.transformers import TransformersEngine as engine_class  # type: ignore[assignment]

    options: dict[str, Any] = {"device": device, "max_batch_size": args.max_concurrency}
    options["torch_threads"] = args.engine_threads  # the model's worker thread, or its engine process
    if args.engine_hang_timeout is not None:
        if not args.engine_process:
            raise SystemExit("--engine-hang-timeout needs --engine-process (an in-thread engine cannot be killed)")
        options["hang_timeout"] = args.engine_hang_timeout or None
    if args.prefix_cache_bytes is not None:
        options["prefix_cache_bytes"] = args.prefix_cache_bytes
    if args.model:
        return engine_class.from_pretrained(args.model, **options)
    if args.gguf:
        gguf = os.path.abspath(args.gguf)
        return engine_class.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf), **options)
    from .embedded import smollm2_gguf

    path = smollm2_gguf()
    return engine_class.from_pretrained(str(path.parent), gguf_file=path.name, **options)


def default_params(args: argparse.Namespace) -> SamplingParams:
    """The server's sampling defaults: what suits the embedded model, with ``--temperature`` on top."""
    embedded = not (args.mock or args.model or args.gguf)
    params = EMBEDDED_PARAMS if embedded else SamplingParams()
    return params if args.temperature is None else replace(params, temperature=args.temperature)


def secret_key(args: argparse.Namespace) -> str:
    if args.secret_key:
        return str(args.secret_key)
    logger.warning("no --secret-key or $%s: sessions are signed with a random key and end on restart", SECRET_ENV)
    return secrets.token_urlsafe(32)


def configs(args: argparse.Namespace, engine: Engine) -> dict[str, Any]:
    """The middleware's config objects from the options, one argument group each."""
    devices = len(getattr(engine, "engines", [engine]))
    return {
        "limits": Limits(max_concurrency=args.max_concurrency * devices, max_queue=args.max_queue),  # per device
        "timeouts": Timeouts(
            drain=args.drain_timeout, drain_on_signals=args.drain_on_signals, freeze_gc=args.freeze_gc
        ),
        "generation": GenerationConfig(system_prompt=args.system_prompt, default_params=default_params(args)),
        "routes": RoutesConfig(ui_path=args.ui_path),
    }


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from .demo import demo_app

    try:
        engine = load_engine(args)
    except (OSError, ValueError, RuntimeError) as exc:  # a folder that holds no model, a device torch does not know
        if isinstance(exc, ChatStreamError):
            raise
        raise ConfigurationError(f"cannot load the model: {type(exc).__name__}: {exc}") from exc
    app = ChatStreamMiddleware(demo_app(), engine=engine, secret_key=secret_key(args), **configs(args, engine))
    # uvicorn re-raises SIGTERM once it has shut down gracefully; under SIG_DFL that kills the process (-15)
    signal.signal(signal.SIGTERM, exit_quietly)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


def port_number(text: str) -> int:
    """A TCP port; uvicorn takes 99999 and binds 99999 % 65536 while it logs 99999."""
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0-65535, got {port}")
    return port


def exit_quietly(sig: int, frame: object) -> None:
    """SIGTERM outside uvicorn's own handler: exit 0, a shutdown that was asked for (as gunicorn does)."""
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        serve(args)
    except ChatStreamError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
