"""The heap is frozen out of the garbage collector's reach once the engine has started, and young collections are
spaced out (``Timeouts.freeze_gc``).

Each case runs in a fresh interpreter: ``gc.freeze()`` is process-wide, and the pytest process may already have
been frozen by another test's startup.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import asyncio, gc, json, sys
    from chatstream_asgi import ChatStreamMiddleware, MockEngine

    async def wrapped(scope, receive, send):
        raise ValueError("no lifespan here")  # the middleware answers the lifespan alone

    async def start_and_stop(options):
        app = ChatStreamMiddleware(wrapped, engine=MockEngine("hi"), secret_key="k" * 32, **options)
        messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
        sent, counts = [], []

        async def receive():
            return messages.pop(0)

        async def send(message):
            sent.append(message["type"])
            counts.append([gc.get_freeze_count(), gc.get_threshold()[0]])

        await app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
        return sent, counts[0]

    options = json.loads(sys.argv[1])
    before, default_threshold = gc.get_freeze_count(), gc.get_threshold()[0]
    first = asyncio.run(start_and_stop(options))
    junk = [[i] for i in range(1000)]  # objects made after the first startup
    second = asyncio.run(start_and_stop(options))
    print(json.dumps({"before": before, "default": default_threshold, "first": first, "second": second}))
    """
)


def run(options: dict[str, object]) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(options)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("options", [{}, {"freeze_gc": True}])
def test_startup_freezes_the_heap_once_per_process(options: dict[str, object]) -> None:
    result = run(options)
    sent, (frozen, young_threshold) = result["first"]  # type: ignore[misc]
    assert result["before"] == 0
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert frozen > 10_000  # the interpreter, starlette, the package: everything alive at startup
    default = result["default"]
    assert isinstance(default, int)
    assert young_threshold == max(7000, default)  # collected every 7,000 allocations instead of 700 (CPython 3.11)
    _, (frozen_again, _) = result["second"]  # type: ignore[misc]
    # a second startup in the same process freezes nothing more: the count only shrinks as frozen objects are
    # freed, where a second freeze would have taken the 1000 lists made in between
    assert frozen_again <= frozen


def test_freeze_gc_false_leaves_the_collector_alone() -> None:
    result = run({"freeze_gc": False})
    untouched = [0, result["default"]]
    assert result["first"] == [["lifespan.startup.complete", "lifespan.shutdown.complete"], untouched]
    assert result["second"][1] == untouched  # type: ignore[index]
