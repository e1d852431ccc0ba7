"""Contender 4 of ``serving.py``: the physical limit, with no server at all.

``model.generate`` on N prompts as one static left-padded batch, greedy, exactly ``--max-new-tokens``
new tokens each (``min_new_tokens`` = ``max_new_tokens``). One untimed warm-up batch per N, then
``--repeats`` timed batches, each after waiting up to ``--quiet-wait`` seconds for other processes to
leave the CPU; the best time counts (the least disturbed by anything else on the machine). Prints
one JSON object per N on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil  # noqa: E402
import torch  # noqa: E402
from _bench_common import PROMPTS, load_model, runtime_info  # noqa: E402

QUIET_CORES = 0.25


def batch_inputs(tokenizer: object, n: int) -> dict[str, torch.Tensor]:
    texts = [
        tokenizer.apply_chat_template(  # type: ignore[attr-defined]
            [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], tokenize=False, add_generation_prompt=True
        )
        for i in range(n)
    ]
    return dict(tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False))  # type: ignore[operator]


def busy_seconds() -> float:
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


def own_seconds() -> float:
    times = psutil.Process().cpu_times()
    return float(times.user + times.system)


def wait_for_quiet(max_wait: float) -> None:
    deadline = time.monotonic() + max_wait
    while time.monotonic() < deadline:
        before = busy_seconds()
        time.sleep(0.5)
        if (busy_seconds() - before) / 0.5 <= QUIET_CORES:
            return


def timed_batch(
    model: object, inputs: dict[str, torch.Tensor], max_new_tokens: int, pad_token_id: int
) -> tuple[float, float]:
    """Seconds for one batch, and the cores that other processes used meanwhile."""
    machine, own = busy_seconds(), own_seconds()
    elapsed = time_batch(model, inputs, max_new_tokens, pad_token_id)
    other = (busy_seconds() - machine - (own_seconds() - own)) / elapsed
    return elapsed, max(0.0, other)


def time_batch(model: object, inputs: dict[str, torch.Tensor], max_new_tokens: int, pad_token_id: int) -> float:
    started = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(  # type: ignore[attr-defined]
            **inputs,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_token_id,
        )
    elapsed = time.perf_counter() - started
    generated = output.shape[1] - inputs["input_ids"].shape[1]
    if generated != max_new_tokens:
        raise SystemExit(f"generate made {generated} tokens per row instead of {max_new_tokens}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-sizes", default="1,4,8")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quiet-wait", type=float, default=30.0)
    args = parser.parse_args()
    model, tokenizer = load_model()
    tokenizer.padding_side = "left"
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    info = runtime_info()
    for n in (int(value) for value in args.batch_sizes.split(",")):
        inputs = batch_inputs(tokenizer, n)
        time_batch(model, inputs, min(8, args.max_new_tokens), pad_token_id)  # warm-up
        runs = []
        for _ in range(args.repeats):
            wait_for_quiet(args.quiet_wait)
            runs.append(timed_batch(model, inputs, args.max_new_tokens, pad_token_id))
        seconds, other_cpu = min(runs)
        tokens = n * args.max_new_tokens
        result = {"n": n, "seconds": seconds, "other_cpu": other_cpu, "tokens": tokens, "info": info}
        result["all_seconds"] = [elapsed for elapsed, _ in runs]
        result["tokens_per_s"] = tokens / seconds
        result["prompt_tokens"] = int(inputs["attention_mask"].sum())
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
