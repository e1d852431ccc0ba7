"""Where the slowest ``/hello`` polls spent their time while chats stream on the fast model.

    python benchmarks/hello_tail.py                     # ProcessEngine, 64 clients x 5 requests
    python benchmarks/hello_tail.py --engine thread --concurrency 32 --slow-ms 1.5

A diagnostic for bench-stack's "/hello p99 under load ≤ 2× idle" target, not a benchmark: it writes nothing
to ``RESULTS.md``. It starts bench-stack's server (the middleware around a tiny Starlette app on uvicorn)
and its ``/hello`` poller, runs one closed loop of the light client while ``perf sched`` records every
context switch of the machine, then, for each poll slower than ``--slow-ms``, says how long the server's
event-loop thread was running, runnable but waiting for a CPU, or asleep, the same for the poller, and
which threads held the CPUs; then the totals over all slow polls. Read it so:
- the loop thread *running* for most of a slow poll: the poll waited for the server's own loop
  iterations (chat work, in the iterations before uvicorn read the request and before its task ran);
- *runnable*: the server waited for a core (the holders say who had them);
- the poller *runnable* or *asleep* at the end: the answer was out, the measuring side was late;
- a *gc* column: the server's garbage collector ran within the poll (and stopped the loop that long).

Needs ``perf`` and the right to trace all CPUs (root, or ``kernel.perf_event_paranoid`` at -1); without them
it still prints the poll percentiles, the loop thread's run-queue wait from ``/proc`` and the collections.
"""

from __future__ import annotations

import argparse
import collections
import os
import tempfile
import time
from pathlib import Path

from _fast_model import build_fast_model
from _sched_timeline import Recording, Timeline, perf_missing
from _stack_http import Poller, Server, in_windows, run_client, run_queue_wait
from _stack_report import percentile

HERE = Path(__file__).resolve().parent
IDLE_SECONDS = 3.0
STATES = ("running", "runnable", "asleep", "unknown")


def ms_at(values: list[float], q: float) -> str:
    """The ``q``-th percentile in ms, by bench-stack's rule (nearest rank)."""
    return f"{percentile(values, q) * 1e3:.2f}" if values else "—"


def thread_roles(server_pid: int) -> dict[int, str]:
    """The server's threads and its child processes' (the engine process), read while they run."""
    roles: dict[int, str] = {}
    pending = [(server_pid, "server")]
    while pending:
        pid, role = pending.pop()
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                roles[int(tid)] = role
                with open(f"/proc/{pid}/task/{tid}/children") as children:  # a child may come from any thread
                    pending.extend((int(child), "engine") for child in children.read().split())
        except OSError:
            continue
    roles[server_pid] = "server loop"
    return roles


def label(tid: int, comm: str, roles: dict[int, str]) -> str:
    return roles.get(tid, f"{comm}[{tid}]")


def states(spent: dict[str, float]) -> str:
    return " ".join(f"{state} {spent[state] * 1e3:.2f}" for state in STATES if spent.get(state, 0.0) >= 5e-6)


def collected_within(pauses: list[tuple[float, float, int]], start: float, end: float) -> tuple[float, int]:
    """Seconds of garbage collection between ``start`` and ``end``, and the oldest generation collected (-1: none)."""
    seconds, oldest = 0.0, -1
    for at, lasted, generation in pauses:
        overlap = min(end, at + lasted) - max(start, at)
        if overlap > 0:
            seconds, oldest = seconds + overlap, max(oldest, generation)
    return seconds, oldest


def report_collections(
    pauses: list[tuple[float, float, int]], window: tuple[float, float], slow: list[tuple[float, float]]
) -> None:
    """How often the server's garbage collector stopped it during the load, and how many slow polls that explains."""
    during = [(at, lasted, gen) for at, lasted, gen in pauses if window[0] <= at <= window[1]]
    by_generation = collections.Counter(gen for _, _, gen in during)
    longest = max((lasted for _, lasted, _ in during), default=0.0)
    hit = [collected_within(during, at, at + seconds)[0] for at, seconds in slow]
    print(
        f"garbage collections in the server during the load: {len(during)} "
        f"({', '.join(f'gen {gen}: {n}' for gen, n in sorted(by_generation.items())) or 'none'}), "
        f"longest {longest * 1e3:.2f} ms; {sum(1 for s in hit if s > 0)} of the {len(slow)} slow polls overlapped one "
        f"({sum(hit) * 1e3:.1f} ms of collection within them)"
    )


