"""The engine process: one model, one batch, served to any number of web processes over a Unix socket.

Started by ``ProcessEngine`` as ``python -m chatstream_asgi.engines._engine_server ADDRESS`` with the
engine's spec pickled on stdin (a fresh interpreter: what CUDA needs, and nothing inherited from the
web process). It loads the model, then binds the socket under a temporary name and renames it into
place, so a client that can connect knows the model is loaded. Each connection has a reader thread
(submits and cancels) and a writer thread (one frame per step), so a slow client never stalls the
model loop. The process exits once no client has been connected for ``linger`` seconds; every web
worker that names the same address shares it.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import signal
import socket
import struct
import sys
import threading
import time
from typing import Any

from ..errors import EngineNotReady
from ._delivery import Event, HoldBack
from ._scheduler import Scheduler
from ._sequence import Sequence
from ._wire import encode, recv_message, wire_event
from .base import SamplingParams
from .transformers import TransformersEngine

logger = logging.getLogger("chatstream_asgi.engine")
ACCEPT_POLL = 0.25


class ClientConnection:
    """One web process: its requests in, its events out (the ``Channel`` of its sequences)."""

    def __init__(self, sock: socket.socket, engine: TransformersEngine, scheduler: Scheduler) -> None:
        self.sock = sock
        self.engine = engine
        self.scheduler = scheduler
        self.closed = False
        self._sequences: dict[int, Sequence] = {}
        self._pending: list[tuple[int, Any]] = []
        self._hold = HoldBack(engine.stream_interval)
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._queued = 0  # frames handed to the writer thread and not yet sent
        self._send_lock = threading.Lock()
        self._writer = threading.Thread(target=self._write_loop, name="engine-writer", daemon=True)

    def serve(self, on_close: Any) -> None:
        self._writer.start()
        threading.Thread(target=self._read_loop, args=(on_close,), name="engine-reader", daemon=True).start()

    def finish(self, timeout: float) -> None:
        """Send what is queued (the errors of a shutdown), then stop writing."""
        self._outbox.put(None)
        self._writer.join(timeout)

    # Channel, called on the scheduler thread
    def post(self, key: Any, event: Event, urgent: bool) -> bool:
        if self.closed:
            return False
        self._pending.append((key, wire_event(event)))
        if not isinstance(event, str):
            self._sequences.pop(key, None)
        self._hold.posted(urgent)
        return True

    def flush(self) -> bool:
        if not self.closed and self._hold.due():
            batch, self._pending = self._pending, []
            self._send(encode(("step", batch)))
        return not self.closed

    def _send(self, frame: bytes) -> None:
        """Write now when nothing is queued and the socket takes it, else leave it to the writer thread.

        A step's frame is small and the socket buffer nearly always has room: sending here saves a thread
        hand-over (and its GIL round trip) per step, while a client that does not read never blocks the model.
        """
        with self._send_lock:
            if self._queued == 0:
                try:
                    sent = self.sock.send(frame, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    sent = len(frame)  # the reader sees the connection end and closes it
                if sent == len(frame):
                    return
                frame = frame[sent:]
            self._queued += 1
            self._outbox.put(frame)

    def send_hello(self) -> None:
        engine = self.engine
        info = {
            "model_name": engine.model_name,
            "max_batch_size": engine.max_batch_size,
            "context_len": engine.context_len,
            "system_prompt": engine.system_prompt,
            "tokenizer": engine.tokenizer,
            "pid": os.getpid(),
        }
        self._send(encode(("hello", info)))

    def _write_loop(self) -> None:
        try:
            while (frame := self._outbox.get()) is not None:
                self.sock.sendall(frame)
                with self._send_lock:
                    self._queued -= 1
        except OSError:
            self._close()

    def _read_loop(self, on_close: Any) -> None:
        try:
            while (message := recv_message(self.sock)) is not None:
                self._handle(message)
        except (OSError, ConnectionError, pickle.UnpicklingError, EOFError):
            pass
        finally:
            self._close()
            on_close(self)

    def _handle(self, message: tuple[Any, ...]) -> None:
        if message[0] == "hello":  # asked for, so that a probe connection costs nothing
            self.send_hello()
        elif message[0] == "submit":
            _, rid, prompt_ids, params = message
            try:
                seq = self.engine.new_sequence(prompt_ids, SamplingParams(**params), self, rid)
                self._sequences[rid] = seq
                self.scheduler.submit(seq)
            except Exception as exc:  # a closed scheduler, bad parameters: that request fails, not the connection
                self._send(encode(("step", [(rid, wire_event(exc))])))
        elif message[0] == "cancel":
            cancelled = self._sequences.pop(message[1], None)
            if cancelled is not None:
                cancelled.cancel()

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for seq in list(self._sequences.values()):
            seq.cancel()  # the web process is gone: stop computing for it at the next step
        self._sequences.clear()
        self._outbox.put(None)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class EngineServer:
    """Accepts web processes on ``address`` and serves them from one scheduler until idle for ``linger`` s."""

    def __init__(self, engine: TransformersEngine, address: str, linger: float) -> None:
        self.engine = engine
        self.address = address
        self.linger = linger
        self.clients: set[ClientConnection] = set()
        self.idle_since = time.monotonic()
        self.stopping = threading.Event()
        self.scheduler = engine.start_scheduler()

    def listen(self) -> socket.socket:
        staging = f"{self.address}.{os.getpid()}.tmp"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(staging)
        os.chmod(staging, 0o600)
        listener.listen(128)
        os.replace(staging, self.address)  # atomic: whoever can connect finds the model loaded
        listener.settimeout(ACCEPT_POLL)
        return listener

    def run(self) -> None:
        listener = self.listen()
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
        client = ClientConnection(sock, self.engine, self.scheduler)
        self.clients.add(client)
        client.serve(self.client_left)

    def client_left(self, client: ClientConnection) -> None:
        self.clients.discard(client)
        if not self.clients:
            self.idle_since = time.monotonic()

    def shutdown(self, listener: socket.socket) -> None:
        listener.close()
        try:
            if os.path.exists(self.address) and os.stat(self.address).st_ino == os.fstat(listener.fileno()).st_ino:
                os.unlink(self.address)
        except (OSError, ValueError):
            pass
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


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine[%(process)d] %(levelname)s %(message)s")
    address, linger = sys.argv[1], float(sys.argv[2])
    spec = pickle.load(sys.stdin.buffer)
    server = EngineServer(build_engine(spec), address, linger)
    # SIGTERM / SIGINT end the serving loop; running replies end with an in-band error, the socket goes away.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: server.stopping.set())
    try:
        server.run()
    except EngineNotReady:
        pass


if __name__ == "__main__":
    main()
