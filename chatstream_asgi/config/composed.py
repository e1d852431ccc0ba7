"""The config objects composed into one, and the flat keywords (shorthands) that set one field each."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NoReturn

from ..errors import ConfigurationError
from .access import Hooks, SecurityConfig, SessionConfig
from .routing import ObservabilityConfig, OpenAIConfig, RoutesConfig
from .serving import GenerationConfig, Limits, Timeouts

# the middleware's keyword for each concern -> its config class
CONCERNS: Mapping[str, type] = MappingProxyType(
    {
        "limits": Limits,
        "timeouts": Timeouts,
        "sessions": SessionConfig,
        "generation": GenerationConfig,
        "openai": OpenAIConfig,
        "security": SecurityConfig,
        "observability": ObservabilityConfig,
        "routes": RoutesConfig,
        "hooks": Hooks,
    }
)
# The one table of shorthands: flat keyword -> (concern, field). Each sets exactly one field of one config.
SHORTHANDS: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "max_concurrency": ("limits", "max_concurrency"),
        "max_queue": ("limits", "max_queue"),
        "queue_timeout": ("limits", "queue_timeout"),
        "max_body_bytes": ("limits", "max_body_bytes"),
        "max_new_tokens_limit": ("limits", "max_new_tokens_limit"),
        "max_input_chars": ("limits", "max_input_chars"),
        "max_input_tokens": ("limits", "max_input_tokens"),
        "max_history_turns": ("limits", "max_history_turns"),
        "generation_timeout": ("timeouts", "generation"),
        "send_timeout": ("timeouts", "send"),
        "drain_timeout": ("timeouts", "drain"),
        "drain_on_signals": ("timeouts", "drain_on_signals"),
        "freeze_gc": ("timeouts", "freeze_gc"),
        "cookie_name": ("sessions", "cookie_name"),
        "cookie_max_age": ("sessions", "cookie_max_age"),
        "https_only": ("sessions", "https_only"),
        "same_site": ("sessions", "same_site"),
        "history_store": ("sessions", "history_store"),
        "session_state": ("sessions", "state_store"),
        "system_prompt": ("generation", "system_prompt"),
        "default_params": ("generation", "default_params"),
        "wire": ("generation", "wire"),
        "openai_prefix": ("openai", "prefix"),
        "openai_max_body_bytes": ("openai", "max_body_bytes"),
        "openai_max_messages": ("openai", "max_messages"),
        "api_keys": ("security", "api_keys"),
        "require_api_key": ("security", "require_api_key"),
        "allowed_origins": ("security", "allowed_origins"),
        "csrf": ("security", "csrf"),
        "metrics_path": ("observability", "metrics_path"),
        "metrics_registry": ("observability", "metrics_registry"),
        "health_path": ("observability", "health_path"),
        "ready_path": ("observability", "ready_path"),
        "log_text": ("observability", "log_text"),
        "path": ("routes", "path"),
        "paths": ("routes", "paths"),
        "extra_paths": ("routes", "extra_paths"),
        "ui_path": ("routes", "ui_path"),
        "on_finish": ("hooks", "on_finish"),
        "request_interceptor": ("hooks", "request_interceptor"),
        "on_feedback": ("hooks", "on_feedback"),
    }
)
OTHER_KEYWORDS = ("engine", "secret_key")  # the middleware's own, for the suggestions


@dataclass(frozen=True)
class ChatStreamConfig:
    """Every config object of one middleware (``ChatStreamMiddleware(...).config``); ``openai`` None: no OpenAI
    routes (an ``OpenAIConfig(prefix=None)`` becomes None).

    Args:
        limits, timeouts, sessions, generation, openai, security, observability, routes, hooks: the config
            objects; each defaults to its class's defaults.
    """

    limits: Limits = field(default_factory=Limits)
    timeouts: Timeouts = field(default_factory=Timeouts)
    sessions: SessionConfig = field(default_factory=SessionConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    openai: OpenAIConfig | None = field(default_factory=OpenAIConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)
    routes: RoutesConfig = field(default_factory=RoutesConfig)
    hooks: Hooks = field(default_factory=Hooks)

    def __post_init__(self) -> None:
        for concern, config_class in CONCERNS.items():
            value = getattr(self, concern)
            if not isinstance(value, config_class) and not (concern == "openai" and value is None):
                fields = ", ".join(name for name, (owner, _) in SHORTHANDS.items() if owner == concern)
                raise ConfigurationError(
                    f"{concern} takes a {config_class.__name__}(...) (got {type(value).__name__}); "
                    f"or pass its shorthands instead ({fields})"
                )
        if self.openai is not None and self.openai.prefix is None:  # one way to say "off": openai=None
            object.__setattr__(self, "openai", None)

    def objects(self) -> dict[str, Any]:
        """Concern keyword -> config object, as ``ChatStreamMiddleware`` takes them."""
        return {concern: getattr(self, concern) for concern in CONCERNS}

    def replace(self, **keywords: Any) -> ChatStreamConfig:
        """A copy with these changes: a config object (``limits=Limits(...)``) replaces that concern's, a
        shorthand (``max_queue=8``) changes one field of it. Both for one concern raise ``ConfigurationError``,
        as does an unknown keyword (naming the closest valid one)."""
        objects = {name: value for name, value in keywords.items() if name in CONCERNS}
        grouped: dict[str, dict[str, Any]] = {}
        for name, value in keywords.items():
            if name not in CONCERNS:
                concern, field_name = SHORTHANDS.get(name) or raise_unknown(name)
                grouped.setdefault(concern, {})[field_name] = value
        for concern, fields in grouped.items():
            if concern in objects:
                raise_both(concern, fields)
            current = getattr(self, concern)
            objects[concern] = with_fields(current if current is not None else CONCERNS[concern](), fields)
        return dataclasses.replace(self, **objects)


def with_fields(config: Any, fields: dict[str, Any]) -> Any:
    """``config`` with ``fields`` changed; an error names the shorthand the caller passed, not the field."""
    try:
        return dataclasses.replace(config, **fields)
    except ConfigurationError as error:
        message = str(error)
        concern = next(name for name, config_class in CONCERNS.items() if isinstance(config, config_class))
        for shorthand, (owner, field_name) in SHORTHANDS.items():
            if owner == concern and field_name in fields and message.startswith(f"{field_name} "):
                raise ConfigurationError(shorthand + message[len(field_name) :]) from None
        raise


def shorthand_of(concern: str, field_name: str) -> str:
    return next(name for name, target in SHORTHANDS.items() if target == (concern, field_name))


def raise_both(concern: str, fields: dict[str, Any]) -> NoReturn:
    config_class = CONCERNS[concern].__name__
    given = ", ".join(f"{shorthand_of(concern, name)}=" for name in fields)
    example = ", ".join(f"{name}=..." for name in fields)
    raise ConfigurationError(
        f"{concern}= and its shorthand(s) {given} were both given; use one: "
        f"{concern}={config_class}({example}), or only the shorthands"
    )


def raise_unknown(name: str) -> NoReturn:
    valid = [*OTHER_KEYWORDS, *CONCERNS, *SHORTHANDS]
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"use a config object ({', '.join(CONCERNS)}) or a shorthand"
    raise ConfigurationError(f"unknown keyword {name!r}; {hint} (docs/configuration.md lists them all)")
