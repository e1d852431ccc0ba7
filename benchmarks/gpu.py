"""``make bench-gpu``: decode throughput of TransformersEngine on one GPU against its references.

What it measures, for random-weight Llamas of real shapes built directly on the GPU in bf16
(SmolLM2-135M, Llama-3.2-1B, Llama-3.1-8B; nothing downloaded, a byte-level BPE tokenizer trained
offline and padded to the model's vocabulary), greedy, ``ignore_eos``, a fixed number of new tokens
(128) for each of 1, 8, 32 and 64 concurrent prompts of 30 to 80 tokens:

- bare forward loop: forward, argmax, one ``tolist()`` per step, a plain ``DynamicCache`` (the floor);
- ``model.generate`` on the whole batch (static batching);
- transformers' own continuous batching, ``model.generate_batch`` (timed after a warm-up call);
- ``TransformersEngine`` alone: N concurrent ``stream()`` consumers in one asyncio loop;
- HTTP: ``ChatStreamMiddleware`` on a real uvicorn in a subprocess, N raw-socket streaming clients, with
  ``ProcessEngine`` (the model in an engine process of its own, ``--engine-process``) and with
  ``TransformersEngine`` in the server's process;
- for the 8B model at the largest batch, the memory-bandwidth bound of a decode step: weight bytes
  plus the KV bytes a step reads (at the padded cache width), over the measured device-to-device
  copy bandwidth (bytes read plus written per second);
- where one engine decode step waits for the GPU (``torch.cuda.set_sync_debug_mode``), per model.

tok/s counts generated tokens over the wall time of the run, prefill included; ms/step is that wall
time over the new-token count. It prints one markdown table and writes it between the
``<!-- gpu:start -->`` / ``<!-- gpu:end -->`` markers of ``benchmarks/RESULTS.md`` (the section is
appended when absent; the rest of the file is kept).

Time: under 8 minutes on one H200. Each model has a wall budget (smollm2 100 s, llama1b 100 s,
llama8b 220 s) and the run a deadline (450 s); rows that would start past either are printed as
"skipped: over budget". The rows run in this order per model: bare, generate and engine for each
batch, then HTTP, then ``generate_batch`` last (on 8B it is the row most likely to be skipped).

It runs on a bare CUDA machine with torch, transformers and tokenizers: this package is imported
from the checkout, and only its engine modules (the web dependencies are needed by the HTTP rows
alone, in the server process). Rows whose packages are missing say "skipped: <why>". For the HTTP
rows on the GPU machine, carry these wheels (about 230 KB; their own needs, h11, click, anyio and
typing-extensions, are there already), as the device README's note on carrying wheels says; in
one line: ``python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12
--implementation cp --platform manylinux_2_28_x86_64 -d .whl uvicorn==0.54.0 starlette==1.10.0
itsdangerous==2.2.0 asgiref==3.13.0 pytest-asyncio==1.5.0``
(pytest-asyncio is for ``tests/cuda``, not for this script) and start the command there with
``python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export
PYTHONPATH=/tmp/site;`` then ``make bench-gpu`` (or ``python3 benchmarks/gpu.py``). The image's transformers
(5.17.0, tokenizers 0.23.2 when last read) was checked here on the CPU in a venv of only the packages above
(plus the carried wheels): ``--smoke`` ran every row but ``generate_batch``, which on a CPU needs ``psutil``
(transformers sizes its paged cache from it; on a GPU it reads ``torch.cuda.mem_get_info``), and ``tests/cuda``
passed.

Usage: ``python benchmarks/gpu.py [--models smollm2,llama1b,llama8b] [--batches 1,8,32,64]
[--new-tokens 128] [--device cuda] [--results PATH]``; ``--smoke`` runs tiny shapes (2 layers,
hidden 64, the real vocabularies) on the given device, 8 tokens at batches 1 and 4, and writes
no results unless ``--results`` is given: every code path in a minute or two on a CPU.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import platform
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]

import _gpu_http  # noqa: E402
import torch  # noqa: E402
from _gpu_models import LABELS, build_model, engine_module, prompt_ids, prompt_texts  # noqa: E402
from _gpu_report import Row, render, write_section  # noqa: E402
from _gpu_runs import (  # noqa: E402
    Timed,
    bare_loop,
    bytes_per_step,
    copy_bandwidth,
    decode_step_syncs,
    engine_run,
    generate_batch,
    generate_static,
)

BUDGETS = {"smollm2": 100.0, "llama1b": 100.0, "llama8b": 220.0}
DEADLINE = 450.0
WARM_TOKENS = 4


class Clock:
    """Per-model budget and whole-run deadline: a row starts only while both leave time."""

    def __init__(self, deadline: float) -> None:
        self.deadline = time.monotonic() + deadline
        self.model_end = self.deadline

    def start_model(self, budget: float) -> None:
        self.model_end = min(self.deadline, time.monotonic() + budget)

    def left(self) -> bool:
        return time.monotonic() < self.model_end


def measure(row: Row, clock: Clock, run: Callable[[], Timed], warm: Callable[[], Timed] | None = None) -> Row:
    """Fill ``row`` from ``run()`` (after ``warm()``), or mark why it has no figures."""
    if not clock.left():
        return row.skip("skipped: over budget")
    try:
        if warm is not None:
            warm()
        row.tokens, row.seconds = run()
    except Exception as exc:  # a contender failing is a result, not the end of the run
        row.skip(f"failed: {type(exc).__name__}: {str(exc)[:160]}")
    return row


class ModelRun:
    """One model's rows; the model is built once and shared by the in-process contenders."""

    def __init__(self, name: str, args: argparse.Namespace, clock: Clock) -> None:
        self.name, self.label, self.args, self.clock = name, LABELS[name], args, clock
        self.n, self.batches = args.new_tokens, args.batches
        self.engine = engine_module()
        self.model, self.tokenizer = build_model(name, args.device, smoke=args.smoke)
        self.texts = prompt_texts(max(self.batches))
        self.ids, self.pad = prompt_ids(self.tokenizer, self.texts), self.tokenizer.pad_token_id

    def row(self, contender: str, batch: int) -> Row:
        return Row(self.label, contender, batch, self.n)

    def local_rows(self, batch: int) -> list[Row]:
        model, ids, pad, n, texts = self.model, self.ids[:batch], self.pad, self.n, self.texts[:batch]

        def engine(tokens: int) -> Timed:
            params = self.engine.SamplingParams(temperature=0.0, max_new_tokens=tokens, ignore_eos=True)
            return engine_run(self.engine.TransformersEngine, params, model, self.tokenizer, texts)

        return [
            measure(self.row("bare forward loop", batch), self.clock,
                    lambda: bare_loop(model, ids, n, pad), lambda: bare_loop(model, ids, WARM_TOKENS, pad)),
            measure(self.row("model.generate (static batch)", batch), self.clock,
                    lambda: generate_static(model, ids, n, pad), lambda: generate_static(model, ids, WARM_TOKENS, pad)),
            measure(self.row("TransformersEngine", batch), self.clock, lambda: engine(n), lambda: engine(WARM_TOKENS)),
        ]  # fmt: skip

    def bound_row(self, measured: list[Row]) -> Row:
        batch = max(self.batches)
        bandwidth = copy_bandwidth(self.model.device)
        weights, kv = bytes_per_step(self.model, batch, max(len(p) for p in self.ids[:batch]) + self.n // 2)
        step = (weights + kv) / bandwidth
        row = self.row("memory-bandwidth bound", batch)
        row.tokens, row.seconds = batch * self.n, step * self.n
        shares = [f"{r.contender} {r.ms_step / row.ms_step:.1f}x" for r in measured if r.batch == batch and r.tokens]
        row.note = (
            f"weights {weights / 1e9:.2f} GB + KV {kv / 1e9:.2f} GB per step at {bandwidth / 1e12:.2f} TB/s "
            f"(copy, read + written); step time over the bound: {', '.join(shares)}"
        )
        return row

    def sync_note(self) -> str:
        ids = self.ids[:8]
        where = f"{self.label}: one engine decode step of {len(ids)} mixed rows"
        try:
            found = decode_step_syncs(self.model, ids, self.pad)
        except Exception as exc:
            return f"{where}: failed: {type(exc).__name__}: {str(exc)[:200]}"
        if self.model.device.type != "cuda":
            return f"{where}: ran; no CUDA device, no syncs to count"
        return f"{where} waits for the GPU at: {found}"

    def http_rows(self) -> list[Row]:
        """The middleware on uvicorn, with the engine in an engine process of its own (the serving path for
        production) and in the server's own process."""
        rows = self.served_rows("HTTP: ProcessEngine on uvicorn", "process")
        return rows + self.served_rows("HTTP: middleware on uvicorn", "thread")

    def served_rows(self, contender: str, engine: str) -> list[Row]:
        rows = [self.row(contender, b) for b in self.batches]
        if missing := _gpu_http.missing_packages():
            return [row.skip(f"skipped: {', '.join(missing)} not installed") for row in rows]
        if not self.clock.left():
            return [row.skip("skipped: over budget") for row in rows]
        free_device()  # the server (or its engine process) needs the memory this one keeps cached
        serve = partial(_gpu_http.server, self.name, self.args.device, max(self.batches), smoke=self.args.smoke)
        try:
            with serve(engine=engine) as port:
                for row in rows:
                    chat = partial(_gpu_http.chat_round, port, self.texts[: row.batch])
                    measure(row, self.clock, partial(chat, self.n), partial(chat, WARM_TOKENS))
        except Exception as exc:
            why = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
            return [row if row.tokens else row.skip(why) for row in rows]
        return rows

    def batching_rows(self) -> list[Row]:
        run = partial(generate_batch, self.model)
        contender = "generate_batch (transformers CB)"
        rows = [self.row(contender, b) for b in self.batches]
        if self.args.device == "cpu" and importlib.util.find_spec("psutil") is None:
            # transformers 5.17 sizes its paged cache on a CPU from psutil's memory figures: without it, from 0 bytes
            return [row.skip("skipped: psutil not installed (generate_batch on a CPU needs it)") for row in rows]
        return [measure(row, self.clock, partial(run, self.ids[: row.batch], self.n, self.pad)) for row in rows]

    def rows(self, notes: list[str]) -> list[Row]:
        """All rows, generate_batch last: when the budget runs short, it is the one skipped."""
        rows = [row for b in self.batches for row in self.local_rows(b)]
        if self.name == "llama8b":
            rows.append(self.bound_row(rows))
        notes.append(self.sync_note())
        rows += self.http_rows()
        rows += self.batching_rows()
        order = ["bare", "model.generate", "generate_batch", "Transformers", "HTTP", "memory"]
        return sorted(rows, key=lambda r: (r.batch, next(i for i, o in enumerate(order) if r.contender.startswith(o))))


def free_device() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the HTTP server process needs the memory this one cached


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,llama1b,llama8b")
    parser.add_argument("--batches", default=None, help="default 1,8,32,64 (smoke: 1,4)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 128 (smoke: 8)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, a few tokens: every code path")
    parser.add_argument("--results", type=Path, default=None, help="default benchmarks/RESULTS.md (smoke: none)")
    args = parser.parse_args()
    args.models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(args.models) - set(LABELS))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {sorted(LABELS)}")
    args.batches = [int(b) for b in (args.batches or ("1,4" if args.smoke else "1,8,32,64")).split(",")]
    args.new_tokens = args.new_tokens or (8 if args.smoke else 128)
    if args.results is None and not args.smoke:
        args.results = HERE / "RESULTS.md"
    return args


