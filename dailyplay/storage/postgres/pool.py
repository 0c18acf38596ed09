"""PostgreSQL: a small pool of asyncpg connections for one worker process.

asyncpg's own Pool costs about 50 µs of CPU per use on this service's machine (a task for its
acquire timeout, another to shield its release, proxies, a reset query by default), as much as
the query it wraps; validate-session does one query. This one does only what the service
needs: a free connection is taken from a list, given back to the list or to the first waiter,
and a connection that failed in a way that may leave it unusable is closed instead.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

Connect = Callable[[], Awaitable[Any]]


class PoolTimeout(asyncio.TimeoutError):
    """No connection became free (and none could be opened) within the wait allowed."""


class ConnectionPool:
    """At most max_size connections, min_size of them opened by open(); more are opened as
    operations need them, and kept. Not thread-safe: one event loop uses it."""

    def __init__(self, connect: Connect, min_size: int, max_size: int, wait_seconds: float):
        self._connect = connect
        self.min_size = min_size
        self.max_size = max_size
        self._wait_seconds = wait_seconds
        self._idle: list[Any] = []
        # Connections open or being opened, in use or idle.
        self.size = 0
        # Operations waiting for a connection: each future gets one, or None, meaning it may
        # open one of its own (the slot of a connection that was closed).
        self._waiters: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._closed = False

    async def open(self) -> None:
        """Open min_size connections (the first proves the server can be reached)."""
        for _ in range(self.min_size):
            self.release(await self._open_one())

    async def _open_one(self) -> Any:
        self.size += 1
        try:
            return await self._connect()
        except BaseException:
            self.size -= 1
            self._wake_one_to_open()
            raise

    def take(self) -> Any | None:
        """A free connection now, or None (then acquire())."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.is_closed():
                return conn
            self.size -= 1  # closed while idle (the server went away)
        return None

    async def acquire(self) -> Any:
        """A connection: a free one, a new one while there are fewer than max_size, or the
        next one given back within the wait allowed (PoolTimeout after it)."""
        if self._closed:
            raise RuntimeError("database is not open")
        conn = self.take()
        if conn is not None:
            return conn
        if self.size < self.max_size:
            return await self._open_one()
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()
        self._waiters.append(waiter)
        timer = loop.call_later(self._wait_seconds, _time_out, waiter)
        try:
            conn = await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # Handed a connection just as this wait ended: pass it on.
                given = waiter.result()
                if given is None:
                    self._wake_one_to_open()
                else:
                    self.release(given)
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
            raise
        finally:
            timer.cancel()
        if conn is None:
            return await self._open_one()
        return conn

    def release(self, conn: Any) -> None:
        """Give back a connection that is fit for the next operation."""
        if conn.is_closed() or conn.is_in_transaction() or self._closed:
            self.discard(conn)
            return
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self._idle.append(conn)

    def discard(self, conn: Any) -> None:
        """Close a connection that must not be used again; its slot goes to a waiter."""
        if not conn.is_closed():
            conn.terminate()
        self.size -= 1
        self._wake_one_to_open()

    def _wake_one_to_open(self) -> None:
        waiters = self._waiters
        while waiters and self.size < self.max_size:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def close(self, timeout: float) -> None:
        """Close the free connections (politely, within timeout) and refuse new operations."""
        self._closed = True
        idle, self._idle = self._idle, []
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(RuntimeError("database is closing"))
        self._waiters.clear()
        for conn in idle:
            try:
                await asyncio.wait_for(conn.close(), timeout)
            except (TimeoutError, OSError, Exception):
                conn.terminate()
            self.size -= 1


def _time_out(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(PoolTimeout("no database connection became free in time"))
