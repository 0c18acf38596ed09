"""Retention (finished tokens deleted after sessions.retention_days) and `dailyplay backup`."""

from __future__ import annotations

import asyncio
import logging
import shutil
import sqlite3
import threading
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import add_a_page, add_org, cap_pages, cli_json, run_cli, sql

from dailyplay import config
from dailyplay.background import log_failed_pass
from dailyplay.clock import DAY_MS, now_ms
from dailyplay.retention import cutoff_ms, run_retention
from dailyplay.storage import sqlite as db
from dailyplay.storage.sqlite import schema
from dailyplay.storage.types import NewSession

NOW = now_ms()  # the CLI and the server's task use the wall clock


def _add(settings: config.Settings, org: int, **columns: Any) -> bytes:
    """One token row with the given state; times in days relative to NOW."""
    token = uuid.uuid4().bytes
    row = {
        "status": "active",
        "created_at": NOW - 100 * DAY_MS,
        "expires_at": NOW + DAY_MS,
        "consumed_at": None,
        "revoked_at": None,
        **columns,
    }
    sql(
        settings,
        "INSERT INTO sessions (token, org_id, game_id, status, created_at, expires_at,"
        " consumed_at, revoked_at) VALUES (?, ?, 1, ?, ?, ?, ?, ?)",
        (token, org, *row.values()),
    )
    return token


def _days_ago(days: int) -> int:
    return NOW - days * DAY_MS


@pytest.fixture
def states(settings: config.Settings) -> dict[str, bytes]:
    org = add_org(settings)
    return {
        "active": _add(settings, org),
        "expired long ago": _add(settings, org, expires_at=_days_ago(40)),
        "expired lately": _add(settings, org, expires_at=_days_ago(10)),
        "consumed long ago, would expire later": _add(
            settings, org, status="consumed", consumed_at=_days_ago(40), expires_at=NOW + DAY_MS
        ),
        "consumed lately": _add(settings, org, status="consumed", consumed_at=_days_ago(10)),
        "revoked long ago": _add(
            settings, org, status="revoked", revoked_at=_days_ago(31), expires_at=NOW + DAY_MS
        ),
        "revoked lately": _add(settings, org, status="revoked", revoked_at=_days_ago(29)),
    }


def _remaining(settings: config.Settings, states: dict[str, bytes]) -> set[str]:
    present = {bytes(row[0]) for row in sql(settings, "SELECT token FROM sessions")}
    return {name for name, token in states.items() if token in present}


KEPT = {"active", "expired lately", "consumed lately", "revoked lately"}


def test_purge_deletes_what_finished_before_the_cutoff_and_nothing_else(
    settings: config.Settings, states: dict[str, bytes]
) -> None:
    commits: list[str] = []

    async def main() -> None:
        database = db.Database(settings.database)
        await database.open()
        try:
            assert await database.count_finished_sessions(cutoff_ms(NOW, 30)) == 3
            assert len(_remaining(settings, states)) == 7
            await database.run_on_writer(
                lambda conn: conn.set_trace_callback(
                    lambda s: commits.append(s) if s == "COMMIT" else None
                )
            )
            assert await database.purge_finished_sessions(cutoff_ms(NOW, 30), batch=2) == 3
            await database.run_on_writer(lambda conn: conn.set_trace_callback(None))
        finally:
            await database.close()

    asyncio.run(main())
    assert _remaining(settings, states) == KEPT
    assert len(commits) == 2  # batches of 2: two transactions, none holding the lock for all


def _purge_in_the_background(
    settings: config.Settings,
    states: dict[str, bytes],
    before: Callable[[], Awaitable[None]] | None = None,
    **timing: float,
) -> None:
    """Open a Database and run the server's retention task on it (run_retention's timing
    keywords) until a pass has purged or 5 s have passed, then stop both; `before`, if given,
    is awaited once the task has started."""

    async def main() -> None:
        database = db.Database(settings.database)
        await database.open()
        task = asyncio.create_task(run_retention(database, 30, **timing))
        try:
            if before is not None:
                await before()
            for _ in range(100):
                await asyncio.sleep(0.05)
                if len(_remaining(settings, states)) < 7:
                    break
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await database.close()

    asyncio.run(main())


