"""The engine process: one model, one batch, served to any number of web processes over a Unix socket.

Started by ``ProcessEngine`` as ``python -m chatstream_asgi.engines._engine_server ADDRESS`` with the
engine's spec pickled on stdin (a fresh interpreter: what CUDA needs, and nothing inherited from the
web process). It loads the model, then binds the socket under a temporary name and renames it into
place, so a client that can connect knows the model is loaded. Each connection is a
``ClientConnection`` (``_engine_connection``). The process exits once no client has been connected
for ``linger`` seconds; every web worker that names the same address shares it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import socket
import struct
import sys
import threading
import time
from typing import Any

import torch

from ..errors import EngineNotReady
from ._engine_connection import ClientConnection
from ._wire import spec_identity
from .gc_heap import freeze_startup_heap
from .transformers import TransformersEngine

logger = logging.getLogger("chatstream_asgi.engine")
ACCEPT_POLL = 0.25


class EngineServer:
    """Accepts web processes on ``address`` and serves them from one scheduler until idle for ``linger`` s."""

    def __init__(self, engine: TransformersEngine, address: str, linger: float, serves: str = "") -> None:
        self.engine = engine
        self.serves = serves
        self.address = address
        self.linger = linger
        self.clients: set[ClientConnection] = set()
        self.idle_since = time.monotonic()
        self.stopping = threading.Event()
        self.scheduler = engine.start_scheduler()
        self.socket_inode = -1
        self.load_seconds: float | None = None

    def listen(self) -> socket.socket:
        staging = f"{self.address}.{os.getpid()}.tmp"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(staging)
        os.chmod(staging, 0o600)
        listener.listen(128)
        os.replace(staging, self.address)  # atomic: whoever can connect finds the model loaded
        self.socket_inode = os.stat(self.address).st_ino  # the path's, not the socket's: which path to remove at exit
        listener.settimeout(ACCEPT_POLL)
        return listener

    def run(self) -> None:
        listener = self.listen()
        self.load_seconds = seconds_since_start()  # every web process's Retry-After while this engine restarts
        # The idle clock starts now, not when the model was loaded: freezing the heap in between took 0.2-0.6 s
        # here, and a private engine (0.5 s linger) exited before its web process could connect.
        self.idle_since = time.monotonic()
        logger.info("engine %s serving on %s (pid %d)", self.engine.model_name, self.address, os.getpid())
        try:
            while not self.stopping.is_set() and self.scheduler.alive:
                if not self.clients and time.monotonic() - self.idle_since > self.linger:
                    break
                try:
                    sock, _ = listener.accept()
                except TimeoutError:
                    continue
                self.admit(sock)
        finally:
            self.shutdown(listener)

    def admit(self, sock: socket.socket) -> None:
        if not same_user(sock):
            sock.close()
            return
        sock.settimeout(None)
        client = ClientConnection(sock, self.engine, self.scheduler, self.serves, self.load_seconds)
        self.clients.add(client)
        client.serve(self.client_left)

    def client_left(self, client: ClientConnection) -> None:
        self.clients.discard(client)
        if not self.clients:
            self.idle_since = time.monotonic()

    def shutdown(self, listener: socket.socket) -> None:
        listener.close()
        with contextlib.suppress(OSError):  # gone already, or replaced by a newer engine's socket: not ours to remove
            if os.stat(self.address).st_ino == self.socket_inode:
                os.unlink(self.address)
        self.scheduler.stop()
        self.scheduler.join(30)  # its last flush queues the in-band errors of whatever was running
        for client in list(self.clients):
            client.finish(timeout=5)


def same_user(sock: socket.socket) -> bool:
    """Only processes of this user may talk to the engine (its frames are pickles)."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):  # no SO_PEERCRED (not Linux): the socket's 0600 mode still guards it
        return True
    _, uid, _ = struct.unpack("3i", creds)
    return bool(uid == os.getuid())


def build_engine(spec: dict[str, Any]) -> TransformersEngine:
    """The engine a spec describes: ``from_pretrained`` arguments, or a ``module:function`` factory."""
    if spec.get("factory"):
        import importlib

        module_name, _, function = spec["factory"].partition(":")
        engine = getattr(importlib.import_module(module_name), function)(**spec.get("kwargs", {}))
        if not isinstance(engine, TransformersEngine):
            raise TypeError(f"factory {spec['factory']} returned {type(engine).__name__}, not a TransformersEngine")
        return engine
    return TransformersEngine.from_pretrained(spec["path"], gguf_file=spec.get("gguf_file"), **spec.get("kwargs", {}))


def seconds_since_start() -> float | None:
    """How long ago this process started (interpreter, imports and model load), from ``/proc``; None elsewhere."""
    try:
        with open("/proc/self/stat") as stat:
            started_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime, in clock ticks
        with open("/proc/uptime") as uptime:
            seconds = float(uptime.read().split()[0]) - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    return seconds if seconds > 0 else None  # a container's faked /proc/uptime (lxcfs) can make it negative


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine[%(process)d] %(levelname)s %(message)s")
    address, linger = sys.argv[1], float(sys.argv[2])
    spec = pickle.load(sys.stdin.buffer)
    # the web process's import path after this one's own: a factory's module is found where it found it
    sys.path.extend(folder for folder in spec.pop("sys_path", []) if folder not in sys.path)
    threads = spec.pop("torch_threads", None)
    serves = spec_identity(spec)
    if threads is not None:  # before the model loads: OpenMP sizes its pool at the first parallel region
        torch.set_num_threads(threads)
    engine = build_engine(spec)
    if threads is not None:  # the engine's worker thread too, whatever its own default (a factory built it)
        engine.torch_threads = threads
    server = EngineServer(engine, address, linger, serves)
    freeze_startup_heap("engine process")  # the model is loaded: a full GC would stall every step for ~0.1 s
    # SIGTERM / SIGINT end the serving loop; running replies end with an in-band error, the socket goes away.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: server.stopping.set())
    try:
        server.run()
    except EngineNotReady:
        pass


if __name__ == "__main__":
    main()