def header(args: argparse.Namespace) -> list[str]:
    import transformers

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "CPU"
    return [
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; device: {device}",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}",
        f"- command: `python benchmarks/gpu.py {' '.join(sys.argv[1:])}`",
        f"- greedy, ignore_eos, {args.new_tokens} new tokens per request, prompts of 30 to 80 tokens, "
        + ("tiny shapes (smoke), " if args.smoke else "")
        + ("float32" if args.smoke and args.device == "cpu" else "bf16"),
    ]


def main() -> None:
    args = parse_args()
    clock, rows, notes = Clock(DEADLINE), list[Row](), list[str]()
    for name in args.models:
        clock.start_model(BUDGETS[name])
        started = time.monotonic()
        try:
            run = ModelRun(name, args, clock)
            rows += run.rows(notes)
            del run
        except Exception as exc:  # e.g. no room for the model: the other models still run
            rows.append(Row(LABELS[name], "(model)", 0, args.new_tokens).skip(f"failed: {type(exc).__name__}: {exc}"))
        free_device()
        notes.append(f"{LABELS[name]}: all rows in {time.monotonic() - started:.0f} s")
    table = render(header(args), rows, notes)
    print(table)
    if args.results is not None:
        write_section(args.results, table)
        print(f"written between the gpu markers of {args.results}")


if __name__ == "__main__":
    main()
