"""The rest of ChatStream's API on the middleware: per-session generation parameters, feedback on a reply,
resource usage, and the built-in chat page.

- ``POST /set_generation_params``: sampling fields (as ``/chat_stream`` takes them; ChatStream's
  ``top_k_value`` / ``top_p_value`` too) become this session's defaults; ``{"reset": true}`` drops them.
- ``GET /get_generation_params``: the parameters this session's turns start from, and its overrides.
- ``POST /set_feedback``: ``{"message_id" | "turn", "rating": "up" | "down" (or "is_like": bool), "text"?}``
  on one reply; kept beside the history and handed to the host's ``on_feedback(session_id, feedback)``. A rating
  sent without ``text`` keeps the text given before (``"text": ""`` clears it).
- ``GET /get_feedback``: one entry per reply in this session's history, ``{"rating", "text", "message_id"}`` or
  null where none was given (the chat page shows the ratings again after a reload).
- ``GET /get_resource_usage``: memory and CPU of this process and host, GPU memory when there is one.
- ``POST /stop_generation``: end this session's running reply, as if its client had disconnected.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from importlib import resources
from typing import Any

from ..engines.base import SamplingParams
from ..errors import ConfigurationError, HTTPError
from ..ops.resource_usage import resource_usage
from .asgi import read_body, send_json
from .hooks import call_hook
from .requests import SAMPLING_FIELDS, invalid, parse_json_object, parse_sampling, require_json
from .routes import ChatRoutes
from .turns import reply_count
from .types import Handler, HTTPReceive, HTTPSend, Scope, response_body, response_start

logger = logging.getLogger("chatstream_asgi")
OnFeedback = Callable[[str, dict[str, Any]], Awaitable[None] | None]
ALIASES = {"top_k_value": "top_k", "top_p_value": "top_p"}  # ChatStream's names
FEEDBACK_FIELDS = ("rating", "text", "message_id")  # what GET /get_feedback shows of each feedback
MAX_FEEDBACK_CHARS = 4000
# the page loads nothing from elsewhere: its script and style are inline, its icon a data: URL
PAGE_CSP = b"default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:"
STOP_WAIT = 5.0  # seconds /stop_generation waits for the stopped turn to end before it answers anyway
ROUTE_NAMES = (
    "set_generation_params",
    "get_generation_params",
    "set_feedback",
    "get_feedback",
    "get_resource_usage",
    "stop_generation",
)
POSTS = frozenset({"set_generation_params", "set_feedback", "stop_generation"})


def params_json(params: SamplingParams) -> dict[str, Any]:
    data = asdict(params)
    data["stop"] = list(params.stop)
    return data


class SessionRoutes:
    """Handlers that share ``ChatRoutes``' cookie signer, history store and session extras.

    Args:
        chat: the middleware's ``ChatRoutes``.
        on_feedback: called with ``(session_id, feedback)`` for each ``/set_feedback``; may be async.
        ui_paths: route name -> path of the chat routes, handed to the chat page.
    """

    def __init__(self, chat: ChatRoutes, on_feedback: OnFeedback | None = None, ui_paths: dict[str, str] | None = None):
        if on_feedback is not None and not callable(on_feedback):
            raise ConfigurationError(f"on_feedback must be a function or None, got {type(on_feedback).__name__}")
        self.chat = chat
        self.on_feedback = on_feedback
        self.ui_paths = ui_paths or {}

    def table(
        self, paths: dict[str, str], ui_path: str | None, taken: dict[str, Any]
    ) -> dict[str, tuple[str, Handler]]:
        own = {name: paths.get(name, f"/{name}") for name in ROUTE_NAMES}
        routes = {path: ("POST" if name in POSTS else "GET", getattr(self, name)) for name, path in own.items()}
        self.ui_paths = {**self.ui_paths, **own}
        if ui_path is not None:
            routes[ui_path] = ("GET", self.chat_page)
        for path in routes:
            if not path.startswith("/") or path in taken:
                raise ConfigurationError(f"route {path!r} must start with '/' and not clash with another route")
        if len(routes) != len(ROUTE_NAMES) + (ui_path is not None):
            raise ConfigurationError(f"two routes share one path: {sorted(routes)}")
        return routes

    def session_id(self, scope: Scope) -> str | None:
        return self.chat.sessions.session_id_from_headers(scope.get("headers", []))

    async def set_generation_params(self, scope: Scope, receive: HTTPReceive, send: HTTPSend) -> None:
        require_json(scope)
        data = parse_json_object(await read_body(scope, receive, self.chat.settings.max_body_bytes))
        data = {ALIASES.get(k, k): v for k, v in data.items()}
        reset = data.pop("reset", False)
        if not isinstance(reset, bool):
            raise invalid("'reset' must be true or false")
        unknown = sorted(set(data) - SAMPLING_FIELDS)
        if unknown:
            raise invalid(f"unknown field(s) {unknown}; allowed: {sorted(SAMPLING_FIELDS | set(ALIASES))} and 'reset'")
        limit = self.chat.settings.max_new_tokens_limit
        checked = parse_sampling(data, SamplingParams(), limit)
        session_id, headers = self.session_id(scope), []
        if session_id is None:
            session_id = self.chat.sessions.new_session_id()
            headers.append(self.chat.sessions.set_cookie_header(session_id))
        extras = self.chat.hooks.extras
        overrides = {} if reset else extras.params(session_id)
        overrides.update({k: getattr(checked, k) for k, v in data.items() if v is not None})
        extras.set_params(session_id, overrides)
        await send_json(send, 200, self.params_body(session_id), headers)

    async def get_generation_params(self, scope: Scope, receive: HTTPReceive, send: HTTPSend) -> None:
        await send_json(send, 200, self.params_body(self.session_id(scope)))

    def params_body(self, session_id: str | None) -> dict[str, Any]:
        params = self.chat.hooks.defaults_for(session_id, self.chat.settings.default_params)
        overrides = self.chat.hooks.extras.params(session_id)
        overrides = {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}
        return {"success": True, "generation_params": params_json(params), "overrides": overrides}

    async def set_feedback(self, scope: Scope, receive: HTTPReceive, send: HTTPSend) -> None:
        require_json(scope)
        data = parse_json_object(await read_body(scope, receive, self.chat.settings.max_body_bytes))
        rating, text = feedback_rating(data), feedback_text(data)
        session_id = self.session_id(scope)
        defaults = self.chat.settings.default_params
        if session_id is None:
            raise HTTPError(404, "unknown_reply", "this client has no session yet, so no reply to give feedback on")
        history = await self.chat.turns.load(session_id)
        replies = [i for i, m in enumerate(history) if m["role"] == "assistant"]
        first = self.chat.hooks.extras.first_reply_number(session_id, len(replies))
        index = self.reply_index(session_id, data, len(replies), first)
        reply_at = replies[index]
        user = next((m["content"] for m in reversed(history[:reply_at]) if m["role"] == "user"), "")
        if "text" not in data and "form_data" not in data:  # a new rating alone (the chat page's) keeps the text given
            text = self.chat.hooks.extras.feedback(session_id).get(first + index, {}).get("text", text)
        feedback = {
            "rating": rating,
            "text": text,
            "reply_index": index,
            # the reply's own id, also when it was named by its turn
            "message_id": data.get("message_id") or self.chat.hooks.extras.reply_id(session_id, first + index),
            "reply": history[reply_at]["content"],
            "user_input": user,
            "generation_params": params_json(self.chat.hooks.defaults_for(session_id, defaults)),
        }
        self.chat.hooks.extras.set_feedback(session_id, first + index, feedback)
        await self.notify(session_id, feedback)
        await send_json(send, 200, {"success": True, "reply_index": index, "message_id": feedback["message_id"]})

    async def get_feedback(self, scope: Scope, receive: HTTPReceive, send: HTTPSend) -> None:
        """The feedback on each of this session's replies, in history order (None where none was given)."""
        session_id = self.session_id(scope)
        feedback: list[dict[str, Any] | None] = []
        if session_id is not None:
            history = await self.chat.turns.load(session_id)
            replies = reply_count(history)
            first = self.chat.hooks.extras.first_reply_number(session_id, replies)
            given = self.chat.hooks.extras.feedback(session_id)
            for index in range(replies):
                kept = given.get(first + index)
                feedback.append(None if kept is None else {k: kept[k] for k in FEEDBACK_FIELDS})
        await send_json(send, 200, {"success": True, "feedback": feedback})

    def reply_index(self, session_id: str, data: dict[str, Any], replies: int, first: int) -> int:
        """The index among the history's ``replies`` of the one ``data`` names; ``first``: the first one's number."""
        message_id, turn = data.get("message_id"), data.get("turn")
        if (message_id is None) == (turn is None):
            raise invalid("give exactly one of 'message_id' (from X-ChatStream-Last-Generated-Message-Id) or 'turn'")
        if message_id is not None:
            extras = self.chat.hooks.extras
            number = extras.reply_number(session_id, message_id) if isinstance(message_id, str) else None
            if number is not None and number < first:
                message = f"the reply with message_id {message_id!r} is no longer in this session's history (trimmed)"
                raise HTTPError(404, "unknown_reply", message)
            if number is None or number - first >= replies:
                raise HTTPError(404, "unknown_reply", f"no reply with message_id {message_id!r} in this session")
            return number - first
        if isinstance(turn, bool) or not isinstance(turn, int) or not -replies <= turn < replies:
            raise invalid(f"'turn' must be an integer index of one of this session's {replies} replies (-1: the last)")
        return turn % replies

    async def notify(self, session_id: str, feedback: dict[str, Any]) -> None:
        if self.on_feedback is None:
            return
        try:
            await call_hook(self.on_feedback, session_id, dict(feedback))
        except Exception:
            logger.exception("the on_feedback callback failed (the feedback is kept)")

    async def stop_generation(self, scope: Scope, receive: HTTPReceive, send: HTTPSend) -> None:
        """End this session's running reply as if its client had left (the reply so far is kept). Answers once the
        turn is over, so a ``GET /get_prompt`` sent next has the reply as the server kept it."""
        session_id = self.session_id(scope)
        if session_id is None or not self.chat.hooks.stop(session_id):
            await send_json(send, 200, {"success": True, "stopped": False, "ended": False})
            return
        ended = await self.chat.hooks.wait_until_over(session_id, STOP_WAIT)
        await send_json(send, 200, {"success": True, "stopped": True, "ended": ended})

    async def get_resource_usage(self, scope: Scope, receive: HTTPReceive, send: HTTPSend) -> None:
        usage = resource_usage(self.chat.engine.model_name)
        await send_json(send, 200, {"success": True, "message": "success", "memory_usage": [usage]})

    async def chat_page(self, scope: Scope, receive: HTTPReceive, send: HTTPSend) -> None:
        root = scope.get("root_path", "")
        config = {name: root + path for name, path in self.ui_paths.items()}
        html = chat_page_html().replace("/*CHATSTREAM_CONFIG*/{}", json.dumps(config))
        body = html.encode("utf-8")
        headers = [
            (b"content-type", b"text/html; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
            (b"x-content-type-options", b"nosniff"),
            (b"content-security-policy", PAGE_CSP),
        ]
        await send(response_start(200, headers))
        await send(response_body(body))


def feedback_rating(data: dict[str, Any]) -> str:
    rating, is_like = data.get("rating"), data.get("is_like")
    if rating is None and isinstance(is_like, bool):
        return "up" if is_like else "down"
    if rating not in ("up", "down"):
        raise invalid("'rating' must be \"up\" or \"down\" (or send ChatStream's 'is_like': true/false)")
    return str(rating)


def feedback_text(data: dict[str, Any]) -> str:
    text = data.get("text", data.get("form_data", ""))
    if not isinstance(text, str):
        text = json.dumps(text, ensure_ascii=False)
    if len(text) > MAX_FEEDBACK_CHARS:
        raise invalid(f"the feedback text has {len(text)} characters; the limit is {MAX_FEEDBACK_CHARS}")
    return text


def chat_page_html() -> str:  # read per request: cheap, and an edited page shows on reload while developing
    return resources.files("chatstream_asgi").joinpath("static/chat.html").read_text(encoding="utf-8")
