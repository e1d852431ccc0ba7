"""Multi-turn chats over real HTTP with the engine's prefix KV cache off and on (`make bench-multiturn`).

    python benchmarks/multiturn.py                     # K = 4 users x T = 6 turns: off, on, transformers' CB (~6 min)
    python benchmarks/multiturn.py --quick             # K = 2, T = 4: a smoke run
    python benchmarks/multiturn.py --budget 33554432   # also a run with a 32 MiB cache budget

Each mode is a uvicorn on 127.0.0.1 in its own process (``_chatstream_asgi_server.py``): ``ChatStreamMiddleware``
over ``TransformersEngine(max_batch_size=K, prefix_cache_bytes=0 | None | --budget)``, SmolLM2-135M-Instruct
float32 on the CPU. K users chat at once, each an ``httpx.AsyncClient`` keeping its session cookie (the
history lives on the server), T turns each with ``--think`` seconds between a user's turns; every message
is ``--words`` words of seeded text, distinct per user and turn; replies are greedy and exactly
``--max-new-tokens`` tokens (``ignore_eos``), so every mode sees the same conversations. Per turn index:
TTFT (send to first ``delta`` event) p50 / p99 over users and the ``done`` event's ``prompt_tokens`` and
``cached_tokens``. Then, on the idle server, a cold probe: fresh sessions with one fresh message as long
as turn T's prompt. In the cache modes ``/get_load``'s ``prefix_cache`` is polled every 100 ms.
A last row runs transformers' own continuous batching with block (prefix) sharing on the same turns,
without HTTP (``_multiturn_cb.py``), or writes why it cannot run. Off and on come from one invocation,
so their ratios compare one machine state. The table goes to stdout and to RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _bench_common import SEED, gguf_path  # noqa: E402
from _multiturn_load import Turn, cold_probe, run_users, warm_up  # noqa: E402
from _multiturn_report import TITLE, Mode, chart, summary, table, write_section  # noqa: E402
from serving import CACHE, Server, cpu_model, other_load, wait_for_quiet  # noqa: E402

CB_TIMEOUT = 600.0


def run_served(a: argparse.Namespace, mode: Mode, budget: str) -> None:
    """One server with ``budget``: warm-up, the users, the cold probe; failures end up in ``mode.error``."""
    started = time.perf_counter()
    k = str(a.users)  # max_batch_size = max_concurrency = max_queue = K
    argv = [sys.executable, str(HERE / "_chatstream_asgi_server.py"), "--batch-size", k, "--max-concurrency", k]
    argv += ["--max-queue", k]
    try:
        with Server(f"multiturn-{mode.name}", [*argv, "--prefix-cache-bytes", budget]) as server:
            asyncio.run(warm_up(server.base_url, a))
            wait_for_quiet(a.quiet_wait)
            with other_load() as other:
                measure(server.base_url, a, mode)
            mode.other_cpu = other[0]
    except Exception as exc:  # one broken mode must not lose the others' numbers
        mode.error = f"{type(exc).__name__}: {exc}"[:500]
    mode.seconds = time.perf_counter() - started
    print(f"  {mode.name}: {mode.seconds:.0f} s" + (f" — {mode.error}" if mode.error else ""), flush=True)


def measure(base_url: str, a: argparse.Namespace, mode: Mode) -> None:
    """The users' turns, then (the server idle again) the cold probe."""
    load = asyncio.run(run_users(base_url, a))
    mode.turns, mode.wall, mode.cache_samples = load.turns, load.wall, load.cache_samples
    failed = [t for t in load.turns if t.error or t.ttft is None]
    if failed or len(load.turns) < a.users * a.turns:
        raise RuntimeError(f"{len(failed)} turn(s) failed: {failed[0].error if failed else 'missing turns'}")
    target, per_word = cold_target(mode, a)
    mode.cold = asyncio.run(cold_probe(base_url, a, target, per_word))


