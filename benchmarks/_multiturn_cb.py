"""The comparison row of ``multiturn.py``: transformers' own continuous batching with prefix (block) sharing.

Runs in a process of its own and prints one JSON object: per-turn TTFT and prompt lengths, output
tokens/s, the cold probe, or ``{"error": ...}`` with the reason it cannot run here. No HTTP: the same
users, turns, texts and think time as the served modes, but each turn's chat-template token ids go
straight to ``ContinuousBatchingManager.add_request(streaming=True)``. TTFT is from ``add_request`` to
the first streamed token. Cached tokens come from the manager's own debug log line
("Found a prefix match of N tokens"), the only place it reports them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_common import load_model  # noqa: E402
from _multiturn_texts import fresh_message, user_message  # noqa: E402

PAGE_SIZE = 64  # tokens per block: sharing works in whole blocks, so smaller blocks share more of each prompt
MAX_BATCH_TOKENS = 512  # as TransformersEngine's prefill_chunk_tokens
CACHE_LOGGER = "ContinuousBatchingLogger"  # transformers.generation.continuous_batching.utils.logger
MATCH = re.compile(r"Found a prefix match of (\d+) tokens for request (\S+)")


class PrefixMatches(logging.Handler):
    """Collects the manager's prefix-match debug lines: request id -> matched tokens."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.matched: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        found = MATCH.search(record.getMessage())
        if found:
            self.matched[found.group(2)] = int(found.group(1))


def build_manager(model: Any, a: argparse.Namespace) -> Any:
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    generation = GenerationConfig(max_new_tokens=a.max_new_tokens, do_sample=False, eos_token_id=-1)  # no EOS
    per_chat = a.turns * (2 * a.words + a.max_new_tokens + 64)  # generous: ~1.3 tokens a word, template, replies
    blocks = math.ceil(2 * a.users * per_chat / PAGE_SIZE) + 16  # room for live chats and as many cached blocks
    config = ContinuousBatchingConfig(
        allow_block_sharing=True, page_size=PAGE_SIZE, num_blocks=blocks, max_batch_tokens=MAX_BATCH_TOKENS
    )
    return model.init_continuous_batching(generation_config=generation, continuous_batching_config=config)


async def generate(manager: Any, request_id: str, ids: list[int], max_new_tokens: int) -> dict[str, Any]:
    """One streamed request; TTFT at its first generated token."""
    loop, finished = asyncio.get_running_loop(), asyncio.Event()
    record: dict[str, Any] = {"request_id": request_id, "prompt_tokens": len(ids), "ttft": None}
    record["started"] = time.perf_counter()

    def on_output(output: Any) -> None:
        if record["ttft"] is None and output.generated_tokens:
            record["ttft"] = time.perf_counter() - record["started"]
        if output.is_finished():
            record["tokens"], record["error"] = list(output.generated_tokens), output.error
            loop.call_soon(finished.set)

    manager.register_result_handler(request_id, on_output)
    manager.add_request(ids, request_id=request_id, max_new_tokens=max_new_tokens, streaming=True)
    await finished.wait()
    record["finished"] = time.perf_counter()
    return record


def template_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


async def chat(manager: Any, tokenizer: Any, user: int, a: argparse.Namespace) -> list[dict[str, Any]]:
    await asyncio.sleep(a.think * user / a.users)
    messages: list[dict[str, str]] = []
    turns = []
    for index in range(1, a.turns + 1):
        if index > 1:
            await asyncio.sleep(a.think)
        messages.append({"role": "user", "content": user_message(a.seed, user, index, a.words)})
        record = await generate(manager, f"u{user}t{index}", template_ids(tokenizer, messages), a.max_new_tokens)
        if record["error"]:
            raise RuntimeError(f"user {user} turn {index}: {record['error']}")
        messages.append({"role": "assistant", "content": tokenizer.decode(record["tokens"], skip_special_tokens=True)})
        turns.append({"user": user, "turn": index, **{k: v for k, v in record.items() if k != "tokens"}})
    return turns


async def cold(manager: Any, tokenizer: Any, a: argparse.Namespace, target: int) -> list[dict[str, Any]]:
    """Fresh single-message prompts of about ``target`` tokens, one at a time on the idle manager."""
    probes = []
    for index in range(1, a.cold_samples + 1):
        words = a.words
        for _ in range(4):  # tokens = template + rate x words: this converges on the word count that fits
            ids = template_ids(tokenizer, [{"role": "user", "content": fresh_message(a.seed, index, words)}])
            words = max(20, round(words * target / len(ids)))
        probes.append(await generate(manager, f"cold{index}", ids, a.max_new_tokens))
    return probes


async def run(a: argparse.Namespace) -> dict[str, Any]:
    model, tokenizer = load_model()
    matches = PrefixMatches()
    cache_log = logging.getLogger(CACHE_LOGGER)
    for handler in cache_log.handlers:  # its console handler keeps printing warnings only
        handler.setLevel(max(handler.level, logging.WARNING))
    cache_log.setLevel(logging.DEBUG)
    cache_log.addHandler(matches)
    manager = build_manager(model, a)
    manager.start()
    try:
        warm = await generate(manager, "warm", template_ids(tokenizer, [{"role": "user", "content": "Hi"}]), 4)
        if warm["error"] or warm["ttft"] is None:
            raise RuntimeError(f"warm-up failed: {warm['error']}")
        started = time.perf_counter()
        users = await asyncio.gather(*(chat(manager, tokenizer, u, a) for u in range(1, a.users + 1)))
        wall = time.perf_counter() - started
        turns = [turn for chat_turns in users for turn in chat_turns]
        last = [t["prompt_tokens"] for t in turns if t["turn"] == a.turns]
        probes = await cold(manager, tokenizer, a, round(sum(last) / len(last)))
        sharing = bool(manager.batch_processor.cache.use_prefix_sharing)
    finally:
        manager.stop(block=True, timeout=30)
    for record in [*turns, *probes]:
        record["cached_tokens"] = matches.matched.get(record["request_id"], 0)
    return {"turns": turns, "wall": wall, "cold": probes, "prefix_sharing": sharing}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    for name, default in (("users", 4), ("turns", 6), ("words", 220), ("max-new-tokens", 32), ("seed", 1234)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--cold-samples", type=int, default=2)
    parser.add_argument("--think", type=float, default=1.0)
    a = parser.parse_args()
    try:
        result = asyncio.run(run(a))
    except Exception as exc:  # the driver writes the reason in place of the row
        result = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
