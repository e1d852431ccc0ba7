"""Several real uvicorn workers share one engine process; a killed engine is restarted once, for all of them."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from .servers import Streamed, chat

REPO = Path(__file__).resolve().parents[2]
WORKERS = 3


def engine_processes(address: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if any("_engine_server" in part for part in cmdline) and str(address) in cmdline:
            found.append(process)
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def workers(tiny_model_dir: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """``uvicorn --workers 3`` on 127.0.0.1 serving ``process_app``; yields its URL and the engine's address."""
    address, port = tmp_path / "engine.sock", free_port()
    env = {**os.environ, "CHATSTREAM_TEST_MODEL": str(tiny_model_dir), "CHATSTREAM_TEST_ENGINE": str(address)}
    command = [sys.executable, "-m", "uvicorn", "tests.integration.process_app:app", "--host", "127.0.0.1"]
    server = subprocess.Popen([*command, "--port", str(port), "--workers", str(WORKERS)], cwd=REPO, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while not ready(url):
            assert server.poll() is None and time.monotonic() < deadline, "uvicorn workers did not become ready"
            time.sleep(0.2)
        yield url, address
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    deadline = time.monotonic() + 15  # with no worker connected it exits after `linger`
    while engine_processes(address) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not engine_processes(address)


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


async def chats(url: str, count: int, retries: int = 0) -> list[str]:
    """``count`` concurrent chats, each its own client and session; each retries a 503 up to ``retries`` times,
    as a client that honours it would."""

    async def one() -> Streamed:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:  # no cookie shared with the others
            for _ in range(retries):
                reply = await chat(client, "hi", max_new_tokens=16, temperature=0)
                if reply.status != 503:
                    return reply
                client.cookies.clear()
                await asyncio.sleep(min(float(reply.headers["retry-after"]), 0.5))
            return await chat(client, "hi", max_new_tokens=16, temperature=0)

    replies = await asyncio.gather(*(one() for _ in range(count)))
    assert all(reply.status == 200 for reply in replies), [(r.status, r.text[:300]) for r in replies if r.status != 200]
    return [reply.text for reply in replies]


def test_uvicorn_workers_share_one_engine_process(workers: tuple[str, Path]) -> None:
    url, address = workers
    replies = asyncio.run(chats(url, 12))  # spread over the workers by the kernel
    assert len(set(replies)) == 1 and replies[0]
    assert len(engine_processes(address)) == 1


def test_a_killed_shared_engine_is_restarted_once_for_every_worker(workers: tuple[str, Path]) -> None:
    url, address = workers
    (engine,) = engine_processes(address)
    engine.kill()
    deadline = time.monotonic() + 60
    while not (ready(url) and engine_processes(address)):
        assert time.monotonic() < deadline, "the engine was not restarted"
        time.sleep(0.2)
    # a worker whose reconnection is still backing off answers 503 + Retry-After meanwhile
    replies = asyncio.run(chats(url, 12, retries=40))
    assert all(replies)
    time.sleep(1.0)  # every worker has reconnected by now: none may have started a second engine
    restarted = engine_processes(address)
    assert len(restarted) == 1 and restarted[0].pid != engine.pid