def cold_target(mode: Mode, a: argparse.Namespace) -> tuple[int, float]:
    """Turn T's mean prompt length, and a first guess of tokens per word (turn 1: one message and the template)."""
    return round(mode.mean(a.turns, "prompt_tokens") or 0), (mode.mean(1, "prompt_tokens") or a.words) / a.words


def run_transformers_cb(a: argparse.Namespace, mode: Mode) -> None:
    """``_multiturn_cb.py`` in its own process; its JSON becomes the mode's turns, or its error the reason."""
    started = time.perf_counter()
    argv = [sys.executable, str(HERE / "_multiturn_cb.py"), "--cold-samples", str(a.cold_samples)]
    for name in ("users", "turns", "words", "max_new_tokens", "seed", "think"):
        argv += [f"--{name.replace('_', '-')}", str(getattr(a, name))]
    CACHE.mkdir(exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    try:
        wait_for_quiet(a.quiet_wait)
        with (CACHE / "multiturn-transformers-cb.log").open("w") as log, other_load() as other:
            done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=log, text=True, env=env, timeout=CB_TIMEOUT)
        lines = done.stdout.strip().splitlines()
        result: dict[str, Any] = json.loads(lines[-1]) if lines else {"error": f"exited with {done.returncode}"}
    except (subprocess.TimeoutExpired, ValueError) as exc:
        result = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    mode.error = result.get("error")
    if mode.error is None and not result.get("prefix_sharing"):
        mode.error = "the manager turned block sharing off for this model (cache.use_prefix_sharing is False)"
    if mode.error is None:
        mode.turns = [as_turn(record, a.max_new_tokens) for record in result["turns"]]
        mode.cold = [as_turn(record, a.max_new_tokens) for record in result["cold"]]
        mode.wall, mode.other_cpu = result["wall"], other[0]
    mode.seconds = time.perf_counter() - started
    print(f"  {mode.name}: {mode.seconds:.0f} s" + (f" — {mode.error}" if mode.error else ""), flush=True)


def as_turn(record: dict[str, Any], max_new_tokens: int) -> Turn:
    counts = {"prompt_tokens": record["prompt_tokens"], "cached_tokens": record["cached_tokens"]}
    turn = Turn(record.get("user", 0), record.get("turn", 1), record["started"], record["ttft"], record["finished"])
    turn.done = {**counts, "completion_tokens": max_new_tokens}
    return turn


def environment(a: argparse.Namespace, seconds: float) -> list[str]:
    import torch
    import transformers

    if a.report_from is not None:  # re-rendered: the run's own date and command
        measured = datetime.fromtimestamp(a.report_from.stat().st_mtime, UTC)
        when = f"{measured:%Y-%m-%d %H:%M} UTC (re-rendered from its --raw file); took {seconds:.0f} s"
        command = f"python benchmarks/multiturn.py --raw {a.report_from}"
    else:
        when = f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; took {seconds:.0f} s"
        command = f"python benchmarks/multiturn.py{''.join(' ' + arg for arg in sys.argv[1:])}"
    return [
        f"- date: {when}",
        f"- machine: {os.cpu_count()} cores, {cpu_model()}, {platform.platform()}; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads, the default, in every process; our model's worker thread: all cores "
        f"but one, `TransformersEngine`'s default), transformers {transformers.__version__}",
        f"- command: `{command}`",
        f"- model: SmolLM2-135M-Instruct, float32 on CPU, from `{gguf_path().name}`; `max_batch_size` = "
        f"`max_concurrency` = `max_queue` = K",
        f"- load: K = {a.users} users x T = {a.turns} turns, {a.words}-word messages (seed {a.seed}), "
        f"{a.max_new_tokens} new tokens a turn (greedy, `ignore_eos`), {a.think:g} s think time; user i starts "
        f"i/K think times late; cold probe: median of {a.cold_samples} fresh session(s), after a calibration request",
    ]


