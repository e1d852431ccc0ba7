"""``ProcessEngine``: a ``TransformersEngine`` in its own process, shared by every web worker that names it.

Why: on a fast model the serving path sets the pace, and in one process the model loop and the web
app's event loop share one GIL. Here the model runs in ``_engine_server`` (vLLM's engine core and
SGLang's scheduler made the same choice); the web process renders and tokenizes prompts, sends
``(request id, token ids, params)`` and receives one frame per step with every stream's events.
Several web workers (``uvicorn --workers 4``, gunicorn ``-w 4``) that pass the same ``address``
share one engine: one model copy, one batch. If the engine process dies (``kill -9``, a CUDA
error), running replies end with an in-band error, new chats get ``503`` with ``Retry-After`` while
it is restarted, and the web app never notices beyond that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import tempfile
import time
import weakref
from collections.abc import AsyncIterator
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError, EngineError, EngineNotReady, EngineUnavailable
from ._launcher import ENGINE_MODULE, Launcher
from ._link import HELLO_TIMEOUT_S, EngineLink
from ._wire import spec_identity
from .base import (
    ChatMessage,
    GenerationChunk,
    PrefixCacheStats,
    SamplingParams,
    SchedulerStats,
    announce_counts,
    check_params,
)
from .prompts import Prompt, fit_prompt, render_off_loop_if_long, with_system_prompt
from .torch_threads import engine_threads

logger = logging.getLogger("chatstream_asgi")
RESTART_BACKOFF = (0.05, 1.0)  # first and longest wait between reconnection attempts, seconds
# after a failed restart (the model folder gone, the GPU lost): 1 s, doubling to a minute, so a process that cannot
# start does not spend a core on a new interpreter and torch import every second
FAILED_RESTART_BACKOFF = (1.0, 60.0)
WATCH_INTERVAL_S = 1.0  # how often the hang watchdog looks


class ProcessEngine:
    """Streams chat replies from a ``TransformersEngine`` that runs in a separate process.

    Args:
        spec: how the engine process builds its engine; use ``from_pretrained`` or ``from_factory``.
        address: the engine's Unix socket path. Web workers passing the same path share one engine process
            (the first to start it, under a lock); default: a private socket in a new temporary folder.
        linger: seconds the engine process stays up with no web process connected (a worker restart keeps it).
        start_timeout: seconds to wait for the model to load.
        hang_timeout: seconds without a word from a running engine process (it sends at least one frame a second,
            and one per step) after which it is taken for hung or stopped: it is killed, so that its streams end
            with an in-band error and it restarts as after a crash. Raise it for a model whose single forward pass
            may take longer (a large model on a CPU); None never does this.
        torch_threads: torch's intra-op threads in the engine process. Default: every core this process may run
            on but one, which is left to the web process(es) (with ``OMP_NUM_THREADS`` set, torch's own choice;
            ``torch_threads.py`` says why).
        tokenizer, context_len, model_name, max_batch_size, system_prompt: what the web side knows before the
            engine answers (``from_pretrained`` fills in the last four from its arguments); the engine's own values
            replace them once connected.
    """

    def __init__(
        self,
        spec: dict[str, Any],
        *,
        address: str | Path | None = None,
        linger: float = 10.0,
        start_timeout: float = 600.0,
        hang_timeout: float | None = 60.0,
        torch_threads: int | None = None,
        tokenizer: Any = None,
        context_len: int | None = None,
        model_name: str = "model",
        max_batch_size: int = 8,
        system_prompt: str | None = None,
    ) -> None:
        self.private = address is None
        if address is None:
            folder = tempfile.mkdtemp(prefix="chatstream-engine-")
            address = os.path.join(folder, "engine.sock")
            # close() removes it; so does dropping an engine never closed (a script, a test), or the interpreter's exit
            weakref.finalize(self, shutil.rmtree, folder, ignore_errors=True)
        if len(os.fsencode(address)) > 100:
            raise ConfigurationError(f"address {address!r} is too long for a Unix socket; use a path under ~100 bytes")
        self.address = str(address)
        spec = {**spec, "torch_threads": engine_threads(torch_threads)}
        self.launcher = Launcher(spec, self.address, 0.5 if self.private else linger, start_timeout)
        if hang_timeout is not None and not (isinstance(hang_timeout, (int, float)) and hang_timeout >= 2):
            raise ConfigurationError(f"hang_timeout must be seconds >= 2 (or None), got {hang_timeout!r}")
        self.hang_timeout = hang_timeout
        self._watchdog: asyncio.Task[None] | None = None
        self.tokenizer, self.context_len, self.system_prompt = tokenizer, context_len, system_prompt
        self.model_name, self.max_batch_size = model_name, max_batch_size
        self._link: EngineLink | None = None
        self._reconnecting: asyncio.Task[None] | None = None
        self._closed = False
        self.restarts = 0

    @classmethod
    def from_pretrained(
        cls,
        path_or_dir: str | Path,
        *,
        gguf_file: str | None = None,
        address: str | Path | None = None,
        linger: float = 10.0,
        start_timeout: float = 600.0,
        hang_timeout: float | None = 60.0,
        torch_threads: int | None = None,
        **kwargs: Any,
    ) -> ProcessEngine:
        """The engine process runs ``TransformersEngine.from_pretrained(path_or_dir, gguf_file=..., **kwargs)``.

        Nothing of the model is loaded here: the tokenizer, the context length and the system prompt come with
        the engine's first answer (``start()``). Loading the tokenizer here through transformers would import
        torch into every web worker (its config classes do): 280 MiB of resident memory each, for nothing.
        """
        spec = {"path": str(path_or_dir), "gguf_file": gguf_file, "kwargs": kwargs}
        name = kwargs.get("model_name") or (Path(gguf_file).stem if gguf_file else Path(str(path_or_dir)).name)
        return cls(
            spec,
            address=address,
            linger=linger,
            start_timeout=start_timeout,
            hang_timeout=hang_timeout,
            torch_threads=torch_threads,
            context_len=kwargs.get("context_len"),
            model_name=name,
            max_batch_size=kwargs.get("max_batch_size", 8),
            system_prompt=kwargs.get("system_prompt"),
        )

    @classmethod
    def from_factory(cls, factory: str, *, max_batch_size: int, model_name: str, **options: Any) -> ProcessEngine:
        """The engine process calls ``factory`` (``"package.module:function"``), which returns a TransformersEngine.

        ``max_batch_size`` and ``model_name`` must match what it builds (admission and ``/v1/models`` need them
        before it answers). Options go to ``ProcessEngine`` (``address``, ``linger``, ``torch_threads``,
        ``factory_kwargs``...).
        """
        if ":" not in factory:
            raise ConfigurationError(f"factory must be 'package.module:function', got {factory!r}")
        spec = {"factory": factory, "kwargs": options.pop("factory_kwargs", {})}
        return cls(spec, max_batch_size=max_batch_size, model_name=model_name, **options)

    @property
    def ready(self) -> bool:
        link = self._link
        return link is not None and not link.closed and not self._silent(link)

    def _silent(self, link: EngineLink) -> bool:
        """The engine process sent nothing for ``hang_timeout`` (it sends a frame at least every second)."""
        return self.hang_timeout is not None and time.monotonic() - link.last_heard > self.hang_timeout

    def prefix_cache_stats(self) -> PrefixCacheStats:
        """The engine process's prefix cache figures, as of its last step that changed them."""
        return self._link.cache_stats if self._link is not None else PrefixCacheStats()

    @property
    def running_count(self) -> int:
        return len(self._link.replies) if self._link is not None else 0

    @property
    def stats(self) -> SchedulerStats:
        """The engine process's batch (every web process's sequences), as of its last frame that changed it."""
        return self._link.engine_stats if self._link is not None else SchedulerStats()

    async def start(self) -> None:
        """Connect to the engine process, starting it if nobody serves the address yet (idempotent)."""
        if self.ready:
            return
        self._closed = False
        await asyncio.to_thread(self.launcher.ensure_started)
        await self._connect(deadline=asyncio.get_running_loop().time() + self.launcher.start_timeout)

    async def close(self) -> None:
        self._closed = True
        for task in (self._reconnecting, self._watchdog):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._watchdog = None
        link, self._link = self._link, None
        if link is not None:
            await link.close()
        if self.private:
            await asyncio.to_thread(self.launcher.stop)
            shutil.rmtree(os.path.dirname(self.address), ignore_errors=True)  # the socket's private folder

    def fit_prompt(self, messages: Seq[ChatMessage], params: SamplingParams) -> Prompt:
        if self.tokenizer is None or self.context_len is None:
            raise EngineNotReady("The engine has not answered yet; start() it before rendering prompts.")
        messages = with_system_prompt(messages, self.system_prompt)
        return fit_prompt(self.tokenizer, messages, max_new_tokens=params.max_new_tokens, context_len=self.context_len)

    def render_prompt(self, messages: Seq[ChatMessage], params: SamplingParams) -> str:
        return self.fit_prompt(messages, params).text

    async def stream(self, messages: Seq[ChatMessage], params: SamplingParams) -> AsyncIterator[GenerationChunk]:
        """Generate a reply in the engine process; closing the iterator cancels it there at its next step."""
        check_params(params)  # here, as the in-thread engine does: a ConfigurationError, not the process's EngineError
        await self._usable_link()  # started and connected: the tokenizer is known
        prompt = await render_off_loop_if_long(self.fit_prompt, messages, params)
        link = await self._usable_link()  # again: the engine may have gone while the prompt was rendered
        rid, replies = link.submit(prompt.token_ids, params)
        announce_counts(link.replies[rid])  # its counts, for a reply cut short (base.live_counts)
        sent = False
        try:
            async for chunk in replies.chunks():
                sent = True
                yield chunk
        except EngineError as exc:
            if sent or not link.closed or isinstance(exc, EngineUnavailable):
                raise
            # the engine died before this reply had any text: a 503 to retry, as for a chat that came a moment later
            retry = round(self.launcher.load_seconds) + 1
            raise EngineUnavailable("The engine process is restarting; retry shortly.", retry_after=retry) from exc
        finally:
            link.cancel(rid)

    async def _usable_link(self) -> EngineLink:
        if self._closed:
            raise EngineNotReady("The engine is closed; call start() again before streaming.")
        if self._link is None and self._reconnecting is None:
            await self.start()
        if self._link is None or self._link.closed:
            retry = round(self.launcher.load_seconds) + 1
            raise EngineUnavailable("The engine process is restarting; retry shortly.", retry_after=retry)
        return self._link

    async def _connect(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        wait = RESTART_BACKOFF[0]
        while True:
            try:
                hello_timeout = min(HELLO_TIMEOUT_S, max(1.0, deadline - loop.time()))
                link = await EngineLink.open(self.address, on_lost=self._lost, hello_timeout=hello_timeout)
                break
            except OSError as exc:
                if loop.time() > deadline:
                    raise EngineNotReady(f"No engine answered on {self.address}: {exc}") from None
                await asyncio.to_thread(self.launcher.ensure_started)
                await asyncio.sleep(wait)
                wait = min(wait * 2, RESTART_BACKOFF[1])
        info = link.info
        ours = spec_identity(self.launcher.spec)
        if info.get("serves") not in (None, ours):  # None: an engine too old to say (same wire version)
            await link.close()
            raise ConfigurationError(
                f"the engine process on {self.address} (pid {info.get('pid')}) serves {info['serves']}, and this "
                f"web process asks for {ours}: give each model (or model setting) an address of its own, or stop "
                "that engine (it exits once its last web process has gone)"
            )
        self.tokenizer, self.context_len = info["tokenizer"], info["context_len"]
        self.model_name, self.max_batch_size = info["model_name"], info["max_batch_size"]
        self.system_prompt = info["system_prompt"]
        load_seconds = info.get("load_seconds")
        if isinstance(load_seconds, (int, float)) and load_seconds > 0:  # also for a worker that did not start it
            self.launcher.load_seconds = load_seconds
        self._link = link
        if self.hang_timeout is not None and self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        """Kill an engine process that went silent: stopped (``SIGSTOP``, a debugger) or stuck in a step (a hung GPU
        kernel). Its socket stays open, so nothing else would end the streams waiting on it, or tell ``/readyz``."""
        silent_before = False
        while not self._closed:
            await asyncio.sleep(WATCH_INTERVAL_S)
            link = self._link
            silent = link is not None and not link.closed and self._silent(link)
            if link is not None and silent and silent_before:  # twice in a row: not a stall of this event loop
                pid = link.info.get("pid")
                logger.error(
                    "the engine process on %s (pid %s) sent nothing for over %.0f s (hang_timeout): taken for hung; "
                    "killing it to restart it",
                    self.address,
                    pid,
                    self.hang_timeout,
                )
                if not kill_engine_process(pid, self.address):
                    link.abort()  # not ours to kill (or gone): its streams fail, and a reconnect starts
            silent_before = silent

    def _lost(self, link: EngineLink) -> None:
        """The engine process went away: its streams already got an error; reconnect (restarting it) in the back."""
        if self._closed or link is not self._link or self._reconnecting is not None:
            return
        self.restarts += 1
        logger.error("the engine process on %s went away; restarting it", self.address)
        self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        wait = FAILED_RESTART_BACKOFF[0]
        try:
            while not self._closed:
                try:
                    await self._connect(deadline=asyncio.get_running_loop().time() + self.launcher.start_timeout)
                    return
                except Exception as exc:  # a failed start (e.g. the GPU still busy): keep answering 503, try again
                    logger.error("restarting the engine process failed (next try in %.0f s): %s", wait, exc)
                    await asyncio.sleep(wait)
                    wait = min(wait * 2, FAILED_RESTART_BACKOFF[1])
        finally:
            self._reconnecting = None

    def __repr__(self) -> str:
        return f"ProcessEngine({self.model_name!r}, address={self.address!r}, ready={self.ready})"


def kill_engine_process(pid: Any, address: str) -> bool:
    """SIGKILL the engine process ``pid`` if it is the one serving ``address`` (its command line says so: a pid
    may have been reused); False if it is not, is gone, or this system cannot tell (no ``/proc``)."""
    try:
        with open(f"/proc/{int(pid)}/cmdline", "rb") as cmdline:
            args = cmdline.read().split(b"\0")
        if ENGINE_MODULE.encode() not in args or os.fsencode(address) not in args:
            return False
        os.kill(int(pid), signal.SIGKILL)
    except (OSError, TypeError, ValueError):
        return False
    return True
