"""One small handler per chat route. Handlers raise ``HTTPError`` before a response starts;
the middleware turns it into a JSON error."""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..engines.base import ChatMessage, Engine, SamplingParams, engine_restarts, engine_stats, prefix_cache_stats
from ..errors import ConfigurationError
from ..ops.admission import Admission
from ..ops.metrics import GenerationProbe, Observer, StreamResult, outcome_of
from ..sessions.cookie import SessionCookie
from ..sessions.history import HistoryStore, trim_turns
from .asgi import read_body, send_json
from .encoders import choose_encoder
from .hooks import ChatHooks
from .requests import ChatTurn, parse_chat_turn, previous_turns, require_json, user_message
from .security import check_input_tokens, token_counter
from .slots import finish_before_last_byte, queue_headers, wait_for_slot
from .streaming import StreamOptions, stream_reply
from .turns import EndTurn, SessionTurns, TurnMessages, reply_count
from .types import Handler, HTTPReceive, HTTPSend, Scope

DEFAULT_PATHS = {
    "chat_stream": "/chat_stream",
    "clear_context": "/clear_context",
    "get_prompt": "/get_prompt",
    "get_load": "/get_load",
    "get_token_count": "/get_token_count",
}
ROUTE_METHODS = {name: "POST" if name in ("chat_stream", "clear_context") else "GET" for name in DEFAULT_PATHS}


@dataclass(frozen=True)
class ChatSettings:
    """The middleware's per-route knobs, from its config objects (``Limits``, ``Timeouts``, ``GenerationConfig``),
    which check them."""

    default_params: SamplingParams = field(default_factory=SamplingParams)
    system_prompt: str | None = None
    max_body_bytes: int = 64 * 1024
    max_input_chars: int = 16_000
    max_history_turns: int | None = None  # at most this many user/assistant pairs sent to the model; None sends all
    max_input_tokens: int | None = None  # needs an engine with a ``tokenizer``; None: only max_input_chars
    max_new_tokens_limit: int = 4096
    generation_timeout: float | None = 300.0
    send_timeout: float | None = 30.0
    ping_interval: float | None = 15.0


