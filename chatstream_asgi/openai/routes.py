"""The OpenAI-compatible routes: ``POST {prefix}/chat/completions`` and ``GET {prefix}/models``.

They are stateless (the client sends the whole conversation; no session cookie) and share the chat
routes' engine, admission and streaming: the same slots and queue, 429/503 with ``Retry-After``, the
same disconnect cancellation. Every error is in OpenAI's shape. The server's ``system_prompt`` is not
added here: an OpenAI client sends its own system message.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from ..engines.base import Engine, GenerationChunk
from ..errors import ConfigurationError, HTTPError
from ..http.asgi import read_body, send_json
from ..http.requests import require_json
from ..http.routes import ChatSettings
from ..http.security import bearer_key, check_keys, key_matches
from ..http.slots import Finish, finish_before_last_byte, queue_headers, wait_for_slot
from ..http.streaming import StreamOptions, as_http_error, stream_reply
from ..http.types import Handler, HTTPReceive, HTTPSend, Scope
from ..ops.admission import Admission, Ticket
from ..ops.metrics import GenerationProbe, Observer, StreamResult
from .limits import MAX_BODY_BYTES, MAX_MESSAGES, PromptLimits
from .responses import OpenAIStreamEncoder, ReplyHeader, completion_id, models_body, usage
from .schema import CompletionRequest, error_body, parse_completion_request

Routes = dict[str, tuple[str, Handler]]
Chunks = AsyncIterator[GenerationChunk]


async def send_openai_error(send: HTTPSend, error: HTTPError, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in error.headers.items()]
    await send_json(send, error.status, error_body(error), [*extra, *(headers or [])])


def openai_route_table(
    routes: OpenAIRoutes, prefix: str | None, api_keys: str | Sequence[str] | None, taken: Routes
) -> Routes:
    """The OpenAI routes under ``prefix`` (none when it is None), checked against the routes already ``taken``."""
    if prefix is None:
        if api_keys is not None:
            raise ConfigurationError(
                "api_keys protects the OpenAI routes; set openai_prefix (e.g. '/v1') too, or openai=OpenAIConfig()"
            )
        return {}
    table: Routes = {
        f"{prefix}/chat/completions": ("POST", routes.guarded(routes.chat_completions)),
        f"{prefix}/models": ("GET", routes.guarded(routes.models)),
    }
    clash = sorted(set(table) & set(taken))
    if clash:
        raise ConfigurationError(f"the OpenAI routes {clash} clash with the chat routes; change openai_prefix")
    return table


class CollectingEncoder:
    """Writes nothing: a non-streaming reply is built from the ``StreamResult`` once generation is over."""

    content_type = b"application/json"
    ping_interval: float | None = None

    def delta(self, text: str) -> bytes:
        return b""

    def done(self, summary: dict[str, Any]) -> bytes:
        return b""

    def error(self, error_type: str, message: str) -> bytes:
        return b""

    def ping(self) -> bytes:
        return b""


async def discard(message: Any) -> None:
    return None


class OpenAIRoutes:
    """The OpenAI-compatible handlers, sharing the middleware's engine, admission and settings.

    Args:
        engine: the engine that generates; its ``model_name`` is the served model.
        admission: the middleware's ``Admission`` (the chat routes use the same slots and queue).
        settings: the middleware's limits and timeouts.
        api_keys: Bearer keys accepted on these routes; None accepts any request.
        max_body_bytes: larger bodies get 413 (a whole conversation is sent each time, so more than the chat routes').
        max_messages: the most messages one request may send (400 beyond).
    """

    def __init__(
        self,
        engine: Engine,
        admission: Admission,
        settings: ChatSettings,
        api_keys: str | Sequence[str] | None = None,
        *,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_messages: int = MAX_MESSAGES,
    ) -> None:
        self.engine = engine
        self.admission = admission
        self.settings = settings
        self.api_keys = check_keys(api_keys)
        self.max_body_bytes = max_body_bytes
        self.limits = PromptLimits(
            engine,
            max_messages=max_messages,
            max_input_chars=settings.max_input_chars,
            max_input_tokens=settings.max_input_tokens,
        )
        self.created = int(time.time())
        self.observer = Observer()  # the middleware puts its own here

    def guarded(self, handler: Handler) -> Handler:
        """``handler`` behind the API key check. What it raises, the middleware counts and sends in OpenAI's shape
        (these paths are its ``openai_paths``), as it does for the 405 of a wrong method."""

        async def guarded_handler(scope: Scope, receive: HTTPReceive, send: HTTPSend) -> None:
            self.check_api_key(scope)
            await handler(scope, receive, send)

        return guarded_handler

    def check_api_key(self, scope: Scope) -> None:
        if not self.api_keys:
            return
        given = bearer_key(scope)
        if given is None or not key_matches(given, self.api_keys):
            error = HTTPError(401, "invalid_api_key", "missing or wrong API key; send 'Authorization: Bearer <key>'")
            error.headers["WWW-Authenticate"] = "Bearer"
            raise error

    async def models(self, scope: Scope, receive: HTTPReceive, send: HTTPSend) -> None:
        await send_json(send, 200, models_body(self.engine.model_name, self.created))

    async def chat_completions(self, scope: Scope, receive: HTTPReceive, send: HTTPSend) -> None:
        require_json(scope)
        s = self.settings
        body = await read_body(scope, receive, self.max_body_bytes)
        request = parse_completion_request(body, s.default_params, s.max_new_tokens_limit)
        request = await self.limits.check(request)
        ticket = self.admission.try_enter()
        try:
            if not await wait_for_slot(ticket, receive):
                self.observer.left_queue()
                return
            reply = ReplyHeader(completion_id(), int(time.time()), self.engine.model_name)
            probe = self.observer.start("chat_completions", reply.id, ticket.queue_wait)
            headers = [(b"x-request-id", reply.id.encode()), *queue_headers(ticket.position)]
            chunks = finish_before_last_byte(self.engine.stream(request.messages, request.params), released(ticket))
            if request.stream:
                await self.stream(send, receive, chunks, request, reply, headers, probe)
            else:
                await self.complete(send, receive, chunks, reply, headers, probe)
        finally:
            ticket.release()

    async def stream(
        self,
        send: HTTPSend,
        receive: HTTPReceive,
        chunks: Chunks,
        request: CompletionRequest,
        reply: ReplyHeader,
        headers: list[tuple[bytes, bytes]],
        probe: GenerationProbe | None = None,
    ) -> StreamResult:
        encoder = OpenAIStreamEncoder(reply, request.include_usage, self.settings.ping_interval)
        options = self.stream_options(headers)
        options.send_error = send_openai_error
        if probe is not None:
            options.on_token, options.on_end = probe.on_token, probe.done
        return await stream_reply(send, receive, chunks, encoder, options)

    async def complete(
        self,
        send: HTTPSend,
        receive: HTTPReceive,
        chunks: Chunks,
        reply: ReplyHeader,
        headers: list[tuple[bytes, bytes]],
        probe: GenerationProbe | None = None,
    ) -> None:
        options = self.stream_options([])
        if probe is not None:
            options.on_token, options.on_end = probe.on_token, probe.done
        result = await collect_reply(receive, chunks, options)
        if result.outcome == "disconnected":
            return
        if result.outcome == "timeout":
            raise HTTPError(504, "generation_timeout", "the reply took longer than the generation deadline")
        if result.outcome == "error":
            raise as_http_error(result.error or RuntimeError("generation failed"))
        finish_reason = result.finish_reason or "stop"
        counts = usage(result.prompt_tokens, result.completion_tokens, result.cached_tokens)
        body = reply.completion(result.text, finish_reason, counts)
        await send_json(send, 200, body, headers)

    def stream_options(self, headers: list[tuple[bytes, bytes]]) -> StreamOptions:
        timeout = self.settings.generation_timeout
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        send_timeout, running = self.settings.send_timeout, self.observer.running
        return StreamOptions(headers=headers, send_timeout=send_timeout, deadline=deadline, running=running)


def released(ticket: Ticket) -> Finish:
    """Free the slot the moment the engine is done, before the last byte: a client that has the whole reply and
    sends its next request at once must find the slot free."""

    async def release(reply: str) -> None:
        ticket.release()

    return release


async def collect_reply(receive: HTTPReceive, chunks: Chunks, options: StreamOptions) -> StreamResult:
    """The whole reply, gathered while a disconnect still cancels the generation (``stream_reply`` sending nothing)."""
    options.send_timeout = None
    return await stream_reply(discard, receive, chunks, CollectingEncoder(), options)
