"""Operations: load control and what an operator watches.

``admission.py``, ``rejections.py`` and ``hold_time.py`` (concurrency limit, FIFO queue, drain, ``Retry-After``
estimate; the routes use them, health and metrics read them), ``metrics.py`` (Prometheus collectors, the
per-generation report and request log), ``gc_pauses.py`` (how long garbage collections stop the process),
``health.py`` (readiness, graceful drain), ``lifespan.py`` (engine start
and stop), ``signals.py`` (drain on SIGTERM/SIGINT), ``resource_usage.py`` (memory and CPU figures).

May import ``sessions``, ``engines`` and ``errors``; never ``http`` (the routes serving these figures live
there), ``openai``, ``compat``, ``middleware`` or ``cli``. ``lifespan.py`` names the ASGI aliases of
``http.types`` in annotations only (under ``TYPE_CHECKING``). The contracts are in ``pyproject.toml``.
"""
