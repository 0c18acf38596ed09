"""PostgreSQL's own machinery: the role it runs as, connecting, migrations, errors, backups.

The API and the Store contract run on PostgreSQL too (the both_engines modules); the properties
of several processes and hosts sharing one database are in test_postgres_hosts.py.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import subprocess
import sys

import pytest
from conftest import database_env, run_cli, sql, with_store

from dailyplay import config
from dailyplay.storage import SCHEMA_VERSION, Store, store_for
from dailyplay.storage.errors import (
    SchemaError,
    StorageBusy,
    StorageFull,
    StorageUnavailable,
)
from dailyplay.storage.postgres import translated

pytestmark = pytest.mark.postgres


def test_the_service_runs_as_a_role_that_is_no_superuser(settings: config.Settings) -> None:
    """Every test on PostgreSQL runs as this role: it owns its database and nothing more."""
    [(superuser, create_role, create_db)] = sql(
        settings,
        "SELECT rolsuper, rolcreaterole, rolcreatedb FROM pg_roles WHERE rolname = current_user",
    )
    assert (superuser, create_role, create_db) == (False, False, False)
    initialized = json.loads(run_cli("init-db", env=database_env(settings)).stdout)
    assert initialized["schema_version"] == SCHEMA_VERSION
    assert initialized["database"] == settings.database.display


def test_the_password_may_come_from_pgpassword_and_never_shows(
    settings: config.Settings, postgres_server
) -> None:
    from bench.postgres import PASSWORD

    url = settings.database.url.replace(f":{PASSWORD}@", "@")
    assert PASSWORD not in url
    env = {**database_env(settings), "DAILYPLAY_DATABASE_URL": url}
    refused = run_cli("init-db", env={**env, "PGPASSWORD": "wrong"})
    assert refused.returncode == 1
    assert "cannot open database postgresql://dailyplay@127.0.0.1" in refused.stderr
    assert "password authentication failed" in refused.stderr
    assert "wrong" not in refused.stderr
    done = run_cli("init-db", env={**env, "PGPASSWORD": PASSWORD})
    assert done.returncode == 0, done.stderr
    # A url with the password in it is shown without it.
    shown = run_cli("init-db", env=database_env(settings))
    assert shown.returncode == 0 and PASSWORD not in shown.stdout + shown.stderr


def test_a_database_out_of_reach_is_a_clear_error_at_start(settings: config.Settings) -> None:
    from conftest import free_port

    url = f"postgresql://dailyplay:pw@127.0.0.1:{free_port()}/nowhere"
    result = run_cli("init-db", env={"DAILYPLAY_DATABASE_URL": url})
    assert result.returncode == 1
    assert result.stderr.startswith("dailyplay: error: cannot open database postgresql://")
    assert "pw@" not in result.stderr and "Traceback" not in result.stderr
    served = run_cli("serve", "--port", str(free_port()), env={"DAILYPLAY_DATABASE_URL": url})
    assert served.returncode == 1 and "cannot open database" in served.stderr


def test_without_the_driver_the_error_says_which_extra_to_install(
    settings: config.Settings,
) -> None:
    # As on an install without the [postgres] extra: asyncpg cannot be imported.
    code = (
        "import sys; sys.modules['asyncpg'] = None; "
        "from dailyplay.cli import main; sys.exit(main(['init-db']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**_base_env(), **database_env(settings)},
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "pip install 'dailyplay[postgres]'" in result.stderr
    assert "Traceback" not in result.stderr


def _base_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("DAILYPLAY_")}


def test_backup_says_to_use_pg_dump(settings: config.Settings, tmp_path) -> None:
    result = run_cli("backup", str(tmp_path / "copy.db"), env=database_env(settings))
    assert result.returncode == 2
    assert "on PostgreSQL use pg_dump" in result.stderr
    assert "pg_dump --format=custom" in result.stderr
    assert not (tmp_path / "copy.db").exists()


def test_a_database_newer_than_the_program_is_refused(
    settings: config.Settings, fresh_postgres_url: str
) -> None:
    settings = settings.replace("database", url=fresh_postgres_url)
    with_store(settings, lambda store: store.schema_version())
    sql(settings, "UPDATE dailyplay_schema SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(SchemaError, match="newer than this dailyplay"):
        with_store(settings, lambda store: store.schema_version())
    result = run_cli("init-db", env=database_env(settings))
    assert result.returncode == 1 and "newer than this dailyplay" in result.stderr


def _open_and_report(url: str, queue) -> None:
    """One process opening a store on a new database (so migrating it), reporting its version."""
    settings = config.Settings().replace("database", url=url)

    async def main() -> int:
        store = store_for(settings.database)
        await store.open()
        try:
            return await store.schema_version()
        finally:
            await store.close()

    queue.put(asyncio.run(main()))


def test_processes_migrating_one_new_database_at_once_take_turns(
    settings: config.Settings, fresh_postgres_url: str
) -> None:
    settings = settings.replace("database", url=fresh_postgres_url)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_open_and_report, args=(settings.database.url, queue)) for _ in range(4)
    ]
    for proc in procs:
        proc.start()
    versions = [queue.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0
    assert versions == [SCHEMA_VERSION] * 4
    assert sql(settings, "SELECT count(*), max(version) FROM dailyplay_schema") == [
        (1, SCHEMA_VERSION)
    ]


def test_driver_errors_become_the_storage_layers_own() -> None:
    import asyncpg

    cases = [
        (asyncpg.DiskFullError("could not extend file"), StorageFull),
        (asyncpg.QueryCanceledError("canceling statement due to statement timeout"), StorageBusy),
        (asyncpg.LockNotAvailableError("canceling statement due to lock timeout"), StorageBusy),
        (asyncpg.DeadlockDetectedError("deadlock detected"), StorageBusy),
        (asyncpg.TooManyConnectionsError("too many clients"), StorageBusy),
        (asyncpg.AdminShutdownError("terminating connection"), StorageUnavailable),
        (asyncpg.CannotConnectNowError("the database system is starting up"), StorageUnavailable),
        (asyncpg.ReadOnlySQLTransactionError("read-only transaction"), StorageUnavailable),
        (asyncpg.ConnectionDoesNotExistError("connection was closed"), StorageUnavailable),
        (asyncpg.InvalidPasswordError("password authentication failed"), StorageUnavailable),
        (asyncpg.InvalidCatalogNameError('database "x" does not exist'), StorageUnavailable),
        (ConnectionRefusedError(111, "Connect call failed"), StorageUnavailable),
        (TimeoutError(), StorageUnavailable),
    ]
    for error, kind in cases:
        mapped = translated(error)
        assert isinstance(mapped, kind), (error, mapped)
        assert mapped.__cause__ is error
    # Leaving a transaction on a connection the server cut: the cut is what is reported.
    cut = asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation")
    try:
        try:
            raise cut
        except asyncpg.ConnectionDoesNotExistError:
            raise asyncpg.InterfaceError("the underlying connection is closed") from None
    except asyncpg.InterfaceError as leaving:
        mapped = translated(leaving)
    assert isinstance(mapped, StorageUnavailable) and mapped.__cause__ is cut
    # A fault in the program (or the schema) stays what it is: a 500, not a 503.
    misuse = asyncpg.InterfaceError("cannot perform operation: another operation is in progress")
    for error in (asyncpg.UndefinedColumnError("no such column"), ValueError("x"), misuse):
        assert translated(error) is error


def test_reads_and_writes_of_a_store_opened_twice_see_each_other(
    settings: config.Settings,
) -> None:
    """Two stores (two processes' pools) on one database: a write of one is read by the other
    at once, without a cache in between."""
    from dailyplay.storage.types import CLI

    async def main() -> tuple[object, object]:
        first, second = store_for(settings.database), store_for(settings.database)
        await first.open()
        await second.open()
        try:
            org = await first.create_org("Acme", "business", "org_1", 1, CLI)
            seen = await second.get_org(org.id)
            await second.set_org_tier(org.id, "free", 2, CLI)
            return seen, await first.get_org(org.id)
        finally:
            await first.close()
            await second.close()

    seen, changed = asyncio.run(main())
    assert seen is not None and seen.tier == "business"  # type: ignore[attr-defined]
    assert changed is not None and changed.tier == "free"  # type: ignore[attr-defined]


def test_usage_counted_in_a_process_is_written_when_it_closes(settings: config.Settings) -> None:
    import uuid

    from dailyplay.keys import new_api_key
    from dailyplay.storage.types import CLI, NewSession

    now = 1_800_000_000_000

    async def work(store: Store) -> int:
        org = await store.create_org("Acme", "business", None, now, CLI)
        _raw, values = new_api_key(org.id, "CRM", now, per_minute=60, per_day=1000)
        key = await store.insert_api_key(values, CLI)
        for _ in range(3):
            token = uuid.uuid4().bytes
            await store.insert_session(
                NewSession(token, org.id, key.id, 1, None, None, None, now, now + 60_000)
            )
        await store.consume_session(token, None, now + 1)
        return key.id

    key_id = with_store(settings, work)
    assert sql(
        settings,
        "SELECT sum(created), sum(consumed) FROM key_usage WHERE api_key_id = ?",
        (key_id,),
    ) == [(3, 1)]


def test_a_refusal_of_the_service_s_own_keeps_the_connection(settings: config.Settings) -> None:
    """A Duplicate raised inside a transaction rolls it back and leaves the connection fit:
    the pool keeps it rather than closing it and opening another."""
    from dailyplay.storage.errors import Duplicate
    from dailyplay.storage.types import CLI

    async def work(store: Store) -> tuple[int, int, list[object]]:
        await store.create_org("Acme", "business", "org_dup", 1, CLI)
        before = store.pool.size  # type: ignore[attr-defined]
        refused = []
        for _ in range(3):
            try:
                await store.create_org("Again", "business", "org_dup", 2, CLI)
            except Duplicate as exc:
                refused.append(exc)
        return before, store.pool.size, refused  # type: ignore[attr-defined]

    before, after, refused = with_store(settings, work)
    assert len(refused) == 3
    assert after == before
    assert sql(settings, "SELECT count(*) FROM orgs") == [(1,)]
