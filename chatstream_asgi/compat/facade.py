"""``ChatStream``: the original ChatStream's API over this package, so its users move over by changing imports.

ChatStream's README quickstart runs with only ``from chatstream import ...`` changed to
``from chatstream_asgi.compat import ...``: ``await chat_stream.handle_starlette_request(request)`` (or 0.3's
``handle_chat_stream_request``) returns a response that does admission, the session, history and
streaming. ``fastsession`` is not needed: the session is our own signed cookie; under a ``FastSessionMiddleware``
the app still adds, the history follows fastsession's session (``routes.fastsession_scope``). Where ChatStream
misbehaved, this keeps the fix: a full queue is a real 429 with ``Retry-After``, decided before any header, and
the model never runs on the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from chatstream_asgi import (
    ChatMessage,
    ChatStreamConfig,
    ChatStreamMiddleware,
    Engine,
    GenerationConfig,
    Hooks,
    Limits,
    MockEngine,
    ObservabilityConfig,
    RoutesConfig,
    SamplingParams,
)
from chatstream_asgi.errors import ConfigurationError

from .legacy_presets import *  # noqa: F403 - ChatStream's preset names, importable from here as from chatstream
from .legacy_presets import PRESETS
from .legacy_prompts import AbstractChatPrompt, LegacyPromptTokenizer, OutputReplacingEngine
from .routes import API_METHODS, ChatStreamResponse, TurnEndings, chosen_apis, no_app

logger = logging.getLogger("chatstream_asgi.compat")
MOCK_REPLY = "This is a mock response from ChatStream compatibility mode. Pass a model to get real replies."
# mock_params={"type": "round"}: these in turn, one per turn of the conversation
MOCK_ROUND = (
    "This is a mock reply: the model is not loaded, so every turn gets one of a few fixed sentences.",
    "Mock replies start at once and cost nothing, which makes them handy for building the page around the chat.",
    "Here is the third fixed sentence; the next turn starts the round again from the first one.",
)
MOCK_LONG = " ".join(MOCK_ROUND * 4)  # mock_params={"type": "long"}
FINISH_TOKEN = "<::EOS::>"  # what ChatStream appended to every response text
Callback = Callable[[Any, str], Any]
__all__ = ["AbstractChatPrompt", "ChatStream", *(preset.__name__ for preset in PRESETS)]


class ChatStream:
    """ChatStream 0.3's constructor and handlers over ``ChatStreamMiddleware``.

    Args:
        model, tokenizer: a transformers causal LM and its tokenizer (not needed with ``use_mock_response``).
        device: where the model runs (``"cuda"``, ``"cpu"``); default where it is.
        num_of_concurrent_executions: replies generated at once (batched): ``Limits.max_concurrency``.
        max_queue_size: requests that may wait; exactly this many wait, the next gets 429: ``Limits.max_queue``.
        chat_prompt_clazz: a ChatStream prompt class for models without a chat template; its stop strings apply.
        max_new_tokens, context_len, temperature, top_k, top_p, repetition_penalty: generation defaults
            (``GenerationConfig.default_params``; ``context_len`` goes to the engine).
        use_mock_response: stream a fixed reply without a model (starts at once), 20 ms a word.
        mock_params: the mock's replies as ChatStream's mock made them: ``type`` ``"round"`` (a few fixed sentences
            in turn), ``"long"`` or ``"echo"`` (the user's message back), ``time_per_token_sec`` (default 0.1),
            ``initial_wait_sec`` (before the first token).
        secret_key: signs the session cookie; without one a random key per process is used (with a warning).
        wire: ``"chatstream-0.3"`` (default: whole reply + ``<::EOS::>`` per chunk, for ChatStream's UI) or ``"delta"``
            (``GenerationConfig.wire``).
        engine: any engine, instead of ``model`` and ``tokenizer``.
        name: this instance's name in ``/get_resource_usage``.
        middleware_options: more ``ChatStreamMiddleware`` keywords, config objects or shorthands (``queue_timeout``,
            ``on_finish``, ``limits=Limits(...)``, ...), over this facade's own (no OpenAI routes, no metrics, the
            chat page at ``/``).
    """

    def __init__(
        self,
        name: str = "node:0",
        model: Any = None,
        tokenizer: Any = None,
        device: Any = None,
        num_of_concurrent_executions: int = 2,
        max_queue_size: int = 5,
        use_mock_response: bool = False,
        mock_params: dict[Any, Any] | None = None,
        chat_prompt_clazz: type[AbstractChatPrompt] | None = None,
        max_new_tokens: int = 256,
        context_len: int | None = 1024,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = 1.0,
        repetition_penalty: float | None = 1.0,
        secret_key: str | bytes | Sequence[str | bytes] | None = None,
        wire: str = "chatstream-0.3",
        engine: Engine | None = None,
        middleware_options: dict[str, Any] | None = None,
        **ignored: Any,
    ) -> None:
        self.logger = logging.getLogger("chatstream_asgi")  # ChatStream's doc: chat_stream.logger.setLevel(...)
        if ignored:
            logger.warning("ChatStream options not used by chatstream_asgi, ignored: %s", sorted(ignored))
        if secret_key is None:
            logger.warning("no secret_key given: sessions are signed with a random key and end when the process does")
            secret_key = secrets.token_urlsafe(32)
        stops = tuple(chat_prompt_clazz().final_stop_strs()) if chat_prompt_clazz is not None else ()
        self.name = name
        self.default_params = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=1.0 if top_p is None else top_p,
            top_k=0 if top_k is None else top_k,
            repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
            stop=stops,
        )
        if engine is None and use_mock_response:
            engine = mock_engine(mock_params, num_of_concurrent_executions)
        self.engine = engine or build_engine(
            model, tokenizer, device, chat_prompt_clazz, num_of_concurrent_executions, context_len
        )
        self.console_history: list[ChatMessage] = []  # handle_console_input's one conversation
        self._console_turn = asyncio.Lock()  # one turn of it at a time: two at once lost the first one's exchange
        # never in the ASGI stack itself: its route table is what the handlers below run (the page at "/")
        config = ChatStreamConfig(
            limits=Limits(max_concurrency=num_of_concurrent_executions, max_queue=max_queue_size),
            generation=GenerationConfig(default_params=self.default_params, wire=wire),  # type: ignore[arg-type]
            openai=None,
            observability=ObservabilityConfig(metrics_path=None),
            routes=RoutesConfig(ui_path="/"),
        )
        # middleware_options: config objects or shorthands, on top of the above (``queue_timeout=...`` changes one
        # field of the Limits, ``openai_prefix="/v1"`` turns the OpenAI routes on)
        self.config = config.replace(**(middleware_options or {}))
        # ChatStream's per-request callbacks hear how each turn ended through on_finish (the app's own runs after)
        hooks = self.config.hooks or Hooks()
        self.endings = TurnEndings(hooks.on_finish)
        self.config = self.config.replace(hooks=dataclasses.replace(hooks, on_finish=self.endings.on_finish))
        configs = self.config.objects()
        self.middleware = ChatStreamMiddleware(no_app, engine=self.engine, secret_key=secret_key, **configs)

    async def start_queue_worker(self) -> None:
        """Start the engine (ChatStream started its queue worker here; admission needs none)."""
        await self.engine.start()

    async def close(self) -> None:
        await self.middleware.shutdown()

    def response_for(
        self, api_name: str, request: Any, request_body: bytes | str | None = None, callback: Callback | None = None
    ) -> ChatStreamResponse:
        path = "/" if api_name == "webui_index" else f"/{api_name}"
        route = self.middleware.table.get(path)
        if route is None:
            raise ConfigurationError(f"unknown ChatStream API {api_name!r}; use one of {sorted(API_METHODS)}")
        body = request_body.encode() if isinstance(request_body, str) else request_body
        if body is None:
            body = getattr(request, "_body", None)  # Starlette keeps a body that was already read here

        def done(message: str) -> None:
            if callback is not None:
                try:
                    callback(request, message)
                except Exception:
                    logger.exception("the ChatStream callback failed")

        guard = self.middleware.guard.check if path in self.middleware.guarded else None
        cookie = self.middleware.routes.sessions.set_cookie_header
        return ChatStreamResponse(route[1], body, done, guard, cookie, self.endings if path == "/chat_stream" else None)

    async def handle_chat_stream_request(
        self, request: Any, request_body: bytes | str | None = None, callback: Callback | None = None
    ) -> ChatStreamResponse:
        """Stream one chat turn; ``callback(request, message)`` at its end, as ChatStream 0.3 calls it.

        ``message``: ``"success"``, ``"client_disconnected_while_streaming"`` (also a ``/stop_generation``),
        ``"client_disconnected_before_streaming"`` (the client left while queued), or
        ``"unknown_error_occurred,while chat_generator.generate"`` (the engine failed or the generation deadline
        passed mid-stream; the reply ends with an in-band error). A request refused with an error response (a full
        queue, bad input) gets none.
        """
        return self.response_for("chat_stream", request, request_body, callback)

    handle_starlette_request = handle_chat_stream_request  # the README's (pre-0.3) name

    async def handle_console_input(self, user_input: str) -> AsyncIterator[tuple[str, str, str]]:
        """One turn of a console chat (one conversation per facade), as ChatStream's console doc uses it: yields
        ``(response_text, updated_text, pos)``, ``pos`` being ``"begin"`` for the first piece of the reply, ``"mid"``
        for the next ones and ``"end"`` once after the last (with ``updated_text`` empty); ``response_text`` is the
        reply so far with ChatStream's ``<::EOS::>`` after it. The reply joins the conversation when it completes.
        """
        async with self._console_turn:
            if not self.engine.ready:
                await self.engine.start()
            messages: list[ChatMessage] = [*self.console_history, {"role": "user", "content": user_input}]
            reply = ""
            async for chunk in self.engine.stream(messages, self.default_params):
                if chunk.text:
                    reply += chunk.text
                    yield reply + FINISH_TOKEN, chunk.text, "mid" if len(reply) > len(chunk.text) else "begin"
            self.console_history = [*messages, {"role": "assistant", "content": reply}]
        yield reply + FINISH_TOKEN, "", "end"

    async def handle_clear_context_request(self, request: Any, *args: Any, **kwargs: Any) -> ChatStreamResponse:
        return self.response_for("clear_context", request)

    async def handle_get_prompt_request(self, request: Any) -> ChatStreamResponse:
        return self.response_for("get_prompt", request)

    async def handle_get_load_request(self, request: Any) -> ChatStreamResponse:
        return self.response_for("get_load", request)

    async def handle_set_generation_params_request(self, request: Any) -> ChatStreamResponse:
        return self.response_for("set_generation_params", request)

    async def handle_get_generation_params_request(self, request: Any) -> ChatStreamResponse:
        return self.response_for("get_generation_params", request)

    async def handle_set_feedback_request(self, request: Any, opts: dict[str, Any] | None = None) -> ChatStreamResponse:
        if opts:  # 0.3's per-call on_feedback_received: here a hook of the middleware, set once
            hint = "pass middleware_options={'on_feedback': fn}"
            logger.warning("set_feedback opts are not used (%s); %s", sorted(opts), hint)
        return self.response_for("set_feedback", request)

    async def handle_get_feedback_request(self, request: Any) -> ChatStreamResponse:
        return self.response_for("get_feedback", request)

    async def handle_get_resource_usage_request(self, request: Any) -> ChatStreamResponse:
        return self.response_for("get_resource_usage", request)

    def append_apis(self, app: Any, opts: dict[str, Any] | None = None) -> list[str]:
        """Add ChatStream's routes to a FastAPI/Starlette ``app``: ``{"all": True}``, ``{"include": [...]}`` or
        ``{"exclude": [...]}`` as in ChatStream (``webui_index`` serves the chat page at ``/``). Returns the paths."""
        names = chosen_apis(opts or {})
        paths = []
        for name in names:
            path = "/" if name == "webui_index" else f"/{name}"
            app.router.add_route(path, self.endpoint(name), methods=[API_METHODS[name]])
            paths.append(path)
        return paths

    def endpoint(self, name: str) -> Callable[[Any], Any]:
        async def endpoint(request: Any) -> ChatStreamResponse:
            return self.response_for(name, request)

        endpoint.__name__ = name
        return endpoint

    def append_middlewares(self, app: Any, opts: dict[str, Any] | None = None) -> None:
        """ChatStream added session, role and CORS middlewares here. Sessions are built in now, so only CORS is
        added, and only when ``opts["cors"]`` asks for it (e.g. ``{"cors": {"allow_origins": ["https://..."]}}``).
        Those origins may then also POST with the session cookie (the CSRF check lets them through)."""
        cors = (opts or {}).get("cors")
        if cors is None:
            return
        from starlette.middleware.cors import CORSMiddleware

        origins = list(cors.get("allow_origins", []))
        if "*" in origins:
            # any site may then call the API with the visitor's cookie: that is what the user asked CORS for
            logger.warning("CORS allow_origins ['*']: the CSRF origin check is off for the ChatStream routes")
            self.middleware.guard.csrf = False
        else:
            self.middleware.guard.allow_origins(origins)
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_credentials=True,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["X-ChatStream-Last-Generated-Message-Id", "Retry-After", "X-Queue-Position"],
        )


def mock_engine(params: dict[Any, Any] | None, batch: int) -> MockEngine:
    """The mock: one fixed sentence, or ChatStream's from its ``mock_params``."""
    if params is None:
        return MockEngine(MOCK_REPLY, token_delay=0.02, max_batch_size=batch, model_name="mock")
    kind = params.get("type", params.get(type, "round"))  # 0.3's own default was {type: "round"}: the builtin as key
    if kind not in ("round", "long", "echo"):
        raise ConfigurationError(f'mock_params "type" must be "round", "long" or "echo", got {kind!r}')

    def reply(messages: Sequence[ChatMessage]) -> str:
        asked = [m["content"] for m in messages if m.get("role") == "user"]
        if kind == "echo":
            return asked[-1] if asked else ""
        return MOCK_LONG if kind == "long" else MOCK_ROUND[(len(asked) - 1) % len(MOCK_ROUND)]

    each, first = params.get("time_per_token_sec", 0.1), params.get("initial_wait_sec", 0)
    for name, delay in (("time_per_token_sec", each), ("initial_wait_sec", first)):
        if not isinstance(delay, (int, float)) or isinstance(delay, bool) or delay < 0:
            raise ConfigurationError(f"mock_params {name!r} must be seconds >= 0, got {delay!r}")
    return MockEngine(reply, token_delay=each, first_token_delay=first, max_batch_size=batch, model_name="mock")


def build_engine(
    model: Any,
    tokenizer: Any,
    device: Any,
    prompt_class: type[AbstractChatPrompt] | None,
    batch: int,
    context_len: int | None,
) -> Engine:
    if model is None or tokenizer is None:
        raise ConfigurationError("pass model= and tokenizer= (or use_mock_response=True, or engine=...)")
    from chatstream_asgi import TransformersEngine

    if prompt_class is not None:
        tokenizer = LegacyPromptTokenizer(tokenizer, prompt_class)
    device = None if device is None else str(device)
    engine = TransformersEngine(model, tokenizer, device=device, max_batch_size=batch, context_len=context_len)
    replacements = prompt_class().get_replacement_when_output() if prompt_class is not None else None
    return OutputReplacingEngine(engine, replacements or [], strip=True)  # ChatStream stripped every reply
