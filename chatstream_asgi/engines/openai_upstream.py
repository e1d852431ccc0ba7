"""OpenAIUpstreamEngine: generate on any OpenAI-compatible server (vLLM, TGI, Ollama, another chatstream_asgi).

The middleware keeps sessions, history, admission and streaming to the browser; each reply is one streamed
``POST {base_url}/chat/completions`` upstream. Closing the engine's stream closes that HTTP response, and
an unread streaming response is never put back in httpx's pool: the connection closes, so the upstream
sees the disconnect and frees its slot. Upstream failures become ``UpstreamError`` with an HTTP ``status``
(502 bad answer or refused connection, 503 overloaded, 504 timeout; the mapping is in ``_upstream_errors``):
before the first token the client gets that status and a JSON error, after it an in-band error.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError
from ._upstream_errors import MAX_ERROR_BODY, UpstreamError, check_response, json_error_message, protocol_error
from .base import ChatMessage, FinishReason, GenerationChunk, SamplingParams

if TYPE_CHECKING:
    import httpx

DEFAULT_TIMEOUT = 60.0
AFTER_FINISH_WAIT = 2.0  # seconds the usage chunk and [DONE] may take once a reply has its finish_reason

__all__ = ["OpenAIUpstreamEngine", "UpstreamError"]


def import_httpx() -> Any:
    try:
        import httpx
    except ImportError as exc:
        raise ImportError("OpenAIUpstreamEngine needs httpx: pip install 'chatstream-asgi[upstream]'") from exc
    return httpx


class OpenAIUpstreamEngine:
    """An engine that streams replies from an OpenAI-compatible ``/chat/completions`` server.

    Args:
        base_url: the API root, e.g. ``"http://127.0.0.1:8001/v1"``.
        model: the model name the upstream serves (``--served-model-name`` in vLLM).
        api_key: sent as ``Authorization: Bearer <api_key>``.
        timeout: seconds to connect, and the longest silence allowed between two upstream bytes.
        max_batch_size: upstream requests at once (set the middleware's ``max_concurrency`` to it).
        model_name: the name served to our clients; default ``model``.
        sampling_extensions: also send ``top_k``, ``repetition_penalty`` and ``ignore_eos`` (vLLM and
            chatstream_asgi accept them; OpenAI itself rejects them).
        extra_body: more fields for every upstream request body.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_batch_size: int = 64,
        model_name: str | None = None,
        sampling_extensions: bool = False,
        extra_body: Mapping[str, Any] | None = None,
    ) -> None:
        import_httpx()
        if not base_url.startswith(("http://", "https://")):
            raise ConfigurationError(
                f"base_url must be an http(s) URL such as 'http://127.0.0.1:8001/v1'; got {base_url!r}"
            )
        if not timeout > 0 or max_batch_size < 1:
            raise ConfigurationError("timeout must be > 0 seconds and max_batch_size >= 1")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.model_name = model_name or model
        self.api_key = api_key
        self.timeout = timeout
        self.max_batch_size = max_batch_size
        self.sampling_extensions = sampling_extensions
        self.extra_body = dict(extra_body or {})
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        if self._client is None:
            httpx = import_httpx()
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._client = httpx.AsyncClient(
                base_url=self.base_url + "/",
                headers=headers,
                timeout=httpx.Timeout(self.timeout),
                limits=httpx.Limits(max_connections=self.max_batch_size, max_keepalive_connections=self.max_batch_size),
            )

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    @property
    def ready(self) -> bool:
        return self._client is not None

    def render_prompt(self, messages: Sequence[ChatMessage], params: SamplingParams) -> str:
        """A readable rendering: the upstream applies its own chat template, which is not visible from here."""
        turns = [f"[{m['role']}]\n{m['content']}" for m in messages]
        return "\n\n".join([f"(sent to {self.model} at {self.base_url})", *turns, "[assistant]\n"])

    def request_body(self, messages: Sequence[ChatMessage], params: SamplingParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        if self.sampling_extensions:
            extensions = {"top_k": params.top_k, "repetition_penalty": params.repetition_penalty}
            body.update(extensions, ignore_eos=params.ignore_eos)
        return {**body, **self.extra_body}

    async def stream(self, messages: Sequence[ChatMessage], params: SamplingParams) -> AsyncIterator[GenerationChunk]:
        httpx = import_httpx()
        await self.start()
        assert self._client is not None
        body = self.request_body(messages, params)
        try:
            async with self._client.stream("POST", "chat/completions", json=body) as response:
                await check_response(response)
                async for chunk in read_chunks(response):
                    yield chunk
        except httpx.TimeoutException as exc:
            message = f"the upstream at {self.base_url} sent nothing for {self.timeout} s ({type(exc).__name__})"
            raise UpstreamError(message, status=504, error_type="upstream_timeout") from exc
        except httpx.ConnectError as exc:
            message = f"cannot connect to the upstream at {self.base_url}: {exc}; is it running?"
            raise UpstreamError(message, error_type="upstream_unreachable") from exc
        except httpx.TransportError as exc:
            message = f"the connection to the upstream at {self.base_url} failed: {type(exc).__name__}: {exc}"
            raise UpstreamError(message, error_type="upstream_disconnected") from exc
        except httpx.DecodingError as exc:  # a body its Content-Encoding does not describe (not a TransportError)
            raise protocol_error(f"the answer does not decode: {exc}") from exc


async def read_chunks(response: httpx.Response) -> AsyncIterator[GenerationChunk]:
    """Text deltas from the upstream's ``chat.completion.chunk`` events, then one chunk with the finish and usage.

    Once the finish has come, the usage chunk and ``[DONE]`` get ``AFTER_FINISH_WAIT`` seconds: an upstream that
    holds the connection open after them left a complete reply waiting for the whole timeout, then failing.
    """
    finish_reason: FinishReason | None = None
    counts: dict[str, int] = {}
    sent = 0
    events = aiter(sse_data(sse_lines(response.aiter_bytes())))
    while True:
        try:
            async with asyncio.timeout(None if finish_reason is None else AFTER_FINISH_WAIT):
                payload = await anext(events)
        except (StopAsyncIteration, TimeoutError):  # the end, or a finished reply whose stream stays open
            break
        if payload == "[DONE]":
            break
        text, reason, usage = parse_chunk(payload)
        if text:
            sent += 1
            # the chunks so far stand for the completion tokens until the usage comes (a cut reply keeps them)
            yield GenerationChunk(text, None, 0, sent)
        finish_reason = reason or finish_reason
        counts = usage or counts
    if finish_reason is None:
        raise protocol_error("the stream ended before a finish_reason")
    prompt_tokens, completion_tokens = counts.get("prompt_tokens", 0), counts.get("completion_tokens", sent)
    yield GenerationChunk("", finish_reason, prompt_tokens, completion_tokens, counts.get("cached_tokens", 0))


async def sse_lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """The lines of an event stream, which end at CR LF, LF or CR only.

    Not httpx's ``aiter_lines``: it splits text as ``str.splitlines`` does, at U+2028, U+2029 and U+0085 too, which
    a JSON encoder may leave raw inside a string (ours and vLLM's do), and the event was cut in two.
    """
    pending = b""
    async for chunk in chunks:
        lines = (pending + chunk).splitlines(keepends=True)  # bytes split at CR and LF only
        pending = lines.pop() if lines and not lines[-1].endswith((b"\n", b"\r")) else b""
        for line in lines:
            yield line.rstrip(b"\r\n").decode("utf-8", errors="replace")
    if pending:
        yield pending.decode("utf-8", errors="replace")


async def sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """Each event's data, its ``data:`` lines joined with newlines (as the SSE spec says); comments, ``event:`` and
    ``id:`` fields skipped. A stream may start with a byte order mark, which is not part of its first field."""
    data: list[str] = []
    first = True
    async for line in lines:
        if first:
            line, first = line.removeprefix("\ufeff"), False
        if not line:  # an event ends at a blank line
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            data.append(line[len("data:") :].removeprefix(" "))
    if data:  # the last event, if the stream ended without its blank line
        yield "\n".join(data)


def parse_chunk(payload: str) -> tuple[str, FinishReason | None, dict[str, int] | None]:
    """``(text, finish_reason, usage)`` of one event; an in-band upstream error raises ``UpstreamError``."""
    try:
        data = json.loads(payload)
    except ValueError:
        raise protocol_error(f"an event is not JSON: {payload[:200]!r}") from None
    if not isinstance(data, dict):
        raise protocol_error(f"an event is not a JSON object: {payload[:200]!r}")
    if data.get("error"):
        raise UpstreamError(f"the upstream failed mid-reply: {json_error_message(payload) or payload[:MAX_ERROR_BODY]}")
    choices = data.get("choices")
    if choices is None and isinstance(data.get("usage"), dict):
        choices = []  # a usage-only chunk that says "choices": null rather than []
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise protocol_error(f"an event has no 'choices' list: {payload[:200]!r}")
    raw_usage = data.get("usage")
    usage = {str(k): v for k, v in raw_usage.items() if isinstance(v, int)} if isinstance(raw_usage, dict) else None
    details = raw_usage.get("prompt_tokens_details") if isinstance(raw_usage, dict) else None
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    if usage is not None and isinstance(cached, int):  # what the upstream's prefix cache supplied (vLLM, OpenAI)
        usage["cached_tokens"] = cached
    text = ""
    reason: FinishReason | None = None
    for choice in choices:
        delta = choice.get("delta")
        content = delta.get("content") if isinstance(delta, dict) else None
        text += content if isinstance(content, str) else ""
        if choice.get("finish_reason"):
            # TGI says "eos_token" / "stop_sequence", others "content_filter" or "tool_calls": all end the reply
            reason = "length" if choice["finish_reason"] == "length" else "stop"
    return text, reason, usage
