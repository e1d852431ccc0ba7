"""The HTTP rows of ``gpu.py``: N streaming clients against ``_gpu_server.py`` on a real uvicorn.

The clients are raw asyncio sockets speaking HTTP/1.1 (chunked SSE, ``Connection: close``): cheap
enough that at batch 64 the client side, in the driver's process, costs the server next to nothing.
The server runs in its own process with the same model; its packages (uvicorn, starlette,
itsdangerous, asgiref) are needed there only, and their absence turns these rows into skips.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import importlib.util
import json
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

SERVER = Path(__file__).resolve().parent / "_gpu_server.py"
REQUIRED = ("uvicorn", "starlette", "itsdangerous", "asgiref")
START_TIMEOUT = 600.0


def missing_packages() -> list[str]:
    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def exchange(port: int, head: str, body: bytes = b"") -> AsyncIterator[tuple[int, bool, asyncio.StreamReader]]:
    """Send one request; yield the status, whether the body is chunked, and the reader at the body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.encode() + body)
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        chunked = False
        while (line := await reader.readline()) not in (b"\r\n", b""):
            chunked = chunked or line.lower().startswith(b"transfer-encoding: chunked")
        yield status, chunked, reader
    finally:
        writer.close()  # also what a dropped writer would do, at a moment of the collector's choosing


async def body_chunks(reader: asyncio.StreamReader, chunked: bool) -> AsyncIterator[bytes]:
    if not chunked:
        while data := await reader.read(65536):
            yield data
        return
    while size := int((await reader.readline()).split(b";")[0].strip() or b"0", 16):
        yield (await reader.readexactly(size + 2))[:-2]


async def chat(port: int, text: str, new_tokens: int) -> int:
    """One streamed chat turn; its ``completion_tokens`` from the final ``done`` event."""
    body = json.dumps({"user_input": text, "max_new_tokens": new_tokens, "ignore_eos": True, "temperature": 0})
    head = (
        f"POST /chat_stream HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    async with exchange(port, head, body.encode()) as (status, chunked, reader):
        if status != 200:
            raise RuntimeError(f"HTTP {status} from /chat_stream")
        decoder, buffer = codecs.getincrementaldecoder("utf-8")(), ""
        async for data in body_chunks(reader, chunked):
            *events, buffer = (buffer + decoder.decode(data)).split("\n\n")
            for event in events:
                lines = event.splitlines()
                payload = "".join(line[5:].strip() for line in lines if line.startswith("data:"))
                if "event: error" in lines:
                    raise RuntimeError(f"error event: {payload[:200]}")
                if "event: done" in lines:
                    return int(json.loads(payload)["completion_tokens"])
    raise RuntimeError("the stream ended without a done event")


def chat_round(port: int, texts: list[str], new_tokens: int) -> tuple[int, float]:
    """All texts at once, one connection each; total completion tokens and wall seconds."""

    async def run() -> tuple[int, float]:
        start = time.perf_counter()
        counts = await asyncio.gather(*(chat(port, t, new_tokens) for t in texts))
        return sum(counts), time.perf_counter() - start

    return asyncio.run(run())


async def ready(port: int) -> bool:
    try:
        async with exchange(port, "GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n") as answer:
            return answer[0] == 200
    except OSError:
        return False


@contextlib.contextmanager
def server(model: str, device: str, max_batch: int, *, smoke: bool, engine: str = "thread") -> Iterator[int]:
    """``_gpu_server.py`` on a free port, ready to serve; yields the port, stops the process (and with it an engine
    process of its own) after."""
    port = free_port()
    command = [sys.executable, str(SERVER), f"--model={model}", f"--device={device}", f"--port={port}"]
    command += [f"--max-batch={max_batch}", f"--engine={engine}", *(["--smoke"] if smoke else [])]
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not asyncio.run(ready(port)):
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    tail = log.read().decode(errors="replace")[-600:]
                    raise RuntimeError(f"the server did not start (exit {process.returncode}): {tail}")
                time.sleep(0.5)
            yield port
        finally:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
