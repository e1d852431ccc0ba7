"""The worker thread: iteration-level (continuous) batching over one model.

Each step: drop finished and cancelled sequences, run ONE decode forward over every running
sequence, then at most one prefill forward (a left-padded group of waiting prompts bounded by
``prefill_chunk_tokens``, or the next chunk of a prompt longer than that). Prefilled sequences
emit their first token at once and join the running batch for the next step; nobody waits for a
batch to drain. A prefill computes only what the prefix cache does not hold, and a sequence
leaving the batch leaves its KV there (``_prefix_reuse``). Sequences come in through ``_intake``;
what a step emitted goes out once, at its end (``_delivery``). A failure in a forward pass fails
only the sequences of that forward (their cache may be half-updated) and the worker keeps serving.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from functools import partial

import torch
from transformers import DynamicCache

from ..errors import EngineNotReady
from ._batch import KVBatch, ModelRunner, prefill, prefill_chunk
from ._cache import row_kv
from ._delivery import Channel
from ._intake import Intake
from ._prefix_cache import PrefixCache
from ._prefix_reuse import PrefixReuse, left_to_compute
from ._sampling import choose_tokens
from ._sequence import Sequence
from ._step_failures import fail_step, poisons_the_device
from .base import SchedulerStats
from .torch_threads import use_in_this_thread

logger = logging.getLogger(__name__)
IDLE_WAKE_S = 1.0  # the longest an idle worker sleeps between two flushes


@dataclass
class _Partial:
    """A prompt longer than one prefill chunk, half-way through its prefill."""

    seq: Sequence
    cache: DynamicCache
    offset: int = 0


class Scheduler:
    """Owns the model on one daemon thread; ``submit`` is the only way in."""

    def __init__(
        self,
        runner: ModelRunner,
        *,
        max_batch_size: int,
        prefill_chunk_tokens: int,
        pad_id: int,
        prefix_cache: PrefixCache | None = None,
        torch_threads: int | None = None,
    ) -> None:
        self._runner = runner
        self._torch_threads = torch_threads
        self._reuse = PrefixReuse(prefix_cache)
        self._max_batch = max_batch_size
        self._chunk = prefill_chunk_tokens
        self._pad_id = pad_id
        self._intake = Intake()
        self._partial: _Partial | None = None
        self._batch: KVBatch | None = None
        self._steps = 0
        self.step_stats = SchedulerStats()  # as of the last step's end (set on the worker thread)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chatstream-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, seq: Sequence) -> None:
        self._intake.submit(seq)

    def attach(self, channel: Channel) -> None:
        """Flush ``channel`` every step from now on, before any sequence of its own (an engine process's connection,
        so that its web process hears the batch change while it has nothing running)."""
        self._intake.attach(channel)

    def stop(self) -> None:
        """Ask the worker to finish its current step, fail what is left and exit."""
        self._stopping.set()
        self._intake.wake()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._intake.closed

    @property
    def stats(self) -> SchedulerStats:
        batch, partial = self._batch, self._partial  # one read each: the worker may swap them
        rows = batch.seqs if batch else []
        return SchedulerStats(
            running=sum(not s.finished for s in rows) + (partial is not None and not partial.seq.finished),
            waiting=self._intake.waiting,
            batch_rows=len(rows),
            steps=self._steps,
            cache_width=batch.width if batch else 0,
        )

    def _run(self) -> None:
        if self._torch_threads is not None:
            use_in_this_thread(self._torch_threads)
        logger.info("the model runs on %d torch thread(s)", torch.get_num_threads())
        try:
            with torch.inference_mode():
                while not self._stopping.is_set():
                    idle = self._batch is None and self._partial is None and not self._intake.pending
                    # idle, it still flushes every IDLE_WAKE_S: an engine process's connections send a heartbeat
                    self._intake.take_new(block=idle, timeout=IDLE_WAKE_S)
                    try:
                        self._step()
                    except Exception as exc:  # a bug outside a forward: lose the batch, not the worker
                        self._recover(exc)
                    self._flush()
        finally:
            self._shutdown()
            self._flush()

    def _flush(self) -> None:
        self.step_stats = self.stats  # once per step, for the channels that pass the figures on (engine process)
        self._intake.flush()

    def _step(self) -> None:
        self._drop_finished()
        if self._batch is None and self._partial is None and not self._intake.pending:
            return
        if self._batch is not None:
            self._decode(self._batch)
        self._prefill_next()
        self._drop_finished()
        self._steps += 1

    def _decode(self, batch: KVBatch) -> None:
        try:
            tokens = choose_tokens(batch.step(self._runner), [s.sampler for s in batch.seqs])
            batch.next_tokens = tokens
            for seq, token in zip(batch.seqs, tokens, strict=True):
                seq.accept(token)
        except Exception as exc:  # the cache may be half-updated: every row of it is lost
            self._batch = None
            self._fail(batch.seqs, exc)

    def _prefill_next(self) -> None:
        if self._partial is not None:
            self._continue_partial(self._partial)
            return
        free = self._max_batch - (len(self._batch.seqs) if self._batch else 0)
        group = self._take_group(free)
        if len(group) == 1 and left_to_compute(group[0]) > self._chunk:
            self._partial = _Partial(group[0], *self._reuse.for_chunks(self._runner, group[0]))
            self._continue_partial(self._partial)
        elif group:
            try:
                reused = self._reuse.for_group(group)
                cache, logits = prefill(self._runner, [s.prompt_ids for s in group], self._pad_id, reused)
                self._admit(group, cache, logits)
            except Exception as exc:
                self._fail(group, exc)

    def _take_group(self, free: int) -> list[Sequence]:
        """FIFO prompts whose padded batch of uncached tokens fits the prefill budget (the first one always goes)."""
        group: list[Sequence] = []
        width = 0
        pending = self._intake.pending
        while pending and len(group) < free:
            widest = max(width, self._reuse.find(pending[0]))
            if group and widest * (len(group) + 1) > self._chunk:
                break
            group.append(pending.popleft())
            width = widest
        return group

    def _continue_partial(self, part: _Partial) -> None:
        prompt = part.seq.prompt_ids
        chunk = prompt[part.offset : part.offset + self._chunk]
        try:
            logits = prefill_chunk(self._runner, part.cache, chunk, part.offset)
            part.offset += len(chunk)
            if part.offset == len(prompt):
                self._partial = None
                self._admit([part.seq], part.cache, logits)
        except Exception as exc:
            self._partial = None
            self._fail([part.seq], exc)

    def _admit(self, seqs: list[Sequence], cache: DynamicCache, logits: torch.Tensor) -> None:
        """Emit each prefilled sequence's first token and move the unfinished ones into the batch."""
        tokens = choose_tokens(logits, [s.sampler for s in seqs])
        joined = KVBatch(seqs, cache, [len(s.prompt_ids) for s in seqs], tokens)
        rows = [i for i, (seq, token) in enumerate(zip(seqs, tokens, strict=True)) if not seq.accept(token)]
        if len(rows) < len(seqs):
            self._reuse.keep_rows(joined, [i for i in range(len(seqs)) if i not in rows])
        if not rows:
            return
        if len(rows) < len(seqs):
            joined.keep(rows)
        batch = self._batch
        if batch is None:
            self._batch = joined
            return
        try:
            batch.merge(joined)
        except Exception as exc:  # a half-merged cache is lost for the running rows too
            self._batch = None
            self._fail(batch.seqs, exc)
            raise

    def _drop_finished(self) -> None:
        self._intake.drop_finished()
        if self._partial is not None and self._partial.seq.finished:
            part, self._partial = self._partial, None
            self._reuse.keep(part.seq, part.offset, part.cache, partial(row_kv, part.cache, 0, 0, part.offset))
        batch = self._batch
        if batch is not None:
            rows = [i for i, s in enumerate(batch.seqs) if not s.finished]
            if len(rows) < len(batch.seqs):
                self._reuse.keep_rows(batch, [i for i, s in enumerate(batch.seqs) if s.finished])
            if not rows:
                self._batch = None
            elif len(rows) < len(batch.seqs):
                batch.keep(rows)

    def _in_flight(self) -> list[Sequence]:
        return (self._batch.seqs if self._batch else []) + ([self._partial.seq] if self._partial else [])

    def _fail(self, seqs: list[Sequence], exc: BaseException) -> None:
        fail_step(seqs, exc)
        if poisons_the_device(exc):
            logger.critical("the device is unusable after %s; the engine worker stops", type(exc).__name__)
            self._stopping.set()

    def _recover(self, exc: Exception) -> None:
        seqs = self._in_flight()
        self._batch = self._partial = None
        self._fail(seqs, exc)

    def _shutdown(self) -> None:
        for seq in [*self._intake.close(), *self._in_flight()]:
            seq.fail(EngineNotReady("The engine was closed while this request was in flight; retry on a running one."))
        self._partial = self._batch = None
