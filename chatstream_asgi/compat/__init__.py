"""ChatStream compatibility: ``from chatstream import ...`` becomes ``from chatstream_asgi.compat import ...``."""

from .facade import *  # noqa: F403 - ChatStream, AbstractChatPrompt and every preset under its ChatStream name
from .facade import __all__  # noqa: F401
