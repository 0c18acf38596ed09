"""WindowCounters: the in-process storage behind every rate limit (limits' fixed windows)."""

from __future__ import annotations

import threading
import time

from limits import RateLimitItemPerMinute
from limits.strategies import FixedWindowRateLimiter

from dailyplay.ratelimit import WindowCounters


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
