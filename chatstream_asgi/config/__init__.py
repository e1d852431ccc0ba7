"""The middleware's configuration: one frozen dataclass per concern, each checked when it is built, and the flat
keywords (shorthands) that set one field each.

- ``serving``: ``Limits`` (admission, request sizes), ``Timeouts``, ``GenerationConfig``.
- ``routing``: ``RoutesConfig``, ``OpenAIConfig``, ``ObservabilityConfig``.
- ``access``: ``SessionConfig``, ``SecurityConfig``, ``Hooks``.
- ``composed``: ``ChatStreamConfig`` (all of them) and ``SHORTHANDS``, the one table of flat keywords.

It sits just below ``middleware``: the config objects name types of the layers below (``HistoryStore``,
``SamplingParams``) and reuse their checks (API keys, origins).
"""

from __future__ import annotations

from .access import Hooks, SecurityConfig, SessionConfig
from .composed import CONCERNS, SHORTHANDS, ChatStreamConfig
from .routing import ObservabilityConfig, OpenAIConfig, RoutesConfig
from .serving import GenerationConfig, Limits, Timeouts

__all__ = [
    "CONCERNS",
    "SHORTHANDS",
    "ChatStreamConfig",
    "GenerationConfig",
    "Hooks",
    "Limits",
    "ObservabilityConfig",
    "OpenAIConfig",
    "RoutesConfig",
    "SecurityConfig",
    "SessionConfig",
    "Timeouts",
]
