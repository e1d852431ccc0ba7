"""The config objects: each checks its fields, defaults are the middleware's, the flat keywords (shorthands) map
to one field each, and a middleware built from config objects behaves like one built from shorthands."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

import chatstream_asgi
from chatstream_asgi import (
    ChatStreamConfig,
    ChatStreamMiddleware,
    ConfigurationError,
    GenerationConfig,
    Hooks,
    Limits,
    MemoryHistoryStore,
    ObservabilityConfig,
    OpenAIConfig,
    RoutesConfig,
    SamplingParams,
    SecurityConfig,
    SessionConfig,
    Timeouts,
)
from chatstream_asgi.compat import ChatStream
from chatstream_asgi.config import CONCERNS, SHORTHANDS

from .apps import SECRET, Chat, CountingEngine, assert_json_error, build_middleware
from .asgi_fakes import RecordingApp

CONFIG_CLASSES = [Limits, Timeouts, SessionConfig, GenerationConfig, OpenAIConfig, SecurityConfig]
CONFIG_CLASSES += [ObservabilityConfig, RoutesConfig, Hooks, ChatStreamConfig]
# a value each shorthand may take that differs from its default
SHORTHAND_VALUES: dict[str, Any] = {
    "max_concurrency": 3,
    "max_queue": 0,
    "queue_timeout": None,
    "max_body_bytes": 1000,
    "max_new_tokens_limit": 100,
    "max_input_chars": 50,
    "max_input_tokens": 20,
    "max_history_turns": 4,
    "generation_timeout": 10.0,
    "send_timeout": None,
    "drain_timeout": 1.0,
    "drain_on_signals": False,
    "freeze_gc": False,
    "cookie_name": "sid",
    "cookie_max_age": 3600,
    "https_only": True,
    "same_site": "strict",
    "history_store": MemoryHistoryStore(),
    "session_state": chatstream_asgi.SessionStateStore(),
    "system_prompt": "Be brief.",
    "default_params": SamplingParams(temperature=0.1),
    "wire": "chatstream-0.3",
    "openai_prefix": "/api/v1",
    "openai_max_body_bytes": 2048,
    "openai_max_messages": 8,
    "api_keys": ["sk-test"],
    "require_api_key": True,
    "allowed_origins": ("https://app.example.com",),
    "csrf": False,
    "metrics_path": "/internal/metrics",
    "metrics_registry": object(),
    "health_path": None,
    "ready_path": "/ready",
    "log_text": True,
    "path": "/chat",
    "paths": {"get_load": "/load"},
    "extra_paths": {"stop_generation": "/stop"},
    "ui_path": "/",
    "on_finish": print,
    "request_interceptor": print,
    "on_feedback": print,
}


def test_every_config_class_is_exported_from_the_package() -> None:
    for config_class in CONFIG_CLASSES:
        assert getattr(chatstream_asgi, config_class.__name__) is config_class
        assert config_class.__name__ in chatstream_asgi.__all__
        assert dataclasses.is_dataclass(config_class)
        assert config_class.__dataclass_params__.frozen  # type: ignore[attr-defined]
        assert "Args:" in (config_class.__doc__ or "")


def test_the_defaults_are_the_middlewares() -> None:
    config = build_middleware().config
    assert config == ChatStreamConfig()
    assert (config.limits.max_concurrency, config.limits.max_queue, config.limits.queue_timeout) == (2, 5, 60.0)
    assert (config.limits.max_body_bytes, config.limits.max_new_tokens_limit) == (64 * 1024, 4096)
    assert (config.limits.max_input_chars, config.limits.max_input_tokens, config.limits.max_history_turns) == (
        16_000,
        None,
        None,
    )
    assert config.timeouts == Timeouts(generation=300.0, send=30.0, drain=25.0, drain_on_signals=True, freeze_gc=True)
    assert config.sessions == SessionConfig("chatstream_session", 14 * 24 * 3600, False, "lax", None, None)
    assert config.generation.params == SamplingParams() and config.generation.wire == "delta"
    assert config.openai == OpenAIConfig(prefix="/v1", max_body_bytes=1024 * 1024, max_messages=256)
    assert config.security == SecurityConfig(api_keys=None, require_api_key=False, allowed_origins=(), csrf=True)
    assert config.observability.ops_paths == {"healthz": "/healthz", "readyz": "/readyz", "metrics": "/metrics"}
    assert config.routes.chat_paths["chat_stream"] == "/chat_stream" and config.routes.ui_path is None
    assert config.hooks == Hooks()


@pytest.mark.parametrize(
    ("build", "says"),
    [
        (lambda: Limits(max_concurrency=0), r"max_concurrency must be a positive integer \(got 0\); pass e.g. 4"),
        (lambda: Limits(max_queue=-1), "max_queue must be an int >= 0"),
        (lambda: Limits(queue_timeout=0), "queue_timeout must be seconds > 0 .* or None"),
        (lambda: Limits(max_body_bytes=True), "max_body_bytes must be a positive integer"),
        (lambda: Limits(max_history_turns=0), "max_history_turns must be .* or None"),
        (lambda: Limits(max_input_tokens=1.5), "max_input_tokens must be"),
        (lambda: Timeouts(generation=-1), "generation must be seconds > 0"),
        (lambda: Timeouts(send=float("inf")), "send must be seconds"),
        (lambda: Timeouts(drain=-1), "drain must be seconds >= 0"),
        (lambda: Timeouts(drain_on_signals="yes"), "drain_on_signals must be True or False"),
        (lambda: Timeouts(freeze_gc=1), "freeze_gc must be True or False"),
        (lambda: SessionConfig(cookie_name="a b"), "cookie_name must be a cookie token"),
        (lambda: SessionConfig(cookie_max_age=0), "cookie_max_age must be a positive integer"),
        (lambda: SessionConfig(same_site="sometimes"), "same_site must be 'lax', 'strict' or 'none'"),
        (lambda: SessionConfig(same_site="none"), "requires https_only=True"),
        (lambda: SessionConfig(history_store={}), "history_store must have async load, save and clear"),
        (lambda: SessionConfig(state_store={}), "state_store must be a SessionStateStore"),
        (lambda: GenerationConfig(wire="sse"), "wire must be one of"),
        (lambda: GenerationConfig(default_params={"temperature": 0}), "default_params must be a SamplingParams"),
        (lambda: GenerationConfig(system_prompt=1), "system_prompt must be a str"),
        (lambda: OpenAIConfig(prefix="v1"), "prefix must start with '/'"),
        (lambda: OpenAIConfig(max_body_bytes=0), "max_body_bytes must be a positive integer"),
        (lambda: OpenAIConfig(max_messages=-1), "max_messages must be a positive integer"),
        (lambda: SecurityConfig(api_keys=[]), "api_keys must be None .* list of non-empty strings"),
        (lambda: SecurityConfig(require_api_key=True), "require_api_key=True needs api_keys"),
        (lambda: SecurityConfig(allowed_origins=["evil.example"]), "allowed_origins takes origins such as"),
        (lambda: SecurityConfig(allowed_origins="https://a.example"), "allowed_origins must be a list"),
        (lambda: ObservabilityConfig(metrics_path="metrics"), "metrics_path must be a path starting with '/'"),
        (lambda: ObservabilityConfig(log_text=1), "log_text must be True or False"),
        (lambda: RoutesConfig(path="chat"), "path must be a path starting with '/'"),
        (lambda: RoutesConfig(paths={"chat": "/c"}), r"paths names unknown route\(s\) \['chat'\]; use"),
        (lambda: RoutesConfig(extra_paths={"stop_generation": "stop"}), "extra_paths.*must be a path"),
        (lambda: Hooks(on_finish="print"), "on_finish must be a function or None"),
        (lambda: Hooks(on_feedback=1), "on_feedback must be a function or None"),
        (lambda: ChatStreamConfig(limits={"max_queue": 1}), r"limits takes a Limits\(...\) .*max_queue"),
    ],
)
def test_a_bad_value_names_the_field_and_what_to_pass(build: Any, says: str) -> None:
    with pytest.raises(ConfigurationError, match=says):
        build()


def test_the_shorthand_table_covers_every_field_once() -> None:
    targets = list(SHORTHANDS.values())
    assert len(set(targets)) == len(targets)
    every_field = {(concern, f.name) for concern, cls in CONCERNS.items() for f in dataclasses.fields(cls)}
    assert set(targets) == every_field
    assert set(SHORTHAND_VALUES) == set(SHORTHANDS)


@pytest.mark.parametrize("shorthand", sorted(SHORTHANDS))
def test_each_shorthand_sets_its_field(shorthand: str) -> None:
    concern, field_name = SHORTHANDS[shorthand]
    value = SHORTHAND_VALUES[shorthand]
    needs = {"https_only": True} if shorthand == "same_site" else {}
    needs = {"api_keys": ["sk-test"]} if shorthand == "require_api_key" else needs
    config = ChatStreamConfig().replace(**{shorthand: value}, **needs)
    if (shorthand, value) == ("openai_prefix", None):
        assert config.openai is None
    else:
        assert getattr(getattr(config, concern), field_name) is value
    for other in CONCERNS:  # nothing else changed
        if other != concern and not any(SHORTHANDS[name][0] == other for name in needs):
            assert getattr(config, other) == getattr(ChatStreamConfig(), other)


def test_the_middleware_takes_shorthands_and_config_objects_alike() -> None:
    flat = build_middleware(max_queue=0, drain_timeout=2.0, openai_prefix=None, cookie_name="sid")
    objects = build_middleware(
        limits=Limits(max_queue=0), timeouts=Timeouts(drain=2.0), openai=None, sessions=SessionConfig("sid")
    )
    assert flat.config == objects.config
    assert flat.drain_timeout == objects.drain_timeout == 2.0
    assert not flat.openai_paths and not objects.openai_paths


def test_a_shorthand_with_its_concerns_config_object_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"limits= and its shorthand\(s\) max_queue= were both given; use one"):
        build_middleware(limits=Limits(max_concurrency=4), max_queue=8)
    with pytest.raises(ConfigurationError, match="openai= and its shorthand"):
        build_middleware(openai=None, openai_prefix="/v2")
    build_middleware(limits=Limits(max_concurrency=4), drain_timeout=3.0)  # another concern's shorthand is fine


def test_a_shorthand_changes_the_default_openai_routes() -> None:
    app = build_middleware(openai_prefix="/api/v1", openai_max_messages=4)
    assert app.config.openai == OpenAIConfig(prefix="/api/v1", max_messages=4)
    assert "/api/v1/chat/completions" in app.openai_paths


@pytest.mark.parametrize(
    ("keyword", "closest"),
    [("max_concurency", "max_concurrency"), ("queue_timout", "queue_timeout"), ("limit", "limits")],
)
def test_an_unknown_keyword_names_the_closest(keyword: str, closest: str) -> None:
    with pytest.raises(ConfigurationError, match=f"unknown keyword '{keyword}'; did you mean '{closest}'"):
        build_middleware(**{keyword: 1})


def test_an_unknown_keyword_without_a_close_one_lists_the_concerns() -> None:
    with pytest.raises(ConfigurationError, match="use a config object .*limits, timeouts"):
        build_middleware(zzz=1)


def test_a_bad_shorthand_value_names_the_shorthand() -> None:
    with pytest.raises(ConfigurationError, match="^openai_max_body_bytes must be a positive integer"):
        build_middleware(openai_max_body_bytes=0)
    with pytest.raises(ConfigurationError, match="^generation_timeout must be seconds > 0"):
        build_middleware(generation_timeout=0)
    with pytest.raises(ConfigurationError, match="^session_state must be a SessionStateStore"):
        build_middleware(session_state={})


@pytest.mark.asyncio
@pytest.mark.parametrize("style", ["shorthands", "config objects"])
async def test_a_full_queue_answers_429_with_the_same_retry_after_either_way(style: str) -> None:
    engine = CountingEngine(" ".join(["w"] * 1000), token_delay=0.01)
    if style == "shorthands":
        options: dict[str, Any] = {"max_concurrency": 1, "max_queue": 0}
    else:
        options = {"limits": Limits(max_concurrency=1, max_queue=0)}
    app = RecordingApp()
    chat = Chat(ChatStreamMiddleware(app, engine=engine, secret_key=SECRET, **options), app, engine, None)
    turn = chat.start_turn()
    await turn.streaming()
    send = await chat.turn()
    assert_json_error(send, 429, "queue_full")
    assert send.header("retry-after") == "1"  # one slot, nothing measured yet: the same estimate either way
    assert (await turn.stop()).status == 200


def test_the_chatstream_facade_maps_its_arguments_onto_the_config_objects() -> None:
    chat_stream = ChatStream(
        use_mock_response=True,
        num_of_concurrent_executions=3,
        max_queue_size=7,
        secret_key=SECRET,
        middleware_options={"queue_timeout": 5.0, "openai_prefix": "/v1"},
    )
    config = chat_stream.middleware.config
    assert config.limits == Limits(max_concurrency=3, max_queue=7, queue_timeout=5.0)
    assert config.generation.wire == "chatstream-0.3" and config.routes.ui_path == "/"
    assert config.openai == OpenAIConfig(prefix="/v1") and config.observability.metrics_path is None
    assert chat_stream.logger.name == "chatstream_asgi"  # ChatStream's logging doc: chat_stream.logger.setLevel(...)


def test_a_printed_config_shows_no_api_key() -> None:
    from chatstream_asgi.config.access import SecurityConfig

    assert "sk-secret" not in repr(SecurityConfig(api_keys=["sk-secret"]))
