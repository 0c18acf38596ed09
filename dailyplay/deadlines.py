"""Coarse deadlines for awaits that are almost always quick: one sweeping timer per event loop.

`asyncio.timeout()` schedules a timer in the loop's heap for every use and cancels it after;
around a request body that has already arrived, that was the larger part of reading it (about
7 µs of every create and consume). A `Deadlines` keeps the reads in progress in a dict and one
timer, armed only while there are any, sweeps them every `resolution` seconds: a read past its
deadline is cancelled and its `with` block raises TimeoutError, as `asyncio.timeout()` would,
between `seconds` and `seconds + resolution` after it began.
"""

from __future__ import annotations

import asyncio
from types import TracebackType


class Deadlines:
    """Bounds for awaits on one event loop; make it on that loop (e.g. in the app's lifespan)."""

    def __init__(self, resolution: float = 0.25):
        self.resolution = resolution
        self._loop = asyncio.get_running_loop()
        self._active: dict[_Bound, float] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    def bound(self, seconds: float) -> _Bound:
        """`with deadlines.bound(s):` around awaits of the current task: TimeoutError when they
        have not finished within s (+ resolution) seconds."""
        loop = self._loop
        task = asyncio.current_task(loop)
        if task is None:
            raise RuntimeError("Deadlines.bound() needs a running task on its own loop")
        bound = _Bound(self, task)
        self._active[bound] = loop.time() + seconds
        if self._sweeper is None:
            self._sweeper = loop.call_later(self.resolution, self._sweep)
        return bound

    def _sweep(self) -> None:
        now = self._loop.time()
        expired = [bound for bound, deadline in self._active.items() if deadline <= now]
        for bound in expired:
            del self._active[bound]
            bound.expire()
        self._sweeper = (
            self._loop.call_later(self.resolution, self._sweep) if self._active else None
        )

    def _forget(self, bound: _Bound) -> None:
        self._active.pop(bound, None)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None


class _Bound:
    __slots__ = ("_cancelling", "_expired", "_owner", "_task")

    def __init__(self, owner: Deadlines, task: asyncio.Task[object]):
        self._owner = owner
        self._task = task
        # Cancellations already requested before this bound (asyncio.timeout does the same).
        self._cancelling = task.cancelling()
        self._expired = False

    def expire(self) -> None:
        # The task is suspended inside the block (the sweep runs on the same loop, and a
        # bound leaves the dict when its block ends): the cancellation lands in the block.
        self._expired = True
        self._task.cancel()

    def __enter__(self) -> _Bound:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._owner._forget(self)
        if (
            self._expired
            and self._task.uncancel() <= self._cancelling
            and exc_type is asyncio.CancelledError
        ):
            # Only our own cancellation is pending: it is a timeout, not a shutdown.
            raise TimeoutError from exc
