"""SIGTERM to a real server process in the middle of a reply: the drain starts at once, not after the stream.

Each test starts ``python -m chatstream_asgi serve --mock`` (or a three-line ``uvicorn.run`` script, what
``uvicorn app:app`` does, or gunicorn with a ``UvicornWorker``) on 127.0.0.1 with a free port, opens an SSE
chat whose mock reply lasts ~2.4 s, and sends SIGTERM after its first token.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .servers import SECRET_KEY, chat_request, sse_events

pytestmark = pytest.mark.asyncio
GRACE = 1.0  # --drain-timeout
TOKEN_DELAY = 0.3  # the mock's reply is 8 words: ~2.4 s
MOCK_REPLY = "Hello! This is a mock reply from chatstream_asgi."
PROBE_AFTER = 0.4  # seconds after SIGTERM: uvicorn on its own has closed its socket by then (it checks every 0.1 s)
MARGIN = 1.0  # for a loaded machine
START_TIMEOUT = 15.0
APP_MODULE = f"""
from chatstream_asgi import ChatStreamMiddleware, MockEngine
from chatstream_asgi.demo import demo_app
engine = MockEngine(token_delay={TOKEN_DELAY})
app = ChatStreamMiddleware(demo_app(), engine=engine, secret_key={SECRET_KEY!r}, drain_timeout={GRACE})
"""
UVICORN_SCRIPT = APP_MODULE + """
import sys, uvicorn
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]))
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cli_command(port: int, *options: str) -> list[str]:
    timing = ["--drain-timeout", str(GRACE), "--mock-token-delay", str(TOKEN_DELAY)]
    serve = ["serve", "--mock", "--no-ui", "--port", str(port), "--secret-key", SECRET_KEY, *timing, *options]
    return [sys.executable, "-m", "chatstream_asgi", *serve]


def launch(launcher: str, port: int, folder: Path) -> list[str]:
    """The command line of ``launcher``: our CLI, a ``uvicorn.run`` script, or gunicorn with one uvicorn worker."""
    if launcher == "cli":
        return cli_command(port)
    if launcher == "uvicorn.run":
        return [sys.executable, "-c", UVICORN_SCRIPT, str(port)]
    (folder / "drain_app.py").write_text(APP_MODULE)
    worker = ["-k", "uvicorn.workers.UvicornWorker", "-w", "1", "--graceful-timeout", "20"]
    where = ["-b", f"127.0.0.1:{port}", "--chdir", str(folder)]
    return [sys.executable, "-m", "gunicorn", *worker, *where, "drain_app:app"]


@contextlib.contextmanager
def server_process(command: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as output:
        # its own process group, so that a test may signal the whole group (as systemd does) and not itself
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


async def wait_until_up(process: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    async with httpx.AsyncClient(base_url=url) as client:
        while True:
            assert process.poll() is None, f"the server exited: {log.read_text()}"
            assert time.monotonic() < deadline, f"the server did not start: {log.read_text()}"
            with contextlib.suppress(httpx.TransportError):
                if (await client.get("/readyz")).status_code == 200:
                    return
            await asyncio.sleep(0.05)


async def events_of(response: httpx.Response) -> AsyncIterator[tuple[str, Any]]:
    """The SSE events of ``response`` as they arrive."""
    buffer = b""
    async for chunk in response.aiter_raw():
        buffer += chunk
        *blocks, buffer = buffer.split(b"\n\n")
        for block in blocks:
            for event in sse_events(block + b"\n\n"):
                yield event


async def wait_for_exit(process: subprocess.Popen[bytes], timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return process.poll()


GUNICORN = pytest.mark.skipif(importlib.util.find_spec("gunicorn") is None, reason="gunicorn is not installed")


@pytest.mark.parametrize(
    ("launcher", "whole_group", "exit_code"),
    [
        pytest.param("cli", False, 0, id="cli"),
        # uvicorn re-raises the SIGTERM it handled once it has shut down, and SIG_DFL ends the process with it
        pytest.param("uvicorn.run", False, -signal.SIGTERM, id="uvicorn.run"),
        # the master forwards SIGTERM to its worker, which runs uvicorn's Server in its main thread
        pytest.param("gunicorn", False, 0, id="gunicorn", marks=GUNICORN),
        # systemd (KillMode=control-group) signals every process: the worker gets the master's copy as well
        pytest.param("gunicorn", True, 0, id="gunicorn-process-group", marks=GUNICORN),
    ],
)
async def test_sigterm_mid_stream_drains_at_once_then_exits(
    launcher: str, whole_group: bool, exit_code: int, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with server_process(launch(launcher, port, tmp_path), tmp_path / "server.log") as process:
        await wait_until_up(process, url, tmp_path / "server.log")
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            async with client.stream(**chat_request("hi", sse=True)) as response:
                assert response.status_code == 200
                events = events_of(response)
                first = await anext(events)
                assert first[0] == "delta"
                if whole_group:
                    os.killpg(process.pid, signal.SIGTERM)
                else:
                    process.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                await asyncio.sleep(PROBE_AFTER)
                async with httpx.AsyncClient(base_url=url, timeout=5) as newcomer:  # a new connection
                    ready = await newcomer.get("/readyz")
                    refused = await newcomer.post("/chat_stream", json={"user_input": "hi"})
                rest = [event async for event in events]
            ended = time.monotonic() - signalled
        code = await wait_for_exit(process, GRACE + TOKEN_DELAY + MARGIN + 2.0)
        exited = time.monotonic() - signalled
        log = (tmp_path / "server.log").read_text()
    assert ready.status_code == 503 and ready.json()["status"] == "draining", log
    assert refused.status_code == 503 and refused.headers.get("retry-after"), log
    assert refused.json()["error"]["type"] == "draining"
    # the grace was given, then the stream ended at its next token with the in-band error, its text kept
    name, data = rest[-1]
    assert name == "error" and data["error"]["type"] == "draining", rest
    text = "".join(data["text"] for name, data in [first, *rest] if name == "delta")
    assert MOCK_REPLY.startswith(text) and 0 < len(text) < len(MOCK_REPLY)
    assert GRACE - 0.05 <= ended <= GRACE + TOKEN_DELAY + MARGIN, (ended, log)
    assert code == exit_code, log
    assert exited <= GRACE + TOKEN_DELAY + MARGIN + 1.0, (exited, log)
    assert "Application shutdown complete" in log, log  # the lifespan shutdown ran after the drain


async def test_without_drain_on_signals_uvicorn_closes_its_socket_and_waits_for_the_reply(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with server_process(cli_command(port, "--no-drain-on-signals"), tmp_path / "server.log") as process:
        await wait_until_up(process, url, tmp_path / "server.log")
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            async with client.stream(**chat_request("hi", sse=True)) as response:
                events = events_of(response)
                first = await anext(events)
                process.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                await asyncio.sleep(PROBE_AFTER)
                async with httpx.AsyncClient(base_url=url, timeout=5) as newcomer:
                    with pytest.raises(httpx.ConnectError):  # no 503 to tell a load balancer anything
                        await newcomer.get("/readyz")
                rest = [event async for event in events]
            ended = time.monotonic() - signalled
        code = await wait_for_exit(process, 10.0)
        log = (tmp_path / "server.log").read_text()
    names = [name for name, _ in [first, *rest]]
    assert names[-1] == "done" and "error" not in names, log  # the reply ran to its end: no drain cut it
    assert ended > GRACE + TOKEN_DELAY, ended
    assert code == 0, log
