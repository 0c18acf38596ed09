"""The calls of one turn of the event loop, sent to a server together.

Under load a worker starts many requests in one turn of its loop (every socket that became
readable). Each would otherwise be a round trip of its own: a send, a wake-up, a receive, a
command for the server to run. A Batcher gathers the calls of one turn and runs them together
on one connection (one PostgreSQL statement, one Redis pipeline; the way the SQLite engine
gathers writes into one group commit), then gives each caller its own result. A lone call goes
alone, one turn later.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

A = TypeVar("A")
R = TypeVar("R")

# Most calls one batch carries.
MAX_BATCH = 256


class Batcher(Generic[A, R]):
    """run(arguments of every call) -> their results in the same order; each caller gets its
    own result (an exception instance among them is raised to its caller alone), or the
    exception the whole batch raised."""

    def __init__(self, run: Callable[[list[A]], Awaitable[list[R]]]):
        self._run = run
        self._pending: list[tuple[A, asyncio.Future[R]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def submit(self, arguments: A) -> asyncio.Future[R]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        pending = self._pending
        if not pending:
            loop.call_soon(self._send)
        pending.append((arguments, future))
        return future

    def _send(self) -> None:
        pending, self._pending = self._pending, []
        for start in range(0, len(pending), MAX_BATCH):
            task = asyncio.get_running_loop().create_task(
                self._settle(pending[start : start + MAX_BATCH])
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _settle(self, batch: list[tuple[A, asyncio.Future[R]]]) -> None:
        try:
            results = await self._run([arguments for arguments, _ in batch])
        except BaseException as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def drain(self) -> None:
        """Wait for every batch already sent (before closing the connections)."""
        while self._tasks or self._pending:
            await asyncio.sleep(0)
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
