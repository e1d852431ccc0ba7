"""The package's public names: every one importable, ``import chatstream_asgi`` stays light, the layers hold."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import chatstream_asgi

REPO = Path(__file__).resolve().parents[2]
FOLDERS = ("http", "sessions", "openai", "ops", "compat", "engines")


def test_every_public_name_resolves() -> None:
    missing = [name for name in chatstream_asgi.__all__ if getattr(chatstream_asgi, name, None) is None]
    assert missing == []


def test_every_public_name_imports_from_the_package_root() -> None:
    namespace: dict[str, object] = {}
    for name in chatstream_asgi.__all__:
        exec(f"from chatstream_asgi import {name}", namespace)
    assert all(namespace[name] is getattr(chatstream_asgi, name) for name in chatstream_asgi.__all__)


def test_the_hooks_and_error_a_host_app_needs_are_public() -> None:
    for name in ("HTTPError", "OnFinish", "Interceptor", "OnFeedback", "SessionStateStore", "ChatMessage"):
        assert name in chatstream_asgi.__all__


def test_importing_the_package_loads_neither_torch_nor_transformers() -> None:
    code = "import sys, chatstream_asgi; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"


def test_importing_any_folder_or_the_cli_loads_no_torch() -> None:
    modules = ", ".join(f"chatstream_asgi.{name}" for name in (*FOLDERS, "cli", "middleware"))
    code = f"import sys, {modules}; print('torch' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "False"


def test_the_chatstream_facade_keeps_its_import_path() -> None:
    from chatstream_asgi.compat import AbstractChatPrompt, ChatPromptMetaLlamaLlama2Chat, ChatStream

    assert ChatStream.__module__ == "chatstream_asgi.compat.facade"
    assert issubclass(ChatPromptMetaLlamaLlama2Chat, AbstractChatPrompt)


def test_the_openai_folder_does_not_shadow_the_openai_client() -> None:
    pytest.importorskip("openai")
    import openai

    assert openai.__name__ == "openai" and hasattr(openai, "AsyncOpenAI")


def test_the_import_layers_hold() -> None:
    lint_imports = shutil.which("lint-imports")
    if lint_imports is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    run = subprocess.run([lint_imports, "--no-cache"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:]
