"""Rate-limit counters (dailyplay.counters: this process's, and Redis's through limits' async
storage) and KeyRateLimiter's windows as the clock moves, driven with explicit clock values.
Every test runs on both kinds of counters; the Redis ones on a real redis-server."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from limits import RateLimitItemPerMinute
from limits.aio.strategies import FixedWindowRateLimiter

from dailyplay import config
from dailyplay.counters import LocalCounters, LocalCounts, SharedCounters, Window
from dailyplay.errors import ApiError
from dailyplay.ratelimit import KeyRateLimiter
from dailyplay.storage.sqlite import Database

Counters = LocalCounters | SharedCounters


@pytest.fixture(params=["local", pytest.param("redis", marks=[pytest.mark.redis])])
def make_counters(request: pytest.FixtureRequest) -> Callable[[], Counters]:
    """Fresh counters of either kind (one per event loop: Redis connections belong to one)."""
    if request.param == "local":
        return LocalCounters
    url = request.getfixturevalue("redis_url")
    return lambda: SharedCounters(url, 1000)


def _run(make_counters: Callable[[], Counters], scenario: Any) -> Any:
    async def main() -> Any:
        counters = make_counters()
        try:
            return await scenario(counters)
        finally:
            await counters.close()

    return asyncio.run(main())


def test_counts_per_key_through_the_limits_strategy(make_counters) -> None:
    async def scenario(storage: Counters) -> None:
        limiter = FixedWindowRateLimiter(storage)
        three = RateLimitItemPerMinute(3)
        assert [await limiter.hit(three, "a", "1") for _ in range(4)] == [True] * 3 + [False]
        assert await limiter.test(three, "b", "1")
        assert await limiter.hit(three, "b", "1")
        assert await storage.get(three.key_for("a", "1")) == 4
        assert await storage.get(three.key_for("b", "1")) == 1
        assert not await limiter.test(three, "a", "1")
        stats = await limiter.get_window_stats(three, "a", "1")
        assert stats.remaining == 0
        assert time.time() + 55 < stats.reset_time <= time.time() + 61

    _run(make_counters, scenario)


def test_take_decides_and_counts_as_the_limits_strategy_does(make_counters) -> None:
    """take(): one hit in every window or, when one is used up (or the lockout is), in none:
    what checking each window with limits' fixed-window strategy, then hitting each, does."""

    async def scenario(ours: Counters) -> None:
        rng = random.Random(11)
        now = int(time.time() * 1000)
        theirs = LocalCounters()
        strategy = FixedWindowRateLimiter(theirs)
        keys = []
        for subject in ("1", "2", "3"):
            minute = Window("minute", rng.randint(1, 8), now, subject)
            day = Window("day", rng.randint(1, 12), now, subject)
            keys.append((subject, minute, day))
        lockout = Window("minute", 3, now, "198.51.100.9")
        refused = 0
        for n in range(300):
            subject, minute, day = rng.choice(keys)
            windows = (minute, day)
            guard = lockout if n % 2 else None
            if n == 150:  # the lockout used up from now on
                for _ in range(3):
                    await strategy.hit(lockout.item, *lockout.identifiers("198.51.100.9"))
                    await ours.incr(lockout.storage_key, 60)
            taken = await ours.take(windows, now, guard)
            checked = windows if guard is None else (guard, *windows)
            if all([await strategy.test(w.item, *w.identifiers(subject)) for w in windows]) and (
                guard is None or n < 150
            ):
                assert all([await strategy.hit(w.item, *w.identifiers(subject)) for w in windows])
                assert taken == [await theirs.get(w.storage_key) for w in windows]
            else:
                refused += 1
                assert isinstance(taken, Window) and taken in checked
                assert await theirs.get(taken.storage_key) >= taken.amount
            assert [await ours.get(w.storage_key) for w in windows] == [
                await theirs.get(w.storage_key) for w in windows
            ]
        assert 0 < refused < 300

    _run(make_counters, scenario)


def test_amounts_add_up_and_clear_forgets(make_counters) -> None:
    async def scenario(storage: Counters) -> None:
        assert await storage.incr("k", 60, 5) == 5
        assert await storage.incr("k", 60) == 6
        await storage.clear("k")
        assert await storage.get("k") == 0
        assert await storage.incr("k", 60) == 1
        assert await storage.check()
        assert await storage.reset() == 1
        assert await storage.get("k") == 0

    _run(make_counters, scenario)