NOTES = [
    "- TTFT: from sending `POST /chat_stream` to the first `delta` event, as the client sees it; p50 / p99 over "
    "the K users at that turn index. `prompt tok` and `cached tok`: the `done` event's `prompt_tokens` and "
    "`cached_tokens` (mean over users).",
    "- The users fall into step: their replies are decoded in one batch and end together, so after the think time "
    "all K next prompts arrive within a second and are prefilled one after another (512-token chunks). A turn's p50 "
    'and p99 therefore include waiting for other users\' prefills; "first in line" is the user with none ahead.',
    "- `transformers-cb`: `model.init_continuous_batching` with `allow_block_sharing=True`, 64-token pages, "
    "512 batch tokens, no HTTP and no sessions: each turn's chat-template token ids (the history re-rendered "
    "with its own decoded replies) go straight to `add_request(streaming=True)`; TTFT to the first streamed "
    'token; cached tokens from its "Found a prefix match" debug log; sharing is per whole 64-token block.',
]


def render(a: argparse.Namespace, modes: list[Mode], seconds: float) -> str:
    lines = [TITLE, "", *environment(a, seconds), "", *table(modes, a.turns), "", *summary(modes, a.turns), ""]
    lines += [*chart(modes, a.turns), "", *NOTES]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="K = 2 users, T = 4 turns, one cold sample")
    parser.add_argument("--users", type=int, help="K concurrent users (default 4; 2 with --quick)")
    parser.add_argument("--turns", type=int, help="T turns per user (default 6; 4 with --quick)")
    parser.add_argument("--words", type=int, default=260, help="words per user message (about 290 tokens)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--think", type=float, default=1.0, help="seconds between a user's turns")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--budget", type=int, help="also run the cache with this budget in bytes")
    parser.add_argument("--cold-samples", type=int, help="cold probe requests (default 2; 1 with --quick)")
    parser.add_argument("--modes", default="off,on", help="served modes to run: off, on (and budget with --budget)")
    parser.add_argument("--no-cb", action="store_true", help="skip transformers' continuous batching row")
    parser.add_argument("--quiet-wait", type=float, default=15.0, help="wait up to this for an idle CPU per mode")
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--raw", type=Path, help="also write every turn, probe and cache sample as JSON here")
    parser.add_argument("--report-from", type=Path, help="measure nothing: render a --raw file of an earlier run")
    a = parser.parse_args(argv)
    a.users = a.users or (2 if a.quick else 4)
    a.turns = a.turns or (4 if a.quick else 6)
    a.cold_samples = a.cold_samples or (1 if a.quick else 2)
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.report_from is not None:
        return report_from(a)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # unwind, so every server process is killed
    started = time.perf_counter()
    modes = [Mode("off", "prefix_cache_bytes=0"), Mode("on", "prefix_cache_bytes=None (default budget)")]
    if a.budget is not None:
        modes.append(Mode("budget", f"prefix_cache_bytes={a.budget}"))
    print(f"multi-turn benchmark: K = {a.users} users x T = {a.turns} turns", flush=True)
    for mode, budget in zip(modes, ["off", "default", str(a.budget)], strict=False):
        if mode.name in a.modes.split(",") or mode.name == "budget":
            run_served(a, mode, budget)
        else:
            mode.error = "not run (--modes)"
    if not a.no_cb:
        modes.append(Mode("transformers-cb", "transformers continuous batching, block sharing, no HTTP"))
        run_transformers_cb(a, modes[-1])
    text = render(a, modes, time.perf_counter() - started)
    write_section(a.results, text)
    if a.raw is not None:
        a.raw.write_text(json.dumps([dataclasses.asdict(mode) for mode in modes], indent=1))
    print("\n" + text + f"\n\nwritten to {a.results}")
    return 1 if modes[0].error or modes[1].error else 0


def report_from(a: argparse.Namespace) -> int:
    """Re-render an earlier run's raw JSON (the section's wording changed, not its measurements)."""
    modes = []
    for raw in json.loads(a.report_from.read_text()):
        raw["turns"] = [Turn(**t) for t in raw["turns"]]
        raw["cold"] = [Turn(**t) for t in raw["cold"]]
        modes.append(Mode(**raw))
    seconds = sum(m.seconds for m in modes)
    text = render(a, modes, seconds)
    write_section(a.results, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
