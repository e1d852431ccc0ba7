"""The fast-model regime: how close the serving stack gets to the model's own speed when a step costs ~1 ms.

    python benchmarks/stack.py                          # N = 32, 64; 2 requests per client; best of 3 rounds
    python benchmarks/stack.py --quick                  # N = 32, 1 request per client
    python benchmarks/stack.py --contenders 1,3,5 --new-tokens 50

On a GPU a small model's decode step takes a few ms and the serving path (worker Python, event-loop wakes,
chunk encoding and writing, metrics) sets the throughput. A random 1-layer Llama (``_fast_model.py``) puts
this CPU in the same regime. Contenders at each N, every reply greedy, ``ignore_eos``, ``--new-tokens`` long:

1. the bare forward loop (left-padded batch of N, ``DynamicCache``, argmax, one ``.tolist()`` a step);
2. ``model.generate`` on the same static batch;
3. ``TransformersEngine(max_batch_size=N)`` in this process, N closed-loop ``engine.stream()`` consumers;
4. ``ProcessEngine.from_pretrained(path, max_batch_size=N)`` the same way (skipped while it does not exist);
5. the middleware on uvicorn in a subprocess (plain text and SSE with TransformersEngine, plain text with
   ProcessEngine), N closed-loop clients in one light raw-socket process (``_stack_client.py``), while
   ``_stack_poller.py`` polls the wrapped app's ``/hello``; plus the client check against ``MockEngine``.

This machine is shared: the contenders of one N run in interleaved rounds (the order rotating), each
row reports its best round, and the ratios compare best with best within this run. The table and the
targets go to stdout and between the stack markers of ``benchmarks/RESULTS.md``.

Every process runs torch with one intra-op thread (``--torch-threads 1``, through ``OMP_NUM_THREADS``):
on a hidden size of 64 a second thread buys nothing (bare loop at N=64 on a quiet machine: 42-51k tok/s
with 1 thread, 40-57k with 2), while with 2 threads any other process on the 2 cores stalls OpenMP's
barriers (the same loop fell to 2-12k tok/s whenever another process took a core). It is also the GPU
regime's shape: the model's arithmetic is not on the cores that run the serving path.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _fast_model import build_fast_model, load_fast_model
from _stack_http import OtherLoad, Poller, Server, in_windows, run_client, run_queue_wait, wait_for_quiet
from _stack_inprocess import Measure, StaticBatch, process_engine_class, stream_closed_loop, thread_engine
from _stack_report import HTTP_ROWS, NAMES, Row, environment, section, write_section

HERE = Path(__file__).resolve().parent
MODEL_DIR = HERE / ".cache" / "fast-model"
WARM_TOKENS = 8
IDLE_POLL_SECONDS = 3.0
Run = Callable[[int, int], Measure]  # (requests per client, new tokens) -> one timed run
SERVED = [("http-thread", "thread", False), ("http-sse", "thread", True), ("http-process", "process", False)]
SERVED.append(("capacity", "mock", False))


class Block:
    """Every contender at one N: engines and servers up, warmed, measured in rounds, then torn down."""

    def __init__(self, args: argparse.Namespace, runner: asyncio.Runner, static: StaticBatch, n: int) -> None:
        self.args, self.runner, self.static, self.n = args, runner, static, n
        self.rows: dict[str, Row] = {}
        self.runs: dict[str, Run] = {}
        self.engines: list[Any] = []
        self.servers: dict[str, Server] = {}
        self.poller: Poller | None = None
        self.windows: dict[str, list[tuple[float, float]]] = {}
        self.infos: dict[str, dict[str, Any]] = {}

    def add(self, key: str, run: Run | None, skipped: str | None = None) -> None:
        self.rows[key] = Row(key, self.n, skipped=skipped)
        if run is not None:
            self.runs[key] = run

    def set_up(self) -> None:
        chosen, n = self.args.contenders, self.n
        process_engine, why = process_engine_class()
        if 5 in chosen:
            kinds = ["thread", "mock"] + (["process"] if process_engine else [])
            self.servers = {kind: Server(kind, n, MODEL_DIR, self.args.new_tokens) for kind in kinds}
            for server in self.servers.values():
                server.start()  # they load while this process builds its engines
            self.poller = Poller()
        if 1 in chosen:
            self.add("bare", lambda r, t: self.static.bare_loop(n, r, t))
        if 2 in chosen:
            self.add("generate", lambda r, t: self.static.generate(n, r, t))
        if 3 in chosen:
            self.add_engine("engine", lambda: thread_engine(MODEL_DIR, n))
        if 4 in chosen and process_engine is None:
            self.add("process", None, f"skipped: {why}")
        elif 4 in chosen:
            self.add_engine("process", lambda: process_engine.from_pretrained(MODEL_DIR, max_batch_size=n))
        if 5 in chosen:
            self.add_served(f"skipped: ProcessEngine {why}")

    def add_engine(self, key: str, build: Callable[[], Any]) -> None:
        """An in-process engine, started here; one that fails to build or start is a failed row, not a failed run."""
        try:
            engine = build()
            self.engines.append(engine)
            self.runner.run(engine.start())
        except Exception as exc:
            self.add(key, None, f"failed to start: {type(exc).__name__}: {str(exc)[:120]}")
            return
        self.add(key, lambda r, t: self.runner.run(stream_closed_loop(engine, self.n, r, t)))

    def add_served(self, skipped: str) -> None:
        for key, kind, sse in SERVED:
            server = self.servers.get(kind)
            if server is None:
                self.add(key, None, skipped)
                continue
            try:
                if not server.info:
                    server.wait_ready()
                    self.infos[kind] = server.info
            except RuntimeError as exc:
                self.add(key, None, f"failed: {str(exc)[:160]}")
                continue
            self.add(key, self.http_run(key, server, sse))

    def http_run(self, key: str, server: Server, sse: bool) -> Run:
        def run(requests: int, new_tokens: int) -> Measure:
            assert self.poller is not None and server.process is not None
            self.poller.point_at(server.port if key in HTTP_ROWS else None)
            waited = run_queue_wait(server.process.pid)
            try:
                measure = run_client(server.port, self.n, requests, new_tokens, sse, self.args.time_cap)
            finally:
                self.poller.point_at(None)
            if measure.seconds > 0:
                measure.loop_cpu_wait = (run_queue_wait(server.process.pid) - waited) / measure.seconds
            if measure.window is not None:
                self.windows.setdefault(key, []).append(measure.window)
            return measure

        return run

    def measure(self, deadline: float) -> None:
        """Warm up, poll the idle servers, then up to ``--rounds`` rounds while the next fits before ``deadline``."""
        for key, run in list(self.runs.items()):
            self.guarded(key, lambda run=run: run(1, WARM_TOKENS))  # untimed: first-call costs stay out
        self.poll_idle()
        order, last = list(self.runs), 0.0
        for round_index in range(self.args.rounds):
            if round_index and time.monotonic() + last > deadline:
                print(f"  N={self.n}: time budget spent after {round_index} round(s)", flush=True)
                return
            started = time.monotonic()
            quiet = wait_for_quiet(self.args.quiet_wait)
            print(f"  N={self.n} round {round_index + 1}/{self.args.rounds} (other load {quiet:.2f} cores)", flush=True)
            shift = round_index % len(order) if order else 0
            for key in order[shift:] + order[:shift]:
                if key in self.runs:
                    self.timed(key)
            last = time.monotonic() - started

    def timed(self, key: str) -> None:
        with OtherLoad() as other:
            measure = self.guarded(key, lambda: self.runs[key](self.args.requests, self.args.new_tokens))
        if measure is not None:
            measure.other_cores = other.cores
            self.rows[key].measures.append(measure)
            errors = f", {measure.failed} failed: {measure.errors[:1]}" if measure.failed else ""
            print(f"    {NAMES[key]:40} {measure.tokens_per_s:9,.0f} tok/s  ({other.cores:.2f} other){errors}")

    def guarded(self, key: str, call: Callable[[], Measure]) -> Measure | None:
        """A contender that raises is reported as failed and left out of the later rounds; the others go on."""
        try:
            return call()
        except Exception as exc:
            print(f"    {NAMES[key]}: failed: {type(exc).__name__}: {exc}"[:400], flush=True)
            self.runs.pop(key, None)
            self.rows[key].skipped = f"failed: {type(exc).__name__}: {str(exc)[:120]}"
            return None

    def poll_idle(self) -> None:
        if self.poller is None:
            return
        for kind, server in self.servers.items():
            if kind == "mock" or not server.info:  # no /hello row for the mock; a failed server has no info
                continue
            self.poller.point_at(server.port)
            start = time.monotonic()
            time.sleep(IDLE_POLL_SECONDS)
            self.poller.point_at(None)
            self.windows.setdefault(f"idle-{kind}", []).append((start, time.monotonic()))

    def tear_down(self) -> None:
        try:
            for engine in self.engines:
                try:
                    self.runner.run(engine.close())
                except Exception as exc:
                    print(f"    closing {type(engine).__name__} failed: {exc}")
        finally:
            for server in self.servers.values():
                server.stop()
            if self.poller is not None:
                self.file_hello(self.poller.samples())

    def file_hello(self, samples: list[tuple[int, float, float]]) -> None:
        """Give each served row the /hello polls of its server idle and of its own load windows."""
        for key, kind, _ in SERVED:
            if key in HTTP_ROWS and key in self.rows and kind in self.servers:
                port = self.servers[kind].port
                self.rows[key].hello_idle = in_windows(samples, port, self.windows.get(f"idle-{kind}", []))
                self.rows[key].hello_load = in_windows(samples, port, self.windows.get(key, []))


def run_all(args: argparse.Namespace) -> tuple[list[Row], dict[str, dict[str, Any]]]:
    build_fast_model(MODEL_DIR)
    model, tokenizer = load_fast_model(MODEL_DIR)
    static, rows, infos = StaticBatch(model, tokenizer), [], {}
    end = time.monotonic() + args.budget
    with asyncio.Runner() as runner:
        for index, n in enumerate(args.concurrency):
            print(f"N={n}: starting the contenders", flush=True)
            block = Block(args, runner, static, n)
            # Later blocks are larger: give each the share of the remaining budget that its N is of the rest.
            share = n / sum(args.concurrency[index:])
            try:
                block.set_up()
                block.measure(time.monotonic() + share * max(0.0, end - time.monotonic()))
            finally:
                block.tear_down()
            rows += block.rows.values()
            infos.update(block.infos)
    return rows, infos


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda text: [int(part) for part in text.split(",") if part.strip()]  # noqa: E731
    parser.add_argument("--concurrency", type=ints, default=[32, 64], help="comma-separated N (default 32,64)")
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--requests", type=int, default=2, help="requests per client (closed loop)")
    parser.add_argument("--contenders", type=ints, default=[1, 2, 3, 4, 5])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each row keeps its best")
    parser.add_argument("--quick", action="store_true", help="N=32 only, 1 request per client")
    parser.add_argument("--budget", type=float, default=240.0, help="seconds; rounds stop early past it (min 1)")
    parser.add_argument("--time-cap", type=float, default=30.0, help="no client request is sent after this (s)")
    parser.add_argument("--quiet-wait", type=float, default=3.0, help="seconds to wait for a calm CPU per round")
    parser.add_argument("--torch-threads", type=int, default=1, help="OMP_NUM_THREADS of every process; 0: torch's")
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    if args.torch_threads > 0:  # before torch is imported here or in any child process
        os.environ["OMP_NUM_THREADS"] = str(args.torch_threads)
    if args.quick:
        args.concurrency, args.requests = [32], 1
    if args.new_tokens < 1 or args.requests < 1 or args.rounds < 1 or min(args.concurrency, default=0) < 1:
        parser.error("--new-tokens, --requests, --rounds and every N must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    rows, infos = run_all(args)
    body = section(args, rows, environment(infos), time.perf_counter() - started)
    print("\n" + body)
    write_section(args.results, body)
    print(f"\nwritten between the stack markers of {args.results}")


if __name__ == "__main__":
    main()
