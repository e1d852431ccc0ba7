"""Polls a server's ``/hello`` every 5 ms, on the port stdin names, and prints timestamped latencies as JSON.

    python benchmarks/_stack_poller.py      # stdin: "PORT" starts polling that port, "pause" stops; EOF ends

Prints ``[[port, monotonic_start, seconds], ...]`` at EOF. ``stack.py`` keeps the samples taken inside
each load window the client reports (same ``time.monotonic()`` clock). ``_hello_poller.py`` does not fit
here: its samples carry no time, so a row that loads the server for two seconds could not be told apart
from the poller's start-up and the idle tail, and it pays httpx's client overhead on every poll, which
is the same order as a /hello answer. One process for every server: started once, never near the load.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time

INTERVAL = 0.005  # a round loads the server 1-3 s: at 20 ms that was ~100 polls, and their p99 one hiccup
TIMEOUT = 30.0


class Target:
    """The port to poll, set by the stdin thread; ``None`` pauses."""

    def __init__(self) -> None:
        self.port: int | None = None
        self.changed = threading.Condition()
        self.closed = False

    def follow(self) -> None:
        for line in sys.stdin:
            word = line.strip()
            with self.changed:
                self.port = int(word) if word.isdigit() else None
                self.changed.notify()
        with self.changed:
            self.closed = True
            self.changed.notify()

    def wait(self) -> int | None:
        """The port to poll now; blocks while paused. ``None`` once stdin closed."""
        with self.changed:
            while self.port is None and not self.closed:
                self.changed.wait()
            return None if self.closed else self.port


def timed_get(sock: socket.socket, port: int) -> float:
    started = time.perf_counter()
    sock.sendall(f"GET /hello HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        data += recv(sock)
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
    while len(body) < length:
        body += recv(sock)
    status_line = head.split(b"\r\n", 1)[0]
    if b" 200 " not in status_line:
        raise OSError(f"status line {status_line!r}")
    return time.perf_counter() - started


def recv(sock: socket.socket) -> bytes:
    data = sock.recv(65536)
    if not data:
        raise OSError("connection closed")
    return data


def poll(target: Target) -> list[list[float]]:
    samples: list[list[float]] = []
    sock: socket.socket | None = None
    port: int | None = None
    while (wanted := target.wait()) is not None:
        if wanted != port and sock is not None:
            sock.close()
            sock = None
        port, at = wanted, time.monotonic()
        try:
            sock = sock or socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
            latency = timed_get(sock, port)
        except OSError:  # a failure counts as the time it took to fail: a stalled server is slow
            latency = time.monotonic() - at
            if sock is not None:
                sock.close()
            sock = None
        samples.append([port, at, latency])
        time.sleep(max(0.0, INTERVAL - latency))
    return samples


def main() -> None:
    target = Target()
    threading.Thread(target=target.follow, daemon=True).start()
    print(json.dumps(poll(target)), flush=True)


if __name__ == "__main__":
    main()