def test_a_counter_ends_when_its_expiry_passes(make_counters) -> None:
    async def scenario(storage: Counters) -> None:
        await storage.incr("short", 1, 7)
        await storage.incr("long", 60, 2)
        assert await storage.get("short") == 7
        await asyncio.sleep(1.2)
        assert await storage.get("short") == 0
        assert await storage.get("long") == 2
        assert await storage.incr("short", 60) == 1  # a new counter, not 8

    _run(make_counters, scenario)


def test_expired_counters_are_dropped_without_being_read_again() -> None:
    """Counters of ended windows are never asked for again (the window's number is in the key):
    they must go by themselves, or memory grows with every key and every window."""
    counts = LocalCounts()
    for n in range(10_000):
        counts.incr(f"old-{n}", 1.0)
    assert len(counts._counts) == 10_000
    time.sleep(1.1)
    counts.incr("new", 60)
    assert len(counts._counts) == 1
    assert len(counts._expiries) == 1


def test_no_background_threads() -> None:
    """limits' MemoryStorage starts a timer thread while hit; this process's counters must not."""

    async def scenario() -> None:
        limiter = FixedWindowRateLimiter(LocalCounters())
        item = RateLimitItemPerMinute(10**6)
        for n in range(2_000):
            await limiter.hit(item, str(n % 100), "1")

    before = threading.active_count()
    asyncio.run(scenario())
    assert threading.active_count() == before


# --- KeyRateLimiter's windows over time (explicit clock values; a real database file) ---------

MINUTE = 60_000
START = 1_900_000_000_000 - 1_900_000_000_000 % 86_400_000 + 3_600_000  # 01:00 UTC on a day


def _limiter_run(
    settings: config.Settings, make_counters: Callable[[], Counters], scenario: Any
) -> Any:
    async def main() -> Any:
        database = Database(settings.database)
        await database.open()
        counters = make_counters()
        try:
            return await scenario(KeyRateLimiter(database, counters))
        finally:
            await counters.close()
            await database.close()

    return asyncio.run(main())


def test_a_new_minute_starts_a_new_count(settings: config.Settings, make_counters) -> None:
    async def scenario(limiter: KeyRateLimiter) -> None:
        remaining = [(await limiter.hit(7, 3, 1000, START + n)).remaining for n in range(3)]
        assert remaining == [2, 1, 0]
        with pytest.raises(ApiError) as refused:
            await limiter.hit(7, 3, 1000, START + 59_999)
        assert refused.value.status == 429
        assert refused.value.headers["Retry-After"] == "1"
        state = await limiter.hit(7, 3, 1000, START + MINUTE)
        assert (state.remaining, state.reset_ms) == (2, START + 2 * MINUTE)

    _limiter_run(settings, make_counters, scenario)


def test_the_day_counts_across_minutes_and_a_new_day_resets_it(
    settings: config.Settings, make_counters
) -> None:
    async def scenario(limiter: KeyRateLimiter) -> None:
        for n in range(4):
            await limiter.hit(7, 100, 4, START + n * MINUTE)
        with pytest.raises(ApiError) as refused:
            await limiter.hit(7, 100, 4, START + 5 * MINUTE)
        assert "per-day" in refused.value.message
        next_day = START - 3_600_000 + 86_400_000
        assert (await limiter.hit(7, 100, 4, next_day)).remaining == 3

    _limiter_run(settings, make_counters, scenario)


def test_a_changed_limit_applies_to_the_next_request(
    settings: config.Settings, make_counters
) -> None:
    async def scenario(limiter: KeyRateLimiter) -> None:
        for n in range(3):
            await limiter.hit(7, 10, 1000, START + n)
        lowered = await limiter.hit(7, 5, 1000, START + 10)
        assert lowered.limit == 5
        raised = await limiter.hit(7, 50, 1000, START + 20)
        assert raised.limit == 50

    _limiter_run(settings, make_counters, scenario)


def test_keys_count_separately(settings: config.Settings, make_counters) -> None:
    async def scenario(limiter: KeyRateLimiter) -> None:
        await limiter.hit(1, 1, 1000, START)
        assert (await limiter.hit(2, 1, 1000, START)).remaining == 0
        with pytest.raises(ApiError):
            await limiter.hit(1, 1, 1000, START + 1)

    _limiter_run(settings, make_counters, scenario)
