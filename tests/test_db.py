"""The storage layer's group commit, without HTTP: writes that arrive together share one
transaction, and each keeps its own outcome."""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import add_org, sql

from dailyplay import config, db

NOW = 1_800_000_000_000
LATER = NOW + 3_600_000


def run(settings: config.Settings, scenario: Any) -> Any:
    """Run scenario(database, commits) on an open Database; commits counts COMMIT statements."""

    async def main() -> Any:
        database = db.Database(settings.database)
        await database.open()
        commits: list[str] = []
        await database.run_on_writer(
            lambda conn: conn.set_trace_callback(
                lambda statement: commits.append(statement) if statement == "COMMIT" else None
            )
        )
        try:
            return await scenario(database, commits)
        finally:
            await database.close()

    return asyncio.run(main())


def session_values(org: int, token: bytes, expires_at: int = LATER) -> tuple[Any, ...]:
    return (token, org, None, 1, None, None, None, NOW, expires_at)


@pytest.fixture
def org(settings: config.Settings) -> int:
    return add_org(settings)


def test_concurrent_inserts_share_commits_and_each_gets_its_own_id(
    settings: config.Settings, org: int
) -> None:
    tokens = [uuid.uuid4().bytes for _ in range(300)]

    async def scenario(database: db.Database, commits: list[str]) -> tuple[list[int], int]:
        ids = await asyncio.gather(
            *(database.insert_session(session_values(org, token)) for token in tokens)
        )
        return list(ids), len(commits)

    ids, commits = run(settings, scenario)
    stored = dict(sql(settings, "SELECT token, id FROM sessions"))
    assert [stored[token] for token in tokens] == ids
    assert len(set(ids)) == 300
    assert commits < 10  # 300 writes, a handful of group commits (at most 256 per group)


def test_a_token_asked_for_many_times_in_one_group_is_won_once(
    settings: config.Settings, org: int
) -> None:
    contested, quiet, expired = (uuid.uuid4().bytes for _ in range(3))
    for token, expires in ((contested, LATER), (quiet, LATER), (expired, NOW - 1)):
        run(settings, lambda d, _c, t=token, e=expires: d.insert_session(session_values(org, t, e)))

    async def scenario(database: db.Database, commits: list[str]) -> list[Any]:
        asks = [database.consume_session(contested, f"player-{i}", NOW) for i in range(20)]
        asks.append(database.consume_session(quiet, "quiet-player", NOW))
        asks.append(database.consume_session(expired, "late-player", NOW))
        asks.append(database.consume_session(uuid.uuid4().bytes, "nobody", NOW))
        rows = await asyncio.gather(*asks)
        assert len(commits) == 1  # all of it in one group commit
        return rows

    rows = run(settings, scenario)
    contested_rows = rows[:20]
    assert [row is not None for row in contested_rows] == [True] + [False] * 19
    assert rows[20] is not None and rows[20]["status"] == "consumed"
    assert rows[21] is None and rows[22] is None
    stored = dict(
        (token, (status, player, consumed_at))
        for token, status, player, consumed_at in sql(
            settings, "SELECT token, status, player_uuid, consumed_at FROM sessions"
        )
    )
    # The winner's own values were stored.
    assert stored[contested] == ("consumed", "player-0", NOW)
    assert stored[quiet] == ("consumed", "quiet-player", NOW)
    assert stored[expired][0] == "active"


def test_a_failing_write_fails_alone_and_the_rest_of_its_group_commits(
    settings: config.Settings, org: int
) -> None:
    taken = uuid.uuid4().bytes
    run(settings, lambda d, _c: d.insert_session(session_values(org, taken)))
    fresh = [uuid.uuid4().bytes for _ in range(5)]

    async def scenario(database: db.Database, commits: list[str]) -> list[Any]:
        writes = [database.insert_session(session_values(org, token)) for token in fresh[:3]]
        writes.append(database.insert_session(session_values(org, taken)))  # duplicate token
        writes += [database.insert_session(session_values(org, token)) for token in fresh[3:]]
        return await asyncio.gather(*writes, return_exceptions=True)

    outcomes = run(settings, scenario)
    assert isinstance(outcomes[3], sqlite3.IntegrityError)
    assert all(isinstance(outcome, int) for i, outcome in enumerate(outcomes) if i != 3)
    stored = {token for (token,) in sql(settings, "SELECT token FROM sessions")}
    assert stored == {taken, *fresh}