class ChatRoutes:
    """The chat routes, sharing one engine, admission, cookie signer and history store."""

    def __init__(
        self,
        engine: Engine,
        admission: Admission,
        sessions: SessionCookie,
        store: HistoryStore,
        settings: ChatSettings,
        hooks: ChatHooks | None = None,
    ) -> None:
        self.hooks = hooks or ChatHooks()
        self.engine = engine
        self.admission = admission
        self.sessions = sessions
        self.turns = SessionTurns(store)
        self.settings = settings
        self.observer = Observer()  # the middleware puts its own here

    @property
    def store(self) -> HistoryStore:
        return self.turns.store

    @property
    def active_sessions(self) -> dict[str, object]:
        """Sessions with a turn streaming right now (the middleware's tests and the soak check none is left)."""
        return self.turns.active

    def table(self, paths: dict[str, str]) -> dict[str, tuple[str, Handler]]:
        """Route path -> (method, handler) for ``paths`` (route name -> path)."""
        unknown = set(paths) - set(DEFAULT_PATHS)
        if unknown:
            raise ConfigurationError(f"unknown route name(s) {sorted(unknown)} in paths; use {sorted(DEFAULT_PATHS)}")
        for name, route in paths.items():
            if not route.startswith("/"):
                raise ConfigurationError(f"path for {name!r} must start with '/', got {route!r}")
        if len(set(paths.values())) != len(paths):
            raise ConfigurationError(f"two routes share one path: {paths}")
        return {route: (ROUTE_METHODS[name], getattr(self, name)) for name, route in paths.items()}

    async def chat_stream(self, scope: Scope, receive: HTTPReceive, send: HTTPSend) -> None:
        require_json(scope)
        s = self.settings
        body = await read_body(scope, receive, s.max_body_bytes)
        session_id, refresh = self.sessions.session_from_headers(scope.get("headers", []))
        headers = []
        if session_id is None:
            session_id, refresh = self.sessions.new_session_id(), True
        if refresh:  # a new session, or a cookie past half its lifetime: signed again now, so use keeps it alive
            headers.append(self.sessions.set_cookie_header(session_id))
        body = await self.hooks.intercept(scope, session_id, body)
        defaults = self.hooks.defaults_for(session_id, s.default_params)
        turn = parse_chat_turn(
            body, defaults, max_new_tokens_limit=s.max_new_tokens_limit, max_input_chars=s.max_input_chars
        )
        if s.max_input_tokens is not None:  # the tokenizer is looked up now: an engine process's comes when it answers
            await check_input_tokens(token_counter(self.engine), turn.user_input, s.max_input_tokens)
        async with self.turns.exclusive(session_id) as end_turn:
            async with self.hooks.stoppable(session_id, receive, send) as (receive, send):
                loaded = await self.turns.load(session_id)
                base, user_input = previous_turns(loaded, turn)
                asked = user_message(user_input)
                messages = TurnMessages(
                    history=[*base, asked],
                    prompt=[*trim_turns(base, s.max_history_turns), asked],
                    stored_replies=reply_count(loaded),
                )
                await self.generate(scope, receive, send, session_id, messages, turn, headers, end_turn)

    async def generate(
        self,
        scope: Scope,
        receive: HTTPReceive,
        send: HTTPSend,
        session_id: str,
        messages: TurnMessages,
        turn: ChatTurn,
        headers: list[tuple[bytes, bytes]],
        end_turn: EndTurn,
    ) -> None:
        """Admit, then stream (nothing if the client leaves while queued)."""
        ticket = self.admission.try_enter()
        request_id = uuid.uuid4().hex  # also the reply's id (ChatStream's X-ChatStream-Last-Generated-Message-Id)

        kept: list[str] = []  # the reply as kept, once finish or cut has run

        async def finish(reply: str) -> None:
            try:
                if await self.turns.save_reply(session_id, messages.history, reply):
                    self.hooks.reply_saved(session_id, messages, request_id)
            finally:
                await end_turn()
                ticket.release()
                kept.append(reply)

        async def cut(reply: str) -> None:
            if await self.turns.save_cut_reply(session_id, messages.history, reply):
                self.hooks.reply_saved(session_id, messages, request_id)
            await end_turn()
            ticket.release()
            kept.append(reply)

        def ended(probe: GenerationProbe, result: StreamResult) -> None:
            # once the stream is over, however it ended: on_finish hears the outcome the log and metrics record
            if result.outcome == "disconnected" and self.hooks.stopped(session_id):
                result.outcome = "stopped"  # POST /stop_generation, not the client leaving
            probe.done(result, user_input=turn.user_input)
            if kept:
                stats = {"outcome": outcome_of(result), "request_id": request_id, "queue_wait_s": ticket.queue_wait}
                self.hooks.turn_ended(session_id, messages, kept[0], request_id, stats)

        try:
            if not await wait_for_slot(ticket, receive):
                self.observer.left_queue()
                return
            self.hooks.arm_stop(session_id)
            probe = self.observer.start("chat_stream", request_id, ticket.queue_wait)
            message_id = (b"x-chatstream-last-generated-message-id", request_id.encode())
            headers = [*headers, (b"x-request-id", request_id.encode()), message_id, *queue_headers(ticket.position)]
            chunks = self.engine.stream(self.with_system_prompt(messages.prompt), turn.params)
            chunks = finish_before_last_byte(chunks, finish, cut)
            encoder = choose_encoder(scope, self.settings.ping_interval, self.hooks.wire)
            options = self.stream_options(headers, {"request_id": request_id, "queue_wait_s": ticket.queue_wait})
            options.on_token = probe.on_token
            options.on_end = functools.partial(ended, probe)
            await stream_reply(send, receive, chunks, encoder, options)
        finally:
            ticket.release()

    def stream_options(self, headers: list[tuple[bytes, bytes]], summary: dict[str, Any]) -> StreamOptions:
        timeout = self.settings.generation_timeout
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        return StreamOptions(
            headers=headers,
            send_timeout=self.settings.send_timeout,
            deadline=deadline,
            summary=summary,
            running=self.observer.running,
        )

    async def clear_context(self, scope: Scope, receive: HTTPReceive, send: HTTPSend) -> None:
        session_id = self.sessions.session_id_from_headers(scope.get("headers", []))
        if session_id is not None:
            async with self.turns.exclusive(session_id):
                await self.turns.clear(session_id)
            # a fresh id after a clear: whoever saw the old cookie (a shared machine, a log) cannot follow the next chat
            new_id = self.sessions.new_session_id()
            self.hooks.extras.cleared(session_id, new_id)
            await send_json(send, 200, {"cleared": True}, [self.sessions.set_cookie_header(new_id)])
            return
        await send_json(send, 200, {"cleared": True})

    async def get_prompt(self, scope: Scope, receive: HTTPReceive, send: HTTPSend) -> None:
        history, prompt = await self.session_prompt(scope)
        await send_json(send, 200, {"messages": history, "prompt": prompt})

    async def get_token_count(self, scope: Scope, receive: HTTPReceive, send: HTTPSend) -> None:
        """The tokens of this session's prompt (what its next turn builds on) against the model's context;
        ``prompt_tokens`` is null for engines without a tokenizer (the mock, an OpenAI upstream)."""
        history, prompt = await self.session_prompt(scope)
        count = token_counter(self.engine)
        tokens = None if count is None else await asyncio.to_thread(count, prompt) if prompt else 0
        context = getattr(self.engine, "context_len", None)
        await send_json(send, 200, {"prompt_tokens": tokens, "context_len": context, "messages": len(history)})

    async def session_prompt(self, scope: Scope) -> tuple[list[ChatMessage], str]:
        """This session's history and the prompt the engine renders from it (cut to ``max_history_turns`` pairs, as a
        new turn's is, and truncated to the context)."""
        session_id = self.sessions.session_id_from_headers(scope.get("headers", []))
        history = [] if session_id is None else await self.turns.load(session_id)
        shown = trim_turns(history, self.settings.max_history_turns)
        messages, params = self.with_system_prompt(shown), self.settings.default_params
        # nothing to render yet (chat templates refuse an empty conversation): a new session's prompt is empty
        prompt = await asyncio.to_thread(self.engine.render_prompt, messages, params) if messages else ""
        return history, prompt

    async def get_load(self, scope: Scope, receive: HTTPReceive, send: HTTPSend) -> None:
        load = {**self.admission.snapshot(), "model": self.engine.model_name}
        cache = prefix_cache_stats(self.engine)
        if cache is not None:  # cached_tokens: prompt tokens the prefix cache supplied since start
            load.update(cached_tokens=cache.hit_tokens, prefix_cache=cache.as_dict())
        load.update(engine_load(self.engine))
        await send_json(send, 200, load)

    def with_system_prompt(self, messages: Sequence[ChatMessage]) -> list[ChatMessage]:
        system = self.settings.system_prompt
        return [{"role": "system", "content": system}, *messages] if system else list(messages)


def engine_load(engine: Engine) -> dict[str, Any]:
    """``/get_load``'s ``engine``: the engine's own batch (every web process's, for a shared engine process) and
    restarts, where the engine has them."""
    stats, restarts = engine_stats(engine), engine_restarts(engine)
    figures: dict[str, Any] = {}
    if stats is not None:
        figures.update(running=stats.running, waiting=stats.waiting, max_batch_size=engine.max_batch_size)
    if restarts is not None:
        figures["restarts"] = restarts
    return {"engine": figures} if figures else {}