def test_the_server_purges_in_the_background(
    settings: config.Settings, states: dict[str, bytes]
) -> None:
    _purge_in_the_background(settings, states, first_pass=0.05)
    assert _remaining(settings, states) == KEPT


def test_a_pass_that_finds_the_database_busy_says_so_in_one_line_and_the_next_one_purges(
    make_settings: Any, states: dict[str, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    """Another program holding the write lock past the busy timeout is the operator's matter,
    not a fault here: a warning without a traceback, and the pass after it does the work."""
    settings = make_settings(database={"busy_timeout_ms": 50})  # the same file as `states`
    blocker = sqlite3.connect(settings.database.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")

    async def release_once_a_pass_found_it_held() -> None:
        for _ in range(100):
            await asyncio.sleep(0.02)
            if "busy" in caplog.text:
                break
        blocker.execute("ROLLBACK")

    try:
        with caplog.at_level(logging.INFO, logger="dailyplay"):
            _purge_in_the_background(
                settings, states, release_once_a_pass_found_it_held, first_pass=0.01, interval=0.05
            )
    finally:
        blocker.close()
    assert _remaining(settings, states) == KEPT
    busy = [r for r in caplog.records if "busy" in r.getMessage()]
    assert busy, caplog.text
    assert all(r.levelno == logging.WARNING and r.exc_info is None for r in busy)
    assert busy[0].getMessage() == (
        "deleting finished session tokens: the database is busy; will retry"
    )
    assert "failed" not in caplog.text


def test_a_background_pass_logs_a_full_disk_in_one_line_and_a_fault_with_its_traceback(
    settings: config.Settings, caplog: pytest.LogCaptureFixture
) -> None:
    conn = db.connect(settings.database)
    try:
        cap_pages(conn)
        with pytest.raises(sqlite3.OperationalError) as full:
            add_a_page(conn)
    finally:
        conn.close()
    log = logging.getLogger("dailyplay.test")
    with caplog.at_level(logging.INFO, logger="dailyplay"):
        log_failed_pass(log, "storing API key usage", schema.translated(full.value))
        log_failed_pass(log, "storing API key usage", RuntimeError("a bug"))
    refused, fault = caplog.records
    assert refused.levelno == logging.ERROR and refused.exc_info is None
    assert refused.getMessage() == (
        "storing API key usage refused: the database or disk is full; will retry"
    )
    assert fault.levelno == logging.ERROR and fault.getMessage() == (
        "storing API key usage failed; will retry"
    )
    assert fault.exc_info is not None and "a bug" in str(fault.exc_info[1])


def test_the_database_stays_bounded_under_a_steady_workload(settings: config.Settings) -> None:
    """120 days of 300 tokens a day (a third consumed, a tenth revoked, the rest expiring a day
    later), purged daily with 30 days of retention: rows and pages stop growing."""
    org = add_org(settings)
    rows_by_day: dict[int, int] = {}
    pages_by_day: dict[int, int] = {}

    async def main() -> None:
        database = db.Database(settings.database)
        await database.open()
        try:
            for day in range(120):
                now = NOW + day * DAY_MS
                tokens = [uuid.uuid4().bytes for _ in range(300)]
                await asyncio.gather(
                    *(
                        database.insert_session(
                            NewSession(t, org, None, 1, None, "r", None, now, now + DAY_MS)  # type: ignore[arg-type]
                        )
                        for t in tokens
                    )
                )
                await asyncio.gather(
                    *(database.consume_session(t, None, now + 1) for t in tokens[:100])
                )
                await database.run_on_writer(
                    lambda conn, now=now, tokens=tokens: conn.executemany(
                        "UPDATE sessions SET status = 'revoked', revoked_at = ? WHERE token = ?",
                        [(now + 2, t) for t in tokens[100:130]],
                    )
                )
                await database.purge_finished_sessions(cutoff_ms(now, 30))
                count = database.reader.execute("SELECT count(*) FROM sessions").fetchone()[0]
                pages = database.reader.execute("PRAGMA page_count").fetchone()[0]
                rows_by_day[day], pages_by_day[day] = count, pages
        finally:
            await database.close()

    asyncio.run(main())
    # Tokens of the last 30-31 days stay; older ones go.
    assert all(rows <= 32 * 300 for rows in rows_by_day.values())
    assert rows_by_day[119] == rows_by_day[60]
    # Freed pages are reused: the file does not keep growing once retention is in force.
    assert pages_by_day[119] <= pages_by_day[60] * 1.05, (pages_by_day[60], pages_by_day[119])


def test_purge_cli_dry_run_then_purge(settings: config.Settings, tmp_path: Path) -> None:
    org = add_org(settings)
    _add(settings, org, expires_at=_days_ago(400))
    _add(settings, org, status="consumed", consumed_at=_days_ago(400))
    _add(settings, org, status="consumed", consumed_at=_days_ago(5))
    _add(settings, org)
    env = {"DAILYPLAY_DATABASE_PATH": settings.database.path}
    dry = cli_json("purge", "--older-than-days", "7", "--dry-run", env=env)
    assert dry["would_delete"] == 2 and dry["older_than_days"] == 7
    assert sql(settings, "SELECT count(*) FROM sessions") == [(4,)]
    done = cli_json("purge", "--older-than-days", "7", env=env)
    assert done["deleted"] == 2
    assert sql(settings, "SELECT count(*) FROM sessions") == [(2,)]
    assert cli_json("purge", "--older-than-days", "1", env=env)["deleted"] == 1


def test_purge_cli_refuses_nonsense(settings: config.Settings) -> None:
    env = {"DAILYPLAY_DATABASE_PATH": settings.database.path}
    for bad in ("0", "-3", "x", "99999"):
        result = run_cli("purge", "--older-than-days", bad, env=env)
        assert result.returncode == 2 and "older-than-days" in result.stderr, result.stderr
    off = run_cli("purge", env={**env, "DAILYPLAY_SESSIONS_RETENTION_DAYS": "0"})
    assert off.returncode == 2 and "--older-than-days" in off.stderr
    assert cli_json("purge", env=env)["older_than_days"] == 30


# --- backup ---------------------------------------------------------------------------------------


def test_backup_copies_a_database_that_is_being_written(
    settings: config.Settings, tmp_path: Path
) -> None:
    org = add_org(settings)
    stop = threading.Event()
    written = [0]

    def keep_writing() -> None:
        conn = db.connect(settings.database)
        while not stop.is_set():
            with db.transaction(conn):
                db.insert_sessions(
                    conn,
                    [
                        (uuid.uuid4().bytes, org, None, 1, None, None, None, NOW, NOW + DAY_MS)
                        for _ in range(50)
                    ],
                )
            written[0] += 50
        conn.close()

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        while written[0] < 2_000:
            stop.wait(0.01)
        copy = tmp_path / "copy.db"
        data = cli_json(
            "backup", str(copy), env={"DAILYPLAY_DATABASE_PATH": settings.database.path}
        )
    finally:
        stop.set()
        writer.join()
    assert data["integrity"] == "ok" and data["schema_version"] == db.SCHEMA_VERSION
    assert 2_000 <= data["sessions"] <= written[0]
    assert data["sessions"] % 50 == 0  # whole transactions only
    assert not copy.with_name("copy.db-wal").exists()
    conn = sqlite3.connect(copy)
    assert conn.execute("SELECT count(*) FROM sessions").fetchone()[0] == data["sessions"]
    conn.close()
    # Restoring is copying the file into place: a server started on it sees the same tokens.
    restored = tmp_path / "restored.db"
    shutil.copy(copy, restored)
    restored_settings = settings.replace("database", path=str(restored))
    assert sql(restored_settings, "SELECT count(*) FROM sessions") == [(data["sessions"],)]


def test_backup_will_not_overwrite_unless_told(settings: config.Settings, tmp_path: Path) -> None:
    env = {"DAILYPLAY_DATABASE_PATH": settings.database.path}
    add_org(settings)
    dest = tmp_path / "b.db"
    dest.write_text("precious")
    result = run_cli("backup", str(dest), env=env)
    assert result.returncode == 2 and "exists" in result.stderr
    assert dest.read_text() == "precious"
    assert cli_json("backup", str(dest), "--force", env=env)["integrity"] == "ok"
    missing = run_cli("backup", str(tmp_path / "no" / "such" / "dir.db"), env=env)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
