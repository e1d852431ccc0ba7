"""ChatStream's README quickstart, run on real uvicorn with only its import lines changed.

The quickstart is copied from ChatStream's README (the model lines point at the tiny test model); the only
other edits are the imports: ``from chatstream import ...`` becomes ``from chatstream_asgi.compat import ...``,
and ``fastsession`` is imported only where it is installed. It must work with and without it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request

from chatstream_asgi import MockEngine
from chatstream_asgi.compat import ChatStream

from .servers import UvicornThread

QUICKSTART = """
import torch
from fastapi import FastAPI, Request
{fastsession_import}
from transformers import AutoTokenizer, AutoModelForCausalLM

from chatstream_asgi.compat import ChatStream,ChatPromptTogetherRedPajamaINCITEChat as ChatPrompt

model_path = MODEL_PATH
device = "cpu"  # "cuda" / "cpu"

tokenizer = AutoTokenizer.from_pretrained(model_path)
model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32)
model.to(device)

chat_stream = ChatStream(
    num_of_concurrent_executions=2,# max concurrent generations
    max_queue_size=5,# waiting queue size
    model=model,
    tokenizer=tokenizer,
    device=device,
    chat_prompt_clazz=ChatPrompt,
    max_new_tokens=12,
)

app = FastAPI()
{fastsession_middleware}

@app.post("/chat_stream")
async def stream_api(request: Request):
    response = await chat_stream.{handler}(request)
    return response


@app.on_event("startup")
async def startup():
    await chat_stream.start_queue_worker()
"""

FASTSESSION_IMPORT = "from fastsession import FastSessionMiddleware, MemoryStore"
FASTSESSION_MIDDLEWARE = """
app.add_middleware(FastSessionMiddleware,
                   secret_key="your-session-secret-key",
                   store=MemoryStore(),
                   http_only=True,
                   secure=False,
                   )
