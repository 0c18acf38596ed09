"""What counting a request's rate limits costs: `python -m bench.limiter [--redis]`.

CPU per hit with many active keys: each hit is what the service does per API-key request, one
hit in a key's minute and day windows, against limits' MemoryStorage (limits' strategy: test,
then hit, each window) and the service's LocalCounters (take()). Hits are paced (a short sleep
every few hits, like requests arriving over time) so that work a storage does in background
threads is counted too: the figure is the process's CPU time (all threads) per hit, minus the
same loop without any limiter.

With --redis (a throwaway redis-server, or --redis-url URI), the same hit on Redis through the
service's SharedCounters (limits' async Redis storage and one script): the latency of one hit
at a time, hits per second with many at once, the client's CPU per hit, and the commands Redis
ran per hit (from INFO commandstats: one round trip each).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from collections.abc import Callable
from typing import Any

from limits import RateLimitItemPerDay, RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import FixedWindowRateLimiter

from dailyplay.counters import LocalCounters, SharedCounters, Window


def _paced_cpu(hit: Callable[[int], Any], hits: int, pace: int) -> float:
    start = time.process_time()
    for n in range(hits):
        hit(n)
        if n % pace == 0:
            time.sleep(0.001)
    return (time.process_time() - start) / hits * 1e6


def cpu_memory_storage(keys: int, hits: int, pace: int) -> float:
    minute, day = RateLimitItemPerMinute(10**9), RateLimitItemPerDay(10**9)
    names = [str(n) for n in range(keys)]
    limiter = FixedWindowRateLimiter(MemoryStorage())
    for name in names:  # every key active in its windows before measuring
        limiter.hit(minute, name, "1")
        limiter.hit(day, name, "1")

    def hit(n: int) -> None:
        name = names[n % keys]
        for item in (minute, day):
            limiter.test(item, name, "1")
        for item in (minute, day):
            limiter.hit(item, name, "1")

    return _paced_cpu(hit, hits, pace)


def cpu_local_counters(keys: int, hits: int, pace: int) -> float:
    now = int(time.time() * 1000)
    windows = [
        (Window("minute", 10**9, now, str(n)), Window("day", 10**9, now, str(n)))
        for n in range(keys)
    ]
    counters = LocalCounters()

    async def run() -> float:
        for pair in windows:
            await counters.take(pair, now)
        start = time.process_time()
        for n in range(hits):
            await counters.take(windows[n % keys], now)
            if n % pace == 0:
                time.sleep(0.001)
        return (time.process_time() - start) / hits * 1e6

    return asyncio.run(run())


def cpu_baseline(hits: int, pace: int) -> float:
    return _paced_cpu(lambda n: None, hits, pace)


def _commandstats(server: Any) -> dict[str, int]:
    """Calls of each command so far, from INFO commandstats (nothing without a server)."""
    if server is None:
        return {}
    text = server.info("commandstats")
    return {name: int(calls) for name, calls in re.findall(r"cmdstat_(\S+?):calls=(\d+)", text)}


def redis_costs(url: str, server: Any, keys: int, hits: int, concurrency: int) -> dict[str, Any]:
    now = int(time.time() * 1000)
    windows = [
        (Window("minute", 10**9, now, str(n)), Window("day", 10**9, now, str(n)))
        for n in range(keys)
    ]
    lockout = Window("minute", 10**9, now, "198.51.100.1")

    async def run() -> dict[str, Any]:
        counters = SharedCounters(url, 1000)
        try:
            for pair in windows[:100]:  # connections open, script loaded
                assert isinstance(await counters.take(pair, now, lockout), list)
            before = _commandstats(server)
            cpu, started = time.process_time(), time.perf_counter()
            for n in range(hits):
                await counters.take(windows[n % keys], now, lockout)
            one_at_a_time = time.perf_counter() - started
            cpu_one = time.process_time() - cpu
            after = _commandstats(server)

            async def worker(offset: int) -> None:
                for n in range(offset, hits, concurrency):
                    await counters.take(windows[n % keys], now, lockout)

            cpu, started = time.process_time(), time.perf_counter()
            await asyncio.gather(*(worker(i) for i in range(concurrency)))
            many_at_once = time.perf_counter() - started
            cpu_many = time.process_time() - cpu
            assert counters.state == "shared", "Redis failed during the benchmark"
        finally:
            await counters.close()
        commands = {
            name: round((calls - before.get(name, 0)) / hits, 2)
            for name, calls in after.items()
            if calls > before.get(name, 0) and name != "info"
        }
        return {
            "hits": hits,
            "latency_us": round(one_at_a_time / hits * 1e6, 1),
            "client_cpu_us_per_hit": round(cpu_one / hits * 1e6, 1),
            "concurrency": concurrency,
            "hits_per_second": round(hits / many_at_once),
            "client_cpu_us_per_hit_at_once": round(cpu_many / hits * 1e6, 1),
            "redis_commands_per_hit": commands,
        }

    return asyncio.run(run())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.limiter", description=__doc__)
    parser.add_argument("--keys", type=int, nargs="+", default=[1, 1_000, 10_000, 100_000])
    parser.add_argument("--hits", type=int, default=10_000)
    parser.add_argument("--pace", type=int, default=10, help="sleep 1 ms every PACE hits")
    parser.add_argument("--redis", action="store_true", help="also on a throwaway redis-server")
    parser.add_argument("--redis-url", default="", help="also on this Redis (its data stays)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    baseline = cpu_baseline(args.hits, args.pace)
    found: dict[str, Any] = {"baseline_us": round(baseline, 2), "us_per_hit": {}}
    storages = {
        "limits MemoryStorage": cpu_memory_storage,
        "dailyplay LocalCounters": cpu_local_counters,
    }
    for label, measure in storages.items():
        found["us_per_hit"][label] = {
            str(keys): round(measure(keys, args.hits, args.pace) - baseline, 1)
            for keys in args.keys
        }
    if args.redis or args.redis_url:
        from bench.redis import ThrowawayRedis

        server = None if args.redis_url else ThrowawayRedis().start()
        try:
            url = args.redis_url or (server.url if server else "")
            found["redis"] = redis_costs(
                url,
                server,
                max(args.keys),
                args.hits,
                args.concurrency,
            )
        finally:
            if server is not None:
                server.remove()
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    print(f"CPU microseconds per hit (a key's minute + day window), {args.hits} hits")
    print(f"{'active keys':>28}" + "".join(f"{k:>10}" for k in args.keys))
    for label, row in found["us_per_hit"].items():
        print(f"{label:>28}" + "".join(f"{row[str(k)]:>10.1f}" for k in args.keys))
    if "redis" in found:
        redis = found["redis"]
        print(
            f"\nOn Redis (SharedCounters, minute + day + lockout in one script, "
            f"{max(args.keys)} keys):\n"
            f"  one at a time: {redis['latency_us']} µs per hit, "
            f"{redis['client_cpu_us_per_hit']} µs of this process's CPU\n"
            f"  {redis['concurrency']} at once: {redis['hits_per_second']:,} hits/s, "
            f"{redis['client_cpu_us_per_hit_at_once']} µs of this process's CPU per hit\n"
            f"  Redis commands per hit: {redis['redis_commands_per_hit']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
