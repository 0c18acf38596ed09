"""Rate limits: per API key (per minute and per UTC day), per client IP for public operations,
and failed authentications per client IP.

Counting is `limits`' fixed-window rule on fixed windows aligned to the clock, in the counters
limits.storage_uri chooses (dailyplay.counters): this process's, or Redis's, shared exactly by
every process and host.

With this process's counters, per-key counts are also added up in the database by a background
flush about once a second, and read back when a process first sees a key in a window, so a
restart does not hand out a fresh quota and several worker processes share one quota (each may
overshoot by what the others admitted since their last flush). Per-IP counts are then per
process. With Redis every count is shared and exact, and the database keeps none.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import NamedTuple

from limits.aio.strategies import FixedWindowRateLimiter

from .background import log_failed_pass, running
from .clock import DAY_MS, MINUTE_MS
from .clock import now_ms as current_ms
from .counters import LocalCounters, SharedCounters, Window
from .errors import ApiError
from .storage import Store

log = logging.getLogger("dailyplay.ratelimit")

Counters = LocalCounters | SharedCounters

# The request scope's entry for the client's Lockout (FailedAuthLimiter.check).
LOCKOUT = "dailyplay.lockout"


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


def _too_many(message: str, window: Window, now_ms: int, kind: str) -> ApiError:
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


@dataclass
class _Unflushed:
    hits: int
    storage_key: str
    window: Window


@dataclass
class _KeyWindows:
    """A key's minute and day windows as of its last request, reused while they last."""

    minute: Window
    day: Window
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

    def __init__(self, db: Store, counters: Counters | None = None):
        self._db = db
        self._counters = counters if counters is not None else LocalCounters()
        # This process's counts are kept in the database too; shared ones need not be.
        self._persist = not self._counters.shared
        self._seeded: set[str] = set()
        self._seeding: dict[str, asyncio.Future[None]] = {}
        self._unflushed: dict[tuple[int, str, int], _Unflushed] = {}
        self._last_used: dict[int, int] = {}
        self._windows: dict[int, _KeyWindows] = {}

    async def _seed(self, key_id: int, windows: list[Window], now_ms: int) -> None:
        """Load what the database already counted for these windows, once per process."""
        missing = [w for w in windows if w.storage_key not in self._seeded]
        if not missing or not self._persist:
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
                    self._counters.counts.incr(
                        window.storage_key, window.expiry_seconds(now_ms), hits
                    )
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
        minute = Window("minute", per_minute, now_ms, subject, by_amount=False)
        day = Window("day", per_day, now_ms, subject, by_amount=False)
        await self._seed(key_id, [minute, day], now_ms)
        windows = _KeyWindows(
            minute, day, (key_id, "minute", minute.period), (key_id, "day", day.period)
        )
        self._windows[key_id] = windows
        return windows

    async def hit(
        self,
        key_id: int,
        per_minute: int,
        per_day: int,
        now_ms: int,
        lockout: Lockout | None = None,
    ) -> WindowState:
        """Count one request; ApiError 429 (nothing counted) when either window is exhausted,
        or when `lockout` (the client's failed authentications) is used up."""
        windows = self._windows.get(key_id)
        if windows is None or not windows.current(per_minute, per_day, now_ms):
            windows = await self._windows_for(key_id, per_minute, per_day, now_ms)
        minute, day = windows.minute, windows.day
        used = await self._counters.take(
            (minute, day), now_ms, None if lockout is None else lockout.window
        )
        if isinstance(used, Window):
            if lockout is not None and used is lockout.window:
                raise lockout.refusal(now_ms)
            which = "per-minute" if used.span == "minute" else "per-day"
            raise _too_many(
                f"rate limit exceeded: this API key's {which} limit of "
                f"{used.amount} requests is used up",
                used,
                now_ms,
                f"key_per_{used.span}",
            )
        if self._persist:
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
            local = self._counters.counts.get(entry.storage_key)
            if total > local and entry.window.reset_ms > now_ms:
                self._counters.counts.incr(
                    entry.storage_key, entry.window.expiry_seconds(now_ms), total - local
                )

    async def prune(self, now_ms: int) -> None:
        """Delete stored counters of windows that ended, and forget their seeding marks."""
        await self._db.prune_rate_counters(now_ms // MINUTE_MS - 1, now_ms // DAY_MS - 1)
        if len(self._seeded) > 100_000:
            self._seeded.clear()
        self._windows = {k: w for k, w in self._windows.items() if w.minute.reset_ms > now_ms}


class _PerClientLimiter:
    """A per-minute count per client IP (0: unlimited), by limits' fixed-window strategy."""

    # The 429's message ({limit} is the per-minute limit) and its kind for metrics.
    refusal = ""
    kind = ""

    def __init__(self, per_minute: int, counters: Counters | None = None):
        self._per_minute = per_minute
        self._counters = counters if counters is not None else LocalCounters()
        self._limiter = FixedWindowRateLimiter(self._counters)

    def _window(self, client_ip: str, now_ms: int) -> Window:
        return Window("minute", self._per_minute, now_ms, client_ip)

    def too_many(self, window: Window, now_ms: int) -> ApiError:
        return _too_many(self.refusal.format(limit=self._per_minute), window, now_ms, self.kind)

    async def _refused(self, client_ip: str, now_ms: int) -> ApiError | None:
        """Count a request in the client's minute: the 429 when that went past the limit."""
        window = self._window(client_ip, now_ms)
        if await self._limiter.hit(window.item, *window.identifiers(client_ip)):
            return None
        return self.too_many(window, now_ms)


class PublicRateLimiter(_PerClientLimiter):
    """Requests per client IP per minute for the unauthenticated operations (0: unlimited)."""

    refusal = "rate limit exceeded: at most {limit} requests per minute from one client address"
    kind = "client_ip"

    async def hit(self, client_ip: str, now_ms: int) -> None:
        if self._per_minute > 0:
            refused = await self._refused(client_ip, now_ms)
            if refused is not None:
                raise refused


@dataclass(frozen=True)
class Lockout:
    """A client's failed-authentication window, to be checked once it has authenticated."""

    window: Window
    limiter: FailedAuthLimiter

    def refusal(self, now_ms: int) -> ApiError:
        return self.limiter.too_many(self.window, now_ms)


class FailedAuthLimiter(_PerClientLimiter):
    """Failed authentications per client IP per minute (0: unlimited).

    Past the limit the client's authenticated requests get 429 before any credential is
    checked, so guessing keys or replaying stolen JWTs costs a minute per few dozen tries.

    check() decides on the counts this process knows without waiting (with shared counters,
    those Redis last answered), so a client another process locked out may have one credential
    checked here: the failure it records then answers 429, not 401 (no more than the limit of
    401s in all), and a credential that passes is confirmed against the shared count, within
    the request's one round trip for create-session (KeyRateLimiter.hit's lockout).
    """

    refusal = (
        "too many failed authentications from this address (at most {limit} a minute); "
        "try again later"
    )
    kind = "failed_auth"

    def check(self, client_ip: str, now_ms: int) -> Lockout | None:
        """429 when the client is known to be locked out; else its lockout to confirm after it
        authenticates (None: unlimited)."""
        if self._per_minute <= 0:
            return None
        window = self._window(client_ip, now_ms)
        if self._counters.peek(window.storage_key) >= window.amount:
            raise self.too_many(window, now_ms)
        return Lockout(window, self)

    async def confirm(self, lockout: Lockout | None, now_ms: int) -> None:
        """After a credential passed: 429 when the client is locked out (by any process)."""
        if lockout is not None:
            refused = await self._counters.take((), now_ms, lockout.window)
            if isinstance(refused, Window):
                raise lockout.refusal(now_ms)

    async def record_failure(self, client_ip: str, now_ms: int) -> ApiError | None:
        """Count a failed authentication: the 429 to answer instead of the 401 when the client
        was already past the limit (None: answer the 401)."""
        return None if self._per_minute <= 0 else await self._refused(client_ip, now_ms)


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
