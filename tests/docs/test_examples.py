"""Every ```python block of README.md and docs/*.md runs here, one test per block, named ``page:line``.

An example stays what a reader would write. The harness brings what the reader brings and bounds what would
not end, and everything it changes is listed here:

- ``reader_names()``: the reader's own ``app`` (a FastAPI app with a ``/hello`` route), ``engine`` (a
  ``MockEngine``), ``KEY`` and ``OLD_KEY``; ``__name__`` is ``"__main__"``, as in a script.
- ``"path/to/model"`` is the tiny test model (``tiny_model_dir``); a ``"cuda"`` / ``"cuda:N"`` device that this
  machine lacks becomes ``"cpu"``; a socket path under ``/run/`` becomes one in a fresh temporary folder.
- ``SERVICES``: a server an example talks to is started for it on 127.0.0.1 and its address replaced. A
  URL in an example's code that no service covers (nor ``NEVER_CONTACTED``) fails the test rather than reaching
  out to the network.
- ``uvicorn.run(app, ...)`` serves ``app`` on a free port for one chat turn, then returns.
- ``EXPECTED_WARNINGS``: warnings an example may raise, each with its reason.

After the block runs, a new ``ChatStreamMiddleware`` left in ``app`` is served on real uvicorn and must answer
one chat turn (SSE, ending in a ``done`` event); an engine process it started is then stopped. Bash and text
blocks are not run; ``test_reference.py`` checks that every block names its language, so no Python example
goes unrun for want of a tag.
"""

from __future__ import annotations

import contextlib
import io
import re
import tempfile
import tokenize
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatstream_asgi import ChatStreamMiddleware, MockEngine
from tests.integration.servers import UvicornThread, not_found_app, sse_events
from tests.redis_server import running_redis

from .markdown import PAGES, Block, code_blocks

EXAMPLES = [block for page in PAGES for block in code_blocks(page) if block.language == "python"]
READER_KEY = "docs-examples-secret-key-0123456789abcdef"
READER_OLD_KEY = "docs-examples-old-secret-key-0123456789"
MODEL_PLACEHOLDER = '"path/to/model"'
DEVICE = re.compile(r'"cuda(?::(\d+))?"')
RUN_SOCKET = re.compile(r'"/run/[^"]+\.sock"')
URL = re.compile(r"\b(?:https?|rediss?)://[^\s\"'/]+")
START_TIMEOUT = 90.0  # an example with ProcessEngine starts an engine process (a fresh interpreter) first
CHAT_TURN = {"user_input": "Hello", "max_new_tokens": 4}


def reader_app() -> Any:
    """The app a reader already has: a FastAPI app with a route of its own."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    return app


def reader_names() -> dict[str, Any]:
    return {
        "__name__": "__main__",
        "app": reader_app(),
        "engine": MockEngine(),
        "KEY": READER_KEY,
        "OLD_KEY": READER_OLD_KEY,
    }


# Services: the address an example uses -> what stands in for it.


def openai_server(stack: contextlib.ExitStack, tmp_path: Path) -> str:
    """docs/openai.md's server: the middleware with its example API keys, a mock engine behind it."""
    app = ChatStreamMiddleware(
        not_found_app, engine=MockEngine(), secret_key=READER_KEY, api_keys=["sk-team-a", "sk-team-b"]
    )
    return stack.enter_context(UvicornThread(app)).url


def vllm_stand_in(stack: contextlib.ExitStack, tmp_path: Path) -> str:
    """An OpenAI-compatible upstream in place of vLLM: another chatstream_asgi's OpenAI routes, key sk-internal."""
    app = ChatStreamMiddleware(not_found_app, engine=MockEngine(), secret_key=READER_KEY, api_keys=["sk-internal"])
    return stack.enter_context(UvicornThread(app)).url


def redis(stack: contextlib.ExitStack, tmp_path: Path) -> str:
    """A real redis-server (``tests/redis_server.py``; skipped with its reason where it is not installed)."""
    server = stack.enter_context(contextlib.contextmanager(running_redis)(tmp_path))
    return f"redis://127.0.0.1:{server.port}"


@dataclass(frozen=True)
class Service:
    address: str  # as the example writes it: scheme, host and port
    start: Callable[[contextlib.ExitStack, Path], str]  # returns the stand-in's scheme, host and port


SERVICES = [
    Service("http://127.0.0.1:8000", openai_server),
    Service("http://127.0.0.1:8001", vllm_stand_in),
    Service("redis://redis:6379", redis),
]

