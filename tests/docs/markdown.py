"""Reading the documentation's Markdown: fenced code blocks with their page and line, links, heading anchors."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

FENCE = re.compile(r"^ {0,3}(`{3,})\s*([^`\s]*)\s*$")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+\1")


@dataclass(frozen=True)
class Block:
    """One fenced code block: ``line`` is the 1-based line of its opening fence."""

    page: str
    line: int
    language: str
    source: str

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def page_name(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def code_blocks(path: Path) -> list[Block]:
    """Every fenced block of ``path``; an unclosed fence is an error, not a block silently dropped."""
    blocks: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    opened: tuple[int, str, str] | None = None  # (line, fence, language)
    body: list[str] = []
    for number, text in enumerate(lines, start=1):
        match = FENCE.match(text)
        if opened is None:
            if match:
                opened, body = (number, match.group(1), match.group(2)), []
        elif match and match.group(1) == opened[1] and not match.group(2):
            blocks.append(Block(page_name(path), opened[0], opened[2], "\n".join(body) + "\n"))
            opened = None
        else:
            body.append(text)
    if opened is not None:
        raise AssertionError(f"{page_name(path)}:{opened[0]}: a code fence is never closed")
    return blocks


def prose_lines(path: Path, *, keep_inline_code: bool = False) -> list[tuple[int, str]]:
    """``(line number, text)`` of the lines outside code blocks, inline code removed unless asked to keep it."""
    inside: set[int] = set()
    for block in code_blocks(path):
        inside.update(range(block.line, block.line + block.source.count("\n") + 2))
    lines = path.read_text(encoding="utf-8").splitlines()
    prose = [(n, text) for n, text in enumerate(lines, start=1) if n not in inside]
    return prose if keep_inline_code else [(n, INLINE_CODE.sub("", text)) for n, text in prose]


def anchors(path: Path) -> set[str]:
    """The anchors GitHub makes for the page's headings (lower case, punctuation dropped, spaces to '-')."""
    seen: dict[str, int] = {}
    result: set[str] = set()
    for _, text in prose_lines(path, keep_inline_code=True):  # a heading's backticked words are in its anchor
        match = HEADING.match(text)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).replace("`", "").strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def links(path: Path) -> list[tuple[int, str]]:
    """``(line number, target)`` of every Markdown link outside code."""
    return [(n, target) for n, text in prose_lines(path) for target in LINK.findall(text)]
