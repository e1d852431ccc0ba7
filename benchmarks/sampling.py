"""Micro-benchmark of ``choose_tokens``: the per-step cost of picking one token per batch row.

Not a test: prints a markdown table of milliseconds per call, best and median of ``--repeats``
timed calls after two warm-ups (on a shared machine the best is the stabler figure), for 32 and
64 rows at SmolLM2's vocabulary width (49152), in three mixes:

- all greedy: ``temperature=0``, no penalty (one batched argmax);
- all sampled: the API defaults (``temperature=0.7, top_k=50, top_p=0.9``), half of them seeded;
- mixed: a quarter each of greedy, sampled, greedy with ``repetition_penalty=1.2`` and seeded
  sampling with the penalty (penalised rows carry a 200-token prompt).

Each timed call feeds the sampler one more observed token per row, as a decode step does.
Usage: ``python benchmarks/sampling.py [--device cuda] [--rows 32,64] [--repeats 20] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatstream_asgi.engines._sampling import RowSampler, choose_tokens  # noqa: E402
from chatstream_asgi.engines.base import SamplingParams  # noqa: E402

VOCAB = 49152
GREEDY = SamplingParams(temperature=0.0)
SAMPLED = SamplingParams()
MIXES = {
    "all greedy": lambda i: GREEDY,
    "all sampled": lambda i: SamplingParams(seed=i) if i % 2 else SAMPLED,
    "mixed": lambda i: [
        GREEDY,
        SAMPLED,
        SamplingParams(temperature=0.0, repetition_penalty=1.2),
        SamplingParams(repetition_penalty=1.2, seed=i),
    ][i % 4],
}


def time_mix(mix: str, rows: int, device: torch.device, repeats: int) -> tuple[float, float]:
    """Best and median milliseconds of one ``choose_tokens`` call."""
    gen = torch.Generator().manual_seed(rows)
    samplers = [RowSampler(MIXES[mix](i), torch.randint(VOCAB, (200,), generator=gen).tolist()) for i in range(rows)]
    logits = [(torch.randn(rows, VOCAB, generator=gen) * 3).to(device) for _ in range(4)]
    times = []
    for step in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        choose_tokens(logits[step % len(logits)], samplers)
        times.append(time.perf_counter() - start)
    return min(times[2:]) * 1000, statistics.median(times[2:]) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", default="32,64")
    parser.add_argument("--repeats", type=int, default=20)
    # On a shared CPU a second intra-op thread that gets descheduled stalls every op by a time slice.
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = [int(r) for r in args.rows.split(",")]
    threads = torch.get_num_threads()
    print(f"choose_tokens, vocab {VOCAB}, {device}, torch threads {threads}: ms per call, best / median")
    print("| mix | " + " | ".join(f"{r} rows" for r in sizes) + " |")
    print("|---|" + "--:|" * len(sizes))
    with torch.inference_mode():
        for mix in MIXES:
            cells = ["{:.2f} / {:.2f}".format(*time_mix(mix, r, device, args.repeats)) for r in sizes]
            print(f"| {mix} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
