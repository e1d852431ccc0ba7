"""The package's public names: every one importable, and ``import chatstream_asgi`` stays light."""

from __future__ import annotations

import subprocess
import sys

import chatstream_asgi


def test_every_public_name_resolves() -> None:
    missing = [name for name in chatstream_asgi.__all__ if getattr(chatstream_asgi, name, None) is None]
    assert missing == []


def test_the_hooks_and_error_a_host_app_needs_are_public() -> None:
    for name in ("HTTPError", "OnFinish", "Interceptor", "OnFeedback", "SessionStateStore", "ChatMessage"):
        assert name in chatstream_asgi.__all__


def test_importing_the_package_loads_neither_torch_nor_transformers() -> None:
    code = "import sys, chatstream_asgi; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
