"""The middleware around real Django, FastAPI, Starlette, Litestar and Quart apps, on a real uvicorn.

Each app has a JSON route, a path-parameter route and a POST route, and a lifespan hook. The same app
is served bare and wrapped, and every answer must be identical apart from the ``date`` header; the
chat routes must stream through the wrapped app, under a ``root_path`` too; websockets pass through.
"""

# No ``from __future__ import annotations`` here: FastAPI and Litestar read the handlers' annotations at
# runtime, and the handlers below import their types locally (so one missing framework skips only its tests).

import asyncio
import contextlib
import importlib.util
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import uvicorn

from .servers import RecordingEngine, UvicornThread, chat, chat_app, wait_until, words

Serve = Callable[..., UvicornThread]
AppFactory = Callable[[], Any]
ECHO_PAYLOAD = {"number": 1, "text": "ünïcode ✓", "list": [1, 2]}


@contextlib.asynccontextmanager
async def lifespan_flag(state: dict[str, Any]) -> AsyncIterator[None]:
    state["started"] = True
    yield
    state["started"] = False


def fastapi_app() -> Any:
    from fastapi import FastAPI, Request, Response

    state: dict[str, Any] = {"started": False}
    app = FastAPI(lifespan=lambda app: lifespan_flag(state))

    @app.get("/items")
    async def items(request: Request) -> dict[str, Any]:
        return {"items": [1, 2, 3], "started": state["started"], "root_path": request.scope.get("root_path")}

    @app.get("/items/{item_id}")
    async def item(item_id: int, response: Response) -> dict[str, Any]:
        response.headers["x-item"] = str(item_id)
        return {"item_id": item_id}

    @app.post("/echo", status_code=201)
    async def echo(request: Request) -> dict[str, Any]:
        return {"echo": await request.json()}

    return app


def starlette_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route, WebSocketRoute
    from starlette.websockets import WebSocket, WebSocketDisconnect

    state: dict[str, Any] = {"started": False}

    async def items(request: Request) -> JSONResponse:
        return JSONResponse({"items": [1, 2, 3], "started": state["started"], "root_path": request.scope["root_path"]})

    async def item(request: Request) -> JSONResponse:
        item_id = request.path_params["item_id"]
        return JSONResponse({"item_id": item_id}, headers={"x-item": str(item_id)})

    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"echo": await request.json()}, status_code=201)

    async def websocket_echo(websocket: WebSocket) -> None:
        await websocket.accept()
        with contextlib.suppress(WebSocketDisconnect):
            while True:
                await websocket.send_text(f"echo: {await websocket.receive_text()}")

    routes = [
        Route("/items", items),
        Route("/items/{item_id:int}", item),
        Route("/echo", echo, methods=["POST"]),
        WebSocketRoute("/ws", websocket_echo),
        WebSocketRoute("/chat_stream", websocket_echo),  # the chat route's path, but a websocket: the app's
    ]
    return Starlette(routes=routes, lifespan=lambda app: lifespan_flag(state))


def litestar_app() -> Any:
    from litestar import Litestar, Request, Response, get, post
    from litestar.params import FromPath

    state: dict[str, Any] = {"started": False}

    @get("/items")
    async def items(request: Request[Any, Any, Any]) -> dict[str, Any]:
        return {"items": [1, 2, 3], "started": state["started"], "root_path": request.scope.get("root_path")}

    @get("/items/{item_id:int}")
    async def item(item_id: FromPath[int]) -> Response[dict[str, Any]]:
        return Response({"item_id": item_id}, headers={"x-item": str(item_id)})

    @post("/echo")
    async def echo(request: Request[Any, Any, Any]) -> dict[str, Any]:
        return {"echo": await request.json()}

    return Litestar(route_handlers=[items, item, echo], lifespan=[lambda app: lifespan_flag(state)])


def quart_app() -> Any:
    from quart import Quart, request

    state: dict[str, Any] = {"started": False}
    app = Quart("quart_under_test")

    @app.before_serving
    async def startup() -> None:
        state["started"] = True

    @app.get("/items")
    async def items() -> dict[str, Any]:
        return {"items": [1, 2, 3], "started": state["started"], "root_path": request.scope.get("root_path")}

    @app.get("/items/<int:item_id>")
    async def item(item_id: int) -> tuple[dict[str, Any], int, dict[str, str]]:
        return {"item_id": item_id}, 200, {"x-item": str(item_id)}

    @app.post("/echo")
    async def echo() -> tuple[dict[str, Any], int]:
        return {"echo": await request.get_json()}, 201

    return app


