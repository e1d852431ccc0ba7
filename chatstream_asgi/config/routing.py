"""Where the routes live: the chat routes, the OpenAI-compatible routes, and health and metrics."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from ..errors import ConfigurationError
from ..http.routes import DEFAULT_PATHS
from ..http.session_routes import ROUTE_NAMES
from ..openai.limits import MAX_BODY_BYTES, MAX_MESSAGES
from ._checks import check_bool, check_int, check_path, check_paths


@dataclass(frozen=True)
class RoutesConfig:
    """The chat routes' paths and the chat page.

    Args:
        path: the chat route; the other routes keep their default paths unless given in ``paths``.
        paths: route name -> path, for ``chat_stream``, ``clear_context``, ``get_prompt``, ``get_load``,
            ``get_token_count``.
        extra_paths: paths for ``set_generation_params``, ``get_generation_params``, ``set_feedback``,
            ``get_feedback``, ``get_resource_usage``, ``stop_generation`` (default ``/<name>``).
        ui_path: where the built-in chat page is served (e.g. ``"/"``); None (the default) turns it off.
    """

    path: str = "/chat_stream"
    paths: dict[str, str] | None = None
    extra_paths: dict[str, str] | None = None
    ui_path: str | None = None

    def __post_init__(self) -> None:
        check_path("path", self.path)
        check_paths("paths", self.paths, DEFAULT_PATHS)
        check_paths("extra_paths", self.extra_paths, ROUTE_NAMES)
        check_path("ui_path", self.ui_path, off="no chat page")

    @cached_property
    def chat_paths(self) -> dict[str, str]:
        """Route name -> path of the four chat routes."""
        return {**DEFAULT_PATHS, "chat_stream": self.path, **(self.paths or {})}


@dataclass(frozen=True)
class OpenAIConfig:
    """The OpenAI-compatible routes (``{prefix}/chat/completions``, ``{prefix}/models``); ``openai=None`` turns
    them off. Their API keys are ``SecurityConfig.api_keys``.

    Args:
        prefix: where the routes live; ``""`` puts them at the root; None turns them off (as ``openai=None``).
        max_body_bytes: the routes' body limit (413 beyond; clients send the whole conversation each time).
        max_messages: the most messages one request may send (400 beyond).
    """

    prefix: str | None = "/v1"
    max_body_bytes: int = MAX_BODY_BYTES
    max_messages: int = MAX_MESSAGES

    def __post_init__(self) -> None:
        prefix = self.prefix
        if prefix is not None and (not isinstance(prefix, str) or (prefix and not is_prefix(prefix))):
            raise ConfigurationError(
                f"prefix must start with '/' and not end with one (e.g. '/v1'); got {prefix!r} (None: no OpenAI routes)"
            )
        check_int("max_body_bytes", self.max_body_bytes, example=MAX_BODY_BYTES)
        check_int("max_messages", self.max_messages, example=MAX_MESSAGES)


def is_prefix(prefix: str) -> bool:
    return prefix.startswith("/") and not prefix.endswith("/")


@dataclass(frozen=True)
class ObservabilityConfig:
    """Health, readiness and metrics routes, and what the request log holds.

    Args:
        metrics_path: where Prometheus metrics are served (needs the ``metrics`` extra; without it they are off
            with a warning); None turns them off.
        metrics_registry: a ``prometheus_client.CollectorRegistry`` to register in; None: a new one.
        health_path: the liveness route; None turns it off.
        ready_path: the readiness route (503 while draining); None turns it off.
        log_text: put user input and reply text in the request log (never by default).
    """

    metrics_path: str | None = "/metrics"
    metrics_registry: object | None = None
    health_path: str | None = "/healthz"
    ready_path: str | None = "/readyz"
    log_text: bool = False

    def __post_init__(self) -> None:
        check_path("metrics_path", self.metrics_path, off="no metrics")
        check_path("health_path", self.health_path, off="no liveness route")
        check_path("ready_path", self.ready_path, off="no readiness route")
        check_bool("log_text", self.log_text)

    @cached_property
    def ops_paths(self) -> dict[str, str | None]:
        """Operations route name -> path (None: off)."""
        return {"healthz": self.health_path, "readyz": self.ready_path, "metrics": self.metrics_path}
