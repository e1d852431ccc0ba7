"""What one request may use and how long it may take, and what the model is asked with."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from ..engines.base import SamplingParams
from ..errors import ConfigurationError
from ..http.encoders import WIRES, Wire
from ._checks import check_bool, check_int, check_seconds, check_text


@dataclass(frozen=True)
class Limits:
    """Admission (slots and queue) and the size of what a request may send or ask for.

    Args:
        max_concurrency: generations running at once (match the engine's ``max_batch_size``).
        max_queue: requests waiting for a slot, in FIFO order; the next one gets 429 with ``Retry-After``.
            0 queues none.
        queue_timeout: seconds a request may wait for a slot before a 503; None waits forever.
        max_body_bytes: larger chat request bodies get 413 without being read.
        max_new_tokens_limit: the most tokens one request may ask for.
        max_input_chars: the longest ``user_input`` (on the OpenAI routes, each message) accepted (400 beyond).
        max_input_tokens: the most tokens one ``user_input`` (on the OpenAI routes, the whole prompt) may have,
            counted with the engine's tokenizer (engines without one are limited by ``max_input_chars`` only);
            None: no token limit.
        max_history_turns: at most this many user/assistant pairs of history sent to the model with a new turn
            (older pairs are cut a quarter of it at a time, so the prompt prefix stays cacheable); None sends all
            (the engine still truncates to its context).
    """

    max_concurrency: int = 2
    max_queue: int = 5
    queue_timeout: float | None = 60.0
    max_body_bytes: int = 64 * 1024
    max_new_tokens_limit: int = 4096
    max_input_chars: int = 16_000
    max_input_tokens: int | None = None
    max_history_turns: int | None = None

    def __post_init__(self) -> None:
        check_int("max_concurrency", self.max_concurrency, example=4)
        check_int("max_queue", self.max_queue, minimum=0, example=8)
        check_seconds("queue_timeout", self.queue_timeout, example=30.0, off="wait forever")
        check_int("max_body_bytes", self.max_body_bytes, example=64 * 1024)
        check_int("max_new_tokens_limit", self.max_new_tokens_limit, example=4096)
        check_int("max_input_chars", self.max_input_chars, example=16_000)
        check_int("max_input_tokens", self.max_input_tokens, example=2048, off="no token limit")
        check_int("max_history_turns", self.max_history_turns, example=20, off="send the whole history")


@dataclass(frozen=True)
class Timeouts:
    """How long a reply, a stalled client and a shutdown may take.

    Args:
        generation: seconds after which a reply is cut (in-band error, partial reply kept); None sets no limit.
        send: seconds a client may stop reading before it is treated as gone; None waits forever.
        drain: seconds running streams may finish during shutdown (25: inside the 30 s that Kubernetes and
            gunicorn wait before SIGKILL, with time left to end the rest cleanly).
        drain_on_signals: on SIGTERM/SIGINT (main thread only) drain at once and hold the signal back from the
            server until the drain is over; False leaves the drain to the lifespan shutdown.
        freeze_gc: once the engine has started, ``gc.freeze()`` the process's heap (once per process), so the
            garbage collector's full collections stop pausing every stream and the host app (135 ms each with
            torch imported, measured), and collect the youngest generation every 7,000 allocations instead of
            700 (see ``engines/gc_heap.py``); False leaves the collector as it is.
    """

    generation: float | None = 300.0
    send: float | None = 30.0
    drain: float = 25.0
    drain_on_signals: bool = True
    freeze_gc: bool = True

    def __post_init__(self) -> None:
        check_seconds("generation", self.generation, example=300.0, off="no limit")
        check_seconds("send", self.send, example=30.0, off="wait forever")
        check_seconds("drain", self.drain, example=25.0, zero=True)
        check_bool("drain_on_signals", self.drain_on_signals)
        check_bool("freeze_gc", self.freeze_gc)


@dataclass(frozen=True)
class GenerationConfig:
    """What every chat turn is generated with.

    Args:
        system_prompt: a system message put before every conversation (not on the OpenAI routes); None: none.
        default_params: sampling defaults, a ``SamplingParams``; requests override them field by field.
            None: ``SamplingParams()``.
        wire: ``"delta"`` (text deltas) or ``"chatstream-0.3"`` (each chunk the whole reply + ``<::EOS::>``,
            for ChatStream 0.3 clients); SSE clients get SSE either way.
    """

    system_prompt: str | None = None
    default_params: SamplingParams | None = None
    wire: Wire = "delta"

    def __post_init__(self) -> None:
        check_text("system_prompt", self.system_prompt)
        if self.default_params is not None and not isinstance(self.default_params, SamplingParams):
            raise ConfigurationError(
                f"default_params must be a SamplingParams (got {type(self.default_params).__name__}); "
                "pass e.g. SamplingParams(temperature=0.3), or None for SamplingParams()"
            )
        if self.wire not in WIRES:
            raise ConfigurationError(f"wire must be one of {list(WIRES)} (got {self.wire!r})")

    @cached_property
    def params(self) -> SamplingParams:
        """The sampling defaults in effect."""
        return self.default_params if self.default_params is not None else SamplingParams()
