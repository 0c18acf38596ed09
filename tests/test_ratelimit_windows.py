"""Rate-limit windows: WindowCounters (the storage behind every limit) and KeyRateLimiter's
windows as the clock moves, driven with explicit clock values."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from typing import Any

import pytest
from limits import RateLimitItemPerMinute
from limits.strategies import FixedWindowRateLimiter

from dailyplay import config
from dailyplay.errors import ApiError
from dailyplay.ratelimit import KeyRateLimiter, WindowCounters, _Window
from dailyplay.storage.sqlite import Database


def test_counts_per_key_through_the_limits_strategy() -> None:
    storage = WindowCounters()
    limiter = FixedWindowRateLimiter(storage)
    three = RateLimitItemPerMinute(3)
    assert [limiter.hit(three, "a", "1") for _ in range(4)] == [True, True, True, False]
    assert limiter.test(three, "b", "1")
    assert limiter.hit(three, "b", "1")
    assert storage.get(three.key_for("a", "1")) == 4
    assert storage.get(three.key_for("b", "1")) == 1
    assert not limiter.test(three, "a", "1")
    stats = limiter.get_window_stats(three, "a", "1")
    assert stats.remaining == 0
    assert time.time() + 55 < stats.reset_time <= time.time() + 60


def test_take_decides_and_counts_as_the_limits_strategy_does() -> None:
    """take(): one hit in every window or, when one is used up, in none (what checking each
    window with limits' fixed-window strategy, then hitting each, does)."""
    rng = random.Random(11)
    now = 1_800_000_000_000
    ours, theirs = WindowCounters(), WindowCounters()
    strategy = FixedWindowRateLimiter(theirs)
    keys = []
    for subject in ("1", "2", "3"):
        minute = _Window("minute", rng.randint(1, 8), now, subject)
        day = _Window("day", rng.randint(1, 12), now, subject)
        keys.append((subject, minute, day))
    refused = 0
    for _ in range(300):
        subject, minute, day = rng.choice(keys)
        taken = ours.take((minute, day), now)
        windows = (minute, day)
        if all(strategy.test(w.item, *w.identifiers(subject)) for w in windows):
            assert all(strategy.hit(w.item, *w.identifiers(subject)) for w in windows)
            assert taken == [theirs.get(w.storage_key) for w in windows]
        else:
            refused += 1
            assert isinstance(taken, _Window) and theirs.get(taken.storage_key) >= taken.amount
        assert [ours.get(w.storage_key) for w in windows] == [
            theirs.get(w.storage_key) for w in windows
        ]
    assert 0 < refused < 300


def test_amounts_add_up_and_clear_forgets() -> None:
    storage = WindowCounters()
    assert storage.incr("k", 60, 5) == 5
    assert storage.incr("k", 60) == 6
    storage.clear("k")
    assert storage.get("k") == 0
    assert storage.incr("k", 60) == 1
    assert storage.check()
    assert storage.reset() == 1
    assert storage.get("k") == 0


def test_a_counter_ends_when_its_expiry_passes() -> None:
    storage = WindowCounters()
    storage.incr("short", 0.05, 7)
    storage.incr("long", 60, 2)
    assert storage.get("short") == 7
    time.sleep(0.1)
    assert storage.get("short") == 0
    assert storage.get("long") == 2
    assert storage.incr("short", 60) == 1  # a new counter, not 8


def test_expired_counters_are_dropped_without_being_read_again() -> None:
    """Counters of ended windows are never asked for again (the window's number is in the key):
    they must go by themselves, or memory grows with every key and every window."""
    storage = WindowCounters()
    for n in range(10_000):
        storage.incr(f"old-{n}", 1.0)
    assert len(storage._counts) == 10_000
    time.sleep(1.1)
    storage.incr("new", 60)
    assert len(storage._counts) == 1
    assert len(storage._expiries) == 1


def test_no_background_threads() -> None:
    """limits' MemoryStorage starts a timer thread while hit; this storage must not."""
    before = threading.active_count()
    storage = WindowCounters()
    limiter = FixedWindowRateLimiter(storage)
    item = RateLimitItemPerMinute(10**6)
    for n in range(2_000):
        limiter.hit(item, str(n % 100), "1")
    assert threading.active_count() == before


# --- KeyRateLimiter's windows over time (explicit clock values; a real database file) ---------

MINUTE = 60_000
START = 1_900_000_000_000 - 1_900_000_000_000 % 86_400_000 + 3_600_000  # 01:00 UTC on a day


def _limiter_run(settings: config.Settings, scenario: Any) -> Any:
    async def main() -> Any:
        database = Database(settings.database)
        await database.open()
        try:
            return await scenario(KeyRateLimiter(database))
        finally:
            await database.close()

    return asyncio.run(main())


def test_a_new_minute_starts_a_new_count(settings: config.Settings) -> None:
    async def scenario(limiter: KeyRateLimiter) -> None:
        remaining = [(await limiter.hit(7, 3, 1000, START + n)).remaining for n in range(3)]
        assert remaining == [2, 1, 0]
        with pytest.raises(ApiError) as refused:
            await limiter.hit(7, 3, 1000, START + 59_999)
        assert refused.value.status == 429
        assert refused.value.headers["Retry-After"] == "1"
        state = await limiter.hit(7, 3, 1000, START + MINUTE)
        assert (state.remaining, state.reset_ms) == (2, START + 2 * MINUTE)

    _limiter_run(settings, scenario)


def test_the_day_counts_across_minutes_and_a_new_day_resets_it(settings: config.Settings) -> None:
    async def scenario(limiter: KeyRateLimiter) -> None:
        for n in range(4):
            await limiter.hit(7, 100, 4, START + n * MINUTE)
        with pytest.raises(ApiError) as refused:
            await limiter.hit(7, 100, 4, START + 5 * MINUTE)
        assert "per-day" in refused.value.message
        next_day = START - 3_600_000 + 86_400_000
        assert (await limiter.hit(7, 100, 4, next_day)).remaining == 3

    _limiter_run(settings, scenario)


def test_a_changed_limit_applies_to_the_next_request(settings: config.Settings) -> None:
    async def scenario(limiter: KeyRateLimiter) -> None:
        for n in range(3):
            await limiter.hit(7, 10, 1000, START + n)
        lowered = await limiter.hit(7, 5, 1000, START + 10)
        assert lowered.limit == 5
        raised = await limiter.hit(7, 50, 1000, START + 20)
        assert raised.limit == 50

    _limiter_run(settings, scenario)


def test_keys_count_separately(settings: config.Settings) -> None:
    async def scenario(limiter: KeyRateLimiter) -> None:
        await limiter.hit(1, 1, 1000, START)
        assert (await limiter.hit(2, 1, 1000, START)).remaining == 0
        with pytest.raises(ApiError):
            await limiter.hit(1, 1, 1000, START + 1)

    _limiter_run(settings, scenario)
