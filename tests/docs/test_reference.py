"""The documentation against the code: links resolve, every block names its language, the configuration page
sets every ``ChatStreamMiddleware`` config object and every one of their fields to its real default, its table
of shorthands is ``SHORTHANDS`` with the real defaults, and every command-line option is documented."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from chatstream_asgi import ChatStreamMiddleware
from chatstream_asgi.config import CONCERNS, SHORTHANDS

from .markdown import PAGES, REPO, anchors, code_blocks, links, page_name

LANGUAGES = {"python", "bash", "text"}
CONFIGURATION = REPO / "docs" / "configuration.md"
PAGE_IDS = [pytest.param(page, id=page_name(page)) for page in PAGES]


@pytest.mark.parametrize("page", PAGE_IDS)
def test_every_code_block_names_its_language(page: Path) -> None:
    untagged = [f"{b.id} ({b.language or 'none'})" for b in code_blocks(page) if b.language not in LANGUAGES]
    assert not untagged, f"tag these blocks with one of {sorted(LANGUAGES)} (python blocks are run): {untagged}"


@pytest.mark.parametrize("page", PAGE_IDS)
def test_links_between_pages_resolve(page: Path) -> None:
    broken = []
    for line, target in links(page):
        if re.match(r"[a-z]+:", target):  # https:, mailto:: not ours to check
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{page_name(page)}:{line}: {target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{page_name(page)}:{line}: {target} (no such heading in {page_name(linked)})")
    assert not broken, "\n".join(broken)


def test_the_readme_links_every_docs_page() -> None:
    linked = {(REPO / target.partition("#")[0]).resolve() for _, target in links(REPO / "README.md")}
    missing = [page_name(page) for page in PAGES[1:] if page.resolve() not in linked]
    assert not missing, f"add these pages to the README's table: {missing}"


def configuration_call() -> ast.Call:
    """The ``ChatStreamMiddleware(...)`` call of the configuration page's first example."""
    first = next(block for block in code_blocks(CONFIGURATION) if block.language == "python")
    calls = [node for node in ast.walk(ast.parse(first.source)) if isinstance(node, ast.Call)]
    return next(call for call in calls if getattr(call.func, "id", None) == "ChatStreamMiddleware")


def literal(node: ast.expr) -> object:
    """A documented value (a literal or simple arithmetic such as ``64 * 1024``)."""
    return eval(compile(ast.Expression(node), "configuration.md", "eval"), {"__builtins__": {}})


def field_defaults(config_class: type) -> dict[str, object]:
    return {field.name: field.default for field in dataclasses.fields(config_class)}


def test_the_configuration_page_sets_every_config_object_to_its_default() -> None:
    parameters = inspect.signature(ChatStreamMiddleware).parameters
    keywords = {name for name, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    documented = {keyword.arg: keyword.value for keyword in configuration_call().keywords}
    assert set(documented) == keywords, "the page and the signature name different keywords"
    assert set(CONCERNS) <= keywords, "every config object is a keyword of the middleware"
    wrong = {}
    for concern, config_class in CONCERNS.items():
        call = documented[concern]
        assert isinstance(call, ast.Call) and getattr(call.func, "id", None) == config_class.__name__, concern
        values = {keyword.arg: literal(keyword.value) for keyword in call.keywords}
        defaults = field_defaults(config_class)
        assert set(values) == set(defaults), f"{concern}=: the page and {config_class.__name__} name different fields"
        for name, default in defaults.items():
            if values[name] != default:
                wrong[f"{concern}.{name}"] = (values[name], default)
        default = parameters[concern].default  # None: the class's defaults
        assert default is None or default == config_class(**values), f"{concern}= defaults to {default!r}"
    assert not wrong, f"documented value, real default: {wrong}"


def test_the_configuration_page_lists_every_shorthand_with_its_field_and_default() -> None:
    text = CONFIGURATION.read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(\w+)` \| `(\w+)\.(\w+)` \| `([^`]*)` \|$", text, re.MULTILINE)
    table = {name: (class_name, field, default) for name, class_name, field, default in rows}
    assert set(table) == set(SHORTHANDS), "the page's shorthand table and SHORTHANDS differ"
    wrong = {}
    for name, (concern, field) in SHORTHANDS.items():
        class_name, documented_field, default = table[name]
        config_class = CONCERNS[concern]
        real_default = field_defaults(config_class)[field]
        documented = literal(ast.parse(default, mode="eval").body)
        if (class_name, documented_field, documented) != (config_class.__name__, field, real_default):
            wrong[name] = ((class_name, documented_field, documented), (config_class.__name__, field, real_default))
    assert not wrong, f"documented, real: {wrong}"


def test_the_configuration_page_names_every_command_line_option() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "chatstream_asgi", "serve", "--help"]
    usage = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=60, check=True).stdout
    options = set(re.findall(r"--[a-z][a-z-]+", usage)) - {"--help"}
    text = CONFIGURATION.read_text(encoding="utf-8")
    missing = sorted(option for option in options if f"`{option}" not in text)
    assert options and not missing, f"document these options in docs/configuration.md: {missing}"
