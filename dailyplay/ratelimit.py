"""Rate limits: per API key (per minute and per UTC day) and per client IP for public operations.

Counting happens in process with the `limits` library (fixed windows aligned to the clock: the
window's number is part of the counter's identity), kept in WindowCounters, whose cost per hit
does not grow with the number of active keys. Per-key counts are also added up in the
database by a background flush about once a second, and read back when a process first sees a
key in a window, so a restart does not hand out a fresh quota and several worker processes
share one quota (each may overshoot by what the others admitted since their last flush).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

from limits import RateLimitItem, RateLimitItemPerDay, RateLimitItemPerMinute
from limits.storage import Storage
from limits.strategies import FixedWindowRateLimiter

from .background import log_failed_pass, running
from .clock import DAY_MS, MINUTE_MS
from .clock import now_ms as current_ms
from .errors import ApiError
from .storage import Store

log = logging.getLogger("dailyplay.ratelimit")

SPANS = {"minute": MINUTE_MS, "day": DAY_MS}


class WindowState(NamedTuple):
    """What a request's X-RateLimit-* headers say (a tuple: made on every counted request)."""

    limit: int
    remaining: int
    reset_ms: int  # when the window ends


def rate_limit_headers(state: WindowState) -> dict[str, str]:
    """X-RateLimit-* headers (Reset in epoch seconds) for the tightest window."""
    return {
        "X-RateLimit-Limit": str(state.limit),
        "X-RateLimit-Remaining": str(state.remaining),
        "X-RateLimit-Reset": str(-(-state.reset_ms // 1000)),
    }


def _retry_after(reset_ms: int, now_ms: int) -> str:
    return str(max(1, -(-(reset_ms - now_ms) // 1000)))


def _too_many(message: str, window: _Window, now_ms: int, kind: str) -> ApiError:
    """The 429 for an exhausted window: Retry-After and X-RateLimit-* with nothing remaining."""
    return ApiError(
        429,
        message,
        headers={
            "Retry-After": _retry_after(window.reset_ms, now_ms),
            **rate_limit_headers(WindowState(window.item.amount, 0, window.reset_ms)),
        },
        kind=kind,
    )


class WindowCounters(Storage):
    """`limits` storage for fixed windows: plain counters in a dict, expired lazily.

    limits' own MemoryStorage starts a timer thread about every 10 ms while it is being hit,
    and each run walks every key, so its cost per hit grows with the number of active keys
    (and the thread competes for the GIL). Here each counter's expiry goes on a heap when the
    counter is created; every call first drops the counters whose time has passed (amortised
    O(log n) per counter over its whole life, nothing per hit), so the cost of a hit does not
    depend on how many keys are active. Used from the event loop's thread only.
    """

    # limits declares this as an instance variable, though it reads it from the class
    STORAGE_SCHEME: ClassVar[list[str]] = ["dailyplay-memory"]  # type: ignore[misc]

    def __init__(self, uri: str | None = None, wrap_exceptions: bool = False, **options: str):
        self._counts: dict[str, list[float]] = {}  # key -> [count, expires_at (monotonic)]
        self._expiries: list[tuple[float, str]] = []
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)

    @property
    def base_exceptions(self) -> type[Exception]:
        return ValueError

    def _expire(self, now: float) -> None:
        expiries, counts = self._expiries, self._counts
        while expiries and expiries[0][0] <= now:
            at, key = heapq.heappop(expiries)
            entry = counts.get(key)
            if entry is not None and entry[1] == at:
                del counts[key]

    def incr(self, key: str, expiry: float, amount: int = 1) -> int:
        now = time.monotonic()
        self._expire(now)
        entry = self._counts.get(key)
        if entry is None:
            entry = self._counts[key] = [0, now + expiry]
            heapq.heappush(self._expiries, (entry[1], key))
        entry[0] += amount
        return int(entry[0])

    def take(self, windows: tuple[_Window, ...], now_ms: int) -> list[int] | _Window:
        """One hit counted in every window, or in none of them when one is used up (the
        fixed-window rule of limits' strategy, as in get() then incr() for each window, with one
        expiry pass): the counts after the hit, or the window that was used up."""
        now = time.monotonic()
        self._expire(now)
        counts = self._counts
        for window in windows:
            entry = counts.get(window.storage_key)
            if entry is not None and entry[0] >= window.amount:
                return window
        used = []
        for window in windows:
            key = window.storage_key
            entry = counts.get(key)
            if entry is None:
                entry = counts[key] = [0, now + window.expiry_seconds(now_ms)]
                heapq.heappush(self._expiries, (entry[1], key))
            entry[0] += 1
            used.append(int(entry[0]))
        return used

    def get(self, key: str) -> int:
        self._expire(time.monotonic())
        entry = self._counts.get(key)
        return 0 if entry is None else int(entry[0])

    def get_expiry(self, key: str) -> float:
        now = time.monotonic()
        self._expire(now)
        entry = self._counts.get(key)
        return time.time() + (0.0 if entry is None else entry[1] - now)

    def check(self) -> bool:
        return True

    def reset(self) -> int:
        cleared = len(self._counts)
        self._counts.clear()
        self._expiries.clear()
        return cleared

    def clear(self, key: str) -> None:
        self._counts.pop(key, None)


class _Window:
    """One clock-aligned fixed window of a given span for a limit amount."""

    def __init__(self, span: str, amount: int, now_ms: int, subject: str = ""):
        self.span = span
        self.length_ms = SPANS[span]
        self.period = now_ms // self.length_ms
        self.reset_ms = (self.period + 1) * self.length_ms
        self.item: RateLimitItem = (
            RateLimitItemPerMinute(amount) if span == "minute" else RateLimitItemPerDay(amount)
        )
        self.amount = amount
        # The counter's key in the storage, as limits' strategies name it.
        self.storage_key = self.item.key_for(*self.identifiers(subject))

    def identifiers(self, subject: str) -> tuple[str, str]:
        return subject, str(self.period)

    def expiry_seconds(self, now_ms: int) -> float:
        return (self.reset_ms - now_ms) / 1000 + 1


@dataclass
class _Unflushed:
    hits: int
    storage_key: str
    window: _Window


@dataclass
class _KeyWindows:
    """A key's minute and day windows as of its last request, reused while they last."""

    minute: _Window
    day: _Window
    minute_slot: tuple[int, str, int]
    day_slot: tuple[int, str, int]

    def current(self, per_minute: int, per_day: int, now_ms: int) -> bool:
        minute, day = self.minute, self.day
        return (
            minute.reset_ms - MINUTE_MS <= now_ms < minute.reset_ms
            and day.reset_ms - DAY_MS <= now_ms < day.reset_ms
            and minute.amount == per_minute
            and day.amount == per_day
        )


class KeyRateLimiter:
    """Per-key limits from the key's row, persisted and shared through the database.

    The fixed-window check is `limits`' (count in the window's counter, refuse past the
    amount); it is done on the storage directly with each window's counter key computed once
    per window rather than on every request.
    """

    def __init__(self, db: Store):
        self._db = db
        self._storage = WindowCounters()
        self._seeded: set[str] = set()
        self._seeding: dict[str, asyncio.Future[None]] = {}
        self._unflushed: dict[tuple[int, str, int], _Unflushed] = {}
        self._last_used: dict[int, int] = {}
        self._windows: dict[int, _KeyWindows] = {}

    async def _seed(self, key_id: int, windows: list[_Window], now_ms: int) -> None:
        """Load what the database already counted for these windows, once per process."""
        missing = [w for w in windows if w.storage_key not in self._seeded]
        if not missing:
            return
        marker = "|".join(w.storage_key for w in missing)
        pending = self._seeding.get(marker)
        if pending is not None:
            await asyncio.shield(pending)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._seeding[marker] = future
        try:
            by_span = {w.span: w for w in windows}
            stored = await self._db.get_rate_counters(
                key_id, by_span["minute"].period, by_span["day"].period
            )
            for window in missing:
                hits = stored.get(window.span, 0)
                if hits > 0:
                    self._storage.incr(window.storage_key, window.expiry_seconds(now_ms), hits)
                self._seeded.add(window.storage_key)
        finally:
            del self._seeding[marker]
            future.set_result(None)

    async def _windows_for(
        self, key_id: int, per_minute: int, per_day: int, now_ms: int
    ) -> _KeyWindows:
        windows = self._windows.get(key_id)
        if windows is not None and windows.current(per_minute, per_day, now_ms):
            return windows
        subject = str(key_id)
        minute = _Window("minute", per_minute, now_ms, subject)
        day = _Window("day", per_day, now_ms, subject)
        await self._seed(key_id, [minute, day], now_ms)
        windows = _KeyWindows(
            minute, day, (key_id, "minute", minute.period), (key_id, "day", day.period)
        )
        self._windows[key_id] = windows
        return windows

    async def hit(self, key_id: int, per_minute: int, per_day: int, now_ms: int) -> WindowState:
        """Count one request; ApiError 429 (nothing counted) when either window is exhausted."""
        windows = self._windows.get(key_id)
        if windows is None or not windows.current(per_minute, per_day, now_ms):
            windows = await self._windows_for(key_id, per_minute, per_day, now_ms)
        minute, day = windows.minute, windows.day
        used = self._storage.take((minute, day), now_ms)
        if isinstance(used, _Window):
            which = "per-minute" if used.span == "minute" else "per-day"
            raise _too_many(
                f"rate limit exceeded: this API key's {which} limit of "
                f"{used.amount} requests is used up",
                used,
                now_ms,
                f"key_per_{used.span}",
            )
        unflushed = self._unflushed
        for window, slot in ((minute, windows.minute_slot), (day, windows.day_slot)):
            entry = unflushed.get(slot)
            if entry is None:
                entry = unflushed[slot] = _Unflushed(0, window.storage_key, window)
            entry.hits += 1
        # The window with fewer requests left (the minute's on a tie) sets the headers.
        minute_left = max(0, minute.amount - used[0])
        day_left = max(0, day.amount - used[1])
        if day_left < minute_left:
            return WindowState(day.amount, day_left, day.reset_ms)
        return WindowState(minute.amount, minute_left, minute.reset_ms)

    def note_used(self, key_id: int, now_ms: int) -> None:
        """Remember that a key was used; stored by the next flush, not per request."""
        self._last_used[key_id] = now_ms

    async def flush(self, now_ms: int) -> None:
        """Add this process's counts to the database and catch up with other processes'."""
        unflushed, self._unflushed = self._unflushed, {}
        last_used, self._last_used = self._last_used, {}
        if not unflushed and not last_used:
            return
        deltas = {slot: entry.hits for slot, entry in unflushed.items()}
        try:
            totals = await self._db.record_key_usage(last_used, deltas)
        except BaseException:
            # Keep the counts for the next attempt.
            for slot, entry in unflushed.items():
                current = self._unflushed.setdefault(
                    slot, _Unflushed(0, entry.storage_key, entry.window)
                )
                current.hits += entry.hits
            for key_id, used in last_used.items():
                self._last_used[key_id] = max(used, self._last_used.get(key_id, 0))
            raise
        for slot, total in totals.items():
            entry = unflushed[slot]
            local = self._storage.get(entry.storage_key)
            if total > local and entry.window.reset_ms > now_ms:
                self._storage.incr(
                    entry.storage_key, entry.window.expiry_seconds(now_ms), total - local
                )

    async def prune(self, now_ms: int) -> None:
        """Delete stored counters of windows that ended, and forget their seeding marks."""
        await self._db.prune_rate_counters(now_ms // MINUTE_MS - 1, now_ms // DAY_MS - 1)
        if len(self._seeded) > 100_000:
            self._seeded.clear()
        self._windows = {k: w for k, w in self._windows.items() if w.minute.reset_ms > now_ms}


class _PerClientLimiter:
    """A per-minute count per client IP, kept in this process (0: unlimited)."""

    # The 429's message ({limit} is the per-minute limit) and its kind for metrics.
    refusal = ""
    kind = ""

    def __init__(self, per_minute: int):
        self._per_minute = per_minute
        self._storage = WindowCounters()
        self._limiter = FixedWindowRateLimiter(self._storage)

    def _admit(self, client_ip: str, now_ms: int, *, count: bool) -> None:
        """429 when the client's minute is used up; count this request too when `count`."""
        if self._per_minute <= 0:
            return
        window = _Window("minute", self._per_minute, now_ms)
        identifiers = window.identifiers(client_ip)
        admitted = self._limiter.hit if count else self._limiter.test
        if not admitted(window.item, *identifiers):
            raise _too_many(self.refusal.format(limit=self._per_minute), window, now_ms, self.kind)


class PublicRateLimiter(_PerClientLimiter):
    """Requests per client IP per minute for the unauthenticated operations (0: unlimited)."""

    refusal = "rate limit exceeded: at most {limit} requests per minute from one client address"
    kind = "client_ip"

    def hit(self, client_ip: str, now_ms: int) -> None:
        self._admit(client_ip, now_ms, count=True)


class FailedAuthLimiter(_PerClientLimiter):
    """Failed authentications per client IP per minute (0: unlimited).

    Past the limit the client's authenticated requests get 429 before any credential is
    checked, so guessing keys or replaying stolen JWTs costs a minute per few dozen tries.
    """

    refusal = (
        "too many failed authentications from this address (at most {limit} a minute); "
        "try again later"
    )
    kind = "failed_auth"

    def check(self, client_ip: str, now_ms: int) -> None:
        self._admit(client_ip, now_ms, count=False)

    def record_failure(self, client_ip: str, now_ms: int) -> None:
        if self._per_minute > 0:
            window = _Window("minute", self._per_minute, now_ms)
            self._limiter.hit(window.item, *window.identifiers(client_ip))


async def run_flusher(limiter: KeyRateLimiter, interval: float = 1.0) -> None:
    """Flush key usage every `interval` seconds until cancelled; prune about once a minute."""
    ticks = 0
    while True:
        await asyncio.sleep(interval)
        ticks += 1
        try:
            now = current_ms()
            await limiter.flush(now)
            if ticks % 60 == 0:
                await limiter.prune(now)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log_failed_pass(log, "storing API key usage", exc)


@contextlib.asynccontextmanager
async def flushing(limiter: KeyRateLimiter, interval: float = 1.0) -> AsyncIterator[None]:
    """Run the flusher in the background; flush once more on the way out."""
    try:
        async with running(run_flusher(limiter, interval)):
            yield
    finally:
        try:
            await limiter.flush(current_ms())
        except Exception:
            log.exception("storing API key usage at shutdown failed")
