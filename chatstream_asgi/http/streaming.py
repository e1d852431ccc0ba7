"""Streaming a reply to the client: the send loop that races a disconnect (the wire formats are in encoders.py).

Deliberate choices, in the manner of sse-starlette:
- The response starts with the first chunk, not before: an error raised before any text (a prompt
  that cannot fit, an engine failure) still gets a proper status and JSON body, never ``200``
  followed by an in-stream error. Admission is decided even earlier, in the route.
- After the start, errors go in-band (an SSE ``error`` event or a final plain-text line).
- A sibling task listens for ``http.disconnect`` because uvicorn's ``send`` does not raise after the
  client leaves; whichever ends first cancels the other, which closes the engine stream.
- A client that stops reading is treated as gone after ``send_timeout`` (back-pressure).
- A ``send`` that raises ``OSError`` (what ASGI 2.4 servers do once the client is gone) is a disconnect,
  not an engine error: the reply is kept as far as it was sent.
- SSE sends a comment ping while the model is silent so proxies keep the connection open; a ping
  starts the response, so an SSE error after ``ping_interval`` of silence goes in-band too.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ..engines.base import GenerationChunk, live_counts
from ..errors import ChatStreamError, HTTPError
from ..ops.metrics import StreamDrained, StreamResult
from .asgi import listen_for_disconnect, send_error
from .encoders import StreamEncoder
from .send_watchdog import SendWatchdog
from .types import HTTPReceive, HTTPSend, HTTPSendEvent, response_body, response_start

STREAM_HEADERS = [(b"cache-control", b"no-store"), (b"x-accel-buffering", b"no")]
ErrorSender = Callable[[HTTPSend, HTTPError, list[tuple[bytes, bytes]] | None], Awaitable[None]]


@dataclass
class StreamOptions:
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    send_timeout: float | None = 30.0
    deadline: float | None = None  # loop.time() after which the generation is cut
    summary: dict[str, Any] = field(default_factory=dict)  # extra fields for the ``done`` event
    send_error: ErrorSender = send_error  # how an error before the first byte is answered (OpenAI routes: their shape)
    on_token: Callable[[], None] | None = None  # per text chunk: metrics, and a drain that ends streams may raise
    # once, however the reply ended (also when the server cancels the request): metrics and the request log
    on_end: Callable[[StreamResult], object] | None = None
    # where the sender puts its "end now" while it runs: a drain past its grace calls them all (Observer.running), so
    # that a stream waiting on a silent engine ends too, not only one that gets a token
    running: set[Callable[[], None]] | None = None


async def stream_reply(
    send: HTTPSend,
    receive: HTTPReceive,
    chunks: AsyncIterator[GenerationChunk],
    encoder: StreamEncoder,
    options: StreamOptions,
) -> StreamResult:
    """Stream ``chunks`` to the client until done, failed, timed out, disconnected or cancelled."""
    result = StreamResult()
    sender = ReplySender(send, encoder, options, result)
    counting: list[Any] = []  # the engine's live counts object, if it announces one (engines.base.live_counts)
    asked = live_counts.set(counting)
    try:
        producer = asyncio.create_task(sender.run(chunks))  # the task copies the context, and the list with it
    finally:
        live_counts.reset(asked)
    listener = asyncio.create_task(listen_for_disconnect(receive))
    cancelled = False
    try:
        await asyncio.wait({producer, listener}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server cancelled this request: a shutdown past its graceful timeout
        cancelled = True
        raise
    finally:
        listener.cancel()
        if not producer.done():
            result.outcome = "cancelled" if cancelled else "disconnected"
            producer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await producer
        with contextlib.suppress(asyncio.CancelledError):
            await listener
        if result.finish_reason is None and counting:  # cut short: the counts as far as the engine got
            take_counts(result, counting[-1])
        if options.on_end is not None:
            options.on_end(result)
    return result


def take_counts(result: StreamResult, counts: Any) -> None:
    """``result``'s token counts from an engine's live ones (a reply cut before, or between, its chunks)."""
    result.prompt_tokens = counts.prompt_tokens
    result.completion_tokens = max(result.completion_tokens, counts.completion_tokens)
    result.cached_tokens = counts.cached_tokens


class ClientGone(ChatStreamError):
    """``send`` raised an ``OSError``: ASGI 2.4 servers do that once the client has disconnected."""


class ClientTooSlow(ClientGone):
    """The client did not accept a chunk within ``send_timeout``."""


class ReplySender:
    """Pulls chunks from the engine and writes them to the client; one instance per request."""

    def __init__(self, send: HTTPSend, encoder: StreamEncoder, options: StreamOptions, result: StreamResult) -> None:
        self.send = send
        self.encoder = encoder
        self.options = options
        self.result = result
        self.started_at = time.perf_counter()
        self.last_write = asyncio.get_running_loop().time()
        self.send_lock: asyncio.Lock | None = None  # only where a keep-alive ping may send beside the chunks
        self.watchdog = SendWatchdog(options.send_timeout)
        self.timeout: asyncio.Timeout | None = None  # the deadline around the reply, while it runs
        self.drained = False  # a drain past its grace ended it (through the deadline)

    async def run(self, chunks: AsyncIterator[GenerationChunk]) -> None:
        try:
            await self.pump(chunks)
        except ClientGone:
            self.result.outcome = "disconnected"
        except TimeoutError:
            if self.drained:
                self.result.outcome, self.result.error = "error", StreamDrained()
                await self.fail(StreamDrained())
            else:
                self.result.outcome = "timeout"
                message = "the reply took longer than the generation deadline"
                await self.fail(HTTPError(504, "generation_timeout", message))
        except Exception as exc:  # an engine failure must end the stream cleanly, not crash the server
            self.result.outcome, self.result.error = "error", exc
            await self.fail(as_http_error(exc))
        finally:
            self.watchdog.close()

    async def pump(self, chunks: AsyncIterator[GenerationChunk]) -> None:
        # One await per chunk, straight on the engine's iterator: no task or wait per chunk (on a fast model the
        # loop wakes once per chunk per stream, and those were two thirds of this loop's cost). The deadline is one
        # timeout around the whole reply; it cancels at the next await, and check_deadline covers an engine that
        # always has a chunk ready. A cancel (deadline, disconnect) lands in the engine's iterator and closes it.
        iterator = aiter(chunks)
        keep_alive = self.start_keep_alive()
        running = self.options.running
        try:
            async with asyncio.timeout_at(self.options.deadline) as self.timeout:
                if running is not None:
                    running.add(self.end_now)
                async for chunk in iterator:
                    self.check_deadline()
                    await self.on_chunk(chunk)
        finally:
            if running is not None:
                running.discard(self.end_now)
            if keep_alive is not None:
                keep_alive.cancel()
                await asyncio.wait({keep_alive})  # no ping after this point, and none holds the send lock
            closer = getattr(iterator, "aclose", None)
            if closer is not None:
                await closer()
        await self.finish()

    def end_now(self) -> None:
        """End the reply at once with the in-band ``draining`` error, whatever it waits for (its deadline, moved);
        nothing if its deadline already fired (it is ending: a Timeout that expires cannot be moved)."""
        if self.timeout is not None and not self.drained and not self.timeout.expired():
            self.drained = True
            self.timeout.reschedule(asyncio.get_running_loop().time())

    def start_keep_alive(self) -> asyncio.Task[None] | None:
        if self.encoder.ping_interval is None:
            return None
        self.send_lock = asyncio.Lock()  # a ping and a chunk must not interleave their sends
        return asyncio.create_task(self.keep_alive(self.encoder.ping_interval, asyncio.current_task()))

    async def keep_alive(self, interval: float, producer: asyncio.Task[Any] | None) -> None:
        """Ping after ``interval`` without a write, so that proxies keep a silent stream open."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                await asyncio.sleep(max(0.0, self.last_write + interval - loop.time()))
                if loop.time() - self.last_write >= interval:
                    await self.start()
                    await self.write(self.encoder.ping())
        except ClientGone:  # the ping found the client gone: end the reply as a disconnect
            self.result.outcome = "disconnected"
            if producer is not None:
                producer.cancel()

    def remaining(self) -> float | None:
        deadline = self.options.deadline
        return None if deadline is None else deadline - asyncio.get_running_loop().time()

    def check_deadline(self) -> None:
        remaining = self.remaining()
        if remaining is not None and remaining <= 0:
            raise TimeoutError

    async def on_chunk(self, chunk: GenerationChunk) -> None:
        # counts so far, where an engine puts them on its chunks (the mock, an upstream): a cut reply keeps them
        if chunk.finish_reason is not None or chunk.completion_tokens:
            self.result.prompt_tokens = chunk.prompt_tokens
            self.result.completion_tokens = chunk.completion_tokens
            self.result.cached_tokens = chunk.cached_tokens
        if chunk.text:
            if self.options.on_token is not None:
                self.options.on_token()
            await self.start()
            if self.result.time_to_first_token is None:
                self.result.time_to_first_token = time.perf_counter() - self.started_at
            await self.write(self.encoder.delta(chunk.text))
            self.result.parts.append(chunk.text)
        if chunk.finish_reason is not None:
            self.result.finish_reason = chunk.finish_reason

    async def finish(self) -> None:
        await self.start()
        await self.write(self.encoder.done(self.summary()), more_body=False)

    def summary(self) -> dict[str, Any]:
        r = self.result
        return {
            "finish_reason": r.finish_reason,
            "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.completion_tokens,
            "cached_tokens": r.cached_tokens,
            "time_to_first_token_s": r.time_to_first_token,
            "duration_s": time.perf_counter() - self.started_at,
            **self.options.summary,
        }

    async def fail(self, error: HTTPError) -> None:
        with contextlib.suppress(ClientGone, OSError):
            if not self.result.started:
                self.result.started = True
                await self.options.send_error(self.send, error, self.options.headers)
                return
            await self.write(self.encoder.error(error.error_type, error.message), more_body=False)

    async def start(self) -> None:
        if self.result.started:
            return
        self.result.started = True
        headers = [(b"content-type", self.encoder.content_type), *STREAM_HEADERS, *self.options.headers]
        await self.timed_send(response_start(200, headers))

    async def write(self, body: bytes, more_body: bool = True) -> None:
        if body or not more_body:
            await self.timed_send(response_body(body, more_body))

    async def timed_send(self, message: HTTPSendEvent) -> None:
        if self.send_lock is None:
            await self.send_within_timeout(message)
        else:
            async with self.send_lock:
                await self.send_within_timeout(message)
        self.last_write = asyncio.get_running_loop().time()

    async def send_within_timeout(self, message: HTTPSendEvent) -> None:
        # Not wait_for: on 3.11 it swallows a cancel that lands as the send completes, and the stream would go
        # on to its end after the client (or a Stop) had ended it. Not asyncio.timeout: see send_watchdog.py.
        watchdog = self.watchdog
        watchdog.begin()
        try:
            await self.send(message)
        except asyncio.CancelledError:
            if watchdog.expired():
                raise ClientTooSlow("the client stopped reading") from None
            raise
        except OSError as exc:
            raise ClientGone("the client disconnected") from exc
        finally:
            watchdog.end()


def as_http_error(exc: BaseException) -> HTTPError:
    """Map an exception raised by an engine to the error the client sees."""
    if isinstance(exc, HTTPError):
        return exc
    status = getattr(exc, "status", None)
    if isinstance(status, int) and 400 <= status < 600:
        headers = getattr(exc, "headers", None)  # e.g. an upstream's Retry-After
        error_type = getattr(exc, "error_type", "generation_error")
        return HTTPError(status, error_type, str(exc), headers if isinstance(headers, dict) else None)
    return HTTPError(500, "generation_error", f"generation failed: {type(exc).__name__}: {exc}")
