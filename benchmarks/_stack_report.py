"""The table, the targets and the RESULTS.md section of ``stack.py``."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from _bench_common import write_marked_section
from _stack_inprocess import Measure

NAMES = {
    "bare": "1. bare forward loop (ceiling)",
    "generate": "2. `model.generate`, static batch",
    "engine": "3. TransformersEngine, in process",
    "process": "4. ProcessEngine, in process",
    "http-thread": "5. HTTP text, TransformersEngine",
    "http-sse": "5. HTTP SSE, TransformersEngine",
    "http-process": "5. HTTP text, ProcessEngine",
    "capacity": "client check: HTTP text, MockEngine",
}
HTTP_ROWS = ("http-thread", "http-sse", "http-process")
ENGINE_ROWS = ("engine", "process")


@dataclass
class Row:
    """One contender at one N: its timed runs (best of them reported), or why it has none."""

    key: str
    n: int
    measures: list[Measure] = field(default_factory=list)
    skipped: str | None = None
    hello_idle: list[float] = field(default_factory=list)
    hello_load: list[float] = field(default_factory=list)

    @property
    def best(self) -> Measure | None:
        ok = [m for m in self.measures if not m.failed]
        return max(ok, key=lambda m: m.tokens_per_s) if ok else None

    @property
    def failed(self) -> int:
        return sum(m.failed for m in self.measures)

    def client_cpu(self) -> tuple[float, float] | None:
        """Client CPU seconds per 1000 tokens and share of a core, all runs together."""
        runs = [m for m in self.measures if m.client_cpu is not None]
        tokens, wall = sum(m.tokens for m in runs), sum(m.seconds for m in runs)
        if not runs or not tokens or not wall:
            return None
        cpu = sum(m.client_cpu or 0.0 for m in runs)
        return 1000 * cpu / tokens, cpu / wall


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1000:.3g} ms"


def ratio(row: Row, reference: Row | None) -> float | None:
    best, ref = row.best, reference.best if reference else None
    return best.tokens_per_s / ref.tokens_per_s if best and ref and ref.tokens_per_s else None


def times(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def table(rows: list[Row]) -> str:
    lines = [
        "| contender | N | output tok/s (best) | × bare loop | × generate | TTFT p50 | /hello p99 idle → load "
        "| client CPU | runs (failed req.) | other load |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    by_key = {(r.key, r.n): r for r in rows}
    for row in rows:
        lines.append(table_line(row, by_key.get(("bare", row.n)), by_key.get(("generate", row.n))))
    return "\n".join(lines)


def table_line(row: Row, bare: Row | None, generate: Row | None) -> str:
    best = row.best
    if best is None:
        why = row.skipped or f"failed: {'; '.join(e for m in row.measures for e in m.errors)[:160]}"
        return f"| {NAMES[row.key]} | {row.n} | {why} | | | | | | | |"
    ttft = statistics.median(best.ttfts) if best.ttfts else None
    hello = "—"
    if row.hello_idle and row.hello_load:
        hello = f"{ms(percentile(row.hello_idle, 99))} → {ms(percentile(row.hello_load, 99))}"
        hello += f" ({len(row.hello_idle)}/{len(row.hello_load)} polls)"
        waits = [m.loop_cpu_wait for m in row.measures if m.loop_cpu_wait is not None and m.loop_cpu_wait >= 0]
        if waits:  # the server's loop was runnable but off the CPU (other processes on its core)
            hello += f"; loop waited for a core {1000 * statistics.median(waits):.0f} ms/s"
    cpu = row.client_cpu()
    client = f"{cpu[0] * 1000:.1f} ms/1k tok, {cpu[1]:.0%} of a core" if cpu else "—"
    runs = f"{len(row.measures)} ({row.failed})"
    model = row.key != "capacity"  # the mock's rate is the client's check, not a contender's
    cells = [NAMES[row.key], str(row.n), f"{best.tokens_per_s:,.0f}", times(ratio(row, bare) if model else None)]
    cells += [times(ratio(row, generate) if model else None), ms(ttft), hello, client, runs]
    cells.append(f"{best.other_cores:.2f} cores")
    return "| " + " | ".join(cells) + " |"


def targets(rows: list[Row]) -> list[str]:
    """Issue 10's targets, each row against its own run's bare loop and generate: printed, not asserted."""
    by_key = {(r.key, r.n): r for r in rows}
    lines = []
    for row in rows:
        bare, generate = by_key.get(("bare", row.n)), by_key.get(("generate", row.n))
        if row.best is None:
            continue
        if row.key in ENGINE_ROWS:
            lines.append(check(row, "≥ 0.9× bare loop", ratio(row, bare), 0.9))
        if row.key in HTTP_ROWS:
            lines.append(check(row, "≥ 0.8× bare loop", ratio(row, bare), 0.8))
            lines.append(check(row, "≥ 1.2× generate", ratio(row, generate), 1.2))
            hello = None
            if row.hello_idle and row.hello_load:
                hello = percentile(row.hello_load, 99) / percentile(row.hello_idle, 99)
            lines.append(check(row, "/hello p99 under load ≤ 2× idle", hello, 2.0, above=False))
    return lines


def check(row: Row, what: str, value: float | None, bound: float, above: bool = True) -> str:
    if value is None:
        verdict = "n/a "
    else:
        verdict = "pass" if (value >= bound if above else value <= bound) else "MISS"
    return f"- {verdict} N={row.n} {NAMES[row.key]}: {what}: {times(value)}"


def capacity_note(rows: list[Row]) -> list[str]:
    """How far the client is from being the bottleneck: its rate against the mock, its CPU."""
    notes = []
    for row in rows:
        best, cpu = row.best, row.client_cpu()
        if row.key != "capacity" or best is None or cpu is None:
            continue
        model_rows = [r.best.tokens_per_s for r in rows if r.n == row.n and r.key in HTTP_ROWS and r.best]
        fastest = max(model_rows, default=0.0)
        versus = f", {best.tokens_per_s / fastest:.1f}× the fastest served model row" if fastest else ""
        ceiling = best.tokens_per_s / max(cpu[1], 1e-9)
        limit = "the server was the limit there" if cpu[1] < 0.5 else "the client may be part of the limit there"
        notes.append(
            f"- N={row.n}: the same client sustained {best.tokens_per_s:,.0f} tok/s against MockEngine{versus}, "
            f"at {cpu[1]:.0%} of a core ({cpu[0] * 1000:.1f} ms CPU per 1000 tokens); {limit} "
            f"(the client alone on one core: ≈ {ceiling:,.0f} tok/s)."
        )
    return notes


def write_section(path: Path, body: str) -> None:
    write_marked_section(path, "stack", body)


def environment(server_infos: dict[str, dict[str, object]]) -> list[str]:
    """What the numbers depend on, one markdown bullet each."""
    import importlib.util
    import platform
    from datetime import UTC, datetime

    import torch
    import transformers
    import uvicorn

    fast = [name for name in ("uvloop", "httptools") if importlib.util.find_spec(name)]
    servers = {kind: info.get("torch_threads") for kind, info in server_infos.items() if info.get("torch_threads")}
    return [
        f"date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"machine: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), {platform.platform()}",
        f"torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}, "
        f"uvicorn {uvicorn.__version__} ({' + '.join(fast) or 'asyncio loop + h11'})",
        f"torch threads (intra, inter-op): driver {[torch.get_num_threads(), torch.get_num_interop_threads()]}, "
        f"servers {servers or 'n/a'}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} "
        "(`--torch-threads`, see `stack.py`'s docstring for why 1)",
    ]


def section(a: argparse.Namespace, rows: list[Row], env: list[str], seconds: float) -> str:
    """The RESULTS.md section: environment, table, targets, the client check, how it was measured."""
    lines = [
        "## Fast-model regime: the serving stack against the bare loop (`make bench-stack`)",
        "",
        *[f"- {line}" for line in env],
        f"- command: `python benchmarks/stack.py{''.join(' ' + arg for arg in sys.argv[1:])}`; took {seconds:.0f} s",
        f"- settings: N = {', '.join(map(str, a.concurrency))}; up to {a.rounds} rounds within a {a.budget:.0f} s "
        "budget",
        "- model: random Llama, 1 layer, hidden 64, 512-token BPE vocab (`benchmarks/_fast_model.py`), float32, CPU",
        f"- load: closed loop, {a.requests} request(s) per client, {a.new_tokens} new tokens each, greedy, "
        "`ignore_eos`; each row is its best of the interleaved rounds (the order rotating per round); "
        "ratios compare best with best of this run; TTFT p50 of the best round; other load = cores other "
        "processes used during that round",
        "",
        table(rows),
        "",
        "Targets (printed, not asserted):",
        "",
        *targets(rows),
        "",
        "Client check (the load generator is not the bottleneck):",
        "",
        *(capacity_note(rows) or ["- not run (contender 5 not selected)"]),
        "- client CPU column: the client process's own user + system CPU over its load windows, all rounds together, "
        "per 1000 tokens and as a share of one core; /hello polls every 5 ms from a process of its own, idle = 3 s "
        "before the rounds, load = the polls inside the row's load windows (all rounds); loop waited for a core = "
        "the run-queue wait of the server's event-loop thread (`/proc/PID/schedstat`) per second of load, median of "
        "the rounds: time it was ready to run while the engine process, the client and the poller held both cores.",
    ]
    return "\n".join(lines)
