"""The rows of ``gpu.py`` and their markdown: one table, and its section of ``RESULTS.md``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from _bench_common import write_marked_section

TITLE = "## GPU decode throughput (`make bench-gpu`)"


@dataclass
class Row:
    """One contender at one batch size; ``tokens == 0`` means no figures (``note`` says why)."""

    model: str
    contender: str
    batch: int
    new_tokens: int
    tokens: int = 0
    seconds: float = 0.0
    note: str = ""

    def skip(self, why: str) -> Row:
        self.tokens, self.seconds, self.note = 0, 0.0, why
        return self

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.tokens and self.seconds else 0.0

    @property
    def ms_step(self) -> float:
        return self.seconds / self.new_tokens * 1000 if self.tokens else 0.0


def render(header: list[str], rows: list[Row], notes: list[str]) -> str:
    """The header lines, the table (with each row's throughput over the bare loop's) and the notes."""
    bare = {(r.model, r.batch): r.tok_s for r in rows if r.contender == "bare forward loop" and r.tokens}
    lines = [
        *header,
        "",
        "| model | contender | N | output tok/s | ms/step | x bare loop | note |",
        "|---|---|--:|--:|--:|--:|---|",
    ]
    for r in rows:
        if not r.tokens:
            lines.append(f"| {r.model} | {r.contender} | {r.batch} | — | — | — | {r.note} |")
            continue
        ratio = f"{r.tok_s / bare[r.model, r.batch]:.2f}" if bare.get((r.model, r.batch)) else "—"
        figures = f"{r.tok_s:,.0f} | {r.ms_step:.2f} | {ratio}"
        lines.append(f"| {r.model} | {r.contender} | {r.batch} | {figures} | {r.note} |")
    lines += ["", "Notes:", "", *(f"- {note}" for note in notes)]
    return "\n".join(lines)


def write_section(path: Path, table: str) -> None:
    write_marked_section(path, "gpu", f"{TITLE}\n\n{table}")