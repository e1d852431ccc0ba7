"""The load side of ``stack.py``: N closed-loop streaming clients on raw sockets, in one light process.

    python benchmarks/_stack_client.py --port P --clients N --requests R --new-tokens T [--sse] [--time-cap S]

Each client keeps one keep-alive connection, writes a hand-made HTTP/1.1 ``POST /chat_stream`` (JSON, no
cookie: a fresh session every time, so every prompt has the same length), reads the chunked body to its
terminating chunk, then sends its next request. Prints one JSON object: wall and CPU seconds of the load
window (this process's user + system time, what psutil's ``cpu_times()`` reports, read with
``time.process_time()`` because psutil's 10 ms ticks are too coarse for a one-second window), tokens,
TTFTs (request written -> first text read), failures.

Why one ``selectors`` loop and not asyncio: the server writes about one chunk per token, and the client
wakes about once per chunk. Measured here against ``MockEngine`` at N=32: ``asyncio.open_connection``
streams and an ``asyncio.Protocol`` both cost ~30 us of client CPU per token (64% of a core at 20k
tok/s, on a 2-core machine that the server needs too); this loop costs ~12 us. Blocking sockets are
fine: a socket is read only when the selector says it is readable, and a request (~300 bytes) always
fits the empty send buffer of its connection.

Tokens: with ``--sse`` the ``done`` event's ``completion_tokens``; in plain text the body does not count
tokens, so a reply that ended with the terminating chunk and no in-band ``[error: ...]`` counts as
``--new-tokens`` (the requests ask ``ignore_eos``, so every complete reply is exactly that long).
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import time
from dataclasses import dataclass, field

from _fast_model import PROMPTS  # imports torch and transformers only inside its functions

CHAT_PATH = "/chat_stream"
READ_SIZE = 65536
RUN_TIMEOUT = 300.0
PLAIN_ERROR = b"\n\n[error: "
SSE_DONE = b"event: done\ndata: "


@dataclass
class Tally:
    """What the clients saw, all requests together."""

    tokens: int = 0
    completed: int = 0
    chunks: int = 0
    ttfts: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class ChunkedBody:
    """Incremental parser of a chunked HTTP/1.1 body; ``done`` once the terminating chunk is in."""

    def __init__(self) -> None:
        self.pending = b""
        self.parts: list[bytes] = []
        self.done = False

    def feed(self, data: bytes) -> None:
        buf = self.pending + data if self.pending else data
        pos = 0
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(buf[pos:eol].split(b";", 1)[0], 16)
            end = eol + 2 + size
            if end + 2 > len(buf):
                break
            if size == 0:  # no trailers: the terminating chunk is b"0\r\n\r\n"
                self.done = True
                return
            self.parts.append(buf[eol + 2 : end])
            pos = end + 2
        self.pending = buf[pos:]


def request_bytes(port: int, prompt: str, new_tokens: int, sse: bool) -> bytes:
    body = json.dumps({"user_input": prompt, "max_new_tokens": new_tokens, "temperature": 0, "ignore_eos": True})
    accept = "text/event-stream" if sse else "*/*"
    head = (
        f"POST {CHAT_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: {accept}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return (head + body).encode()


def reply_tokens(text: bytes, sse: bool, new_tokens: int) -> int:
    """Tokens of a complete reply; ``ValueError`` when the server reported an error in-band."""
    if not sse:
        if PLAIN_ERROR in text or not text:
            raise ValueError(f"in-band error or empty reply: {text[-160:]!r}")
        return new_tokens
    at = text.rfind(SSE_DONE)
    if at < 0 or b"event: error" in text:
        raise ValueError(f"no done event: {text[-160:]!r}")
    return int(json.loads(text[at + len(SSE_DONE) :].split(b"\n", 1)[0])["completion_tokens"])


class Client:
    """One closed-loop client: a keep-alive connection and the response it is reading."""

    def __init__(self, index: int, args: argparse.Namespace, selector: selectors.BaseSelector, tally: Tally) -> None:
        self.index, self.args, self.selector, self.tally = index, args, selector, tally
        self.sock: socket.socket | None = None
        self.turn = 0
        self.head: bytes | None = None
        self.buffer, self.body, self.sent = b"", ChunkedBody(), 0.0
        self.first: float | None = None

    def send_next(self, deadline: float) -> bool:
        """Send the next request; False when this client is done."""
        if self.turn >= self.args.requests or (self.turn and time.perf_counter() >= deadline):
            self.close()
            return False
        prompt = PROMPTS[(self.index + self.turn) % len(PROMPTS)]
        self.turn += 1
        self.head, self.buffer, self.body, self.first = None, b"", ChunkedBody(), None
        try:
            if self.sock is None:
                self.sock = socket.create_connection(("127.0.0.1", self.args.port))
                self.selector.register(self.sock, selectors.EVENT_READ, self)
            self.sent = time.perf_counter()
            self.sock.sendall(request_bytes(self.args.port, prompt, self.args.new_tokens, self.args.sse))
        except OSError as exc:
            self.tally.errors.append(f"{type(exc).__name__}: {exc}"[:300])
            self.close()
            return self.send_next(deadline)
        return True

    def on_readable(self, deadline: float) -> bool:
        """Read what arrived; False when this client is done."""
        assert self.sock is not None
        try:
            data = self.sock.recv(READ_SIZE)
            if not data:
                raise ValueError("connection closed before the terminating chunk")
            if not self.feed(data):
                return True
            self.tally.tokens += reply_tokens(b"".join(self.body.parts), self.args.sse, self.args.new_tokens)
        except (ValueError, OSError) as exc:
            self.tally.errors.append(f"{type(exc).__name__}: {exc}"[:300])
            self.close()
            return self.send_next(deadline)
        self.tally.completed += 1
        self.tally.chunks += len(self.body.parts)
        if self.first is not None:
            self.tally.ttfts.append(self.first - self.sent)
        if self.head is not None and b"connection: close" in self.head.lower():
            self.close()
        return self.send_next(deadline)

    def feed(self, data: bytes) -> bool:
        """True once the response is complete."""
        if self.head is None:
            self.buffer += data
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return False
            self.head, data = self.buffer[: end + 4], self.buffer[end + 4 :]
            status = self.head.split(b" ", 2)[1]
            if status != b"200" or b"transfer-encoding: chunked" not in self.head.lower():
                raise ValueError(f"HTTP {status.decode()}: {self.head[:120]!r}")
        self.body.feed(data)
        if self.first is None and any(self.body.parts):
            self.first = time.perf_counter()
        return self.body.done

    def close(self) -> None:
        if self.sock is not None:
            self.selector.unregister(self.sock)
            self.sock.close()
            self.sock = None


def run(args: argparse.Namespace) -> dict[str, object]:
    tally, selector = Tally(), selectors.DefaultSelector()
    cpu_before, started, mono = time.process_time(), time.perf_counter(), time.monotonic()
    deadline, give_up = started + args.time_cap, started + RUN_TIMEOUT
    clients = [Client(i, args, selector, tally) for i in range(args.clients)]
    active = sum(client.send_next(deadline) for client in clients)
    while active and time.perf_counter() < give_up:
        for key, _ in selector.select(timeout=1.0):
            active -= not key.data.on_readable(deadline)
    tally.errors += [f"client {c.index} timed out after {RUN_TIMEOUT:.0f} s" for c in clients if c.sock is not None]
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_before
    return {
        "wall": wall,
        "cpu": cpu,
        "window": [mono, mono + wall],  # time.monotonic() is system-wide on Linux: the poller's clock
        "requests": args.clients * args.requests,
        "completed": tally.completed,
        "tokens": tally.tokens,
        "chunks": tally.chunks,
        "ttfts": tally.ttfts,
        "errors": tally.errors[:5],
        "failed": len(tally.errors),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--requests", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--sse", action="store_true")
    parser.add_argument("--time-cap", type=float, default=120.0, help="no request is sent after this many seconds")
    print(json.dumps(run(parser.parse_args())), flush=True)


if __name__ == "__main__":
    main()