"""
MARKER = "<::EOS::>"


def quickstart_app(model_dir: Path, with_fastsession: bool, handler: str) -> Any:
    source = QUICKSTART.format(
        fastsession_import=FASTSESSION_IMPORT if with_fastsession else "",
        fastsession_middleware=FASTSESSION_MIDDLEWARE if with_fastsession else "",
        handler=handler,
    )
    namespace: dict[str, Any] = {"MODEL_PATH": str(model_dir)}
    exec(compile(source, "chatstream_quickstart.py", "exec"), namespace)
    return namespace["app"], namespace["chat_stream"]


def fastsession_cases() -> list[Any]:
    installed = importlib.util.find_spec("fastsession") is not None
    skip = pytest.mark.skipif(not installed, reason="fastsession is not installed (pip install fastsession)")
    return [pytest.param(False, id="without-fastsession"), pytest.param(True, id="with-fastsession", marks=skip)]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # FastAPI deprecates @app.on_event, which the README uses
@pytest.mark.parametrize("with_fastsession", fastsession_cases())
@pytest.mark.parametrize("handler", ["handle_starlette_request", "handle_chat_stream_request"])
def test_readme_quickstart_runs_with_only_imports_changed(
    tiny_model_dir: Path, with_fastsession: bool, handler: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "chatstream_asgi.compat")
    app, chat_stream = quickstart_app(tiny_model_dir, with_fastsession, handler)
    chat_stream.append_apis(app, {"include": ["get_prompt"]})
    assert "random key" in caplog.text  # no secret given: a per-process key, and a warning that says so
    assert chat_stream.default_params.stop == ("<human>:", "<|endoftext|>")

    async def converse(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            for question in ("Who is Alan Turing", "And who was Ada Lovelace?"):
                async with client.stream("POST", "/chat_stream", json={"user_input": question}) as response:
                    assert response.status_code == 200, await response.aread()
                    assert response.headers["x-chatstream-last-generated-message-id"]
                    chunks = [chunk.decode() async for chunk in response.aiter_raw()]
                assert chunks and all(chunk.endswith(MARKER) for chunk in chunks), chunks
                replies = [chunk[: -len(MARKER)] for chunk in chunks]
                assert all(b.startswith(a) for a, b in zip(replies, replies[1:], strict=False))  # cumulative
            # both turns kept: fastsession replaced our cookie on its first response, and the first turn was lost
            history = (await client.get("/get_prompt")).json()["messages"]
            assert [m["content"] for m in history if m["role"] == "user"] == [
                "Who is Alan Turing",
                "And who was Ada Lovelace?",
            ]
            prompt = chat_stream.engine.render_prompt(
                [{"role": "user", "content": "Who is Alan Turing"}], chat_stream.default_params
            )
            assert prompt == "<human>: Who is Alan Turing\n<bot>:"

    with UvicornThread(app) as server:
        asyncio.run(converse(server.url))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_full_queue_is_a_429_with_chatstreams_body_and_retry_after() -> None:
    chat_stream = ChatStream(
        use_mock_response=True, num_of_concurrent_executions=1, max_queue_size=1, secret_key="k" * 32
    )
    chat_stream.engine.token_delay = 0.05  # type: ignore[attr-defined]
    app = FastAPI()
    chat_stream.append_apis(app, {"all": True})

    async def burst(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            await chat_stream.start_queue_worker()
            requests = [client.post("/chat_stream", json={"user_input": f"q{i}"}) for i in range(3)]
            responses = await asyncio.gather(*requests)
            statuses = sorted(r.status_code for r in responses)
            assert statuses == [200, 200, 429]
            rejected = next(r for r in responses if r.status_code == 429)
            assert rejected.json() == {"error": "too_many_requests"} and int(rejected.headers["retry-after"]) >= 1
            load = (await client.get("/get_load")).json()
            assert load["running"] == 0 and load["max_queue"] == 1
            assert (await client.get("/get_resource_usage")).json()["success"] is True
            assert (await client.get("/get_feedback")).json() == {"success": True, "feedback": [None]}
            assert "<html" in (await client.get("/")).text

    with UvicornThread(app) as server:
        asyncio.run(burst(server.url))


def test_intercepted_body_and_callback(tiny_model_dir: Path) -> None:
    chat_stream = ChatStream(use_mock_response=True, secret_key="k" * 32)
    messages: list[str] = []
    app = FastAPI()

    @app.post("/chat_stream")
    async def stream_api(request: Request) -> Any:
        body = await request.body()  # the app reads the request itself, as ChatStream's "intercept" doc shows
        assert b"user_input" in body
        return await chat_stream.handle_chat_stream_request(
            request, request_body=body, callback=lambda req, message: messages.append(message)
        )

    async def talk(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            refused = await client.post("/chat_stream", json={"user_input": "hi", "temprature": 1})  # a typo: 400
            assert refused.status_code == 400
            response = await client.post("/chat_stream", json={"user_input": "hi"})
            assert response.status_code == 200 and response.text.endswith(MARKER)

    with UvicornThread(app) as server:
        asyncio.run(talk(server.url))
    assert messages == ["success"]  # ChatStream 0.3 calls back for a refused request neither


def test_callback_hears_a_mid_stream_failure_and_the_apps_on_finish_still_runs() -> None:
    """An engine failing mid-stream ends the body normally (its error goes in-band); ChatStream 0.3 called back
    ``unknown_error_occurred`` there, this facade said ``success``. The app's own ``on_finish`` runs too."""
    finished: list[str] = []
    chat_stream = ChatStream(
        engine=MockEngine("a b c d e f", token_delay=0.01, fail_after=3),
        secret_key="k" * 32,
        middleware_options={
            "on_finish": lambda session_id, user_input, reply, stats: finished.append(stats["outcome"])
        },
    )
    messages: list[str] = []
    app = FastAPI()

    @app.post("/chat_stream")
    async def stream_api(request: Request) -> Any:
        callback = lambda req, message: messages.append(message)  # noqa: E731 - as ChatStream's docs write it
        return await chat_stream.handle_chat_stream_request(request, callback=callback)

    async def talk(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            await chat_stream.start_queue_worker()
            failed = await client.post("/chat_stream", json={"user_input": "hi"})
            assert failed.status_code == 200 and "[error: generation_error]" in failed.text
            chat_stream.engine.fail_after = None  # type: ignore[attr-defined]
            assert (await client.post("/chat_stream", json={"user_input": "again"})).text.endswith(MARKER)
            async with client.stream("POST", "/chat_stream", json={"user_input": "bye"}) as response:
                await anext(response.aiter_raw())  # the first chunk, then the client leaves

    with UvicornThread(app) as server:
        asyncio.run(talk(server.url))
        deadline = time.monotonic() + 5
        while len(messages) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert messages == [
        "unknown_error_occurred,while chat_generator.generate",
        "success",
        "client_disconnected_while_streaming",
    ]
    assert finished == ["error", "completed", "disconnected"]
    assert not chat_stream.endings.waiting


def test_append_apis_adds_only_the_included_routes() -> None:
    chat_stream = ChatStream(use_mock_response=True, secret_key="k" * 32)
    app = FastAPI()
    chat_stream.append_apis(app, {"include": ["chat_stream", "get_prompt"]})

    async def check(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            await chat_stream.start_queue_worker()
            assert (await client.post("/chat_stream", json={"user_input": "hi"})).text.endswith(MARKER)
            assert (await client.get("/get_prompt")).status_code == 200
            assert (await client.get("/get_load")).status_code == 404  # not included

    with UvicornThread(app) as server:
        asyncio.run(check(server.url))


def test_facade_checks_origins_and_lets_its_cors_origins_post_with_the_cookie() -> None:
    chat_stream = ChatStream(use_mock_response=True, secret_key="k" * 32)
    app = FastAPI()
    chat_stream.append_apis(app, {"all": True})
    chat_stream.append_middlewares(app, {"cors": {"allow_origins": ["https://app.example.com"]}})

    async def post_from(url: str, origin: str) -> httpx.Response:
        headers = {"Origin": origin, "Sec-Fetch-Site": "cross-site"}
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            await chat_stream.start_queue_worker()
            return await client.post("/chat_stream", json={"user_input": "hi"}, headers=headers)

    with UvicornThread(app) as server:
        allowed = asyncio.run(post_from(server.url, "https://app.example.com"))
        forged = asyncio.run(post_from(server.url, "https://evil.example.net"))
    assert allowed.status_code == 200 and allowed.text.endswith(MARKER)
    assert allowed.headers["access-control-allow-origin"] == "https://app.example.com"
    assert forged.status_code == 403 and forged.json()["error"]["type"] == "cross_site_request"


def test_cors_for_every_origin_turns_the_origin_check_off_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    chat_stream = ChatStream(use_mock_response=True, secret_key="k" * 32)
    with caplog.at_level(logging.WARNING, logger="chatstream_asgi"):
        chat_stream.append_middlewares(FastAPI(), {"cors": {"allow_origins": ["*"]}})
    assert chat_stream.middleware.guard.csrf is False
    assert "CSRF origin check is off" in caplog.text
