"""Soak: thousands of chats with random disconnects against the mock and the tiny engine, on 127.0.0.1.

``make soak`` (or ``python benchmarks/soak.py``) serves ``ChatStreamMiddleware`` on a real uvicorn in a
thread and drives it with N closed-loop clients, each keeping its session (history grows, trimmed by the
store). A share of the chats is abandoned at a random point (before the first byte, mid-stream). Each phase
is bounded by a chat count and a time budget. Afterwards it checks that every slot and queue place came
back and no session stayed locked, and it follows the process RSS after warm-up (it must stay flat).

The figures go between ``<!-- soak:start -->`` and ``<!-- soak:end -->`` in ``benchmarks/RESULTS.md``;
the rest of the file (the serving benchmark's section) is left as it is. Exit status 1 if a slot leaked.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chatstream_asgi import ChatStreamMiddleware, MemoryHistoryStore, MockEngine  # noqa: E402
from tests.integration.servers import UvicornThread, not_found_app  # noqa: E402

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
START, END = "<!-- soak:start -->", "<!-- soak:end -->"
SECRET = "soak-secret-key-0123456789abcdef"
CONFLICT_PAUSE = 0.02  # what a client does after a 409: wait a moment, then send its next turn


@dataclass
class Phase:
    name: str
    chats: int
    seconds: float
    served: int = 0
    disconnected: int = 0
    rejected: int = 0
    errors: int = 0
    conflicts: int = 0
    leaked_slots: int = -1
    locked_sessions: int = -1
    rss_mb: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    statuses: dict[int, int] = field(default_factory=dict)
    in_band: set[str] = field(default_factory=set)

    @property
    def done(self) -> int:
        return self.served + self.disconnected + self.rejected + self.errors + self.conflicts


async def one_chat(client: httpx.AsyncClient, phase: Phase, rng: random.Random, leave_rate: float) -> None:
    leave_after = rng.randint(0, 6) if rng.random() < leave_rate else None
    try:
        async with client.stream("POST", "/chat_stream", json={"user_input": f"question {rng.random()}"}) as reply:
            if reply.status_code in (429, 503):
                phase.rejected += 1
                await reply.aread()
                return
            if reply.status_code == 409:  # the session's abandoned turn has not been noticed as ended yet
                phase.conflicts += 1
                await asyncio.sleep(CONFLICT_PAUSE)
                return
            if reply.status_code != 200:
                phase.errors += 1
                phase.statuses[reply.status_code] = phase.statuses.get(reply.status_code, 0) + 1
                return
            chunks, body = 0, []
            async for chunk in reply.aiter_raw():
                body.append(chunk)
                chunks += 1
                if leave_after is not None and chunks > leave_after:
                    phase.disconnected += 1
                    return
            text = b"".join(body)
            if b"[error:" in text:
                phase.errors += 1
                phase.in_band.add(text[text.index(b"[error:") :][:80].decode(errors="replace"))
            else:
                phase.served += 1
    except httpx.HTTPError:
        phase.errors += 1


async def drive(url: str, phase: Phase, clients: int, leave_rate: float, seed: int) -> None:
    deadline = time.monotonic() + phase.seconds
    process = psutil.Process()
    marks = [phase.chats // 10, phase.chats // 2]

    async def worker(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            while phase.done < phase.chats and time.monotonic() < deadline:
                await one_chat(client, phase, rng, leave_rate)
                if marks and phase.done >= marks[0]:
                    marks.pop(0)
                    phase.rss_mb.append(process.memory_info().rss / 2**20)

    started = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(clients)))
    phase.elapsed = time.monotonic() - started
    phase.rss_mb.append(process.memory_info().rss / 2**20)


async def settle(app: ChatStreamMiddleware, phase: Phase) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
        app.admission.running or app.admission.waiting or app.routes.active_sessions
    ):
        await asyncio.sleep(0.05)
    phase.leaked_slots = app.admission.running + app.admission.waiting
    phase.locked_sessions = len(app.routes.active_sessions)


def run_phase(phase: Phase, engine: Any, args: argparse.Namespace, **options: Any) -> Phase:
    store = MemoryHistoryStore(max_turns=4)
    app = ChatStreamMiddleware(not_found_app, engine=engine, secret_key=SECRET, history_store=store, **options)
    with UvicornThread(app, fail_on_errors=False) as server:
        asyncio.run(drive(server.url, phase, args.clients, args.leave_rate, args.seed))
        asyncio.run(settle(app, phase))
    print(f"{phase.name}: {phase}", flush=True)
    return phase


def tiny_engine() -> Any:
    from chatstream_asgi import TransformersEngine
    from tests.tiny_model import build_tiny_model

    folder = build_tiny_model(Path(tempfile.mkdtemp(prefix="soak-tiny-")))
    return TransformersEngine.from_pretrained(str(folder), max_batch_size=4)


def report(phases: list[Phase], args: argparse.Namespace) -> str:
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "## Soak (`make soak`)",
        "",
        f"{when}, {os.cpu_count()} CPUs, {args.clients} closed-loop clients on 127.0.0.1, {args.leave_rate:.0%} of",
        "chats abandoned at a random point (before the first byte or mid-stream); each client keeps its",
        "session (history trimmed to 4 turns). `leaked` is slots plus queue places still held once the load",
        "stops (must be 0); `locked` is sessions still marked as streaming (must be 0). RSS is the whole",
        "process (server and clients), sampled after 10 % and 50 % of the chats and at the end.",
        "",
        "| engine | chats | served | abandoned | 409 | rejected | errors | leaked | locked | chats/s | RSS MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in phases:
        rss = " → ".join(f"{mb:.0f}" for mb in p.rss_mb)
        rate = p.done / p.elapsed if p.elapsed else 0.0
        lines.append(
            f"| {p.name} | {p.done} | {p.served} | {p.disconnected} | {p.conflicts} | {p.rejected} | {p.errors} | "
            f"{p.leaked_slots} | {p.locked_sessions} | {rate:.0f} | {rss} |"
        )
    lines += [
        "",
        "RSS MB: after 10 % → 50 % of the chats → at the end. `409`: the client's next turn arrived before the",
        "server had seen it leave the previous one (the client then waits 20 ms); `rejected`: 429/503 under the",
        "queue limit; `errors`: any other non-200 answer, a transport error, or an in-band error.",
    ]
    return "\n".join(lines)


def write_results(section: str) -> None:
    """Put ``section`` between the soak markers, leaving everything else in the file as it is."""
    block = f"{START}\n{section}\n{END}"
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmark results\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    RESULTS.write_text(text, encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mock-chats", type=int, default=3000)
    parser.add_argument("--tiny-chats", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=90.0, help="time budget of each phase")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--leave-rate", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=6)
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing RESULTS.md")
    args = parser.parse_args()
    limits = {"max_concurrency": 8, "max_queue": 16, "queue_timeout": 10.0, "drain_timeout": 2.0}
    mock = MockEngine(" ".join(["word"] * 40), token_delay=0.001)
    phases = [run_phase(Phase("mock", args.mock_chats, args.seconds), mock, args, **limits)]
    if args.tiny_chats:
        tiny = Phase("tiny Llama (TransformersEngine, CPU)", args.tiny_chats, args.seconds)
        params = {"max_concurrency": 4, "max_queue": 16, "queue_timeout": 30.0, "drain_timeout": 2.0}
        phases.append(run_phase(tiny, tiny_engine(), args, max_new_tokens_limit=16, **params))
    section = report(phases, args)
    if args.no_write:
        print(section)
    else:
        write_results(section)
    return 1 if any(p.leaked_slots or p.locked_sessions for p in phases) else 0


if __name__ == "__main__":
    raise SystemExit(main())
