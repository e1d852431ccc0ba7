"""``TransformersEngine``: a transformers causal LM served with continuous batching.

The model lives on one worker thread (``_scheduler.Scheduler``); the event loop only renders
prompts (in a thread), submits sequences and awaits their events, which the worker delivers once
per step for all the streams of a loop (``_delivery``). Closing a stream marks its sequence
cancelled and the worker drops it at its next step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigurationError, EngineNotReady
from ._batch import ModelRunner
from ._delivery import Channel, LoopChannel, ReplyBuffer
from ._model_setup import as_dtype, default_name, eos_token_ids, placed, positive
from ._prefix_cache import PrefixCache, default_prefix_cache_bytes
from ._scheduler import Scheduler
from ._sequence import Sequence
from .base import (
    ChatMessage,
    GenerationChunk,
    PrefixCacheStats,
    SamplingParams,
    SchedulerStats,
    announce_counts,
    check_params,
)
from .detokenizer import DecoderSpec
from .prompts import Prompt, fit_prompt, model_context_len, render_off_loop_if_long, with_system_prompt
from .torch_threads import engine_threads

ENGINE_KWARGS = frozenset(
    {
        "device",
        "dtype",
        "max_batch_size",
        "context_len",
        "prefill_chunk_tokens",
        "model_name",
        "system_prompt",
        "stream_interval",
        "prefix_cache_bytes",
        "torch_threads",
    }
)
#: seconds a stream's text may wait to be sent with the next (see ``_delivery``): 50 writes a second at most.
STREAM_INTERVAL = 0.02


class TransformersEngine:
    """Streams chat replies from a transformers causal LM, batching requests at the iteration level.

    Args:
        model: a loaded ``AutoModelForCausalLM`` whose attention layers are full or sliding-window (others are
            refused, with the reason).
        tokenizer: its tokenizer; its chat template renders the prompts.
        device: move the model there (``"cpu"``, ``"cuda:0"``; ``"auto"``: CUDA when available); default: where it
            already is.
        dtype: cast the model (``torch.bfloat16`` or ``"bfloat16"``); default: keep its dtype, except that a
            float32 model on a CUDA device with bf16 support runs in bfloat16 (pass ``"float32"`` to keep it).
        max_batch_size: sequences decoded together; more wait inside the engine, first come first served.
        context_len: token budget of prompt plus reply; default the config's ``max_position_embeddings`` (or the
            name the model's family uses: ``n_positions``, ``max_seq_len``...).
        prefill_chunk_tokens: padded prompt tokens per prefill forward; longer prompts are prefilled
            in chunks between decode steps so running streams keep flowing.
        model_name: the name served to clients; default the basename of ``model.config.name_or_path``.
        system_prompt: prepended to conversations that carry no system message.
        stream_interval: seconds a stream's text may be held back to go out with the next tokens, so a model
            faster than anyone reads costs one write per interval, not one per token; a reply's first text and
            its end are never held. 0 hands every step's tokens over at once.
        prefix_cache_bytes: bytes of KV kept from ended sequences so that a chat's next turn (or any prompt that
            starts the same way) computes only its new tokens; 0 turns the cache off. Default: a tenth of the
            memory free on the model's device at start, at most 4 GiB (``default_prefix_cache_bytes``).
        torch_threads: CPU threads torch runs the model on, set in the engine's worker thread only (the host
            app's threads keep theirs). Default: for a model on the CPU every core but one, left to the event
            loop (``OMP_NUM_THREADS``, where set, decides); elsewhere torch's own (``torch_threads.py``).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        max_batch_size: int = 8,
        context_len: int | None = None,
        prefill_chunk_tokens: int = 512,
        model_name: str | None = None,
        system_prompt: str | None = None,
        stream_interval: float = STREAM_INTERVAL,
        prefix_cache_bytes: int | None = None,
        torch_threads: int | None = None,
    ) -> None:
        self.max_batch_size = positive("max_batch_size", max_batch_size)
        self.prefill_chunk_tokens = positive("prefill_chunk_tokens", prefill_chunk_tokens)
        self.context_len = positive("context_len", model_context_len(model, context_len))
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigurationError(
                "The tokenizer has no chat template; set tokenizer.chat_template to a Jinja template "
                "(see transformers' chat templating docs) before building the engine."
            )
        self.model = placed(model, device, as_dtype(dtype)).eval()
        self.tokenizer = tokenizer
        self.model_name = model_name or default_name(model)
        self.system_prompt = system_prompt
        if not isinstance(stream_interval, (int, float)) or not 0 <= stream_interval <= 1:
            raise ConfigurationError(f"stream_interval must be seconds in [0, 1], got {stream_interval!r}")
        self.stream_interval = float(stream_interval)
        self._runner = ModelRunner(self.model)
        if prefix_cache_bytes is None:
            prefix_cache_bytes = default_prefix_cache_bytes(self.model.device)
        if not isinstance(prefix_cache_bytes, int) or prefix_cache_bytes < 0:
            raise ConfigurationError(f"prefix_cache_bytes must be an int >= 0 (0 = off), got {prefix_cache_bytes!r}")
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        #: the worker thread's torch threads (None: torch's own); an engine process sets its own before start
        self.torch_threads = engine_threads(torch_threads)
        if torch_threads is None and self.model.device.type != "cpu":
            self.torch_threads = None  # the default is for a model computed on the CPU
        self._decoder = DecoderSpec(tokenizer)
        self._eos_ids = eos_token_ids(tokenizer, self.model)
        pad = getattr(tokenizer, "pad_token_id", None)
        self._pad_id = int(pad if pad is not None else next(iter(self._eos_ids), 0))
        self._scheduler: Scheduler | None = None
        self._closed = False
        # one channel per event loop: the web server's, and any other loop a caller streams from (tests do); the
        # entries of closed loops go when a new loop comes (the worker's flush drops their channels on its side)
        self._channels: dict[asyncio.AbstractEventLoop, LoopChannel] = {}

    @classmethod
    def from_pretrained(
        cls, path_or_dir: str | Path, *, gguf_file: str | None = None, **kwargs: Any
    ) -> TransformersEngine:
        """Load model and tokenizer with transformers' ``from_pretrained``.

        Engine arguments (``device``, ``dtype``, ``max_batch_size``, ...) go to the engine; every
        other keyword goes to ``AutoModelForCausalLM.from_pretrained``. With ``gguf_file`` the
        weights are dequantized from that GGUF file inside ``path_or_dir``.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        engine_kwargs = {k: v for k, v in kwargs.items() if k in ENGINE_KWARGS}
        load_kwargs = {k: v for k, v in kwargs.items() if k not in ENGINE_KWARGS}
        if gguf_file is not None:
            load_kwargs["gguf_file"] = gguf_file
            engine_kwargs.setdefault("model_name", Path(gguf_file).stem)
        if engine_kwargs.get("dtype") is not None:
            load_kwargs.setdefault("dtype", as_dtype(engine_kwargs["dtype"]))
        tokenizer = AutoTokenizer.from_pretrained(path_or_dir, **({"gguf_file": gguf_file} if gguf_file else {}))
        model = AutoModelForCausalLM.from_pretrained(path_or_dir, **load_kwargs)
        return cls(model, tokenizer, **engine_kwargs)

    @property
    def ready(self) -> bool:
        return self._scheduler is not None and self._scheduler.alive

    @property
    def stats(self) -> SchedulerStats:
        """Running and waiting sequences, steps taken and KV-cache width (all zero before ``start``)."""
        scheduler = self._scheduler
        return scheduler.stats if scheduler is not None else SchedulerStats()

    @property
    def running_count(self) -> int:
        return self.stats.running

    def prefix_cache_stats(self) -> PrefixCacheStats:
        """Hits, queries, bytes and entries of the prefix cache (``capacity_bytes == 0``: off)."""
        return self.prefix_cache.stats

    async def start(self) -> None:
        if self._scheduler is not None:
            return
        self._scheduler, self._closed = self.start_scheduler(), False

    def start_scheduler(self) -> Scheduler:
        """A new worker thread over this model (the engine process drives one without an event loop)."""
        scheduler = Scheduler(
            self._runner,
            max_batch_size=self.max_batch_size,
            prefill_chunk_tokens=self.prefill_chunk_tokens,
            pad_id=self._pad_id,
            prefix_cache=self.prefix_cache,
            torch_threads=self.torch_threads,
        )
        scheduler.start()
        return scheduler

    def new_sequence(
        self, prompt_ids: list[int], params: SamplingParams, channel: Channel, key: Any, *, detokenize: bool = True
    ) -> Sequence:
        """A request for the worker: its events go to ``channel`` for ``key``; token ids if not ``detokenize``."""
        check_params(params)
        return Sequence(
            prompt_ids, params, channel, key, decoder=self._decoder, eos_ids=self._eos_ids, detokenize=detokenize
        )

    async def close(self) -> None:
        scheduler, self._scheduler = self._scheduler, None
        self._closed = True
        if scheduler is not None:
            scheduler.stop()
            # The worker finishes its current forward first; wait for it off the event loop.
            await asyncio.to_thread(scheduler.join)

    def fit_prompt(self, messages: Seq[ChatMessage], params: SamplingParams) -> Prompt:
        """The prompt (text and ids) that ``stream`` would generate from, after truncation."""
        messages = with_system_prompt(messages, self.system_prompt)
        return fit_prompt(self.tokenizer, messages, max_new_tokens=params.max_new_tokens, context_len=self.context_len)

    def render_prompt(self, messages: Seq[ChatMessage], params: SamplingParams) -> str:
        return self.fit_prompt(messages, params).text

    async def stream(self, messages: Seq[ChatMessage], params: SamplingParams) -> AsyncIterator[GenerationChunk]:
        """Generate a reply to ``messages``; closing the iterator cancels the generation.

        Raises:
            PromptTooLong: the conversation cannot fit the context even truncated.
            EngineError: the model failed while generating this reply.
            EngineNotReady: the engine was closed before or during the generation.
        """
        check_params(params)
        scheduler = await self._running_scheduler()
        prompt = await render_off_loop_if_long(self.fit_prompt, messages, params)
        replies = ReplyBuffer()
        seq = self.new_sequence(prompt.token_ids, params, self._loop_channel(), replies)
        announce_counts(seq)
        scheduler.submit(seq)
        try:
            async for chunk in replies.chunks():
                yield chunk
        finally:
            seq.cancel()

    def _loop_channel(self) -> LoopChannel:
        """The channel of the running loop: every stream of one loop shares one hand-over per step."""
        loop = asyncio.get_running_loop()
        channel = self._channels.get(loop)
        if channel is None or channel.closed:
            for closed in [known for known in self._channels if known.is_closed()]:
                del self._channels[closed]
            channel = self._channels[loop] = LoopChannel(loop, self.stream_interval)
        return channel

    async def _running_scheduler(self) -> Scheduler:
        if self._scheduler is None:
            if self._closed:
                raise EngineNotReady("The engine is closed; call start() again before streaming.")
            await self.start()
        assert self._scheduler is not None
        return self._scheduler
