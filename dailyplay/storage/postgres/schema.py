"""PostgreSQL: the schema and its migrations, and the translation of asyncpg's errors."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING, NoReturn

from ..errors import SchemaError, StorageBusy, StorageError, StorageFull, StorageUnavailable

if TYPE_CHECKING:
    import asyncpg

SCHEMA_FILE = "schema.sql"

# The schema's version lives in a table of its own (SQLite keeps it in PRAGMA user_version).
VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS dailyplay_schema ("
    " id integer PRIMARY KEY CHECK (id = 1), version integer NOT NULL)"
)
# Migrations of every process and host take turns on this advisory lock (any constant will do;
# this one is 'dailyplay' in ASCII, cut to 63 bits).
MIGRATION_LOCK = 0x6461696C79706C61


def schema_text() -> str:
    """The PostgreSQL schema shipped beside this module."""
    return resources.files(__package__).joinpath(SCHEMA_FILE).read_text(encoding="utf-8")


# Ordered, named steps with the same numbers as SQLite's (storage.sqlite.schema.MIGRATIONS), so
# that a schema version means the same on both engines. The schema file is the whole current
# schema and every statement in it is IF NOT EXISTS: step 1 makes a new database complete.
MIGRATIONS: list[tuple[str, Callable[[], str]]] = [
    ("initial schema", schema_text),
    ("readiness probe row; retention indexes; audit log; key usage", schema_text),
    ("sessions by organization and external reference", schema_text),
    ("idempotency keys of create-session", schema_text),
]
SCHEMA_VERSION = len(MIGRATIONS)


async def read_version(conn: asyncpg.Connection) -> int:
    """The database's schema version: 0 when it has none yet."""
    exists = await conn.fetchval("SELECT to_regclass('dailyplay_schema') IS NOT NULL")
    if not exists:
        return 0
    version = await conn.fetchval("SELECT version FROM dailyplay_schema WHERE id = 1")
    return 0 if version is None else int(version)


async def migrate(conn: asyncpg.Connection) -> int:
    """Bring the database to SCHEMA_VERSION, each step committed with its version (DDL is
    transactional here); returns it. Concurrent migrations wait for each other."""
    while True:
        version = await read_version(conn)
        if version > SCHEMA_VERSION:
            raise SchemaError(
                f"database schema version {version} is newer than this dailyplay "
                f"(knows up to {SCHEMA_VERSION}); upgrade dailyplay"
            )
        if version == SCHEMA_VERSION:
            return version
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            # Another process may have migrated while we waited for the lock.
            if await read_version(conn) == version:
                _name, script = MIGRATIONS[version]
                await conn.execute(VERSION_TABLE)
                await conn.execute(script())
                await conn.execute(
                    "INSERT INTO dailyplay_schema (id, version) VALUES (1, $1)"
                    " ON CONFLICT (id) DO UPDATE SET version = excluded.version",
                    version + 1,
                )


def translated(exc: BaseException) -> BaseException:
    """exc as the storage layer's own exception when it is one of the conditions callers
    handle (busy, full, unavailable); any other exception as it is."""
    import asyncpg

    kind: type[StorageError] | None = None
    if isinstance(exc, asyncpg.DiskFullError):
        kind = StorageFull
    elif isinstance(
        exc,
        asyncpg.QueryCanceledError  # statement_timeout
        | asyncpg.TransactionRollbackError  # serialization failure, deadlock
        | asyncpg.LockNotAvailableError
        | asyncpg.TooManyConnectionsError,
    ):
        kind = StorageBusy
    elif isinstance(
        exc,
        asyncpg.PostgresConnectionError  # the connection broke or was refused
        | asyncpg.OperatorInterventionError  # shutting down, starting up, crashed
        | asyncpg.InsufficientResourcesError  # out of memory
        | asyncpg.ReadOnlySQLTransactionError  # a standby (mid fail-over)
        | asyncpg.InvalidAuthorizationSpecificationError  # the role or its password refused
        | asyncpg.InvalidCatalogNameError  # no such database
        | asyncpg.InternalClientError  # the protocol out of step after the server cut a session
        | OSError  # refused, reset, unreachable
        | asyncio.TimeoutError,  # connecting, or a reply, took too long
    ):
        kind = StorageUnavailable
    if kind is None:
        # Leaving a transaction on a connection the server has just cut raises InterfaceError
        # ("the underlying connection is closed") while the cut is being handled: that cut is
        # what happened.
        if isinstance(exc, asyncpg.InterfaceError) and exc.__context__ is not None:
            cause = translated(exc.__context__)
            if isinstance(cause, StorageError):
                return cause
        return exc
    error = kind(_describe(exc))
    error.__cause__ = exc
    return error


def _describe(exc: BaseException) -> str:
    """A one-line description of a driver error for logs (never the connection string)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


def reraise(exc: BaseException) -> NoReturn:
    """Raise exc, translated (from inside the except clause that caught it)."""
    raise translated(exc)
