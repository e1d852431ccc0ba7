"""HTTP: the chat routes, request parsing, streaming and wire encoders, hooks, security, raw-ASGI helpers."""
