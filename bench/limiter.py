"""CPU cost of one rate-limit hit with many active keys: `python -m bench.limiter`.

Each hit is what the service does per API-key request: test, then count, a minute and a day
window (`limits`' fixed-window strategy), against limits' MemoryStorage and the service's
WindowCounters. Hits are paced (a short sleep every few hits, like requests arriving over
time) so that work a storage does in background threads is counted too: the figure is the
process's CPU time (all threads) per hit, minus the same loop without any limiter.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

from limits import RateLimitItemPerDay, RateLimitItemPerMinute
from limits.storage import MemoryStorage, Storage
from limits.strategies import FixedWindowRateLimiter

from dailyplay.ratelimit import WindowCounters

STORAGES: dict[str, Callable[[], Storage]] = {
    "limits MemoryStorage": MemoryStorage,
    "dailyplay WindowCounters": WindowCounters,
}


def cpu_per_hit(make: Callable[[], Storage] | None, keys: int, hits: int, pace: int) -> float:
    """Microseconds of process CPU per hit, `hits` hits spread round-robin over `keys` keys."""
    minute, day = RateLimitItemPerMinute(10**9), RateLimitItemPerDay(10**9)
    names = [str(n) for n in range(keys)]
    limiter = FixedWindowRateLimiter(make()) if make is not None else None
    if limiter is not None:
        for name in names:  # every key active in its windows before measuring
            limiter.hit(minute, name, "1")
            limiter.hit(day, name, "1")
    start = time.process_time()
    for n in range(hits):
        if limiter is not None:
            name = names[n % keys]
            for item in (minute, day):
                limiter.test(item, name, "1")
            for item in (minute, day):
                limiter.hit(item, name, "1")
        if n % pace == 0:
            time.sleep(0.001)
    return (time.process_time() - start) / hits * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.limiter", description=__doc__)
    parser.add_argument("--keys", type=int, nargs="+", default=[1, 1_000, 10_000, 100_000])
    parser.add_argument("--hits", type=int, default=10_000)
    parser.add_argument("--pace", type=int, default=10, help="sleep 1 ms every PACE hits")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    baseline = cpu_per_hit(None, 1, args.hits, args.pace)
    found: dict[str, Any] = {"baseline_us": round(baseline, 2), "us_per_hit": {}}
    for label, make in STORAGES.items():
        found["us_per_hit"][label] = {
            str(keys): round(cpu_per_hit(make, keys, args.hits, args.pace) - baseline, 1)
            for keys in args.keys
        }
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    print(f"CPU microseconds per hit (minute + day window, test then hit), {args.hits} hits")
    print(f"{'active keys':>28}" + "".join(f"{k:>10}" for k in args.keys))
    for label, row in found["us_per_hit"].items():
        print(f"{label:>28}" + "".join(f"{row[str(k)]:>10.1f}" for k in args.keys))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
