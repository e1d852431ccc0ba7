"""The load side of ``serving.py``: closed-loop streaming clients, the passthrough poller's process, the TTFT probe.

Two wire formats: ``SSEWire`` for this project (``Accept: text/event-stream``; each ``delta`` event is
one text delta and the ``done`` event carries the exact ``completion_tokens``) and ``CumulativeWire``
for the original ChatStream (each chunk is the whole reply so far followed by ``<::EOS::>``, one per
generation step; its final reply is also re-tokenized as a cross-check).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.cookiejar
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from _bench_common import PROMPTS, SEED

CHAT_PATH = "/chat_stream"
ORIGINAL_EOS = "<::EOS::>"
POLLER = str(Path(__file__).resolve().parent / "_hello_poller.py")
# Queued requests of the sequential contenders wait long for their first byte.
TIMEOUT = httpx.Timeout(connect=10.0, read=600.0, write=10.0, pool=600.0)


def no_cookies() -> http.cookiejar.CookieJar:
    """A jar that keeps nothing: every request starts a fresh session, so every prompt has the same length."""
    return http.cookiejar.CookieJar(policy=http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))


@dataclass
class RequestResult:
    """One streamed reply as the client saw it; times from ``time.perf_counter()``."""

    started: float
    finished: float = 0.0
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)  # between consecutive text events
    tokens: int = 0
    retokenized: int | None = None  # the original's final reply re-tokenized, as a cross-check of ``tokens``
    events: int = 0
    error: str | None = None
    joined_running: bool = False  # sent while other requests of the run were streaming

    @property
    def ok(self) -> bool:
        return self.error is None and self.tokens > 0


class SSEWire:
    """This project's SSE stream: ``event: delta`` / ``event: done`` / ``event: error``."""

    def __init__(self, max_new_tokens: int) -> None:
        self.max_new_tokens = max_new_tokens
        self.headers = {"Accept": "text/event-stream"}

    def body(self, prompt: str, max_new_tokens: int | None = None) -> dict[str, Any]:
        return {
            "user_input": prompt,
            "max_new_tokens": max_new_tokens or self.max_new_tokens,
            "ignore_eos": True,
            "temperature": 0,
            "seed": SEED,
        }

    def parser(self) -> SSEParser:
        return SSEParser()


class SSEParser:
    def __init__(self) -> None:
        self.buffer = ""
        self.completion_tokens = 0
        self.error: str | None = None

    def feed(self, text: str) -> list[str]:
        """The text deltas completed by ``text``."""
        self.buffer += text
        *blocks, self.buffer = self.buffer.split("\n\n")
        deltas = []
        for block in blocks:
            name, data = parse_event(block)
            if name == "delta" and data.get("text"):
                deltas.append(data["text"])
            elif name == "done":
                self.completion_tokens = int(data.get("completion_tokens") or 0)
            elif name == "error":
                self.error = json.dumps(data)[:200]
        return deltas

    def tokens(self) -> int:
        return self.completion_tokens


def parse_event(block: str) -> tuple[str | None, dict[str, Any]]:
    name, data = None, ""
    for line in block.splitlines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data += line[5:].strip()
    return name, json.loads(data) if data else {}


class CumulativeWire:
    """The original ChatStream's plain-text stream: ``<whole reply so far><::EOS::>`` per generated token."""

    headers: dict[str, str] = {}

    def __init__(self, count_tokens: Callable[[str], int]) -> None:
        self.count_tokens = count_tokens

    def body(self, prompt: str, max_new_tokens: int | None = None) -> dict[str, Any]:
        return {"user_input": prompt}  # its max_new_tokens and sampling are fixed when the server is built

    def parser(self) -> CumulativeParser:
        return CumulativeParser(self.count_tokens)


class CumulativeParser:
    """Counts generated tokens exactly: ``chat_core.process_chat`` yields once per generation step (its
    ``stream_interval`` is 1 and we configure no stop strings) and ``ChatGenerator.generate`` adds one
    final segment, so a reply of k tokens is k + 1 segments. Re-tokenizing the final reply is kept as a
    cross-check (``retokenized``): it can differ by a token or two from what the model generated."""

    def __init__(self, count_tokens: Callable[[str], int]) -> None:
        self.count_tokens = count_tokens
        self.buffer = ""
        self.reply = ""
        self.segments = 0
        self.error: str | None = None

    def feed(self, text: str) -> list[str]:
        """The new text of each completed segment whose text grew."""
        self.buffer += text
        *segments, self.buffer = self.buffer.split(ORIGINAL_EOS)
        self.segments += len(segments)
        deltas = []
        for segment in segments:
            if segment != self.reply:
                deltas.append(segment[len(self.reply) :] if segment.startswith(self.reply) else segment)
                self.reply = segment
        return deltas

    def tokens(self) -> int:
        return max(0, self.segments - 1)

    def retokenized(self) -> int:
        return self.count_tokens(self.reply) if self.reply else 0


Wire = SSEWire | CumulativeWire


async def stream_one(
    client: httpx.AsyncClient, wire: Wire, prompt: str, first_only: bool = False, max_new_tokens: int | None = None
) -> RequestResult:
    """Send one chat turn and read its stream; with ``first_only``, hang up after the first text."""
    result = RequestResult(started=time.perf_counter())
    parser = wire.parser()
    last = None
    try:
        body = wire.body(prompt, max_new_tokens)
        async with client.stream("POST", CHAT_PATH, json=body, headers=wire.headers) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return finish(result)
            async for text in response.aiter_text():
                now = time.perf_counter()  # all events decoded from one read arrived together
                for _ in parser.feed(text):
                    result.events += 1
                    if last is None:
                        result.ttft = now - result.started
                    else:
                        result.gaps.append(now - last)
                    last = now
                if first_only and last is not None:
                    return finish(result)
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return finish(result)
    result.error = parser.error
    result.tokens = parser.tokens()
    if isinstance(parser, CumulativeParser):
        result.retokenized = parser.retokenized()
    return finish(result)


