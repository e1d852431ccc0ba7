"""The engine process's serving loop, run in this process: when its idle clock starts."""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from typing import Any

from chatstream_asgi.engines._engine_server import EngineServer
from chatstream_asgi.engines._wire import encode, recv_message
from chatstream_asgi.engines.transformers import TransformersEngine


def test_a_slow_start_leaves_the_whole_linger_for_the_first_connection(tiny_engine_parts: tuple[Any, Any]) -> None:
    # Between building the engine and listening, the engine process freezes its heap (0.2-0.6 s measured on a
    # busy machine); a private engine lingers 0.5 s. The idle clock must start when the socket is up.
    model, tokenizer = tiny_engine_parts
    with tempfile.TemporaryDirectory(prefix="cs-") as folder:
        address = os.path.join(folder, "engine.sock")
        server = EngineServer(TransformersEngine(model, tokenizer, max_batch_size=2), address, linger=0.3)
        time.sleep(0.6)  # the slow start: longer than the linger
        serving = threading.Thread(target=server.run, daemon=True)
        serving.start()
        deadline = time.monotonic() + 10
        while not os.path.exists(address):
            assert time.monotonic() < deadline, "the engine never bound its socket"
            time.sleep(0.005)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(10)
            client.connect(address)
            client.sendall(encode(("hello",)))
            kind, info = recv_message(client)
        assert kind == "hello" and info["max_batch_size"] == 2
        serving.join(10)  # with its one client gone, it exits after the linger
        assert not serving.is_alive()