def django_app() -> Any:
    from .django_site import django_asgi_app

    return django_asgi_app()


FRAMEWORKS: dict[str, tuple[str, AppFactory]] = {
    "django": ("django", django_app),
    "fastapi": ("fastapi", fastapi_app),
    "starlette": ("starlette", starlette_app),
    "litestar": ("litestar", litestar_app),
    "quart": ("quart", quart_app),
}


@pytest.fixture(params=sorted(FRAMEWORKS))
def app_factory(request: pytest.FixtureRequest) -> AppFactory:
    module, factory = FRAMEWORKS[request.param]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")
    return factory


async def answers(url: str) -> list[tuple[int, dict[str, str], bytes]]:
    """The app's answers to a fixed set of requests: status, headers (without ``date``) and body."""
    requests: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", "/items", {}),
        ("GET", "/items/42", {"params": {"verbose": "1"}}),
        ("POST", "/echo", {"json": ECHO_PAYLOAD}),
        ("GET", "/echo", {}),  # the app's own 405
        ("GET", "/no/such/route", {}),  # the app's own 404
    ]
    results = []
    async with httpx.AsyncClient(base_url=url, timeout=10.0) as client:
        for method, path, options in requests:
            response = await client.request(method, path, **options)
            headers = {k: v for k, v in response.headers.items() if k != "date"}
            results.append((response.status_code, headers, response.content))
    return results


@pytest.mark.asyncio
@pytest.mark.parametrize("root_path", ["", "/api"])
async def test_wrapped_app_routes_answer_exactly_as_the_bare_app(
    serve: Serve, app_factory: AppFactory, root_path: str
) -> None:
    bare = serve(app_factory(), root_path=root_path, lifespan="auto")  # Django speaks no lifespan of its own
    wrapped = serve(chat_app(app_factory(), RecordingEngine()), root_path=root_path)
    expected, got = await answers(bare.url), await answers(wrapped.url)
    assert got == expected
    items_status, _, items_body = got[0]
    assert items_status == 200 and b'"started":true' in items_body.replace(b" ", b"")  # the app's lifespan ran
    assert got[1][0] == 200 and got[2][0] == 201, "the path-parameter and POST routes must work"


@pytest.mark.asyncio
async def test_chat_streams_through_a_wrapped_app_while_its_routes_keep_answering(
    serve: Serve, app_factory: AppFactory
) -> None:
    engine = RecordingEngine(reply=words(12), token_delay=0.05)
    server = serve(chat_app(app_factory(), engine))
    async with httpx.AsyncClient(base_url=server.url, timeout=10.0) as client:
        streaming = asyncio.create_task(chat(client, "hi"))
        await wait_until(lambda: engine.produced or streaming.done())
        during = await client.get("/items/7")
        answered_while_streaming = not streaming.done()
        streamed = await streaming
    assert during.status_code == 200 and during.json() == {"item_id": 7} and answered_while_streaming
    assert streamed.status == 200 and streamed.text == words(12)
    assert len(streamed.chunks) > 1, f"the reply arrived in one piece: {streamed.chunks!r}"
    assert streamed.arrivals[0] < engine.produced[-1], "the first chunk arrived only after the last was produced"


@pytest.mark.asyncio
async def test_lifespan_starts_and_closes_the_engine_and_reaches_the_app(serve: Serve, app_factory: AppFactory) -> None:
    engine = RecordingEngine()
    assert not engine.ready
    server = serve(chat_app(app_factory(), engine))
    assert engine.ready, "lifespan startup did not start the engine"
    async with httpx.AsyncClient(base_url=server.url) as client:
        assert (await client.get("/items")).json()["started"] is True
    server.stop()
    assert not engine.ready, "lifespan shutdown did not close the engine"


class EngineWithoutModel(RecordingEngine):
    async def start(self) -> None:
        raise RuntimeError("no model at /models/missing")


