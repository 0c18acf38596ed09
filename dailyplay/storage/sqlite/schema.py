"""SQLite: the schema and its migrations, connections and their PRAGMAs, error codes."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import NoReturn

from ...config import DatabaseSettings
from ..errors import SchemaError, StorageBusy, StorageError, StorageFull, StorageUnavailable

SCHEMA_FILE = "schema.sql"

# PRAGMA journal_size_limit: when the log starts over, its file is cut back to this size (after
# a long reader, such as a backup, let it grow); SQLite reuses the file up to it.
WAL_FILE_LIMIT_BYTES = 64 * 1024 * 1024


def schema_text() -> str:
    """The schema shipped in the wheel, or the top-level schema.sql of a source checkout."""
    packaged = resources.files("dailyplay").joinpath(SCHEMA_FILE)
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    return (Path(__file__).resolve().parents[3] / SCHEMA_FILE).read_text(encoding="utf-8")


def _statements(script: str) -> list[str]:
    """Split a script into complete statements (executescript would COMMIT on its own)."""
    statements, buffer = [], ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            if buffer.strip():
                statements.append(buffer.strip())
            buffer = ""
    if buffer.strip() and not all(
        part.strip().startswith("--") or not part.strip() for part in buffer.splitlines()
    ):
        raise SchemaError("schema.sql ends with an incomplete statement")
    return statements


# Ordered, named migration steps; step N brings the file to PRAGMA user_version N.
# schema.sql is the whole current schema and every statement in it is IF NOT EXISTS: step 1
# makes a new file complete, and a step that only adds tables and indexes runs it again, which
# creates what an older file lacks and leaves the rest alone.
MIGRATIONS: list[tuple[str, Callable[[], str]]] = [
    ("initial schema", schema_text),
    ("readiness probe row; retention indexes; audit log; key usage", schema_text),
    ("sessions by organization and external reference", schema_text),
    ("idempotency keys of create-session", schema_text),
]
SCHEMA_VERSION = len(MIGRATIONS)


def _connection_pragmas(
    settings: DatabaseSettings, read_only: bool, busy_timeout_ms: int | None = None
) -> list[str]:
    busy_timeout_ms = settings.busy_timeout_ms if busy_timeout_ms is None else busy_timeout_ms
    pragmas = [
        f"PRAGMA busy_timeout = {int(busy_timeout_ms)}",
        "PRAGMA foreign_keys = ON",
        f"PRAGMA synchronous = {settings.synchronous.upper()}",
        # Token lookups on a large table stay in memory: 64 MiB page cache and reads through
        # a memory map of up to 1 GiB (SQLite falls back to read() past it).
        "PRAGMA cache_size = -65536",
        "PRAGMA mmap_size = 1073741824",
    ]
    if read_only:
        pragmas.append("PRAGMA query_only = ON")
    else:
        pragmas.append(f"PRAGMA journal_size_limit = {int(WAL_FILE_LIMIT_BYTES)}")
    return pragmas


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the file to SCHEMA_VERSION, each step committed with its version; returns it."""
    conn.execute("PRAGMA journal_mode = WAL")
    while True:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise SchemaError(
                f"database schema version {version} is newer than this dailyplay "
                f"(knows up to {SCHEMA_VERSION}); upgrade dailyplay"
            )
        if version == SCHEMA_VERSION:
            return int(version)
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Another process may have migrated while we waited for the lock.
            current = conn.execute("PRAGMA user_version").fetchone()[0]
            if current == version:
                _name, script = MIGRATIONS[version]
                for statement in _statements(script()):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def _open(
    settings: DatabaseSettings, read_only: bool = False, busy_timeout_ms: int | None = None
) -> sqlite3.Connection:
    """A connection to settings.path: autocommit, rows by name, the service's PRAGMAs."""
    busy_timeout_ms = settings.busy_timeout_ms if busy_timeout_ms is None else busy_timeout_ms
    conn = sqlite3.connect(settings.path, isolation_level=None, timeout=busy_timeout_ms / 1000)
    conn.row_factory = sqlite3.Row
    for pragma in _connection_pragmas(settings, read_only, busy_timeout_ms):
        conn.execute(pragma)
    return conn


def check_directory(settings: DatabaseSettings) -> None:
    """SchemaError unless the database file's directory exists (SQLite would make the file,
    not the directory)."""
    path = Path(settings.path)
    if path.parent and not path.parent.exists():
        raise SchemaError(f"database directory does not exist: {path.parent}")


def connect(settings: DatabaseSettings, *, migrate_schema: bool = True) -> sqlite3.Connection:
    """A synchronous connection (autocommit; use `transaction`) with the schema current."""
    check_directory(settings)
    conn = _open(settings)
    if migrate_schema:
        migrate(conn)
    return conn


def _primary_code(exc: BaseException) -> int:
    """SQLite's primary result code of exc (the low byte of an extended code); 0 if none."""
    return int(getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF


def is_busy(exc: BaseException) -> bool:
    """exc is SQLite's "database is locked": another connection held a lock past the busy
    timeout (SQLITE_BUSY), or one of this connection's own tables was locked (SQLITE_LOCKED)."""
    return _primary_code(exc) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def is_full(exc: BaseException) -> bool:
    """exc is SQLite refusing a write for want of space (SQLITE_FULL): the disk or its quota
    is full, or the file reached its page limit."""
    return _primary_code(exc) == sqlite3.SQLITE_FULL


# SQLite's result codes for a file that cannot be read or written now, rather than a fault in
# the program or the file's contents.
_UNAVAILABLE_CODES = frozenset(
    {
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
    }
)


def translated(exc: BaseException) -> BaseException:
    """exc as the storage layer's own exception when it is one of the conditions callers
    handle (busy, full, unavailable); any other exception as it is."""
    if not isinstance(exc, sqlite3.Error) or isinstance(exc, sqlite3.IntegrityError):
        return exc
    code = _primary_code(exc)
    kind: type[StorageError] | None = None
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        kind = StorageBusy
    elif code == sqlite3.SQLITE_FULL:
        kind = StorageFull
    elif code in _UNAVAILABLE_CODES:
        kind = StorageUnavailable
    if kind is None:
        return exc
    error = kind(str(exc))
    error.__cause__ = exc
    return error


def reraise(exc: sqlite3.Error) -> NoReturn:
    """Raise exc, translated (from inside the except clause that caught it)."""
    raise translated(exc)


def checkpoint(conn: sqlite3.Connection, mode: str = "PASSIVE") -> tuple[int, int, int]:
    """A checkpoint in `mode` (PASSIVE, the default, never waits for readers or the writer):
    (1 if it could not finish, because another checkpoint was running or, for RESTART, a
    reader stayed, else 0; frames in the WAL; frames copied)."""
    busy, frames, copied = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
    return int(busy), int(frames), int(copied)


def checkpoint_to_start_over(conn: sqlite3.Connection, wait_ms: int) -> tuple[int, int, int]:
    """A RESTART checkpoint: copy every frame, then wait (at most wait_ms) until no reader is
    still on the log's frames, so that the next write starts the log over. Returns as
    checkpoint() does; 1 first when it gave up waiting (the next pass tries again)."""
    (previous,) = conn.execute("PRAGMA busy_timeout").fetchone()
    conn.execute(f"PRAGMA busy_timeout = {int(wait_ms)}")
    try:
        return checkpoint(conn, "RESTART")
    finally:
        conn.execute(f"PRAGMA busy_timeout = {int(previous)}")


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