def test_a_locked_database_fails_every_write_of_the_group_and_stores_nothing(
    make_settings, org: int
) -> None:
    settings = make_settings(database={"busy_timeout_ms": 100})
    blocker = sqlite3.connect(settings.database.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:

        async def scenario(database: db.Database, commits: list[str]) -> list[Any]:
            writes = [
                database.insert_session(session_values(org, uuid.uuid4().bytes)) for _ in range(4)
            ]
            return await asyncio.gather(*writes, return_exceptions=True)

        outcomes = run(settings, scenario)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert all(isinstance(o, sqlite3.OperationalError) and "locked" in str(o) for o in outcomes)
    assert sql(settings, "SELECT count(*) FROM sessions") == [(0,)]


def test_commits_leave_checkpoints_to_the_checkpointer_which_copies_them_soon(
    settings: config.Settings, org: int, tmp_path
) -> None:
    """The writer's COMMITs never run a checkpoint (wal_autocheckpoint is off on it); the
    checkpointer thread copies committed pages into the database file within moments, so the
    main file alone (no -wal) holds the rows while the server still runs."""
    tokens = [uuid.uuid4().bytes for _ in range(50)]

    async def scenario(database: db.Database, commits: list[str]) -> tuple[int, int]:
        autocheckpoint = await database.run_on_writer(
            lambda conn: conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
        )
        await asyncio.gather(
            *(database.insert_session(session_values(org, token)) for token in tokens)
        )
        found = 0
        for _ in range(40):  # up to 4 s; the checkpointer runs every 0.25 s
            await asyncio.sleep(0.1)
            copy = tmp_path / "main-file-only.db"
            copy.write_bytes((tmp_path / "dailyplay.db").read_bytes())
            with sqlite3.connect(copy) as conn:
                found = conn.execute("SELECT count(*) FROM sessions").fetchone()[0]
            copy.unlink()
            if found == len(tokens):
                break
        return autocheckpoint, found

    autocheckpoint, found = run(settings, scenario)
    assert autocheckpoint == 0
    assert found == len(tokens)


def _take_turns(path: str, seconds: float, results: Any) -> None:
    """In a process of its own: take the writer lock again and again, holding it for 2 ms of
    CPU each time, straight back after each release."""

    async def main() -> tuple[int, float]:
        lock = db.WriterLock(path)
        turns, longest = 0, 0.0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            asked = time.monotonic()
            await lock.acquire()
            longest = max(longest, time.monotonic() - asked)
            turns += 1
            busy_until = time.monotonic() + 0.002
            while time.monotonic() < busy_until:  # working, as a group commit does
                pass
            lock.release()
        lock.close()
        return turns, longest

    results.put(asyncio.run(main()))


def _burn(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_two_processes_that_write_all_the_time_take_turns(tmp_path: Path) -> None:
    """flock alone let a process that released the lock take it straight back while the other
    stayed blocked (writes waited 0.5-0.9 s with two busy workers): on a busy machine the
    blocked one, woken by the release, is not running yet when the other asks again. Two more
    processes keep both cores busy meanwhile."""
    context = multiprocessing.get_context("spawn")
    burners = [context.Process(target=_burn, args=(3.0,)) for _ in range(2)]
    for burner in burners:
        burner.start()
    results = context.Queue()
    path = str(tmp_path / "turns.db")
    workers = [context.Process(target=_take_turns, args=(path, 2.0, results)) for _ in range(2)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=60) for _ in workers]
    for process in workers + burners:
        process.join(timeout=10)
    (turns_a, longest_a), (turns_b, longest_b) = outcomes
    assert min(turns_a, turns_b) > 0.3 * (turns_a + turns_b), outcomes
    assert max(longest_a, longest_b) < 0.1, outcomes