def served_on(app: Any, **config: Any) -> bool:
    """Whether uvicorn serves ``app`` after its lifespan startup (it is stopped again at once), in a thread."""
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="critical", **config))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))

    def run() -> None:
        with contextlib.suppress(SystemExit):  # uvicorn >= 0.30 exits with 3 on a failed startup, older ones return
            asyncio.run(server.serve(sockets=[sock]))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while thread.is_alive() and not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    started = server.started
    server.should_exit = True
    thread.join(20)
    sock.close()
    return started


def test_an_engine_that_cannot_start_stops_the_server_on_uvicorns_default_lifespan(app_factory: AppFactory) -> None:
    # `--lifespan auto` took a failure raised into the app for an app without lifespan, and served on without an engine
    assert served_on(chat_app(app_factory(), RecordingEngine()), lifespan="auto")  # the check can tell
    assert not served_on(chat_app(app_factory(), EngineWithoutModel()), lifespan="auto")


@pytest.mark.asyncio
async def test_chat_routes_are_served_under_the_root_path(serve: Serve, app_factory: AppFactory) -> None:
    engine = RecordingEngine(reply=words(6), token_delay=0.02)
    server = serve(chat_app(app_factory(), engine), root_path="/api")
    async with httpx.AsyncClient(base_url=server.url, timeout=10.0) as client:
        load = await client.get("/get_load")
        streamed = await chat(client, "hi")
        prompt = await client.get("/get_prompt")
        items = await client.get("/items")
    assert load.status_code == 200 and load.json()["running"] == 0
    assert streamed.status == 200 and streamed.text == words(6) and len(streamed.chunks) > 1
    assert [m["content"] for m in prompt.json()["messages"]] == ["hi", words(6)]
    assert items.json()["root_path"] == "/api"


# Websockets of the wrapped app


async def websocket_exchange(url: str, texts: list[str]) -> list[str]:
    """Send each text over a websocket at ``url`` and collect the replies, with whichever client is installed."""
    if importlib.util.find_spec("websockets") is not None:
        from websockets.asyncio.client import connect

        async with connect(url) as websocket:
            replies = []
            for text in texts:
                await websocket.send(text)
                replies.append(str(await websocket.recv()))
            return replies
    if importlib.util.find_spec("httpx_ws") is not None:
        from httpx_ws import aconnect_ws

        async with httpx.AsyncClient() as client, aconnect_ws(url, client) as websocket:
            replies = []
            for text in texts:
                await websocket.send_text(text)
                replies.append(await websocket.receive_text())
            return replies
    if importlib.util.find_spec("wsproto") is not None:
        return await wsproto_exchange(url, texts)
    pytest.skip("no websocket client installed: pip install websockets (or httpx-ws, or wsproto)")


async def wsproto_exchange(url: str, texts: list[str]) -> list[str]:
    """A minimal websocket client on wsproto (sans-IO) and asyncio streams."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

    host_port, _, path = url.removeprefix("ws://").partition("/")
    host, _, port = host_port.partition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    connection = WSConnection(ConnectionType.CLIENT)

    async def next_event() -> Any:
        while True:
            for event in connection.events():
                return event
            data = await reader.read(65536)
            assert data, "the server closed the connection"
            connection.receive_data(data)

    try:
        writer.write(connection.send(Request(host=host_port, target=f"/{path}")))
        assert isinstance(await next_event(), AcceptConnection), "the websocket handshake was refused"
        replies = []
        for text in texts:
            writer.write(connection.send(TextMessage(data=text)))
            event = await next_event()
            assert isinstance(event, TextMessage), f"expected a text message, got {event!r}"
            replies.append(event.data)
        writer.write(connection.send(CloseConnection(code=1000)))
        assert isinstance(await next_event(), CloseConnection), "the server did not answer the close"
        return replies
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@pytest.mark.asyncio
@pytest.mark.parametrize("path", ["/ws", "/chat_stream"])
async def test_websockets_of_the_wrapped_app_pass_through(serve: Serve, path: str) -> None:
    server = serve(chat_app(starlette_app(), RecordingEngine()))
    url = f"ws://127.0.0.1:{server.port}{path}"
    replies = await asyncio.wait_for(websocket_exchange(url, ["one", "two ✓"]), timeout=5)
    assert replies == ["echo: one", "echo: two ✓"]
