"""The small host app that ``python -m chatstream_asgi serve`` wraps: any ASGI app would do."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

INDEX = """<!doctype html><meta charset="utf-8"><title>chatstream_asgi demo</title>
<h1>chatstream_asgi demo</h1>
<p>This page belongs to the wrapped app; the chat routes belong to the middleware. Try:</p>
<pre>curl -N -c /tmp/cj -b /tmp/cj -H 'Content-Type: application/json' \\
     -d '{"user_input": "What is the capital of France?"}' http://HOST/chat_stream</pre>
<p>Also: <a href="/get_load">/get_load</a>, <a href="/get_prompt">/get_prompt</a>, <a href="/hello">/hello</a>.</p>
"""


async def index(request: Request) -> HTMLResponse:
    return HTMLResponse(INDEX.replace("HOST", request.headers.get("host", "127.0.0.1:8000")))


async def hello(request: Request) -> JSONResponse:
    return JSONResponse({"hello": "from the wrapped app"})


def demo_app() -> Starlette:
    return Starlette(routes=[Route("/", index), Route("/hello", hello)])
