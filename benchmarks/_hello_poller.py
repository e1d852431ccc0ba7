"""Polls the wrapped app's ``/hello`` every 20 ms and prints the latencies (seconds) as one JSON list.

    python benchmarks/_hello_poller.py URL COUNT     # COUNT polls, or with COUNT 0 until stdin closes

A process of its own: a polling thread inside the driver would share the driver's GIL with the
streaming clients and measure their parsing (up to the 5 ms switch interval), not the server.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import httpx
from _bench_common import HELLO_PATH

INTERVAL = 0.020
TIMEOUT = 30.0


def timed_get(client: httpx.Client) -> float:
    """Seconds for one ``GET /hello``; a failure counts as the time it took to fail (a stalled server is slow)."""
    started = time.perf_counter()
    try:
        client.get(HELLO_PATH).raise_for_status()
    except httpx.HTTPError:
        pass
    return time.perf_counter() - started


def main() -> None:
    url, count = sys.argv[1], int(sys.argv[2])
    stopping = threading.Event()
    if count == 0:
        threading.Thread(target=lambda: (sys.stdin.read(), stopping.set()), daemon=True).start()
    latencies: list[float] = []
    with httpx.Client(base_url=url, timeout=TIMEOUT) as client:
        while not stopping.is_set() and (count == 0 or len(latencies) < count):
            latencies.append(timed_get(client))
            stopping.wait(INTERVAL)
    print(json.dumps(latencies), flush=True)


if __name__ == "__main__":
    main()
