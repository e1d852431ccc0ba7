"""What uvicorn's own stack costs the serving path: asyncio + h11 against uvloop + httptools, no model.

    python benchmarks/server_stack.py            # 64 clients; 3 interleaved rounds
    python benchmarks/server_stack.py --quick    # 1 round

uvicorn picks uvloop (its event loop) and httptools (its HTTP parser) by itself when they are installed
(``uvicorn[standard]``, or this package's ``serve`` extra), else asyncio and the pure-Python h11. The
middleware does not care which; the web process's CPU does. Both stacks serve the same middleware around
the same Starlette app with ``MockEngine`` (no model, no delay), so the server is all there is to measure:

- chat requests: 64 closed-loop clients ask for 2-token replies (what each request costs: parsing,
  session cookie, admission, prompt, response head, end of turn, history, metrics);
- streaming: 64 clients ask for 200-token replies, one write per token (what each chunk costs);
- web CPU: the server process's user + system CPU over the load, per request or per 1000 tokens.

Rounds interleave the stacks (the machine is shared); each row is its best round, ratios compare best
with best. The table goes to stdout and between the server-stack markers of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psutil
import uvicorn
from _bench_common import write_marked_section
from _stack_http import OtherLoad, Server, run_client, wait_for_quiet

HERE = Path(__file__).resolve().parent
CLIENTS = 64
STACKS = {"h11": "asyncio + h11", "fast": "uvloop + httptools"}
LOADS = {"requests": (2, 40), "streaming": (200, 2)}  # load -> (tokens per reply, requests per client)


@dataclass
class Row:
    stack: str
    load: str
    rates: list[float] = field(default_factory=list)  # requests/s or tokens/s, per round
    cpu_per_unit: list[float] = field(default_factory=list)  # web CPU ms per request or per 1000 tokens
    failed: int = 0
    other: float = 0.0

    @property
    def best(self) -> float:
        return max(self.rates, default=0.0)

    @property
    def best_cpu(self) -> float:
        return min(self.cpu_per_unit, default=float("nan"))


def measure(server: Server, load: str, row: Row) -> None:
    tokens, requests = LOADS[load]
    web = psutil.Process(int(server.info["pid"]))
    before = web.cpu_times()
    with OtherLoad() as other:
        measured = run_client(server.port, CLIENTS, requests, tokens, sse=False, time_cap=60.0)
    after = web.cpu_times()
    cpu = (after.user + after.system) - (before.user + before.system)
    completed = CLIENTS * requests - measured.failed
    if load == "requests":
        row.rates.append(completed / measured.seconds)
        row.cpu_per_unit.append(cpu / max(1, completed) * 1e3)
    else:
        row.rates.append(measured.tokens_per_s)
        row.cpu_per_unit.append(cpu / max(1, measured.tokens) * 1e6)
    row.failed += measured.failed
    row.other = max(row.other, other.cores)


def report(rows: dict[tuple[str, str], Row], rounds: int, took: float, missing: str) -> str:
    fast = [name for name in ("uvloop", "httptools") if importlib.util.find_spec(name)]
    lines = [
        "## uvicorn's stack: asyncio + h11 against uvloop + httptools (`make bench-server-stack`)",
        "",
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; took {took:.0f} s; {rounds} interleaved round(s), "
        "each row its best",
        f"- machine: {psutil.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}, "
        f"uvicorn {uvicorn.__version__}; installed: {', '.join(fast) or 'neither uvloop nor httptools'}",
        f"- load: {CLIENTS} closed-loop clients (`_stack_client.py`), the middleware around a Starlette app, "
        "`MockEngine` (no model, no delay), one web process",
        "",
        "| stack | load | rate (best) | web CPU (best) | failed | other load |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for (stack, load), row in rows.items():
        unit, cpu_unit = ("req/s", "ms per request") if load == "requests" else ("tok/s", "ms per 1k tokens")
        rate = f"{row.best:,.0f} {unit}" if row.rates else "—"
        cpu = f"{row.best_cpu:.2f} {cpu_unit}" if row.rates else "—"
        label = "chat requests, 2-token replies" if load == "requests" else "streaming, 200-token replies"
        lines.append(f"| {STACKS[stack]} | {label} | {rate} | {cpu} | {row.failed} | {row.other:.2f} cores |")
    lines.append("")
    for load in LOADS:
        slow, fast_row = rows.get(("h11", load)), rows.get(("fast", load))
        if slow and fast_row and slow.best and fast_row.best:
            lines.append(
                f"- {load}: uvloop + httptools {fast_row.best / slow.best:.2f}× the rate of asyncio + h11, "
                f"{slow.best_cpu / fast_row.best_cpu:.2f}× less web CPU per unit"
            )
    if missing:
        lines.append(f"- uvloop + httptools not measured: {missing} (`pip install uvloop httptools`)")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one round")
    args = parser.parse_args()
    started = time.perf_counter()
    missing = ", ".join(name for name in ("uvloop", "httptools") if importlib.util.find_spec(name) is None)
    stacks = ["h11"] + ([] if missing else ["fast"])
    rounds = 1 if args.quick else 3
    rows = {(stack, load): Row(stack, load) for stack in stacks for load in LOADS}
    for round_index in range(rounds):
        wait_for_quiet(10.0)
        order = stacks if round_index % 2 == 0 else stacks[::-1]
        for stack in order:
            for load, (tokens, _) in LOADS.items():
                server = Server("mock", CLIENTS, None, tokens, stack=stack)
                server.start()
                try:
                    server.wait_ready()
                    run_client(server.port, CLIENTS, 1, tokens, sse=False, time_cap=30.0)  # warm-up
                    measure(server, load, rows[(stack, load)])
                finally:
                    server.stop()
                rate = rows[(stack, load)].rates[-1]
                print(f"  round {round_index + 1}/{rounds} {STACKS[stack]:20} {load:9} {rate:10,.0f}", flush=True)
    body = report(rows, rounds, time.perf_counter() - started, missing)
    print(body)
    write_marked_section(HERE / "RESULTS.md", "server-stack", body)
    print(f"written between the server-stack markers of {HERE / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
