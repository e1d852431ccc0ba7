"""chatstream_asgi: stream LLM chat replies from any ASGI app.

``import chatstream_asgi`` stays light: torch and transformers load only when
``TransformersEngine`` is first used.

One folder per concern, each importing only those below it (``lint-imports`` checks the contracts in
``pyproject.toml``): ``compat/`` and ``cli.py`` > ``middleware.py`` (the composition root) > ``config/`` > ``openai/`` >
``http/`` > ``ops/`` > ``sessions/`` > ``engines/`` > ``errors.py``. Each folder's ``__init__`` says what it holds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import (
    ChatStreamConfig,
    GenerationConfig,
    Hooks,
    Limits,
    ObservabilityConfig,
    OpenAIConfig,
    RoutesConfig,
    SecurityConfig,
    SessionConfig,
    Timeouts,
)
from .engines.base import ChatMessage, Engine, GenerationChunk, SamplingParams
from .engines.mock import MockEngine
from .engines.replicas import EngineReplicas
from .errors import (
    ChatStreamError,
    ConfigurationError,
    EngineError,
    EngineUnavailable,
    HistoryStoreError,
    HTTPError,
)
from .http.hooks import Interceptor, OnFinish
from .http.session_routes import OnFeedback
from .middleware import ChatStreamMiddleware
from .ops.admission import Draining, QueueFull, QueueTimeout, Rejected
from .sessions.history import HistoryStore, MemoryHistoryStore
from .sessions.state import SessionStateStore

if TYPE_CHECKING:
    from .engines.openai_upstream import OpenAIUpstreamEngine
    from .engines.process import ProcessEngine
    from .engines.transformers import TransformersEngine
    from .sessions.redis_store import RedisHistoryStore

__version__ = "0.1.0"
__all__ = [
    "ChatMessage",
    "ChatStreamConfig",
    "ChatStreamError",
    "ChatStreamMiddleware",
    "ConfigurationError",
    "Draining",
    "Engine",
    "EngineError",
    "EngineReplicas",
    "EngineUnavailable",
    "GenerationChunk",
    "GenerationConfig",
    "HTTPError",
    "HistoryStore",
    "HistoryStoreError",
    "Hooks",
    "Interceptor",
    "Limits",
    "MemoryHistoryStore",
    "MockEngine",
    "ObservabilityConfig",
    "OnFeedback",
    "OnFinish",
    "OpenAIConfig",
    "OpenAIUpstreamEngine",
    "ProcessEngine",
    "QueueFull",
    "QueueTimeout",
    "RedisHistoryStore",
    "Rejected",
    "RoutesConfig",
    "SamplingParams",
    "SecurityConfig",
    "SessionConfig",
    "SessionStateStore",
    "Timeouts",
    "TransformersEngine",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name == "TransformersEngine":
        from .engines.transformers import TransformersEngine

        return TransformersEngine
    if name == "ProcessEngine":
        from .engines.process import ProcessEngine

        return ProcessEngine
    if name == "RedisHistoryStore":
        from .sessions.redis_store import RedisHistoryStore

        return RedisHistoryStore
    if name == "OpenAIUpstreamEngine":
        from .engines.openai_upstream import OpenAIUpstreamEngine

        return OpenAIUpstreamEngine
    raise AttributeError(f"module 'chatstream_asgi' has no attribute {name!r}")
