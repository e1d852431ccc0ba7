"""The report of ``multiturn.py``: the per-turn table, the summary lines, a text chart, the RESULTS.md section."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _bench_common import write_marked_section
from _multiturn_load import Turn
from serving import percentile

TITLE = "## Multi-turn chats: prefix KV cache off and on (`make bench-multiturn`)"
BAR_WIDTH = 40


@dataclass
class Mode:
    """One served configuration (or transformers' own batching) and what it measured."""

    name: str
    label: str
    turns: list[Turn] = field(default_factory=list)
    wall: float = 0.0
    cold: list[Turn] = field(default_factory=list)
    cache_samples: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    other_cpu: float = 0.0
    error: str | None = None

    def at(self, turn: int) -> list[Turn]:
        return [t for t in self.turns if t.turn == turn and t.ttft is not None]

    def ttft(self, turn: int, q: float = 50) -> float | None:
        return percentile([t.ttft for t in self.at(turn) if t.ttft is not None], q)

    def first_in_line(self, turn: int) -> float | None:
        """The turn's smallest TTFT: the user whose prompt had no other user's prefill queued ahead of it."""
        return min((t.ttft for t in self.at(turn) if t.ttft is not None), default=None)

    def mean(self, turn: int, name: str) -> float | None:
        values = [t.count(name) for t in self.at(turn)]
        known = [v for v in values if v is not None]
        return statistics.fmean(known) if known else None

    def cold_ttft(self) -> float | None:
        values = [t.ttft for t in self.cold if t.ttft is not None]
        return statistics.median(values) if values else None

    def cold_tokens(self) -> float | None:
        values = [t.count("prompt_tokens") for t in self.cold]
        known = [v for v in values if v is not None]
        return statistics.fmean(known) if known else None

    def tokens_per_s(self) -> float | None:
        tokens = sum(t.count("completion_tokens") or 0 for t in self.turns)
        return tokens / self.wall if self.wall > 0 else None


def seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f} s"


