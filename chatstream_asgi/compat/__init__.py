"""ChatStream compatibility: ``from chatstream import ...`` becomes ``from chatstream_asgi.compat import ...``.

``facade.py`` (the ``ChatStream`` class over ``ChatStreamMiddleware``), ``routes.py`` (the response its
handlers return, ChatStream's API names), ``legacy_prompts.py`` and ``legacy_presets.py`` (ChatStream's prompt
builder and presets, for models without a chat template).

Built on the public API only (``chatstream_asgi``, ``chatstream_asgi.errors``), like any user's code, except
the JSON senders of ``http.asgi``, so its error bodies match the middleware's. The contracts are in
``pyproject.toml``.
"""

from .facade import *  # noqa: F403 - ChatStream, AbstractChatPrompt and every preset under its ChatStream name
from .facade import __all__ as _facade_names
from .legacy_prompts import LegacyPromptTokenizer

# LegacyPromptTokenizer: a preset as a chat template, for TransformersEngine used without the facade
__all__ = [*_facade_names, "LegacyPromptTokenizer"]
