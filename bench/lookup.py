"""list-sessions by external_ref in a large table: `python -m bench.lookup`.

Seeds a database with --tokens tokens (two per external_ref, as an order and its retry) on
SQLite and, with --engines postgresql, on a throwaway PostgreSQL; then times the look-up
list-sessions makes for a random reference (the Store's list_sessions, a page of 50), with the
index that serves it and, for comparison, a few without it. Prints microseconds per look-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.__main__ import prepare_instance, seed_tokens
from dailyplay.clock import now_ms
from dailyplay.storage import Store, with_store
from dailyplay.storage.types import SessionQuery

INDEX = "sessions_by_org_ref"


def _ref(n: int) -> str:
    return f"order-{n // 2}"


async def _timed(store: Store, org_id: int, refs: list[str]) -> list[float]:
    found, spent = 0, []
    for ref in refs:
        query = SessionQuery(now=now_ms(), limit=51, external_ref=ref)
        started = time.perf_counter()
        found += len(await store.list_sessions(org_id, query))
        spent.append((time.perf_counter() - started) * 1e6)
    assert found == 2 * len(refs), "every reference has two tokens"
    return spent


def measure(
    engine: str, tokens: int, lookups: int, without: int, work: Path, url: str
) -> dict[str, Any]:
    instance = prepare_instance(work / engine, 1, database_url=url)
    started = time.monotonic()
    seed_tokens(instance, tokens, None, _ref)
    seeded_s = time.monotonic() - started
    rng = random.Random(7)  # noqa: S311 - which references to look up
    refs = [_ref(rng.randrange(tokens)) for _ in range(lookups)]

    async def run(store: Store) -> dict[str, Any]:
        await _timed(store, instance.org_id, refs[:50])  # warm
        with_index = await _timed(store, instance.org_id, refs)
        return {
            "p50_us": round(statistics.median(with_index), 1),
            "p99_us": round(sorted(with_index)[int(len(with_index) * 0.99) - 1], 1),
        }

    found: dict[str, Any] = {"tokens": tokens, "seeded_s": round(seeded_s, 1)}
    found["with_index"] = asyncio.run(with_store(instance.settings.database, run))
    if without:
        _drop_index(instance.settings.database)

        async def run_without(store: Store) -> dict[str, Any]:
            spent = await _timed(store, instance.org_id, refs[:without])
            return {"p50_us": round(statistics.median(spent), 1), "lookups": without}

        found["without_index"] = asyncio.run(with_store(instance.settings.database, run_without))
    return found


def _drop_index(database: Any) -> None:
    if database.engine == "postgresql":
        import asyncpg

        async def drop() -> None:
            conn = await asyncpg.connect(database.url)
            try:
                await conn.execute(f"DROP INDEX {INDEX}")
            finally:
                await conn.close()

        asyncio.run(drop())
        return
    from dailyplay.storage import sqlite as db

    conn = db.connect(database)
    try:
        conn.execute(f"DROP INDEX {INDEX}")
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lookup", description=__doc__)
    parser.add_argument("--tokens", type=int, default=5_000_000)
    parser.add_argument("--lookups", type=int, default=2_000)
    parser.add_argument("--without", type=int, default=5, help="look-ups without the index")
    parser.add_argument("--engines", nargs="+", default=["sqlite"])
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="dailyplay-lookup-") as tmp:
        for engine in args.engines:
            server, url = None, ""
            if engine == "postgresql":
                from bench.postgres import ThrowawayPostgres

                server = ThrowawayPostgres(durable=False).start()
                server.setup_role()
                url = server.create_database()
            try:
                results[engine] = measure(
                    engine, args.tokens, args.lookups, args.without, Path(tmp), url
                )
            finally:
                if server is not None:
                    server.remove()
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