def number(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def ratio(top: float | None, bottom: float | None) -> float | None:
    return top / bottom if top is not None and bottom else None


def table(modes: list[Mode], turns: int) -> list[str]:
    off, on, others = modes[0], modes[1] if len(modes) > 1 else None, modes[2:]
    head = ["turn", "prompt tok (mean)", "TTFT p50 / p99 off"]
    if on is not None:
        head += [f"TTFT p50 / p99 {on.name}", f"cached tok {on.name}", "p50 on/off"]
    for mode in others:
        head += [f"TTFT p50 / p99 {mode.name}", f"cached tok {mode.name}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "--:|" * len(head)]
    for turn in range(1, turns + 1):
        prompts = next((m.mean(turn, "prompt_tokens") for m in modes if m.turns and not m.error), None)
        cells = [str(turn), number(prompts), pair(off, turn)]
        if on is not None:
            cells += [pair(on, turn), number(on.mean(turn, "cached_tokens"))]
            cells.append(number(ratio(on.ttft(turn), off.ttft(turn)), 2) + "×")
        for mode in others:
            cells += [pair(mode, turn), number(mode.mean(turn, "cached_tokens"))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def pair(mode: Mode, turn: int) -> str:
    if mode.error:
        return "—"
    return f"{seconds(mode.ttft(turn))} / {seconds(mode.ttft(turn, 99))}"


def summary(modes: list[Mode], turns: int) -> list[str]:
    ok = [m for m in modes if not m.error]
    lines = [
        "- output tokens/s (all users, think time included): "
        + ", ".join(f"{m.name} {number(m.tokens_per_s(), 1)}" for m in ok)
    ]
    colds = [f"{m.name} {seconds(m.cold_ttft())} ({number(m.cold_tokens())} tok)" for m in ok if m.cold]
    lines.append(f"- cold probe TTFT (fresh session, one message as long as turn {turns}'s prompt): {', '.join(colds)}")
    for m in ok:
        last_vs_cold, last_vs_first = ratio(m.ttft(turns), m.cold_ttft()), ratio(m.ttft(turns), m.ttft(1))
        cached = m.name != "off"
        lines.append(
            f"- {m.name}: turn-{turns} TTFT p50 / cold TTFT = {number(last_vs_cold, 2)}×"
            + (f" {verdict(last_vs_cold, 0.3)} (target ≤ 0.3)" if cached else "")
            + f" (first in line: {number(ratio(m.first_in_line(turns), m.cold_ttft()), 2)}×)"
            + f"; turn {turns} / turn 1 = {number(last_vs_first, 2)}×"
            + (f" {verdict(last_vs_first, 2.0)} (target ≤ 2)" if cached else "")
        )
    off = next((m for m in ok if m.name == "off"), None)
    lines += [same_load_line(m, off, turns) for m in ok if m.name != "off" and off is not None]
    lines += [cache_line(m) for m in ok if m.cache_samples]
    lines += [overhead_line(m) for m in ok if any("time_to_first_token_s" in t.done for t in m.turns)]
    times = ", ".join(f"{m.name} {m.seconds:.0f} s" for m in modes)
    others = ", ".join(f"{m.name} {m.other_cpu:.2f} cores" for m in ok if m.turns)
    lines.append(f"- time per mode: {times}; other processes' CPU during the turns and the cold probe: {others}")
    lines += [f"- {m.name}: not measured: {m.error}" for m in modes if m.error]
    return lines


def same_load_line(mode: Mode, off: Mode, turns: int) -> str:
    """The like-for-like readings: against ``off``'s turn T (a prompt as long, uncached, under the same load), and
    turn T against turn 1 for the user first in line (no other user's prefill queued ahead)."""
    same_load = ratio(mode.ttft(turns), off.ttft(turns))
    unqueued = ratio(mode.first_in_line(turns), mode.first_in_line(1))
    return (
        f"- {mode.name}, like for like: turn-{turns} TTFT p50 / off's turn-{turns} TTFT p50 (the same prompt length, "
        f"uncached, under the same load) = {number(same_load, 2)}× {verdict(same_load, 0.3)} (target ≤ 0.3); "
        f"first in line, turn {turns} / turn 1 = {number(unqueued, 2)}× {verdict(unqueued, 2.0)} (target ≤ 2)"
    )


def verdict(value: float | None, bound: float) -> str:
    return "?" if value is None else ("MET" if value <= bound else "MISSED")


def cache_line(mode: Mode) -> str:
    last, samples = mode.cache_samples[-1], mode.cache_samples
    capacity = last.get("capacity_bytes") or 0
    seen = max(int(s.get("bytes") or 0) for s in samples)
    within = "never above it, MET" if seen <= capacity else "ABOVE it, MISSED"
    hit, asked = last.get("hit_tokens", 0), last.get("queries_tokens", 0)
    return (
        f"- {mode.name} cache: max `bytes` seen {mib(seen)} over {len(samples)} polls of `/get_load` vs capacity "
        f"{mib(capacity)} ({within}); `peak_bytes` {mib(last.get('peak_bytes'))}; at the end {last.get('entries')} "
        f"entries, {hit:,} of {asked:,} queried tokens hit, {last.get('evictions')} evictions"
    )


def overhead_line(mode: Mode) -> str:
    """How much of the client's TTFT the server itself counted (the rest: HTTP, event loop, client)."""
    server = [(t.ttft, t.done.get("time_to_first_token_s")) for t in mode.turns]
    gaps = [client - ours for client, ours in server if client is not None and ours is not None]
    if not gaps:
        return f"- {mode.name}: no server-side TTFT reported"
    p50, p99 = (number((percentile(gaps, q) or 0.0) * 1000, 1) for q in (50, 99))
    return (
        f"- {mode.name}: client TTFT minus the server's own `time_to_first_token_s`: {p50} ms p50, {p99} ms p99 "
        "(HTTP, event loop and client); the rest of TTFT is inside the engine"
    )


def mib(value: Any) -> str:
    return "—" if value is None else f"{int(value) / 2**20:,.1f} MiB"


def chart(modes: list[Mode], turns: int) -> list[str]:
    """TTFT p50 per turn as text bars, one per mode, on one scale."""
    ok = [m for m in modes if not m.error]
    top = max((m.ttft(t) or 0.0 for m in ok for t in range(1, turns + 1)), default=0.0) or 1.0
    width = max(len(m.name) for m in ok) if ok else 3
    lines = ["```", f"TTFT p50 per turn (full bar = {top:.2f} s)"]
    for turn in range(1, turns + 1):
        for m in ok:
            value = m.ttft(turn) or 0.0
            bar = "#" * round(BAR_WIDTH * value / top)
            lines.append(f"turn {turn} {m.name:<{width}} {bar:<{BAR_WIDTH}} {value:.2f} s")
    return [*lines, "```"]


def write_section(path: Path, body: str) -> None:
    write_marked_section(path, "multiturn", body)