"""Unit tests for ``chatstream_asgi.ops.lifespan``: the middleware's start-up and shutdown run whether the wrapped app
speaks the lifespan protocol (and then answers it) or not (and then the middleware answers alone)."""

from __future__ import annotations

from typing import Any

import pytest

from chatstream_asgi.ops.lifespan import Lifespan

from .asgi_fakes import ScriptedReceive, with_hang_guard

pytestmark = pytest.mark.asyncio
SCOPE = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
STARTUP, SHUTDOWN = {"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}


class Recorder:
    """The middleware's hooks and the server's side of the exchange, in one ordered log."""

    def __init__(self, fail_startup: bool = False, fail_shutdown: bool = False) -> None:
        self.log: list[str] = []
        self.fail_startup = fail_startup
        self.fail_shutdown = fail_shutdown

    async def startup(self) -> None:
        self.log.append("hook startup")
        if self.fail_startup:
            raise RuntimeError("no model")

    async def shutdown(self) -> None:
        self.log.append("hook shutdown")
        if self.fail_shutdown:
            raise RuntimeError("drain failed")

    async def send(self, message: dict[str, Any]) -> None:
        self.log.append(f"server got {message['type']}")


async def run(app: Any, recorder: Recorder) -> None:
    lifespan = Lifespan(recorder.startup, recorder.shutdown)
    await with_hang_guard(lifespan(app, SCOPE, ScriptedReceive([STARTUP, SHUTDOWN]), recorder.send))


async def test_an_app_that_speaks_lifespan_answers_it_after_the_middleware_acted() -> None:
    recorder = Recorder()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            recorder.log.append(f"app saw {message['type']}")
            await send({"type": f"{message['type']}.complete"})
            if message["type"] == "lifespan.shutdown":
                return

    await run(app, recorder)
    assert recorder.log == [
        "hook startup",
        "app saw lifespan.startup",
        "server got lifespan.startup.complete",
        "hook shutdown",
        "app saw lifespan.shutdown",
        "server got lifespan.shutdown.complete",
    ]


async def starlette_like(recorder: Recorder) -> Any:
    """Reads the startup outside its try, as Starlette's router does: what that read raises escapes the app."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        recorder.log.append(f"app saw {message['type']}")
        try:
            await send({"type": "lifespan.startup.complete"})
            message = await receive()
            recorder.log.append(f"app saw {message['type']}")
        except BaseException:
            await send({"type": "lifespan.startup.failed", "message": "app"})
            raise
        await send({"type": "lifespan.shutdown.complete"})

    return app


async def test_a_failing_startup_is_reported_to_the_server_and_the_app_never_starts() -> None:
    recorder = Recorder(fail_startup=True)
    with pytest.raises(RuntimeError, match="no model"):
        await run(await starlette_like(recorder), recorder)
    # the server hears of it from us: raised out of the app alone, uvicorn's `--lifespan auto` served on
    assert recorder.log == ["hook startup", "server got lifespan.startup.failed"]


async def test_a_failing_shutdown_still_shuts_the_app_down_and_is_reported() -> None:
    recorder = Recorder(fail_shutdown=True)
    await run(await starlette_like(recorder), recorder)
    assert recorder.log == [
        "hook startup",
        "app saw lifespan.startup",
        "server got lifespan.startup.complete",
        "hook shutdown",
        "app saw lifespan.shutdown",  # the app closes what it holds although the engine's drain failed
        "server got lifespan.shutdown.failed",
    ]


async def django_like(scope: Any, receive: Any, send: Any) -> None:
    raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")


async def returns_at_once(scope: Any, receive: Any, send: Any) -> None:
    return


@pytest.mark.parametrize("app", [django_like, returns_at_once], ids=["raises", "returns"])
async def test_an_app_without_lifespan_is_left_out_and_the_middleware_answers_alone(app: Any) -> None:
    recorder = Recorder()
    await run(app, recorder)
    assert recorder.log == [
        "hook startup",
        "server got lifespan.startup.complete",
        "hook shutdown",
        "server got lifespan.shutdown.complete",
    ]


async def test_a_failing_startup_while_answering_alone_is_reported_to_the_server() -> None:
    recorder = Recorder(fail_startup=True)
    await run(django_like, recorder)
    assert recorder.log == ["hook startup", "server got lifespan.startup.failed"]


async def test_an_app_that_fails_after_reading_a_message_fails_the_lifespan() -> None:
    recorder = Recorder()

    async def broken(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        raise RuntimeError("the app's own startup failed")

    with pytest.raises(RuntimeError, match="the app's own startup failed"):
        await run(broken, recorder)
    assert recorder.log == ["hook startup"]  # the server hears of the failure from the exception, as without us


async def test_the_apps_own_failed_startup_undoes_ours() -> None:
    # the engine stayed started (and the signal handlers chained): uvicorn exits with no shutdown after a failed one
    recorder = Recorder()

    async def app_whose_database_is_down(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "db down"})

    await run(app_whose_database_is_down, recorder)
    assert recorder.log == ["hook startup", "hook shutdown", "server got lifespan.startup.failed"]
