"""Starting the engine process once per address, however many web processes ask at the same time.

Every web worker that names one address races to start its engine; an exclusive ``flock`` on
``ADDRESS.lock`` picks one, which starts ``_engine_server`` in a new session (it outlives that
worker, serves all of them, and is not hit by the Ctrl-C meant for the web server) and holds the lock
until the socket appears or the process dies. The others keep trying to connect meanwhile.

The engine process imports what the web process imported: this ``chatstream_asgi`` (a checkout on
``sys.path`` that pip never installed, say) and a factory's module from wherever the web process found it
(uvicorn's ``--app-dir``, a ``sys.path.insert``), as ``multiprocessing``'s spawn does with the parent's path.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pickle
import site
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

from ..errors import EngineError

POLL = 0.05
ENGINE_MODULE = "chatstream_asgi.engines._engine_server"  # what an engine process runs (python -m ...)


class Launcher:
    """Starts (and reaps) the engine process for ``address`` from ``spec``."""

    def __init__(self, spec: dict[str, Any], address: str, linger: float, start_timeout: float) -> None:
        self.spec = spec
        self.address = address
        self.linger = linger
        self.start_timeout = start_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.load_seconds = 10.0  # how long the last start took: the Retry-After of a restart

    def ensure_started(self) -> None:
        """Blocking: return once something serves ``address`` (started here or by another process)."""
        os.makedirs(os.path.dirname(self.address) or ".", mode=0o700, exist_ok=True)
        with self._start_lock() as ours:
            if not ours or serving(self.address):
                return  # another process is starting it, or it is up: the caller just connects
            self._start()

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the process started here, if any (a shared engine otherwise exits when idle)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _start(self) -> None:
        if self.process is not None:
            self.process.wait()  # the dead engine started here: reap it before starting the next
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.address)  # a dead engine's socket
        started = time.monotonic()
        command = [sys.executable, "-m", ENGINE_MODULE, self.address, str(self.linger)]
        process = subprocess.Popen(command, stdin=subprocess.PIPE, start_new_session=True, env=engine_environment())
        assert process.stdin is not None
        process.stdin.write(pickle.dumps({**self.spec, "sys_path": list(sys.path)}))
        process.stdin.close()
        self.process = process
        while not serving(self.address):
            if process.poll() is not None:
                raise EngineError(
                    f"The engine process exited with code {process.returncode} before serving "
                    f"(its log is above); check the model arguments: {self.spec}"
                )
            if time.monotonic() - started > self.start_timeout:
                self.stop()
                raise EngineError(f"The engine process did not serve within start_timeout={self.start_timeout} s")
            time.sleep(POLL)
        self.load_seconds = time.monotonic() - started

    @contextlib.contextmanager
    def _start_lock(self) -> Iterator[bool]:
        with open(f"{self.address}.lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def engine_environment() -> dict[str, str]:
    """This environment, with ``PYTHONPATH`` led by the folder this ``chatstream_asgi`` was imported from.

    A site-packages folder is left out: every interpreter has it already, and ahead of the standard library
    it could shadow a standard module with a stale backport installed there.
    """
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    site_folders = {os.path.abspath(folder) for folder in [*site.getsitepackages(), site.getusersitepackages()]}
    if root not in site_folders:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


def serving(address: str) -> bool:
    """True when a process accepts connections on ``address``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(address)
        return True
    except OSError:
        return False
    finally:
        probe.close()
