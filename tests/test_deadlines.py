"""dailyplay.deadlines: coarse deadlines on a real event loop, compared with asyncio.timeout."""

from __future__ import annotations

import asyncio
import time

import pytest

from dailyplay.deadlines import Deadlines

RESOLUTION = 0.05


async def bounded_sleep(deadlines: Deadlines, limit: float, pause: float) -> str:
    try:
        with deadlines.bound(limit):
            await asyncio.sleep(pause)
    except TimeoutError:
        return "timeout"
    return "done"


def test_an_await_past_its_deadline_raises_timeout_within_the_resolution() -> None:
    async def main() -> float:
        deadlines = Deadlines(RESOLUTION)
        started = time.monotonic()
        with pytest.raises(TimeoutError), deadlines.bound(0.2):
            await asyncio.sleep(5)
        return time.monotonic() - started

    elapsed = asyncio.run(main())
    assert 0.2 <= elapsed < 0.2 + RESOLUTION + 0.15


def test_quick_awaits_finish_and_leave_no_cancellation_or_timer_behind() -> None:
    async def main() -> None:
        deadlines = Deadlines(RESOLUTION)
        for _ in range(100):
            assert await bounded_sleep(deadlines, 0.1, 0) == "done"
        # Past every deadline those bounds had: nothing is cancelled after its block ended.
        await asyncio.sleep(0.1 + 3 * RESOLUTION)
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0
        # With nothing in progress the sweeping timer is not re-armed.
        assert deadlines._sweeper is None

    asyncio.run(main())


def test_concurrent_bounds_time_out_by_their_own_deadlines() -> None:
    async def main() -> list[str]:
        deadlines = Deadlines(RESOLUTION)
        return await asyncio.gather(
            bounded_sleep(deadlines, 0.1, 1.0),  # too slow
            bounded_sleep(deadlines, 1.0, 0.2),  # in time
            bounded_sleep(deadlines, 0.3, 0.05),  # in time
            bounded_sleep(deadlines, 0.2, 0.6),  # too slow
        )

    assert asyncio.run(main()) == ["timeout", "done", "done", "timeout"]


def test_a_cancellation_from_outside_stays_a_cancellation() -> None:
    async def main() -> None:
        deadlines = Deadlines(RESOLUTION)
        task = asyncio.create_task(bounded_sleep(deadlines, 10, 10))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_an_outside_cancellation_that_meets_an_expiry_is_not_swallowed() -> None:
    # As with asyncio.timeout: when the task is also cancelled by someone else, the block ends
    # with CancelledError (a shutdown must not be turned into a 408).
    async def main() -> None:
        deadlines = Deadlines(RESOLUTION)
        task = asyncio.create_task(bounded_sleep(deadlines, 0.1, 5))
        await asyncio.sleep(0)  # the task enters its block
        time.sleep(0.1 + 2 * RESOLUTION)  # the deadline and the sweep are due
        await asyncio.sleep(0)  # the sweep runs after us in this round of the loop ...
        await asyncio.sleep(0)  # ... and we run again before the task wakes up
        assert task.cancelling() == 1  # the sweep's cancellation, not yet delivered
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_bound_needs_a_task_on_its_own_loop() -> None:
    async def make() -> Deadlines:
        return Deadlines(RESOLUTION)

    deadlines = asyncio.run(make())
    with pytest.raises(RuntimeError):
        deadlines.bound(1)
