"""The HTTP side of ``multiturn.py``: users that chat for several turns, the ``/get_load`` poller, the cold probe.

Each user is one ``httpx.AsyncClient`` that keeps its session cookie, so its history lives on the server
and every turn's prompt is the whole conversation so far. A turn is ``POST /chat_stream`` with
``Accept: text/event-stream``; TTFT is the time from sending it to the first ``delta`` event, and the
``done`` event gives ``prompt_tokens``, ``completion_tokens`` and (with a prefix cache) ``cached_tokens``.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from _bench_client import CHAT_PATH, no_cookies, parse_event
from _multiturn_texts import fresh_message, user_message

LOAD_PATH = "/get_load"
TIMEOUT = httpx.Timeout(connect=10.0, read=300.0, write=10.0, pool=300.0)
POLL_INTERVAL = 0.1
CONFLICT_RETRIES = 20  # 409: the server had not yet seen this session's previous turn end


@dataclass
class Turn:
    """One chat turn as a user saw it; times in seconds."""

    user: int
    turn: int
    started: float
    ttft: float | None = None
    finished: float = 0.0
    done: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def count(self, name: str) -> int | None:
        value = self.done.get(name)
        return int(value) if value is not None else None


@dataclass
class Load:
    """What the users of one mode measured: their turns, the wall time, and the cache as ``/get_load`` showed it."""

    turns: list[Turn]
    wall: float
    cache_samples: list[dict[str, Any]]


def body(text: str, max_new_tokens: int, seed: int) -> dict[str, Any]:
    # greedy, exactly max_new_tokens: every mode generates the same replies, so the histories match
    return {"user_input": text, "max_new_tokens": max_new_tokens, "ignore_eos": True, "temperature": 0, "seed": seed}


async def send_turn(client: httpx.AsyncClient, text: str, max_new_tokens: int, seed: int, turn: Turn) -> Turn:
    """Stream one reply; retries a 409 (the previous turn still counted as running) without counting the wait."""
    for _ in range(CONFLICT_RETRIES):
        turn.started = time.perf_counter()
        headers = {"Accept": "text/event-stream"}
        async with client.stream("POST", CHAT_PATH, json=body(text, max_new_tokens, seed), headers=headers) as reply:
            if reply.status_code == 409:
                await reply.aread()
                await asyncio.sleep(0.05)
                continue
            if reply.status_code != 200:
                turn.error = f"HTTP {reply.status_code}: {(await reply.aread())[:200]!r}"
                break
            await read_events(reply, turn)
            break
    else:
        turn.error = "409 on every try"
    turn.finished = time.perf_counter()
    return turn


async def read_events(reply: httpx.Response, turn: Turn) -> None:
    buffer = ""
    async for text in reply.aiter_text():
        now = time.perf_counter()
        *blocks, buffer = (buffer + text).split("\n\n")
        for block in blocks:
            name, data = parse_event(block)
            if name == "delta" and turn.ttft is None and data.get("text"):
                turn.ttft = now - turn.started
            elif name == "done":
                turn.done = data
            elif name == "error":
                turn.error = str(data)[:200]


async def chat(base_url: str, user: int, a: Any, start_after: float) -> list[Turn]:
    """User ``user``'s conversation: ``a.turns`` turns, ``a.think`` seconds apart, on one session cookie."""
    await asyncio.sleep(start_after)
    turns: list[Turn] = []
    async with httpx.AsyncClient(base_url=base_url, timeout=TIMEOUT) as client:
        for index in range(1, a.turns + 1):
            if index > 1:
                await asyncio.sleep(a.think)
            text = user_message(a.seed, user, index, a.words)
            turns.append(await send_turn(client, text, a.max_new_tokens, a.seed, Turn(user, index, 0.0)))
            if turns[-1].error:
                break  # the history is no longer what the other modes see
    return turns


async def poll_cache(base_url: str, samples: list[dict[str, Any]], stop: asyncio.Event) -> None:
    """``prefix_cache`` of ``/get_load`` every ``POLL_INTERVAL`` s until ``stop`` (nothing when it is absent)."""
    async with httpx.AsyncClient(base_url=base_url, timeout=5.0) as client:
        while not stop.is_set():
            with contextlib.suppress(httpx.HTTPError, ValueError):
                cache = (await client.get(LOAD_PATH)).json().get("prefix_cache")
                if isinstance(cache, dict):
                    samples.append(cache)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), POLL_INTERVAL)


async def run_users(base_url: str, a: Any) -> Load:
    """``a.users`` users chatting at once; their first turns are spread over one think time, not a burst."""
    samples: list[dict[str, Any]] = []
    stop = asyncio.Event()
    poller = asyncio.create_task(poll_cache(base_url, samples, stop))
    started = time.perf_counter()
    chats = (chat(base_url, user, a, a.think * user / a.users) for user in range(1, a.users + 1))
    per_user = await asyncio.gather(*chats)
    wall = time.perf_counter() - started
    stop.set()
    await poller
    async with httpx.AsyncClient(base_url=base_url, timeout=5.0) as client:  # the cache after the last turn
        with contextlib.suppress(httpx.HTTPError, ValueError):
            last = (await client.get(LOAD_PATH)).json().get("prefix_cache")
            samples += [last] if isinstance(last, dict) else []
    return Load([turn for turns in per_user for turn in turns], wall, samples)


async def one_fresh_turn(base_url: str, text: str, max_new_tokens: int, seed: int) -> Turn:
    async with httpx.AsyncClient(base_url=base_url, timeout=TIMEOUT, cookies=no_cookies()) as client:
        return await send_turn(client, text, max_new_tokens, seed, Turn(0, 1, 0.0))


async def cold_probe(base_url: str, a: Any, target_tokens: int, tokens_per_word: float) -> list[Turn]:
    """Single-message chats from fresh sessions, each about ``target_tokens`` long, on the otherwise idle server.

    The first is a calibration (its ``prompt_tokens`` corrects the words-per-token guess) and is not kept.
    """
    words = max(20, round(target_tokens / tokens_per_word))
    calibration = await one_fresh_turn(base_url, fresh_message(a.seed, 0, words), 1, a.seed)
    if calibration.error or not calibration.count("prompt_tokens"):
        raise RuntimeError(f"cold probe calibration failed: {calibration.error or calibration.done}")
    words = max(20, round(words * target_tokens / calibration.count("prompt_tokens")))
    probes = []
    for index in range(1, a.cold_samples + 1):
        probes.append(await one_fresh_turn(base_url, fresh_message(a.seed, index, words), a.max_new_tokens, a.seed))
        if probes[-1].error:
            raise RuntimeError(f"cold probe failed: {probes[-1].error}")
    return probes


async def warm_up(base_url: str, a: Any) -> None:
    """One short untimed chat, so first-call costs stay out of the numbers."""
    turn = await one_fresh_turn(base_url, fresh_message(a.seed, 999, 40), 4, a.seed)
    if turn.error or turn.ttft is None:
        raise RuntimeError(f"warm-up request failed: {turn.error or turn.done}")


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None