# URLs in examples that nothing connects to: URL -> why.
NEVER_CONTACTED = {"https://app.example.com": "an origin allowed to POST with the cookie (allowed_origins)"}

# Warnings an example may raise: (text in the example, category, reason).
EXPECTED_WARNINGS = [
    ("@app.on_event", DeprecationWarning, "FastAPI deprecates on_event, which ChatStream's quickstart uses"),
]


def code_strings(source: str) -> list[str]:
    """The string literals of ``source`` (not its comments)."""
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return [token.string for token in tokens if token.type == tokenize.STRING]


def prepared(source: str, model_dir: Path, stack: contextlib.ExitStack, tmp_path: Path) -> str:
    """``source`` with the placeholders a reader fills in filled in, and each service it names started."""
    import torch

    gpus = torch.cuda.device_count()
    source = source.replace(MODEL_PLACEHOLDER, repr(str(model_dir)))
    source = DEVICE.sub(lambda m: m.group(0) if int(m.group(1) or 0) < gpus else '"cpu"', source)
    socket_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="cs-doc-"))  # short: a socket path has ~100 B
    source = RUN_SOCKET.sub(repr(str(Path(socket_dir) / "engine.sock")), source)
    for service in SERVICES:
        if service.address in source:
            source = source.replace(service.address, service.start(stack, tmp_path))
    for literal in code_strings(source):
        for url in URL.findall(literal):
            local = re.fullmatch(r"\w+://127\.0\.0\.1:\d+", url) is not None
            assert local or url in NEVER_CONTACTED, f"the example talks to {url}; add a stand-in for it to SERVICES"
    return source


def serve_chat_turn(app: ChatStreamMiddleware, **config: Any) -> None:
    """Serve ``app`` on real uvicorn and post one chat turn to its chat route; the reply must end in ``done``."""
    chat_path = next(path for path, (_, handler) in app.table.items() if handler.__name__ == "chat_stream")
    try:
        with UvicornThread(app, start_timeout=START_TIMEOUT, **config) as server:
            headers = {"accept": "text/event-stream"}
            response = httpx.post(server.url + chat_path, json=CHAT_TURN, headers=headers, timeout=60)
            assert response.status_code == 200, response.text
            events = sse_events(response.content)
            assert events and events[-1][0] == "done", events
    finally:
        stop_engine_processes(app.engine)


def stop_engine_processes(engine: object) -> None:
    """Stop the engine processes started here: one on a shared ``address`` would otherwise outlive the test by
    its ``linger`` period (the reader's server would keep it for the next worker)."""
    for part in [engine, *getattr(engine, "engines", [])]:
        launcher = getattr(part, "launcher", None)
        if launcher is not None:
            launcher.stop()


@contextlib.contextmanager
def bounded_uvicorn_run(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[object]]:
    """``uvicorn.run(app, host=..., port=..., **options)`` serves one chat turn on a free port of 127.0.0.1 (the
    other options go to uvicorn as given) and returns."""
    import uvicorn

    served: list[object] = []

    def run(app: Any, *, host: str = "127.0.0.1", port: int = 8000, **options: Any) -> None:
        assert isinstance(app, ChatStreamMiddleware), "the examples run the middleware"
        served.append(app)
        serve_chat_turn(app, **options)

    monkeypatch.setattr(uvicorn, "run", run)
    yield served


@pytest.mark.parametrize("example", [pytest.param(block, id=block.id) for block in EXAMPLES])
def test_example_runs(example: Block, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = reader_names()
    with contextlib.ExitStack() as stack, bounded_uvicorn_run(monkeypatch) as served, warnings.catch_warnings():
        for marker, category, _reason in EXPECTED_WARNINGS:
            if marker in example.source:
                warnings.filterwarnings("ignore", category=category)
        source = prepared(example.source, tiny_model_dir, stack, tmp_path)
        # blank lines first, so a traceback's line numbers are the page's
        code = compile("\n" * example.line + source, example.id, "exec")
        exec(code, names)
        app = names["app"]
        if isinstance(app, ChatStreamMiddleware) and app not in served:
            serve_chat_turn(app)


def test_the_examples_were_found() -> None:
    pages = {block.page for block in EXAMPLES}
    assert {"README.md", "docs/engines.md", "docs/openai.md", "docs/sessions.md"} <= pages, pages
