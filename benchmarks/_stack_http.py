"""The processes of ``stack.py``'s served rows: uvicorn servers, the ``/hello`` poller, the light client.

Every process is started here and ended here: servers are terminated (then killed) by ``stop()``, the
poller ends when its stdin closes, the client exits after its bounded closed loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from _cpu_load import busy_seconds, our_cpu_seconds
from _stack_inprocess import Measure

HERE = Path(__file__).resolve().parent
LOGS = HERE / ".cache"
START_TIMEOUT = 180.0
CLIENT_TIMEOUT = 330.0  # the client gives up on its own after 300 s


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """``_stack_server.py`` with one engine kind and batch size, on a free port of 127.0.0.1."""

    def __init__(
        self, engine: str, n: int, model: Path | None, new_tokens: int, stack: str = "auto", trace_gc: bool = False
    ) -> None:
        self.engine, self.port = engine, free_port()
        self.argv = [sys.executable, str(HERE / "_stack_server.py"), "--port", str(self.port), "--engine", engine]
        self.argv += ["--batch", str(n), "--mock-tokens", str(new_tokens), "--stack", stack]
        self.argv += ["--trace-gc"] if trace_gc else []
        self.argv += ["--model", str(model)] if model is not None else []
        self.log_path = LOGS / f"stack-{engine}-{n}{'' if stack == 'auto' else '-' + stack}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}

    def start(self) -> None:
        LOGS.mkdir(exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=HERE.parent)

    def wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.engine} server exited with {self.process.returncode}: {self.log_tail()}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                self.info = self.get_json("/bench_info")
                return
            time.sleep(0.3)
        raise RuntimeError(f"{self.engine} server not ready within {START_TIMEOUT:.0f} s: {self.log_tail()}")

    def get_json(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2.0) as response:
            return json.loads(response.read())

    def log_tail(self) -> str:
        """The exception line of the server's log if it has one, else its last line."""
        lines = [line.strip() for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b", line)]
        return (errors or lines or ["(empty log)"])[-1]

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Poller:
    """``_stack_poller.py``: polls the port it is pointed at; ``samples()`` ends it."""

    def __init__(self) -> None:
        argv = [sys.executable, str(HERE / "_stack_poller.py")]
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def point_at(self, port: int | None) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{port if port is not None else 'pause'}\n")
        self.process.stdin.flush()

    def samples(self) -> list[tuple[int, float, float]]:
        """``(port, monotonic start, seconds)`` of every poll; ends the poller."""
        out, _ = self.process.communicate("", timeout=60)
        return [(int(port), at, latency) for port, at, latency in json.loads(out)]


def run_client(port: int, n: int, requests: int, new_tokens: int, sse: bool, time_cap: float) -> Measure:
    """One closed loop of the light client against ``port``."""
    argv = [sys.executable, str(HERE / "_stack_client.py"), "--port", str(port), "--clients", str(n)]
    argv += ["--requests", str(requests), "--new-tokens", str(new_tokens), "--time-cap", str(time_cap)]
    argv += ["--sse"] if sse else []
    done = subprocess.run(argv, capture_output=True, text=True, timeout=CLIENT_TIMEOUT, cwd=HERE)
    if done.returncode != 0:
        raise RuntimeError(f"client exited with {done.returncode}: {done.stderr[-600:]}")
    result = json.loads(done.stdout)
    measure = Measure(result["tokens"], result["wall"], result["ttfts"], result["failed"], result["errors"])
    measure.client_cpu, measure.window, measure.chunks = result["cpu"], tuple(result["window"]), result["chunks"]
    return measure


def run_queue_wait(pid: int) -> float:
    """Seconds thread ``pid`` (a process's main thread: uvicorn's event loop) has waited for a core, runnable."""
    try:
        with open(f"/proc/{pid}/schedstat") as stat:  # on-CPU ns, run-queue wait ns, time slices (Linux)
            return int(stat.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return float("nan")


def in_windows(samples: list[tuple[int, float, float]], port: int, windows: list[tuple[float, float]]) -> list[float]:
    """Latencies of the polls of ``port`` that started inside one of ``windows``."""
    return [s for p, at, s in samples if p == port and any(start <= at <= end for start, end in windows)]


class OtherLoad:
    """Cores that processes outside this benchmark used between ``__enter__`` and ``__exit__``."""

    cores = 0.0

    def __enter__(self) -> OtherLoad:
        self.machine, self.ours, self.started = busy_seconds(), our_cpu_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        elapsed = time.perf_counter() - self.started
        machine, ours = busy_seconds() - self.machine, our_cpu_seconds() - self.ours
        self.cores = max(0.0, (machine - ours) / elapsed) if elapsed > 0 else 0.0


def wait_for_quiet(max_wait: float, threshold: float = 0.25) -> float:
    """Wait up to ``max_wait`` s for other processes to leave the CPU; return the cores they still use."""
    deadline = time.monotonic() + max_wait
    while True:
        with OtherLoad() as other:
            time.sleep(0.5)
        if other.cores <= threshold or time.monotonic() >= deadline:
            return other.cores
