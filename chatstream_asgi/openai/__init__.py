"""The OpenAI-compatible API (``/v1/chat/completions``, ``/v1/models``), split as vLLM splits it.

``routes.py`` (the router and the serving: admission, streaming, non-streaming replies), ``schema.py`` (the
request protocol: parsing, validation, errors), ``responses.py`` (reply, chunk and usage shapes, the SSE
encoder), ``limits.py`` (body, message and prompt limits).

May import ``http``, ``ops``, ``sessions``, ``engines`` and ``errors``; never ``compat``, ``middleware`` or
``cli``. This is ``chatstream_asgi.openai``, not the PyPI ``openai`` client, which the package never imports
(the tests import the client as plain ``import openai``). The contracts are in ``pyproject.toml``.
"""