def report_slow_polls(
    timeline: Timeline,
    slow: list[tuple[float, float]],
    pids: tuple[int, int],
    roles: dict[int, str],
    pauses: list[tuple[float, float, int]],
    top: int,
) -> None:
    """One line per slow poll (the ``top`` slowest), then the totals; ``pids``: the server's loop, the poller."""
    server_pid, poller_pid = pids
    totals: dict[str, collections.Counter[str]] = {"loop": collections.Counter(), "poller": collections.Counter()}
    holders: collections.Counter[str] = collections.Counter()
    for rank, (at, seconds) in enumerate(sorted(slow, key=lambda poll: -poll[1])):
        loop = timeline.breakdown(server_pid, at, at + seconds)
        poller = timeline.breakdown(poller_pid, at, at + seconds)
        totals["loop"].update(loop)
        totals["poller"].update(poller)
        held: collections.Counter[str] = collections.Counter()
        for cpu in timeline.on_cpu:
            for (tid, comm), time_held in timeline.holders(cpu, at, at + seconds).items():
                held[label(tid, comm, roles)] += time_held
        holders.update(held)
        if rank < top:
            who = ", ".join(f"{name} {held_s * 1e3:.2f}" for name, held_s in held.most_common(4))
            collecting, generation = collected_within(pauses, at, at + seconds)
            gc_note = f" | gc (gen {generation}) {collecting * 1e3:.2f}" if generation >= 0 else ""
            print(f"  {seconds * 1e3:6.2f} ms | loop: {states(loop)}{gc_note} | poller: {states(poller)} | CPUs: {who}")
    total = sum(seconds for _, seconds in slow)
    print(f"\nall {len(slow)} slow polls, {total * 1e3:.1f} ms in all (ms):")
    print(f"  the server's loop thread: {states(dict(totals['loop']))}")
    print(f"  the poller: {states(dict(totals['poller']))}")
    busiest = ", ".join(f"{name} {held_s * 1e3:.1f}" for name, held_s in holders.most_common(6))
    print(f"  CPU time by thread (all CPUs): {busiest}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["process", "thread"], default="process")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--requests", type=int, default=5, help="requests per client (closed loop)")
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--slow-ms", type=float, default=2.0, help="polls slower than this are explained")
    parser.add_argument("--top", type=int, default=12, help="slow polls listed one by one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hello-tail-") as trace_dir:  # perf's trace: a few MB
        run(args, Path(trace_dir))


def run(args: argparse.Namespace, trace_dir: Path) -> None:
    why_not = perf_missing()
    model = build_fast_model(HERE / ".cache" / "fast-model")
    server, poller = Server(args.engine, args.concurrency, model, args.new_tokens, trace_gc=True), Poller()
    try:
        server.start()
        server.wait_ready()
        run_client(server.port, args.concurrency, 1, 20, sse=False, time_cap=60.0)  # warm-up: first requests
        poller.point_at(server.port)
        time.sleep(IDLE_SECONDS)
        roles = {**thread_roles(server.info["pid"]), poller.process.pid: "poller"}
        recording = None if why_not else Recording(120.0, trace_dir / "sched.data")
        time.sleep(0.5)  # perf is tracing before the load starts
        waited = run_queue_wait(server.info["pid"])
        load = run_client(server.port, args.concurrency, args.requests, args.new_tokens, sse=False, time_cap=50.0)
        waited = run_queue_wait(server.info["pid"]) - waited
        if recording is not None:
            why_not = recording.stop()  # at the end of the load, not after the whole minute
        pauses = [(at, lasted, generation) for at, lasted, generation in server.get_json("/gc_pauses")]
    finally:
        server.stop()
    samples = poller.samples()
    start, end = load.window
    idle = in_windows(samples, server.port, [(start - IDLE_SECONDS, start - 0.1)])
    loaded = [(at, s) for port, at, s in samples if port == server.port and start <= at <= end]
    seconds, under_load = end - start, [s for _, s in loaded]
    rate = load.tokens / load.seconds
    print(f"{args.engine} engine, {args.concurrency} clients: {rate:,.0f} tok/s over {seconds:.1f} s")
    print(
        f"/hello p50 / p99: idle {ms_at(idle, 50)} / {ms_at(idle, 99)} ms, load "
        f"{ms_at(under_load, 50)} / {ms_at(under_load, 99)} ms ({len(loaded)} polls); "
        f"the loop thread waited for a core {waited / seconds * 1e3:.0f} ms/s"
    )
    slow = [(at, s) for at, s in loaded if s * 1e3 > args.slow_ms]
    report_collections(pauses, load.window, slow)
    if why_not is not None:
        print(f"no per-poll breakdown: {why_not}")
        return
    print(f"\n{len(slow)} polls over {args.slow_ms} ms (ms spent in each state within the poll):")
    timeline = Timeline.load(trace_dir / "sched.data")
    report_slow_polls(timeline, slow, (int(server.info["pid"]), poller.process.pid), roles, pauses, args.top)


if __name__ == "__main__":
    main()
