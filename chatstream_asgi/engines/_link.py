"""One web process's connection to the engine process: requests out, one frame of token ids per step in.

The engine process sends token ids, not text: detokenizing and watching stop strings cost ~4 µs a
token in Python, a fifth of a fast model's step at batch 64, so they run here, beside the model loop
instead of inside it (vLLM's frontend does the same). A reader task takes each frame (every stream's
tokens of one engine step) and hands each stream its ids; each stream's consumer turns them into text
when it runs (``ReplyBuffer.decode``). A stop string ends the reply there and cancels the sequence at
the engine's next step.
When the connection ends, every open stream gets an ``EngineError`` (in-band for the client) and
``on_lost`` tells the engine to restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

from ..errors import EngineError, EngineNotReady
from ._delivery import FirstToken, ReplyBuffer
from ._wire import WIRE_VERSION, encode, local_event, read_message
from .base import GenerationChunk, PrefixCacheStats, SamplingParams, SchedulerStats
from .detokenizer import DecoderSpec, ReplyText

logger = logging.getLogger("chatstream_asgi")
LINK_BUFFER = 1 << 22  # bytes the reader may take in one read: a step of many streams is one read
LOST = "The engine process ended while generating this reply; it is being restarted."
HELLO_TIMEOUT_S = 10.0  # an engine's reader thread answers at once; one that does not is stopped or hung


def ids_only(events: list[Any]) -> bool:
    """Whether a stream's events are token ids only: a first token is only ever a reply's first event, and an end
    or an error its last, so the edges tell (no test per id)."""
    return type(events[0]) is int and type(events[-1]) is int


@dataclasses.dataclass(slots=True)
class OpenReply:
    """A request in flight: where its text goes, and the text state its token ids go through."""

    buffer: ReplyBuffer
    text: ReplyText
    prompt_tokens: int
    completion_tokens: int = 0
    cached_tokens: int = 0


class EngineLink:
    """Submits and cancels requests; ``replies`` maps each open request id to its ``OpenReply``."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        info: dict[str, Any],
        on_lost: Callable[[EngineLink], None],
    ) -> None:
        self.reader, self.writer, self.info = reader, writer, info
        self.decoder = DecoderSpec(info["tokenizer"])
        self.replies: dict[int, OpenReply] = {}
        # the engine's prefix cache, as of its hello or its last frame that changed it (an older engine sends none)
        self.cache_stats = PrefixCacheStats(*info["cache"]) if info.get("cache") else PrefixCacheStats()
        # the engine's whole batch (every web process's sequences), as of its hello or its last frame that changed it
        self.engine_stats = SchedulerStats(*info.get("stats", ()))
        self.closed = False
        self.last_heard = time.monotonic()  # the engine sends a frame at least every second
        self._ids = itertools.count()
        self._on_lost = on_lost
        self._task = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def open(
        cls, address: str, on_lost: Callable[[EngineLink], None], hello_timeout: float = HELLO_TIMEOUT_S
    ) -> EngineLink:
        reader, writer = await asyncio.open_unix_connection(address, limit=LINK_BUFFER)
        try:
            writer.write(encode(("hello",)))
            answer = await asyncio.wait_for(read_message(reader), hello_timeout)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            writer.close()
            raise ConnectionError(f"the engine on {address} closed the connection before answering") from exc
        except TimeoutError as exc:  # a stopped process still accepts connections (the kernel's listen backlog)
            writer.close()
            raise ConnectionError(f"the engine on {address} did not answer within {hello_timeout:.0f} s") from exc
        if not (isinstance(answer, tuple) and len(answer) == 2 and answer[0] == "hello"):
            writer.close()
            raise ConnectionError(f"the engine on {address} answered {str(answer)[:80]} instead of hello")
        info = answer[1]
        if info.get("wire") != WIRE_VERSION:
            writer.close()
            raise EngineNotReady(
                f"the engine process on {address} (pid {info.get('pid')}) speaks wire version {info.get('wire')}, "
                f"this web process {WIRE_VERSION}: it is from another chatstream_asgi version; stop it (or wait for "
                "it to exit once its last web process has gone) and start again"
            )
        return cls(reader, writer, info, on_lost)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> tuple[int, ReplyBuffer]:
        """Send a request to the engine; its id (to ``cancel`` it) and the buffer its reply arrives in."""
        if self.closed:  # nobody would ever answer this request
            raise ConnectionError("the connection to the engine is closed")
        rid = next(self._ids)
        reply = OpenReply(ReplyBuffer(), ReplyText(self.decoder, params.stop), len(prompt_ids))
        reply.buffer.decode = functools.partial(self._decode, rid, reply)
        self.replies[rid] = reply
        # a flat copy of the fields: dataclasses.asdict deep-copies them, ten times slower for the same dict
        self.writer.write(encode(("submit", rid, prompt_ids, dict(vars(params)))))
        return rid, reply.buffer

    def cancel(self, rid: int) -> None:
        """Stop request ``rid`` at the engine's next step; nothing to do once it ended."""
        if self.replies.pop(rid, None) is not None and not self.closed:
            self.writer.write(encode(("cancel", rid)))

    async def close(self) -> None:
        self.closed = True
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()

    async def _read_loop(self) -> None:
        try:
            while True:
                kind, batch, cache, load = await read_message(self.reader)
                self.last_heard = time.monotonic()
                if kind == "step":
                    self._deliver(batch)
                    if cache is not None:
                        self.cache_stats = PrefixCacheStats(*cache)
                    if load is not None:
                        self.engine_stats = SchedulerStats(*load)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except Exception:  # a frame this side cannot handle: lose the link (its streams fail), never hang them
            logger.exception("unreadable frame from the engine process; dropping the connection")
        finally:
            self._lose()

    def _deliver(self, batch: dict[int, list[Any]]) -> None:
        """Hand a frame's events to their streams as they came, to be decoded on each consumer's own turn.

        A frame holds every step the engine sent while this loop was busy (at batch 64, five steps of 64
        tokens were common), grouped by stream, each stream's in step order. Handing them over costs a
        list extend and a wake-up per stream, so a whole frame goes in one callback; detokenizing and
        watching stop strings (~4 µs a token) run in ``ReplyBuffer.take``, where the loop's fair wake-ups
        bound each iteration's chat work, and a consumer that fell behind decodes all its pending ids in
        one call. (Decoding here, in time slices of streams per iteration, decoded each frame's ids as
        they came and gave the link a budget of its own beside the consumers': ~12 % fewer tokens/s over
        HTTP on the fast-model benchmark, the host app's ``/hello`` p99 the same.)
        """
        # A reply's first text is its time to first token, and a reply's end lets its client send the next
        # request (a batch row stays empty until it arrives): those streams are woken first. Only a run's
        # first event (a first token) or its last (an end, an error) is either.
        urgent = [rid for rid, run in batch.items() if not ids_only(run)]
        for rid in urgent:
            self._hand_over(rid, batch.pop(rid))
        for rid, events in batch.items():
            self._hand_over(rid, events)

    def _hand_over(self, rid: int, events: list[Any]) -> None:
        reply = self.replies.get(rid)
        if reply is not None:  # None: cancelled or stopped here while its last tokens were on the way
            reply.buffer.push_raw(events)

    def _decode(self, rid: int, reply: OpenReply, events: list[Any]) -> None:
        """A stream's raw events into its reply text, an end or an error (``ReplyBuffer.decode``)."""
        if ids_only(events):  # a running stream's: no test per id (a quarter of the cost of decoding at batch 64)
            self._tokens(rid, reply, events)
            return
        ids: list[int] = []
        for wire in events:
            if isinstance(wire, int):
                ids.append(wire)
                continue
            event = local_event(wire)
            if isinstance(event, FirstToken):
                reply.cached_tokens = event.cached_tokens
                ids.append(event.token_id)
                continue
            if ids and not self._tokens(rid, reply, ids):
                return  # a stop string ended it
            self.replies.pop(rid, None)
            if isinstance(event, GenerationChunk):
                reply.buffer.push(self._last_chunk(reply, event))
            elif isinstance(event, tuple):
                reply.buffer.push(EngineError(event[1]))
            return
        if ids:
            self._tokens(rid, reply, ids)

    def _tokens(self, rid: int, reply: OpenReply, ids: list[int]) -> bool:
        """Turn ``ids`` into text for the stream; False once a stop string ended the reply."""
        if reply.text.watches_stops:  # token by token: the reply ends at the token that completes a stop string
            return all(self._token(rid, reply, token_id) for token_id in ids)
        reply.completion_tokens += len(ids)
        text = reply.text.push_many(ids)
        if text:
            reply.buffer.push(text)
        return True

    def _token(self, rid: int, reply: OpenReply, token_id: int) -> bool:
        reply.completion_tokens += 1
        text = reply.text.push(token_id)
        if reply.text.stopped:  # a stop string: the reply ends with the text before it
            end = GenerationChunk(text, "stop", reply.prompt_tokens, reply.completion_tokens, reply.cached_tokens)
            reply.buffer.push(end)
            self.cancel(rid)
            return False
        if text:
            reply.buffer.push(text)
        return True

    @staticmethod
    def _last_chunk(reply: OpenReply, end: GenerationChunk) -> GenerationChunk:
        """The engine ended the reply (EOS, max_new_tokens): release the held-back text with the end."""
        text = reply.text.finish()
        reason = "stop" if reply.text.stopped else end.finish_reason
        return dataclasses.replace(end, text=text, finish_reason=reason)

    def abort(self) -> None:
        """Drop the connection as if the engine had gone (its streams fail; the engine restarts it)."""
        self._task.cancel()  # its finally loses the link

    def _lose(self) -> None:
        """The engine is gone: fail what was running here, then let the engine restart it."""
        was_closed, self.closed = self.closed, True
        self.engine_stats = SchedulerStats(steps=self.engine_stats.steps)  # its batch went with it
        self.writer.close()
        replies, self.replies = self.replies, {}
        for reply in replies.values():
            reply.buffer.push_raw([("error", LOST)])  # after the tokens that arrived before, still undecoded
        if not was_closed:
            self._on_lost(self)
