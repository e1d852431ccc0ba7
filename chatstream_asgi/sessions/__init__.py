"""Sessions: who a client is and what it said before.

``cookie.py`` (the signed session cookie), ``history.py`` (the ``HistoryStore`` protocol and the in-memory
store), ``redis_store.py`` (the store for many replicas), ``state.py`` (per-session generation params and
feedback).

May import ``engines`` and ``errors`` only: sessions know nothing of HTTP routes, OpenAI or operations (the turn
built from a history is ``http.requests``'s job). The contracts are in ``pyproject.toml`` (``lint-imports``).
"""
