"""What crosses the boundary between web processes and an engine process: framed, pickled batches.

A frame is a 4-byte big-endian length and a pickle. Pickle (protocol 5) of plain lists and tuples is the
cheapest serialisation the standard library has for what goes through here (a step's events, a few
microseconds per stream), and the peer is trusted by construction: the socket lives in a folder only its
user can enter and the server checks the peer's uid (``SO_PEERCRED``) before it reads anything.

Client to engine: ``("submit", rid, prompt_ids, params)``, ``("cancel", rid)``.
Engine to client: ``("hello", info)`` once, then one ``("step", {rid: [event, ...]}, cache)`` per step (or
stream interval). The events come grouped by request, each request's in order: grouping them as the engine
posts them costs it nothing more, and spares the web process a pass over every id of the frame. An event
is an ``int`` (a generated token id: the web process detokenizes), ``("first", token id, cached_tokens)``
for a reply's first token, ``("end", text, reason, prompt_tokens, completion_tokens, cached_tokens)`` or
``("error", message)``, and ``cache`` is the prefix cache's ``PrefixCacheStats`` fields when they changed
since the last frame, else None.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import re
import socket
import struct
from dataclasses import astuple
from typing import Any

from ._delivery import FirstToken
from .base import GenerationChunk

HEADER = struct.Struct("!I")
#: bumped whenever a message changes shape: a web process never talks to an engine of another version
WIRE_VERSION = 5
MAX_FRAME = 1 << 30


def spec_identity(spec: dict[str, Any]) -> str:
    """What an engine process serves, comparable between the web processes that share its address: the model and
    its arguments (not ``torch_threads`` or the import path, which do not change what it answers)."""
    path = spec.get("path")
    if isinstance(path, str) and os.path.exists(path):
        path = os.path.realpath(path)  # "./model" from one worker's folder, "/srv/model" from another's
    kwargs = spec.get("kwargs") or {}
    described = repr((spec.get("factory"), path, spec.get("gguf_file"), sorted(kwargs.items(), key=lambda kv: kv[0])))
    return re.sub(r" at 0x[0-9a-fA-F]+", "", described)  # an object's address differs from process to process


def encode(message: Any) -> bytes:
    payload = pickle.dumps(message, protocol=5)
    return HEADER.pack(len(payload)) + payload


def recv_message(sock: socket.socket) -> Any:
    """One message from a blocking socket; ``None`` at a clean end of stream."""
    header = _recv_exactly(sock, HEADER.size)
    if header is None:
        return None
    (size,) = HEADER.unpack(header)
    if size > MAX_FRAME:  # checked before reading: it would be held in memory whole
        raise ConnectionError("the peer sent an oversized frame")
    payload = _recv_exactly(sock, size)
    if payload is None:
        raise ConnectionError("the peer sent a truncated frame")
    return pickle.loads(payload)


def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            if left == size:
                return None
            raise ConnectionError("the peer closed the connection inside a frame")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


async def read_message(reader: asyncio.StreamReader) -> Any:
    """One message from an asyncio stream; raises ``asyncio.IncompleteReadError`` at the end."""
    (size,) = HEADER.unpack(await reader.readexactly(HEADER.size))
    if size > MAX_FRAME:
        raise ConnectionError("the engine sent an oversized frame")
    return pickle.loads(await reader.readexactly(size))


def wire_event(event: Any) -> Any:
    """An engine event (token id, text, ``GenerationChunk`` or exception) as plain values and tuples."""
    if isinstance(event, (int, str)):
        return event
    if isinstance(event, FirstToken):
        return ("first", *event)
    if isinstance(event, GenerationChunk):
        return ("end", *astuple(event))
    return ("error", f"{event}")


def local_event(event: Any) -> int | str | GenerationChunk | FirstToken | tuple[str, str]:
    """The inverse of ``wire_event`` for ids, text and ends; an error stays ``("error", message)``."""
    if isinstance(event, (int, str)) or event[0] == "error":
        return event  # type: ignore[no-any-return]
    if event[0] == "first":
        return FirstToken(event[1], event[2])
    return GenerationChunk(*event[1:])


def step_frame(
    batch: dict[int, list[Any]], cache: tuple[int, ...] | None = None, load: tuple[int, ...] | None = None
) -> bytes:
    """One step's events (maybe none), the prefix cache's figures when they changed, and the batch's (``stats``)."""
    return encode(("step", batch, cache, load))