def finish(result: RequestResult) -> RequestResult:
    result.finished = time.perf_counter()
    return result


@dataclass
class LoadRun:
    """A closed loop of ``n`` clients against one server."""

    n: int
    wall: float
    results: list[RequestResult]
    hello_idle: list[float]
    hello_load: list[float]


async def closed_loop(base_url: str, wire: Wire, n: int, per_client: int, time_cap: float) -> LoadRun:
    """``n`` clients, each sending its next request when the previous one ends, while ``/hello`` is polled."""
    hello_idle = poll_hello_idle(base_url)
    poller = HelloPoller(base_url)
    started = time.perf_counter()
    deadline = started + time_cap
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(base_url=base_url, timeout=TIMEOUT, limits=limits, cookies=no_cookies()) as client:
        per_loop = await asyncio.gather(*(client_loop(client, wire, i, n, per_client, deadline) for i in range(n)))
    wall = time.perf_counter() - started
    hello_load = poller.stop()
    return LoadRun(n, wall, [r for results in per_loop for r in results], hello_idle, hello_load)


async def client_loop(
    client: httpx.AsyncClient, wire: Wire, index: int, n: int, per_client: int, deadline: float
) -> list[RequestResult]:
    results: list[RequestResult] = []
    for turn in range(per_client):
        if turn and time.perf_counter() >= deadline:
            break
        result = await stream_one(client, wire, PROMPTS[(index + turn * 3) % len(PROMPTS)])
        # After the first wave, a request arrives while the other n - 1 clients' replies are streaming.
        result.joined_running = turn > 0 and n > 1
        results.append(result)
    return results


def poll_hello_idle(base_url: str, samples: int = 150) -> list[float]:
    """``/hello`` latencies on the idle server, polled as during load."""
    done = subprocess.run([sys.executable, POLLER, base_url, str(samples)], capture_output=True, text=True, check=True)
    return list(json.loads(done.stdout))


class HelloPoller:
    """Polls ``/hello`` from a process of its own (``_hello_poller.py``) until ``stop()``."""

    def __init__(self, base_url: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, POLLER, base_url, "0"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def stop(self) -> list[float]:
        out, _ = self.process.communicate("", timeout=120)
        return list(json.loads(out))


@dataclass
class ProbeRun:
    idle: list[float]
    loaded: list[float]
    background: int


async def ttft_probe(base_url: str, wire: SSEWire, n: int, samples: int, background_tokens: int) -> ProbeRun:
    """TTFT of a request that joins ``n`` running streams, against TTFT on the idle server.

    The server's batch holds ``n + 1``: the probe joins a batch already decoding ``n`` sequences,
    which is what a continuous-batching engine must make cheap (a static batch would make it wait for
    the whole batch to finish).
    """
    limits = httpx.Limits(max_connections=n + 2)
    async with httpx.AsyncClient(base_url=base_url, timeout=TIMEOUT, limits=limits, cookies=no_cookies()) as client:
        idle = [await first_token_time(client, wire, i) for i in range(samples)]
        streaming = asyncio.Semaphore(0)
        streams = [keep_streaming(client, wire, i, background_tokens, streaming) for i in range(n)]
        background = [asyncio.create_task(stream) for stream in streams]
        try:
            for _ in range(n):
                await streaming.acquire()
            loaded = []
            for i in range(samples):
                await asyncio.sleep(0.3)
                loaded.append(await first_token_time(client, wire, i))
            if any(task.done() for task in background):
                raise RuntimeError("a background stream ended during the probe; raise background_tokens")
        finally:
            for task in background:
                task.cancel()
            for task in background:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    return ProbeRun(idle, loaded, n)


async def first_token_time(client: httpx.AsyncClient, wire: Wire, index: int) -> float:
    result = await stream_one(client, wire, PROMPTS[index % len(PROMPTS)], first_only=True)
    if result.ttft is None:
        raise RuntimeError(f"probe request got no text: {result.error}")
    return result.ttft


async def keep_streaming(
    client: httpx.AsyncClient, wire: SSEWire, index: int, max_new_tokens: int, streaming: asyncio.Semaphore
) -> None:
    """One long stream; releases ``streaming`` at its first text so the probe starts with a full batch."""
    body = wire.body(PROMPTS[index % len(PROMPTS)], max_new_tokens)
    async with client.stream("POST", CHAT_PATH, json=body, headers=wire.headers) as response:
        parser, announced = wire.parser(), False
        async for text in response.aiter_text():
            if not announced and parser.feed(text):
                streaming.release()
                announced = True


async def warm_up(base_url: str, wire: Wire, max_new_tokens: int) -> RequestResult:
    """One untimed request, so first-call costs (allocations, lazy inits) stay out of the numbers."""
    async with httpx.AsyncClient(base_url=base_url, timeout=TIMEOUT, cookies=no_cookies()) as client:
        result = await stream_one(client, wire, PROMPTS[0], max_new_tokens=max_new_tokens)
    if not result.ok:
        raise RuntimeError(f"warm-up request failed: {result.error or 'no tokens'}")
    return result
