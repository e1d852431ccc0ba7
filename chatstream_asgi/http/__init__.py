"""The HTTP layer: the chat routes and everything that turns a request into a streamed response.

``routes.py`` (the chat routes), ``turns.py`` (one turn at a time per session, its history loaded and
saved), ``session_routes.py`` (generation params, feedback, stop, resource usage),
``ops_routes.py`` (``/healthz``, ``/readyz``, ``/metrics``), ``requests.py`` (body parsing and turn building),
``streaming.py`` and ``encoders.py`` (the send loop and the wire formats), ``slots.py`` (waiting for an admission
slot), ``hooks.py`` (interceptor, on_finish, stop), ``security.py`` (API keys, CSRF), ``asgi.py`` (raw-ASGI
helpers) and ``types.py`` (asgiref's HTTP event types inside, loose ones at the framework boundary).

May import ``ops``, ``sessions``, ``engines`` and ``errors``; never ``openai``, ``compat``, ``middleware`` or
``cli``. The contracts are in ``pyproject.toml`` (``lint-imports``).
"""
