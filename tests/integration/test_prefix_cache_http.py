"""The prefix cache seen from outside, on a real uvicorn with the tiny model: ``cached_tokens`` in the SSE ``done``
event, ``/get_load`` and ``/metrics``; a cleared session reusing nothing of its own; the real ``openai`` client
resending a conversation and reading ``usage.prompt_tokens_details.cached_tokens``."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from chatstream_asgi.engines.base import SamplingParams

from .servers import UvicornThread, chat, chat_app, get_load, not_found_app

GREEDY = {"temperature": 0, "max_new_tokens": 12}
FIRST, SECOND, THIRD = "What is the capital of France?", "Hello, world! How are you today?", "Tell me about cats."


def done_event(body: str) -> dict[str, Any]:
    match = re.search(r"event: done\ndata: (.*)\n", body)
    assert match is not None, body
    summary: dict[str, Any] = json.loads(match.group(1))
    return summary


def deltas(body: str) -> str:
    return "".join(json.loads(data)["text"] for data in re.findall(r"event: delta\ndata: (.*)\n", body))


async def turn(client: httpx.AsyncClient, text: str) -> tuple[str, dict[str, Any]]:
    streamed = await chat(client, text, sse=True, **GREEDY)
    assert streamed.status == 200, streamed.text
    return deltas(streamed.text), done_event(streamed.text)


def metric(exposition: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", exposition, re.MULTILINE)
    assert match is not None, f"{name} missing"
    return float(match.group(1))


@pytest.mark.asyncio
async def test_later_turns_report_cached_tokens_in_done_get_load_and_metrics(
    serve: Callable[..., UvicornThread], chat_engine_factory: Callable[..., Any]
) -> None:
    server = serve(chat_app(not_found_app, chat_engine_factory(max_batch_size=2, prefix_cache_bytes=1 << 28)))
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        summaries = [(await turn(client, text))[1] for text in (FIRST, SECOND, THIRD)]
        load = await get_load(client)
        exposition = (await client.get("/metrics")).text
    cached = [s["cached_tokens"] for s in summaries]
    assert cached[0] == 0 and cached[1] >= summaries[0]["prompt_tokens"] and cached[2] >= summaries[1]["prompt_tokens"]
    assert load["cached_tokens"] == sum(cached) == load["prefix_cache"]["hit_tokens"]
    assert load["prefix_cache"]["queries_tokens"] == sum(s["prompt_tokens"] for s in summaries)
    assert 0 < load["prefix_cache"]["bytes"] <= load["prefix_cache"]["capacity_bytes"] == 1 << 28
    assert metric(exposition, "chatstream_prefix_cache_hits_total") == sum(cached)
    assert metric(exposition, "chatstream_prefix_cache_queries_total") == load["prefix_cache"]["queries_tokens"]
    assert metric(exposition, "chatstream_prefix_cache_entries") == load["prefix_cache"]["entries"] >= 1
    assert metric(exposition, "chatstream_prefix_cache_bytes") == load["prefix_cache"]["bytes"]
    assert metric(exposition, "chatstream_prefix_cache_evictions_total") == 0


@pytest.mark.asyncio
async def test_a_cleared_session_reuses_only_token_identical_prefixes(
    serve: Callable[..., UvicornThread], chat_engine_factory: Callable[..., Any]
) -> None:
    reference = chat_engine_factory(prefix_cache_bytes=0)
    server = serve(chat_app(not_found_app, chat_engine_factory(max_batch_size=2, prefix_cache_bytes=1 << 28)))
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        await turn(client, FIRST)
        await turn(client, SECOND)
        old_cookie = client.cookies.get("chatstream_session")
        assert (await client.post("/clear_context")).status_code == 200
        assert client.cookies.get("chatstream_session") != old_cookie  # the id rotated
        fresh_reply, fresh = await turn(client, THIRD)  # a new first turn: nothing of the old chat applies
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as other:
            same_reply, same = await turn(other, FIRST)  # another session, the same first message: same tokens
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    expected = [
        "".join([c.text async for c in reference.stream([{"role": "user", "content": t}], params)])
        for t in (THIRD, FIRST)
    ]
    await reference.close()
    assert fresh["cached_tokens"] == 0 and fresh_reply == expected[0]
    assert same["cached_tokens"] == same["prompt_tokens"] - 1 and same_reply == expected[1]


def test_openai_clients_resending_the_conversation_get_cached_tokens(
    serve: Callable[..., UvicornThread], chat_engine_factory: Callable[..., Any]
) -> None:
    server = serve(chat_app(not_found_app, chat_engine_factory(max_batch_size=2, prefix_cache_bytes=1 << 28)))
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=30, max_retries=0)
    messages: list[Any] = [{"role": "user", "content": FIRST}]
    first = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert first.usage is not None and first.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": SECOND},
    ]
    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = [chunk.usage for chunk in stream if chunk.usage is not None]
    client.close()
    assert len(usage) == 1 and usage[0].prompt_tokens_details is not None
    assert usage[0].prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
