"""One web process as the engine process sees it: its requests in, its events out.

A reader thread takes submits and cancels; the scheduler thread posts each sequence's events here (this is
their ``Channel``) and, once per step, sends them as one frame, straight from its own thread when the
socket takes it. A writer thread only drains what a client that reads slowly left behind, so such a
client never stalls the model loop. When the web process goes away, its sequences are cancelled.
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import threading
import time
from dataclasses import astuple
from typing import Any

import torch

from ._delivery import Event, FirstToken, StreamHold
from ._scheduler import IDLE_WAKE_S, Scheduler
from ._sequence import Sequence
from ._wire import WIRE_VERSION, encode, recv_message, step_frame, wire_event
from .base import PrefixCacheStats, SamplingParams, SchedulerStats
from .transformers import TransformersEngine

WRITER_EXIT_S = 5.0  # the writer thread's last sendall fails at once on a shut-down socket
#: a connection that sent nothing for this long gets an empty frame at the next flush, so that its web process can
#: tell an engine with nothing to say from a hung or stopped one (ProcessEngine's hang_timeout). Half the idle
#: worker's wake-up period, so that every idle wake-up sends one: at the full period, a wake-up that came a hair
#: early sent nothing, and the gap doubled
HEARTBEAT_S = IDLE_WAKE_S / 2


class ClientConnection:
    """One web process: its requests in, its events out (the ``Channel`` of its sequences)."""

    def __init__(
        self,
        sock: socket.socket,
        engine: TransformersEngine,
        scheduler: Scheduler,
        serves: str = "",
        load_seconds: float | None = None,
    ) -> None:
        self.sock = sock
        self.load_seconds = load_seconds  # how long this engine took to start (the web side's Retry-After)
        self.engine = engine
        self.serves = serves  # spec_identity of the spec it was built from: a web process asking for another refuses
        self.scheduler = scheduler
        self.closed = False
        self._sequences: dict[int, Sequence] = {}
        self._hold = StreamHold(engine.stream_interval)  # wire events by request id
        self._cache_sent: PrefixCacheStats | None = None
        self._load_sent = SchedulerStats()
        self._last_send = time.monotonic()
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._queued = 0  # frames handed to the writer thread and not yet sent
        self._send_lock = threading.Lock()
        self._writer = threading.Thread(target=self._write_loop, name="engine-writer", daemon=True)

    def serve(self, on_close: Any) -> None:
        self._writer.start()
        threading.Thread(target=self._read_loop, args=(on_close,), name="engine-reader", daemon=True).start()

    def finish(self, timeout: float) -> None:
        """Send what is queued (the errors of a shutdown), then stop writing."""
        self._outbox.put(None)
        self._writer.join(timeout)

    # Channel, called on the scheduler thread
    def post(self, key: Any, event: Event, urgent: bool) -> bool:
        if self.closed:
            return False
        self._hold.post(key, wire_event(event), urgent)
        if not isinstance(event, (int, str, FirstToken)):  # the last event of that sequence
            self._sequences.pop(key, None)
        return True

    def flush(self) -> bool:
        if self.closed:
            return False
        batch = self._hold.take_due()
        load = self._load_changes(with_events=bool(batch))
        if batch or load is not None or time.monotonic() - self._last_send > HEARTBEAT_S:
            self._send(step_frame(batch, self._cache_changes(), load))
        return True

    def _send(self, frame: bytes) -> None:
        """Write now when nothing is queued and the socket takes it, else leave it to the writer thread.

        A step's frame is small and the socket buffer nearly always has room: sending here saves a thread
        hand-over (and its GIL round trip) per step, while a client that does not read never blocks the model.
        """
        self._last_send = time.monotonic()
        with self._send_lock:
            if self._queued == 0:
                try:
                    sent = self.sock.send(frame, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    sent = len(frame)  # the reader sees the connection end and closes it
                if sent == len(frame):
                    return
                frame = frame[sent:]
            self._queued += 1
            self._outbox.put(frame)

    def _cache_changes(self) -> tuple[int, ...] | None:
        """The prefix cache's figures if they changed since the last frame (what ``/metrics`` shows there)."""
        stats = self.engine.prefix_cache_stats()
        if stats == self._cache_sent:
            return None
        self._cache_sent = stats
        return astuple(stats)

    def _load_changes(self, with_events: bool) -> tuple[int, ...] | None:
        """The batch's figures for a frame: with events whenever they changed; alone (a connection with nothing due,
        its web process idle while others use the engine) when running or waiting did, not just the step count."""
        stats, last = self.scheduler.step_stats, self._load_sent
        if stats is last or (not with_events and (stats.running, stats.waiting) == (last.running, last.waiting)):
            return None
        self._load_sent = stats
        return (stats.running, stats.waiting, stats.batch_rows, stats.steps, stats.cache_width)

    def send_hello(self) -> None:
        engine = self.engine
        self._cache_sent = engine.prefix_cache_stats()  # with the hello: /get_load shows the cache before any step
        self._load_sent = self.scheduler.stats
        info = {
            "model_name": engine.model_name,
            "max_batch_size": engine.max_batch_size,
            "context_len": engine.context_len,
            "system_prompt": engine.system_prompt,
            "tokenizer": engine.tokenizer,
            "pid": os.getpid(),
            "torch_threads": torch.get_num_threads(),
            "wire": WIRE_VERSION,
            "serves": self.serves,
            "cache": astuple(self._cache_sent),
            "stats": astuple(self._load_sent),
            "load_seconds": self.load_seconds,
        }
        self._send(encode(("hello", info)))

    def _write_loop(self) -> None:
        try:
            while (frame := self._outbox.get()) is not None:
                self.sock.sendall(frame)
                with self._send_lock:
                    self._queued -= 1
        except OSError:
            self._close()

    def _read_loop(self, on_close: Any) -> None:
        try:
            while (message := recv_message(self.sock)) is not None:
                self._handle(message)
        except (OSError, ConnectionError, pickle.UnpicklingError, EOFError):
            pass
        finally:
            self._close()
            self._writer.join(WRITER_EXIT_S)  # it exits once the socket is shut down; then the socket can go
            self.sock.close()
            on_close(self)

    def _handle(self, message: tuple[Any, ...]) -> None:
        if message[0] == "hello":  # asked for, so that a probe connection costs nothing
            self.send_hello()
            self.scheduler.attach(self)  # after the hello: no step frame (figures, heartbeat) may go before it
        elif message[0] == "submit":
            _, rid, prompt_ids, params = message
            try:
                seq = self.engine.new_sequence(prompt_ids, SamplingParams(**params), self, rid, detokenize=False)
                self._sequences[rid] = seq
                self.scheduler.submit(seq)
            except Exception as exc:  # a closed scheduler, bad parameters: that request fails, not the connection
                self._send(step_frame({rid: [wire_event(exc)]}))
        elif message[0] == "cancel":
            cancelled = self._sequences.pop(message[1], None)
            if cancelled is not None:
                cancelled.cancel()

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for seq in list(self._sequences.values()):
            seq.cancel()  # the web process is gone: stop computing for it at the next step
        self._sequences.clear()
        self._outbox.put(None)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
