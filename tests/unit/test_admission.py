"""Admission: exact burst capacity, FIFO hand-off, timeouts and cancellation that never leak a slot."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable

import pytest
import pytest_asyncio

from chatstream_asgi.errors import ChatStreamError, ConfigurationError
from chatstream_asgi.ops.admission import Admission, Draining, QueueFull, QueueTimeout, Rejected, Ticket


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class LoopClock:
    """Shifts the running loop's clock so queue timers fire on demand, with no real waiting."""

    def __init__(self, real: Callable[[], float]) -> None:
        self._real = real
        self.offset = 0.0

    def __call__(self) -> float:
        return self._real() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@pytest_asyncio.fixture
async def loop_clock(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[LoopClock]:
    loop = asyncio.get_running_loop()
    clock = LoopClock(loop.time)
    monkeypatch.setattr(loop, "time", clock)
    yield clock


async def spin(rounds: int = 20) -> None:
    """Let every ready callback and task run, without letting time pass."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def hold_until(admission: Admission, event: asyncio.Event) -> None:
    async with admission.slot():
        await event.wait()


@pytest.mark.asyncio
@pytest.mark.parametrize(("limit", "queue", "burst"), [(2, 5, 20), (1, 0, 5), (4, 3, 8)])
async def test_burst_admits_exactly_limit_plus_queue_and_rejects_the_rest_at_once(
    limit: int, queue: int, burst: int
) -> None:
    admission = Admission(limit, queue, None)
    release = asyncio.Event()
    tasks = [asyncio.create_task(hold_until(admission, release)) for _ in range(burst)]
    await spin()
    rejected = [task for task in tasks if task.done()]
    assert len(rejected) == burst - limit - queue
    assert all(isinstance(task.exception(), QueueFull) for task in rejected)
    assert (admission.running, admission.waiting) == (limit, queue)
    release.set()
    await asyncio.gather(*(task for task in tasks if task not in rejected))
    assert (admission.running, admission.waiting) == (0, 0)


@pytest.mark.asyncio
async def test_queue_full_is_a_429_rejection_with_retry_after() -> None:
    admission = Admission(1, 0, None)
    admission.try_enter()
    with pytest.raises(QueueFull) as caught:
        admission.try_enter()
    error = caught.value
    assert isinstance(error, Rejected) and isinstance(error, ChatStreamError)
    assert (error.reason, error.status, error.retry_after) == ("queue_full", 429, 1)


@pytest.mark.asyncio
async def test_slots_are_granted_in_fifo_order() -> None:
    admission = Admission(1, 10, None)
    holder = admission.try_enter()
    order: list[int] = []

    async def waiter(number: int) -> None:
        async with admission.slot():
            order.append(number)
            await asyncio.sleep(0)

    tasks = [asyncio.create_task(waiter(number)) for number in range(8)]
    await spin()
    holder.release()
    await asyncio.gather(*tasks)
    assert order == list(range(8))


@pytest.mark.asyncio
async def test_a_newcomer_never_jumps_the_queue() -> None:
    admission = Admission(1, 5, None)
    holder = admission.try_enter()
    first = admission.try_enter()
    holder.release()  # the freed slot goes to the waiter, not to whoever asks next
    assert first.granted and admission.running == 1
    newcomer = admission.try_enter()
    assert not newcomer.granted and newcomer.position == 1 and admission.waiting == 1


@pytest.mark.asyncio
async def test_ticket_position_and_queue_wait() -> None:
    clock = FakeClock()
    admission = Admission(1, 5, None, clock=clock)
    holder = admission.try_enter()
    second, third = admission.try_enter(), admission.try_enter()
    assert (holder.position, second.position, third.position) == (0, 1, 2)
    clock.now += 4.0
    holder.release()
    await second.wait()
    clock.now += 10.0
    assert holder.queue_wait == 0.0 and second.queue_wait == 4.0


@pytest.mark.asyncio
async def test_queue_timeout_raises_and_frees_the_position(loop_clock: LoopClock) -> None:
    admission = Admission(1, 1, 30.0)
    holder = admission.try_enter()
    ticket = admission.try_enter()
    waiter = asyncio.create_task(ticket.wait())
    loop_clock.advance(29.0)
    await spin()
    assert not waiter.done()
    loop_clock.advance(2.0)
    await spin()
    error = waiter.exception()
    assert isinstance(error, QueueTimeout)
    assert (error.reason, error.status) == ("queue_timeout", 503) and error.retry_after >= 1
    assert admission.waiting == 0
    admission.try_enter()  # the place is free again
    holder.release()
    assert admission.running == 1 and not ticket.granted


@pytest.mark.asyncio
async def test_cancelling_a_waiter_frees_its_place_at_once() -> None:
    admission = Admission(1, 2, None)
    holder = admission.try_enter()
    first = asyncio.create_task(hold_until(admission, asyncio.Event()))
    await spin()
    behind = admission.try_enter()
    assert admission.waiting == 2 and behind.position == 2
    first.cancel()
    await spin(2)
    assert admission.waiting == 1
    admission.try_enter()  # the freed place can be taken by a newcomer
    holder.release()
    assert behind.granted and admission.running == 1  # the cancelled waiter did not receive the slot


@pytest.mark.asyncio
@pytest.mark.parametrize("cancel_first", [False, True])
@pytest.mark.parametrize("someone_behind", [False, True])
async def test_cancel_racing_a_handoff_passes_the_slot_on(cancel_first: bool, someone_behind: bool) -> None:
    admission = Admission(1, 5, None)
    holder = admission.try_enter()
    racer = admission.try_enter()
    racer_task = asyncio.create_task(racer.wait())
    behind = admission.try_enter() if someone_behind else None
    await spin()
    # both happen in one loop iteration: the slot is handed to a task that is already being cancelled
    if cancel_first:
        racer_task.cancel()
        holder.release()
    else:
        holder.release()
        racer_task.cancel()
    await spin()
    assert racer_task.cancelled()
    if behind is not None:
        assert behind.granted and admission.running == 1
        behind.release()
    assert (admission.running, admission.waiting) == (0, 0)
    admission.try_enter()  # capacity is intact
    assert admission.running == 1


@pytest.mark.asyncio
async def test_release_is_idempotent() -> None:
    admission = Admission(1, 1, None)
    holder = admission.try_enter()
    waiting = admission.try_enter()
    waiting.release()
    waiting.release()
    assert admission.waiting == 0 and admission.running == 1
    holder.release()
    holder.release()
    assert admission.running == 0
    with pytest.raises(RuntimeError, match="released"):
        await holder.wait()


@pytest.mark.asyncio
async def test_slot_is_released_when_the_body_raises() -> None:
    admission = Admission(1, 0, None)
    with pytest.raises(KeyError):
        async with admission.slot():
            raise KeyError("boom")
    assert admission.running == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("seed", range(12))
async def test_hammer_random_paths_end_with_nothing_held(seed: int, loop_clock: LoopClock) -> None:
    rng = random.Random(seed)
    admission = Admission(3, 4, 5.0)
    inside = 0

    async def use(ticket_style: bool) -> None:
        nonlocal inside
        if ticket_style:
            ticket: Ticket = admission.try_enter()
            try:
                await ticket.wait()
                await body()
            finally:
                ticket.release()
        else:
            async with admission.slot():
                await body()

    async def body() -> None:
        nonlocal inside
        inside += 1
        assert inside <= admission.max_concurrency == 3
        try:
            for _ in range(rng.randint(0, 6)):
                await asyncio.sleep(0)
            if rng.random() < 0.2:
                raise ValueError("handler failed")
        finally:
            inside -= 1

    tasks: list[asyncio.Task[None]] = []
    for _ in range(300):
        tasks.append(asyncio.create_task(use(rng.random() < 0.5)))
        action = rng.random()
        pending = [task for task in tasks if not task.done()]
        if action < 0.25 and pending:
            rng.choice(pending).cancel()
        elif action < 0.35:
            loop_clock.advance(rng.uniform(0, 6))
        await spin(rng.randint(0, 3))
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(r is None or isinstance(r, (Rejected, ValueError, asyncio.CancelledError)) for r in results)
    assert (admission.running, admission.waiting, inside) == (0, 0, 0)


@pytest.mark.asyncio
async def test_retry_after_grows_with_the_queue() -> None:
    admission = Admission(2, 20, None)
    admission.try_enter(), admission.try_enter()
    estimates = []
    for _ in range(20):
        estimates.append(admission.retry_after())
        admission.try_enter()
    assert estimates == sorted(estimates) and estimates[0] == 1 and estimates[-1] == 10  # ceil(20 * 1 s / 2)
    with pytest.raises(QueueFull) as caught:
        admission.try_enter()
    assert caught.value.retry_after == 11


@pytest.mark.asyncio
async def test_retry_after_follows_the_measured_hold_time_and_is_clamped() -> None:
    clock = FakeClock()
    admission = Admission(1, 0, None, clock=clock)
    assert admission.retry_after() == 1
    for hold in (10.0, 10.0, 50.0):
        ticket = admission.try_enter()
        clock.now += hold
        ticket.release()
    assert admission.mean_hold == pytest.approx(10.0 + 0.2 * 40.0)
    admission.try_enter()
    with pytest.raises(QueueFull) as caught:
        admission.try_enter()
    assert caught.value.retry_after == 18
    assert admission.retry_after(waiting=1000) == 300


@pytest.mark.asyncio
async def test_drain_rejects_newcomers_and_the_queue(loop_clock: LoopClock) -> None:
    admission = Admission(1, 3, None)
    holder = admission.try_enter()
    waiters = [asyncio.create_task(hold_until(admission, asyncio.Event())) for _ in range(2)]
    await spin()
    admission.drain()
    await spin()
    assert all(isinstance(task.exception(), Draining) for task in waiters)
    with pytest.raises(Draining) as caught:
        admission.try_enter()
    assert (caught.value.reason, caught.value.status) == ("draining", 503)
    assert admission.snapshot()["draining"] is True and admission.waiting == 0
    timed_out = asyncio.create_task(admission.wait_idle(10.0))
    await spin()
    loop_clock.advance(11.0)
    await spin()
    assert timed_out.result() is False
    idle = asyncio.create_task(admission.wait_idle())
    await spin()
    assert not idle.done()
    holder.release()
    await spin()
    assert idle.done() and idle.result() is True
    assert await admission.wait_idle(0.001) is True


@pytest.mark.asyncio
async def test_snapshot_reports_load() -> None:
    admission = Admission(3, 4, 30.0)
    admission.try_enter()
    assert admission.snapshot() == {
        "running": 1,
        "waiting": 0,
        "max_concurrency": 3,
        "max_queue": 4,
        "available_slots": 2,
        "draining": False,
    }


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"max_concurrency": True}, "max_concurrency"),
        ({"max_concurrency": 2.0}, "max_concurrency"),
        ({"max_queue": -1}, "max_queue"),
        ({"queue_timeout": 0}, "queue_timeout"),
        ({"queue_timeout": -1.0}, "queue_timeout"),
        ({"queue_timeout": float("nan")}, "queue_timeout"),
        ({"queue_timeout": "30"}, "queue_timeout"),
    ],
)
def test_bad_arguments_raise_configuration_error(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"max_concurrency": 2, "max_queue": 2, "queue_timeout": None, **kwargs}
    with pytest.raises(ConfigurationError, match=message) as caught:
        Admission(**args)  # type: ignore[arg-type]
    assert isinstance(caught.value, ValueError)


@pytest.mark.asyncio
async def test_a_rejection_in_the_same_step_as_a_disconnect_is_not_logged_as_never_retrieved() -> None:
    from chatstream_asgi.http.slots import wait_for_slot

    class RejectedAtOnce:
        granted = False

        async def wait(self) -> None:
            raise Draining("draining", retry_after=1)

    async def disconnected() -> dict[str, str]:
        return {"type": "http.disconnect"}

    loop, logged = asyncio.get_running_loop(), []
    loop.set_exception_handler(lambda _, context: logged.append(context["message"]))
    try:
        assert await wait_for_slot(RejectedAtOnce(), disconnected) is False  # type: ignore[arg-type]
        import gc

        gc.collect()  # an exception never retrieved is reported when its task is collected
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert logged == []
