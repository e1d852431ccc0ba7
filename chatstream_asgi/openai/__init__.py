"""The OpenAI-compatible API: routes (router and serving), schema (protocol), limits."""
