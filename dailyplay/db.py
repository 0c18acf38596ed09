"""The SQLite layer: connections, PRAGMAs, migrations and every SQL statement the service runs.

The server uses `Database`: one writer thread that owns the writing connection and commits writes
in groups (each group one `BEGIN IMMEDIATE` transaction, run in one call to that thread), and one
read-only connection used directly for reads. The CLI uses the synchronous helpers on a plain
sqlite3 connection.
Everything else calls the named operations here and never holds SQL of its own.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import functools
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from .clock import HOUR_MS, iso_from_ms
from .config import DatabaseSettings

T = TypeVar("T")
log = logging.getLogger("dailyplay.db")

SCHEMA_FILE = "schema.sql"


class KeyChanged(Exception):
    """The API key's row is no longer the one the request was admitted on; nothing was stored."""


class SchemaError(RuntimeError):
    """The database file's schema is newer than this program, or cannot be migrated."""


def schema_text() -> str:
    """The schema shipped in the wheel, or the top-level schema.sql of a source checkout."""
    packaged = resources.files("dailyplay").joinpath(SCHEMA_FILE)
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    return (Path(__file__).resolve().parent.parent / SCHEMA_FILE).read_text(encoding="utf-8")


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


def connect(settings: DatabaseSettings, *, migrate_schema: bool = True) -> sqlite3.Connection:
    """A synchronous connection (autocommit; use `transaction`) with the schema current."""
    path = Path(settings.path)
    if path.parent and not path.parent.exists():
        raise SchemaError(f"database directory does not exist: {path.parent}")
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


# --- audit ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Actor:
    """Who makes a change, for the audit log: a JWT `sub` with the caller's address, or 'cli'."""

    name: str
    client_ip: str | None = None


CLI = Actor("cli")
AUDIT_COLUMNS = "id, at, org_id, actor, action, api_key_id, client_ip, changes"


def record_audit(
    conn: sqlite3.Connection,
    at: int,
    org_id: int,
    by: Actor,
    action: str,
    api_key_id: int | None,
    changes: dict[str, Any] | None,
) -> None:
    """One audit entry, in the caller's transaction (so it exists exactly when the change does)."""
    conn.execute(
        "INSERT INTO audit_log (at, org_id, actor, action, api_key_id, client_ip, changes)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (at, org_id, by.name, action, api_key_id, by.client_ip,
         None if changes is None else json.dumps(changes, ensure_ascii=False)),
    )  # fmt: skip


# --- SQL shared by the server and the CLI -------------------------------------------------------

API_KEY_COLUMNS = (
    "id, org_id, name, description, key_prefix, is_active, allowed_game_ids, allowed_stream_ids,"
    " rate_limit_per_minute, rate_limit_per_day, expires_at, created_at, updated_at, last_used_at"
)
SESSION_ROW = "(?, ?, ?, ?, ?, ?, ?, ?, ?)"
INSERT_SESSION_HEAD = (
    "INSERT INTO sessions (token, org_id, api_key_id, game_id, stream_id, external_ref,"
    " metadata, created_at, expires_at) VALUES "
)
INSERT_SESSION = INSERT_SESSION_HEAD + SESSION_ROW
INSERT_API_KEY = (
    "INSERT INTO api_keys (org_id, name, description, key_prefix, key_hash, allowed_game_ids,"
    " allowed_stream_ids, rate_limit_per_minute, rate_limit_per_day, expires_at, created_at,"
    f" updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING {API_KEY_COLUMNS}"
)
# Tokens that already expired keep reporting `expired`; only live ones turn `revoked`.
REVOKE_KEY_SESSIONS = (
    "UPDATE sessions SET status = 'revoked', revoked_at = ?"
    " WHERE api_key_id = ? AND status = 'active' AND expires_at > ?"
)
SESSION_COLUMNS = (
    "id, org_id, api_key_id, game_id, stream_id, external_ref, metadata, status, created_at,"
    " expires_at, consumed_at, revoked_at"
)
# Consumes a group's tokens in one statement. Batch rows are (ordinal, token, player_uuid, now);
# for a token asked for twice, the first asker's values are the ones that count.
CONSUME_SESSIONS = (
    "WITH batch(i, t, p, n) AS (VALUES {batch}),"
    " first AS (SELECT t, p, n FROM batch b WHERE i = (SELECT min(i) FROM batch WHERE t = b.t))"
    " UPDATE sessions SET status = 'consumed',"
    " consumed_at = (SELECT n FROM first WHERE first.t = sessions.token),"
    " player_uuid = (SELECT p FROM first WHERE first.t = sessions.token)"
    " WHERE token IN (SELECT t FROM first) AND status = 'active'"
    " AND expires_at > (SELECT n FROM first WHERE first.t = sessions.token)"
    " RETURNING token, " + SESSION_COLUMNS
)
GET_SESSION = f"SELECT {SESSION_COLUMNS} FROM sessions WHERE token = ?"
# Everything that decides whether a key may create a token, and how: a request is admitted on
# one reading of it (remembered between requests), and its token is inserted only if the row is
# still the same inside the inserting transaction.
KEY_STATE = (
    "SELECT k.id, k.org_id, k.key_hash, k.is_active, k.allowed_game_ids,"
    " k.allowed_stream_ids, k.rate_limit_per_minute, k.rate_limit_per_day,"
    " k.expires_at, o.tier FROM api_keys k JOIN orgs o ON o.id = k.org_id"
    " WHERE k.id = ?"
)
MUTABLE_KEY_COLUMNS = frozenset(
    {
        "name",
        "description",
        "is_active",
        "allowed_game_ids",
        "allowed_stream_ids",
        "rate_limit_per_minute",
        "rate_limit_per_day",
        "expires_at",
    }
)


# Tokens deleted per transaction by retention.
PURGE_BATCH = 500
# Most writes one group commit may carry (they share one transaction and one fsync).
MAX_GROUP = 256
# Reads run on the event loop (an indexed lookup costs microseconds, less than a hop to a thread);
# in WAL mode they never wait for writers, so this bound only matters in rare recovery moments.
# The reads of one turn of the loop share a transaction (Database.reader).
READER_BUSY_TIMEOUT_MS = 200

# A write of several statements: runs on the writer thread inside the group's transaction.
Work = Callable[[sqlite3.Connection], Any]


# How long a worker that released the write lock while another was waiting holds back from
# taking it again, at most, so that the other has its turn (WriterLock).
HANDOVER_SECONDS = 0.02


class WriterLock:
    """Orders the writers of all worker processes on one database with flock(2), taking turns.

    SQLite's own busy handler sleeps and polls (tails of hundreds of milliseconds when two
    workers write at once); a process blocked in flock is woken the moment the lock is released.
    flock is not fair, though: a released lock goes to whoever asks first, and the worker that
    released it, still running, usually asks again before the woken one has run. A worker with
    more writes queued could so take it back again and again while the other stayed blocked
    (seen: writes waiting 0.5-0.9 s with two workers under a mixed load). So:
    - a worker about to block first holds a shared lock on a second file (`-writer.wait`), and a
      worker that finds that file held by someone else does not take the free write lock but
      queues behind them;
    - every holder counts its turn in the lock file, and a worker that released the lock while
      another was waiting does not take it again until the count has moved on (the other has
      had its turn), or HANDOVER_SECONDS have passed (the other is not running).
    The lock files live beside the database: closing any descriptor of the database file would
    drop SQLite's POSIX locks on it.
    """

    def __init__(self, database_path: str):
        self._fd = os.open(f"{database_path}-writer.lock", os.O_RDWR | os.O_CREAT, 0o600)
        self._waiting_fd = os.open(f"{database_path}-writer.wait", os.O_RDWR | os.O_CREAT, 0o600)
        self._turn = 0
        # The turn count when this worker released the lock with another waiting, until the
        # other has had its turn.
        self._handed_over: int | None = None

    def _others_waiting(self) -> bool:
        try:
            fcntl.flock(self._waiting_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(self._waiting_fd, fcntl.LOCK_UN)
        return False

    def _wait_for_turn(self) -> None:
        fcntl.flock(self._waiting_fd, fcntl.LOCK_SH)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        finally:
            fcntl.flock(self._waiting_fd, fcntl.LOCK_UN)

    def _take_if_free(self) -> bool:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _last_turn(self) -> int:
        return int.from_bytes(os.pread(self._fd, 8, 0), "little")

    def _let_the_other_go_first(self) -> None:
        handed_over, self._handed_over = self._handed_over, None
        deadline = time.monotonic() + HANDOVER_SECONDS
        while (
            self._last_turn() == handed_over
            and self._others_waiting()
            and time.monotonic() < deadline
        ):
            time.sleep(0.0001)

    def acquire(self) -> bool:
        """Take the lock, blocking until it is this process's turn; True when another process
        held it or was waiting, and this one waited."""
        waited = self._handed_over is not None
        if waited:
            self._let_the_other_go_first()
        if self._others_waiting() or not self._take_if_free():
            self._wait_for_turn()
            waited = True
        self._turn = self._last_turn() + 1
        os.pwrite(self._fd, self._turn.to_bytes(8, "little"), 0)
        return waited

    def release(self) -> None:
        if self._others_waiting():
            self._handed_over = self._turn
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self._fd)
        os.close(self._waiting_fd)


# How often the checkpointer copies committed WAL pages into the database file.
CHECKPOINT_INTERVAL_SECONDS = 0.25
# WAL frames left un-copied after a checkpoint that are worth a warning (about 40 MB).
WAL_WARN_FRAMES = 10_000
# A WAL this long, all copied, is started over: the writer finishes the checkpoint between two
# groups (Checkpointer). 4,096 frames of 4 KiB pages is about 16 MiB: about a second of the
# benchmark's mixed workload at full speed (4,300 frames a second on one worker).
WAL_RESTART_FRAMES = 4096
# How long the writer, finishing a checkpoint between two groups, waits for readers still on the
# log's frames before it leaves the start-over to a later pass (writes queue meanwhile). Each
# worker's reads share one transaction per turn of its event loop (Database.reader), so a reader
# is usually gone within a few milliseconds; a long one (a backup) is not waited out.
RESTART_WAIT_MS = 20
# The start-over is asked for while a pass leaves at most this many frames uncopied: those
# committed since the snapshots of the loops' current turns. A reader that has kept one
# snapshot for long (a backup) leaves far more, and is not waited for.
WAL_RESTART_LAG_FRAMES = 512
# PRAGMA journal_size_limit: when the log starts over, its file is cut back to this size (after
# a long reader, such as a backup, let it grow); SQLite reuses the file up to it.
WAL_FILE_LIMIT_BYTES = 64 * 1024 * 1024


class Checkpointer:
    """Copies committed pages from the WAL into the database file on a thread of its own.

    No group commit pays for a checkpoint: the writer runs with wal_autocheckpoint off (SQLite's
    default would run one inside the COMMIT that passes 1,000 pages, 15-20 ms in which every
    request of that group waits), and this thread checkpoints PASSIVE (never blocking readers or
    the writer) every CHECKPOINT_INTERVAL_SECONDS while there are new commits. A checkpoint that
    cannot finish (a long reader, such as a backup) is retried next time; the WAL is logged if it
    stays large.

    The -wal file stays short under writes that never pause. SQLite starts the log over from
    its first frame only when a write transaction begins with every frame already copied, which
    a writer that keeps appending while this thread copies would rarely allow (the file, and the
    index of its frames each checkpoint builds, would grow without end). So once a pass has
    copied a log of WAL_RESTART_FRAMES or more with at most WAL_RESTART_LAG_FRAMES left (the
    event loops' reads each hold a snapshot for one turn of their loop, so a pass under load
    rarely copies every frame), finish_checkpoint (the writer's) is asked to copy the rest
    between two groups, holding the write lock, with a RESTART checkpoint that waits at most
    RESTART_WAIT_MS for readers to leave the log; the next write then starts the log over.
    """

    def __init__(self, settings: DatabaseSettings, finish_checkpoint: Callable[[], None]):
        self._settings = settings
        self._finish_checkpoint = finish_checkpoint
        self._stop = threading.Event()
        self._commits = 0  # bumped by the writer after each commit
        self._thread = threading.Thread(target=self._run, name="dailyplay-checkpoint", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def committed(self) -> None:
        self._commits += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        conn = _open(self._settings, busy_timeout_ms=1000)
        seen = 0
        try:
            while not self._stop.wait(CHECKPOINT_INTERVAL_SECONDS):
                if self._commits == seen:
                    continue
                seen = self._commits
                try:
                    _busy, frames, copied = checkpoint(conn)
                except sqlite3.Error as exc:
                    log.warning("WAL checkpoint failed; will retry: %s", exc)
                    continue
                if frames >= WAL_RESTART_FRAMES and frames - copied <= WAL_RESTART_LAG_FRAMES:
                    self._finish_checkpoint()
                if frames - copied > WAL_WARN_FRAMES:
                    log.warning(
                        "the WAL holds %d pages not yet copied into the database file "
                        "(a long-running reader?)", frames - copied,
                    )  # fmt: skip
        finally:
            conn.close()


class WriterThread:
    """The thread that owns the writing connection and commits the queued writes in groups.

    Callers queue _Write items (submit, from the event loop); the thread takes every write
    queued so far (at most MAX_GROUP) after taking the write lock, runs them in one transaction
    and sends the outcomes back to each caller's event loop in one call_soon_threadsafe. A
    "call" item runs a function on this thread between groups (opening and closing the
    connection, maintenance), in its place in the queue.
    """

    def __init__(
        self,
        lock: WriterLock,
        committed: Callable[[], None],
        observe_commit: Callable[[float, int, bool], None] | None,
        refused_for_space: Callable[[], None],
    ):
        self.conn: sqlite3.Connection | None = None
        self._lock = lock
        self._committed = committed
        self._observe_commit = observe_commit
        # Told (on this thread) whenever a write or call failed with SQLITE_FULL, whoever asked.
        self._refused_for_space = refused_for_space
        self._queue: collections.deque[_Write] = collections.deque()
        self._wake = threading.Event()
        self._stopping = False
        self._checkpoint_due = False
        self._thread = threading.Thread(target=self._run, name="dailyplay-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, item: _Write) -> None:
        if self._stopping:
            raise RuntimeError("database is not open")
        # deque.append is atomic; the thread clears the event before it looks at the queue, so
        # an item appended before this set() is always seen.
        self._queue.append(item)
        if not self._wake.is_set():
            self._wake.set()

    def finish_checkpoint(self) -> None:
        """From any thread: before its next group, this thread checkpoints (PASSIVE) holding the
        write lock, so that no frame is appended between that checkpoint and the next write."""
        self._checkpoint_due = True
        self._wake.set()

    def stop(self) -> None:
        """After every queued item has run (blocking; call it from a thread of its own)."""
        self._stopping = True
        self._wake.set()
        self._thread.join()
        self._lock.close()

    def _run(self) -> None:
        queue = self._queue
        while True:
            self._wake.wait()
            self._wake.clear()
            while True:
                if self._checkpoint_due:  # asked for even when no write is queued
                    self._checkpoint()
                if not queue:
                    break
                if queue[0].kind == "call":
                    item = queue.popleft()
                    function, args = item.payload
                    try:
                        outcome: tuple[bool, Any] = (True, function(*args))
                    except BaseException as exc:  # the caller gets it; the thread goes on
                        outcome = (False, exc)
                    self._note_refusals([outcome])
                    _settle([item], [outcome])
                else:
                    self._commit_next_group()
            if self._stopping and not queue:
                return

    def _checkpoint(self) -> None:
        self._checkpoint_due = False
        if self.conn is None:
            return
        try:
            self._lock.acquire()
            try:
                # Busy (another checkpoint running, a reader that stays) is not an error.
                checkpoint_to_start_over(self.conn, RESTART_WAIT_MS)
            finally:
                self._lock.release()
        except (sqlite3.Error, OSError) as exc:  # the checkpointer asks again
            log.warning("WAL checkpoint failed; will retry: %s", exc)

    def _note_refusals(self, outcomes: list[tuple[bool, Any]]) -> None:
        if any(not succeeded and is_full(value) for succeeded, value in outcomes):
            self._refused_for_space()

    def _take_group(self) -> list[_Write]:
        group: list[_Write] = []
        queue = self._queue
        while queue and len(group) < MAX_GROUP and queue[0].kind != "call":
            group.append(queue.popleft())
        return group

    def _commit_next_group(self) -> None:
        group: list[_Write] = []
        locked = waited = False
        started = time.perf_counter()
        try:
            waited = self._lock.acquire()
            locked = True
            started = time.perf_counter()
            # Taken after the lock: writes that came in while waiting join this group.
            group = self._take_group()
            assert self.conn is not None
            outcomes = _commit_writes(self.conn, [(item.kind, item.payload) for item in group])
        except BaseException as exc:  # every caller of the group gets it; the thread goes on
            group = group or self._take_group()  # the lock failed: these writes fail with it
            outcomes = [(False, exc)] * len(group)
        finally:
            if locked:
                self._lock.release()
        seconds = time.perf_counter() - started
        self._committed()
        self._note_refusals(outcomes)
        observe = self._observe_commit
        _settle(
            group,
            outcomes,
            None if observe is None else functools.partial(observe, seconds, len(group), waited),
        )


class Database:
    """The service's storage: named async operations over one SQLite file.

    Writes go through group commits on one writer thread (the pattern of Datasette's
    `execute_write_fn`): writes that arrive together run in one BEGIN IMMEDIATE transaction with
    one COMMIT (one fsync under synchronous=FULL), and each caller resumes only after the COMMIT
    that made its write durable. Reads use a separate read-only connection directly on the
    event loop.

    The writer thread takes its next group itself as soon as a COMMIT returns (the writes that
    arrived meanwhile), and hands each group's outcomes back to the event loop in one callback:
    the loop, busy answering requests, is not a step in the chain from one commit to the next.
    """

    def __init__(
        self,
        settings: DatabaseSettings,
        observe_commit: Callable[[float, int, bool], None] | None = None,
    ):
        self.settings = settings
        # Told of each group commit: (seconds holding the write lock, writes, waited for it).
        self._observe_commit = observe_commit
        self._writer: sqlite3.Connection | None = None
        self._writer_thread: WriterThread | None = None
        self._reader: sqlite3.Connection | None = None
        # The loop whose current turn's read transaction is open on the reader (see reader).
        self._read_loop: asyncio.AbstractEventLoop | None = None
        self._checkpointer: Checkpointer | None = None
        # When a write was last refused for want of space (SQLITE_FULL), time.monotonic().
        self._full_at: float | None = None

    async def open(self) -> None:
        """Migrate the file, then open the writer (on its thread) and the read-only connection."""
        self._writer_thread = WriterThread(
            WriterLock(self.settings.path), self._committed, self._observe_commit, self.note_full
        )
        self._writer_thread.start()
        try:
            # The writing connection is made, used and closed on the writer thread only.
            self._writer = await self._on_writer_thread(connect, self.settings)
            self._writer_thread.conn = self._writer
            # Checkpoints run on their own thread (Checkpointer), not inside this one's COMMITs.
            await self._on_writer_thread(self._writer.execute, "PRAGMA wal_autocheckpoint = 0")
        except BaseException:
            await self.close()
            raise
        self._checkpointer = Checkpointer(self.settings, self._writer_thread.finish_checkpoint)
        self._checkpointer.start()
        self._reader = _open(self.settings, read_only=True, busy_timeout_ms=READER_BUSY_TIMEOUT_MS)

    async def close(self) -> None:
        """Finish queued writes, checkpoint the WAL into the main file, close both connections."""
        if self._checkpointer is not None:
            await asyncio.to_thread(self._checkpointer.stop)
            self._checkpointer = None
        if self._reader is not None:
            self._reader.close()  # ends a read transaction still open
            self._read_loop = None
        thread = self._writer_thread
        if thread is not None:
            # Queued behind every write already waiting: those are committed first.
            if self._writer is not None:
                await self._on_writer_thread(_checkpoint_and_close, self._writer)
            await asyncio.to_thread(thread.stop)
        self._reader = self._writer = self._writer_thread = None

    def _committed(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.committed()

    async def _on_writer_thread(self, function: Callable[..., T], *args: Any) -> T:
        """function(*args) on the writer thread, between group commits."""
        result: T = await self._enqueue("call", (function, args))
        return result

    async def run_on_writer(self, function: Callable[[sqlite3.Connection], T]) -> T:
        """function(writing connection) on the writer thread, outside any group (tests,
        maintenance); it must not leave a transaction open."""
        return await self._on_writer_thread(function, self.writer)

    @property
    def writer(self) -> sqlite3.Connection:
        """The writing connection; use it only on the writer thread (run_on_writer)."""
        if self._writer is None:
            raise RuntimeError("database is not open")
        return self._writer

    @property
    def reader(self) -> sqlite3.Connection:
        """The read-only connection, inside this turn of the event loop's read transaction.

        The reads of one turn of the loop share one transaction, ended by a callback the first
        read schedules for the next turn. Each read on its own would begin and end a
        transaction of its own: in WAL mode that is two fcntl() calls on the -shm file and an
        fstat() of the database file, about 40 % of what a lookup costs by itself.

        Sharing it gives up nothing: every read still sees every commit that was complete when
        its request arrived. The snapshot is taken during the turn; anything that reaches a
        request after that (its bytes, a writer's result, a timer) resumes it through the
        loop's queue, behind the callback that ends the transaction, so in a later transaction.
        Outside a running loop (the CLI, tests) each read is a transaction of its own.
        """
        reader = self._reader
        if reader is None:
            raise RuntimeError("database is not open")
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if self._read_loop is not loop:
            # Not yet in this turn's transaction. One still open was left by a loop that
            # stopped before its next turn: it is ended, never read from again.
            self._end_read()
            if loop is not None:
                reader.execute("BEGIN")
                self._read_loop = loop
                loop.call_soon(self._end_read)
        return reader

    def _end_read(self) -> None:
        self._read_loop = None
        reader = self._reader
        if reader is not None and reader.in_transaction:
            try:
                reader.execute("COMMIT")
            except sqlite3.Error as exc:  # not known to happen for a read: never keep a snapshot
                log.warning("ending a read transaction failed (%s); rolling it back", exc)
                reader.rollback()

    # --- group commit ----------------------------------------------------------------------------

    def _enqueue(self, kind: str, payload: Any) -> asyncio.Future[Any]:
        if self._writer_thread is None:
            raise RuntimeError("database is not open")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._writer_thread.submit(_Write(kind, payload, future))
        return future

    async def _in_transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run work (on the writer thread) inside the next group commit; return its result once
        that is committed."""
        result: T = await self._enqueue("work", work)
        return result

    async def _write_one(self, sql: str, params: Iterable[Any]) -> list[sqlite3.Row]:
        """One statement in the next group commit; all RETURNING rows are read inside it."""
        values = tuple(params)
        return await self._in_transaction(lambda conn: conn.execute(sql, values).fetchall())

    # Reads run on the event loop (see READER_BUSY_TIMEOUT_MS), and plainly: a coroutine here
    # would be one more frame for every read to create and resume, validate-session's included.
    def _read_one(self, sql: str, params: Iterable[Any]) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self.reader.execute(sql, tuple(params)).fetchone()
        return row

    def _read_all(self, sql: str, params: Iterable[Any]) -> list[sqlite3.Row]:
        return self.reader.execute(sql, tuple(params)).fetchall()

    # --- health ----------------------------------------------------------------------------------

    def schema_version(self) -> int:
        """PRAGMA user_version as the read connection sees it."""
        return int(self.reader.execute("PRAGMA user_version").fetchone()[0])

    def note_full(self) -> None:
        """A write was refused because the disk (or the file's page limit) is full. The writer
        thread calls this for any write it ran that was refused so, a request's or a background
        task's."""
        self._full_at = time.monotonic()

    def seconds_since_full(self) -> float | None:
        """Seconds since a write was last refused for want of space; None if none was."""
        return None if self._full_at is None else time.monotonic() - self._full_at

    async def probe_write(self, now: int) -> None:
        """Write one row through a group commit: the file takes writes and fsyncs."""
        await self._write_one(
            "INSERT INTO readiness (id, checked_at) VALUES (1, ?)"
            " ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at",
            (now,),
        )

    async def list_audit(self, org_id: int, limit: int, before_id: int | None) -> list[sqlite3.Row]:
        """An org's audit entries, newest first, with ids below before_id when given."""
        return list_audit(self.reader, org_id, limit, before_id)

    # --- retention -------------------------------------------------------------------------------

    async def purge_finished_sessions(self, cutoff: int, batch: int = PURGE_BATCH) -> int:
        """Delete tokens that finished before cutoff, `batch` per transaction, so that each
        holds the write lock briefly and other writes run in between; returns how many."""
        deleted = 0
        while True:
            done = await self._in_transaction(
                lambda conn: delete_finished_sessions(conn, cutoff, batch)
            )
            deleted += done
            if done < batch:
                return deleted

    # --- organizations -------------------------------------------------------------------------

    async def get_org(self, org_id: int) -> sqlite3.Row | None:
        return self._read_one(
            "SELECT id, name, tier, external_id FROM orgs WHERE id = ?", (org_id,)
        )

    async def get_member_role(self, org_id: int, user_id: str) -> str | None:
        row = self._read_one(
            "SELECT role FROM org_members WHERE org_id = ? AND user_id = ?", (org_id, user_id)
        )
        return None if row is None else str(row["role"])

    # --- API keys ------------------------------------------------------------------------------

    async def list_api_keys(self, org_id: int) -> list[sqlite3.Row]:
        return list_api_keys(self.reader, org_id)

    async def key_usage(self, org_id: int, now: int) -> dict[int, dict[str, int]]:
        """Per key of the org: sessions created/consumed in the last 24 h and 30 days."""
        return key_usage(self.reader, org_id, now)

    async def insert_api_key(self, values: tuple[Any, ...], by: Actor) -> sqlite3.Row:
        """Insert one key (`values` in INSERT_API_KEY's column order) and its audit entry."""
        return await self._in_transaction(lambda conn: insert_api_key(conn, values, by))

    async def update_api_key(
        self, org_id: int, key_id: int, changes: dict[str, Any], now: int, by: Actor
    ) -> tuple[sqlite3.Row | None, int]:
        """update_api_key_in, in one transaction of the writer."""
        return await self._in_transaction(
            lambda conn: update_api_key_in(conn, org_id, key_id, changes, now, by)
        )

    async def delete_api_key(self, org_id: int, key_id: int, now: int, by: Actor) -> int | None:
        """delete_api_key_in, in one transaction of the writer."""
        return await self._in_transaction(
            lambda conn: delete_api_key_in(conn, org_id, key_id, now, by)
        )

    async def find_api_key_hashes(self, key_prefix: str) -> list[sqlite3.Row]:
        """(id, key_hash) of every key whose first 8 characters are key_prefix."""
        return self._read_all(
            "SELECT id, key_hash FROM api_keys WHERE key_prefix = ?", (key_prefix,)
        )

    async def get_api_key_for_request(self, key_id: int) -> sqlite3.Row | None:
        """The key's current state and its org's tier (KEY_STATE's columns), read now."""
        return self._read_one(KEY_STATE, (key_id,))

    async def record_key_usage(
        self, last_used: dict[int, int], counter_deltas: dict[tuple[int, str, int], int]
    ) -> dict[tuple[int, str, int], int]:
        """Store last_used_at and add this process's rate-limit counts; returns the new totals."""

        def work(conn: sqlite3.Connection) -> dict[tuple[int, str, int], int]:
            conn.executemany(
                "UPDATE api_keys SET last_used_at = max(coalesce(last_used_at, 0), ?) WHERE id = ?",
                [(used, key_id) for key_id, used in last_used.items()],
            )
            totals: dict[tuple[int, str, int], int] = {}
            for (key_id, span, period), delta in counter_deltas.items():
                rows = conn.execute(
                    "INSERT INTO rate_counters (api_key_id, span, period, hits)"
                    " SELECT ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM api_keys WHERE id = ?)"
                    " ON CONFLICT (api_key_id, span, period)"
                    " DO UPDATE SET hits = hits + excluded.hits"
                    " RETURNING hits",
                    (key_id, span, period, delta, key_id),
                ).fetchall()
                for row in rows:
                    totals[(key_id, span, period)] = int(row[0])
            return totals

        return await self._in_transaction(work)

    async def prune_rate_counters(self, minute_before: int, day_before: int) -> None:
        """Forget counters of windows that are over, and usage older than listings show."""

        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "DELETE FROM rate_counters WHERE (span = 'minute' AND period < ?)"
                " OR (span = 'day' AND period < ?)",
                (minute_before, day_before),
            )
            conn.execute(
                "DELETE FROM key_usage WHERE hour < ?", ((day_before + 1) * 24 - USAGE_KEPT_HOURS,)
            )

        await self._in_transaction(work)

    async def get_rate_counters(self, key_id: int, minute: int, day: int) -> dict[str, int]:
        """Stored hits of a key in the given minute and day, as {'minute': n, 'day': n}."""
        rows = self._read_all(
            "SELECT span, hits FROM rate_counters WHERE api_key_id = ?"
            " AND ((span = 'minute' AND period = ?) OR (span = 'day' AND period = ?))",
            (key_id, minute, day),
        )
        return {str(row["span"]): int(row["hits"]) for row in rows}

    # --- sessions ------------------------------------------------------------------------------

    async def insert_session(
        self, values: tuple[Any, ...], key_state: tuple[Any, ...] | None = None
    ) -> None:
        """Insert a token: (token, org_id, api_key_id, game_id, stream_id, external_ref,
        metadata, created_at, expires_at); returns once it is committed. With key_state (a
        KEY_STATE row as a tuple) the token is inserted only if the key's row is still exactly
        that inside the transaction; else KeyChanged is raised and nothing is stored."""
        await self._enqueue("insert_session", (values, key_state))

    async def get_session(self, token: bytes) -> sqlite3.Row | None:
        # One SQL string object for every call: a string built per call (validate-session's
        # every request) is hashed anew for the statement cache.
        return self._read_one(GET_SESSION, (token,))

    async def consume_session(
        self, token: bytes, player_uuid: str | None, now: int
    ) -> sqlite3.Row | None:
        """Atomically mark an active, unexpired token consumed; None when it was not."""
        row: sqlite3.Row | None = await self._enqueue("consume_session", (token, player_uuid, now))
        return row


# --- synchronous operations for the CLI ---------------------------------------------------------


def create_org(
    conn: sqlite3.Connection,
    name: str,
    tier: str,
    external_id: str | None,
    now: int,
    by: Actor = CLI,
) -> sqlite3.Row:
    row: sqlite3.Row = conn.execute(
        "INSERT INTO orgs (name, tier, external_id, created_at) VALUES (?, ?, ?, ?)"
        " RETURNING id, name, tier, external_id, created_at",
        (name, tier, external_id, now),
    ).fetchone()
    changes = {k: {"from": None, "to": row[k]} for k in ("name", "tier", "external_id")}
    record_audit(conn, now, row["id"], by, "org.create", None, changes)
    return row


def list_orgs(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    return conn.execute(
        "SELECT o.id, o.name, o.tier, o.external_id, o.created_at,"
        " (SELECT count(*) FROM org_members m WHERE m.org_id = o.id) AS members,"
        " (SELECT count(*) FROM api_keys k WHERE k.org_id = o.id) AS api_keys"
        " FROM orgs o ORDER BY o.id"
    ).fetchall()


def find_org_by_external_id(conn: sqlite3.Connection, external_id: str) -> sqlite3.Row | None:
    row: sqlite3.Row | None = conn.execute(
        "SELECT id, name, tier, external_id, created_at FROM orgs WHERE external_id = ?",
        (external_id,),
    ).fetchone()
    return row


def set_org_tier(
    conn: sqlite3.Connection, org_id: int, tier: str, now: int, by: Actor = CLI
) -> sqlite3.Row | None:
    before = conn.execute("SELECT tier FROM orgs WHERE id = ?", (org_id,)).fetchone()
    row: sqlite3.Row | None = conn.execute(
        "UPDATE orgs SET tier = ? WHERE id = ? RETURNING id, name, tier, external_id, created_at",
        (tier, org_id),
    ).fetchone()
    if row is not None and before["tier"] != tier:
        changes = {"tier": {"from": before["tier"], "to": tier}}
        record_audit(conn, now, org_id, by, "org.tier_change", None, changes)
    return row


def org_exists(conn: sqlite3.Connection, org_id: int) -> bool:
    return conn.execute("SELECT 1 FROM orgs WHERE id = ?", (org_id,)).fetchone() is not None


def org_tier(conn: sqlite3.Connection, org_id: int) -> str | None:
    """The org's tier, or None if there is no such org."""
    row = conn.execute("SELECT tier FROM orgs WHERE id = ?", (org_id,)).fetchone()
    return None if row is None else str(row[0])


def upsert_member(
    conn: sqlite3.Connection, org_id: int, user_id: str, role: str, now: int, by: Actor = CLI
) -> sqlite3.Row:
    before = conn.execute(
        "SELECT role FROM org_members WHERE org_id = ? AND user_id = ?", (org_id, user_id)
    ).fetchone()
    if before is None or before["role"] != role:
        action = "member.add" if before is None else "member.role_change"
        changes = {
            "user_id": {"from": None if before is None else user_id, "to": user_id},
            "role": {"from": None if before is None else before["role"], "to": role},
        }
        record_audit(conn, now, org_id, by, action, None, changes)
    row: sqlite3.Row = conn.execute(
        "INSERT INTO org_members (org_id, user_id, role, created_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (org_id, user_id) DO UPDATE SET role = excluded.role"
        " RETURNING org_id, user_id, role, created_at",
        (org_id, user_id, role, now),
    ).fetchone()
    return row


def delete_member(
    conn: sqlite3.Connection, org_id: int, user_id: str, now: int, by: Actor = CLI
) -> bool:
    cursor = conn.execute(
        "DELETE FROM org_members WHERE org_id = ? AND user_id = ? RETURNING role",
        (org_id, user_id),
    )
    removed = cursor.fetchone()
    if removed is not None:
        changes = {
            "user_id": {"from": user_id, "to": None},
            "role": {"from": removed["role"], "to": None},
        }
        record_audit(conn, now, org_id, by, "member.remove", None, changes)
    return removed is not None


def list_members(conn: sqlite3.Connection, org_id: int) -> list[sqlite3.Row]:
    return conn.execute(
        "SELECT org_id, user_id, role, created_at FROM org_members WHERE org_id = ?"
        " ORDER BY user_id",
        (org_id,),
    ).fetchall()


def update_api_key_in(
    conn: sqlite3.Connection,
    org_id: int,
    key_id: int,
    changes: dict[str, Any],
    now: int,
    by: Actor,
) -> tuple[sqlite3.Row | None, int]:
    """Apply changes to a key of org_id, with its audit entry, in the caller's transaction;
    deactivating revokes its live tokens at once. Returns (the updated row, or None when the
    key is not in the org; tokens revoked)."""
    unknown = set(changes) - MUTABLE_KEY_COLUMNS
    if unknown:
        raise ValueError(f"not a mutable API key column: {sorted(unknown)}")
    before = conn.execute(
        f"SELECT {API_KEY_COLUMNS} FROM api_keys WHERE id = ? AND org_id = ?", (key_id, org_id)
    ).fetchone()
    if before is None:
        return None, 0
    assignments = ", ".join(f"{column} = ?" for column in changes)
    # The row was just read in this transaction, so the UPDATE finds it.
    row = conn.execute(
        f"UPDATE api_keys SET {assignments}, updated_at = ?"
        f" WHERE id = ? AND org_id = ? RETURNING {API_KEY_COLUMNS}",
        (*changes.values(), now, key_id, org_id),
    ).fetchone()
    revoked = 0
    if changes.get("is_active") == 0:
        revoked = conn.execute(REVOKE_KEY_SESSIONS, (now, key_id, now)).rowcount
    diff = {
        column: {"from": before[column], "to": value}
        for column, value in changes.items()
        if before[column] != value
    }
    action = "api_key.update"
    if "is_active" in diff:
        action = "api_key.reactivate" if changes["is_active"] else "api_key.revoke"
    record_audit(conn, now, org_id, by, action, key_id, diff)
    return row, revoked


def delete_api_key_in(
    conn: sqlite3.Connection, org_id: int, key_id: int, now: int, by: Actor
) -> int | None:
    """Revoke a key's live tokens and delete it, with its audit entry, in the caller's
    transaction; the tokens revoked, or None if the key is not in the org."""
    found = conn.execute(
        "SELECT 1 FROM api_keys WHERE id = ? AND org_id = ?", (key_id, org_id)
    ).fetchone()
    if found is None:
        return None
    revoked = conn.execute(REVOKE_KEY_SESSIONS, (now, key_id, now)).rowcount
    conn.execute("DELETE FROM api_keys WHERE id = ?", (key_id,))
    conn.execute("DELETE FROM key_usage WHERE api_key_id = ?", (key_id,))
    record_audit(conn, now, org_id, by, "api_key.delete", key_id, None)
    return int(revoked)


def insert_api_key(conn: sqlite3.Connection, values: tuple[Any, ...], by: Actor) -> sqlite3.Row:
    """Insert one key (`values` in INSERT_API_KEY's column order) and its audit entry, in the
    caller's transaction."""
    row: sqlite3.Row = conn.execute(INSERT_API_KEY, values).fetchone()
    settings = {
        column: row[column]
        for column in ("name", "description", "allowed_game_ids", "allowed_stream_ids",
                       "rate_limit_per_minute", "rate_limit_per_day", "expires_at")
    }  # fmt: skip
    changes = {column: {"from": None, "to": value} for column, value in settings.items()}
    record_audit(conn, row["created_at"], row["org_id"], by, "api_key.create", row["id"], changes)
    return row


def list_api_keys(conn: sqlite3.Connection, org_id: int) -> list[sqlite3.Row]:
    """An org's keys (never their hashes), oldest first."""
    return conn.execute(
        f"SELECT {API_KEY_COLUMNS} FROM api_keys WHERE org_id = ? ORDER BY id", (org_id,)
    ).fetchall()


def list_audit(
    conn: sqlite3.Connection, org_id: int, limit: int, before_id: int | None = None
) -> list[sqlite3.Row]:
    """An org's audit entries, newest first, with ids below before_id when given."""
    return conn.execute(
        f"SELECT {AUDIT_COLUMNS} FROM audit_log WHERE org_id = ? AND id < ?"
        " ORDER BY id DESC LIMIT ?",
        (org_id, before_id if before_id is not None else 2**63 - 1, limit),
    ).fetchall()


def json_list(text: str | None) -> list[int] | None:
    """An allow-list column (JSON array text, or NULL for no list) as a list."""
    return None if text is None else json.loads(text)


# An API key's columns whose stored form differs from the API's (keys.api_key_data): audit
# changes are kept as stored and shown as the API shows the key.
_API_FORM: dict[str, Callable[[Any], Any]] = {
    "is_active": bool,
    "allowed_game_ids": json_list,
    "allowed_stream_ids": json_list,
    "expires_at": iso_from_ms,
}


def _changes_in_api_form(changes: dict[str, Any]) -> dict[str, Any]:
    shown: dict[str, Any] = {}
    for column, change in changes.items():
        form = _API_FORM.get(column)
        shown[column] = (
            {side: form(value) for side, value in change.items()}
            if form is not None and isinstance(change, dict)
            else change
        )
    return shown


def audit_entry(row: sqlite3.Row) -> dict[str, Any]:
    """An audit row as the API and the CLI show it: ISO times, and changes as an object whose
    values have the API's types (booleans, arrays, RFC 3339 times)."""
    return {
        "id": row["id"],
        "at": iso_from_ms(row["at"]),
        "org_id": row["org_id"],
        "actor": row["actor"],
        "action": row["action"],
        "api_key_id": row["api_key_id"],
        "client_ip": row["client_ip"],
        "changes": (
            None if row["changes"] is None else _changes_in_api_form(json.loads(row["changes"]))
        ),
    }


@dataclass
class _Write:
    """One caller's write waiting for the next group commit."""

    # "work" (payload: a Work), "insert_session" or "consume_session" (values), or "call"
    # ((function, args): run between groups)
    kind: str
    payload: Any
    future: asyncio.Future[Any]


def _settle(
    group: list[_Write],
    outcomes: list[tuple[bool, Any]],
    then: Callable[[], None] | None = None,
) -> None:
    """From the writer thread: give each caller its outcome on the caller's event loop (one
    callback per loop for the whole group); `then` runs first, on the first of those loops."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Write, tuple[bool, Any]]]] = {}
    for item, outcome in zip(group, outcomes, strict=True):
        by_loop.setdefault(item.future.get_loop(), []).append((item, outcome))
    for loop, settled in by_loop.items():
        with contextlib.suppress(RuntimeError):  # that loop has closed: nobody is waiting
            loop.call_soon_threadsafe(_set_outcomes, settled, then)
        then = None


def _set_outcomes(
    settled: list[tuple[_Write, tuple[bool, Any]]], then: Callable[[], None] | None
) -> None:
    if then is not None:
        then()
    for item, (succeeded, value) in settled:
        if item.future.done():  # the caller went away; its write stands or failed anyway
            continue
        if succeeded:
            item.future.set_result(value)
        else:
            item.future.set_exception(value)


# Same-kind hot writes of one group share a statement; a statement binds at most this many rows.
ROWS_PER_STATEMENT = 200


def _commit_writes(
    conn: sqlite3.Connection, writes: list[tuple[str, Any]]
) -> list[tuple[bool, Any]]:
    """On the writer thread: one transaction for all writes; (succeeded, result or exception)
    for each. A write that fails takes its group down; then each runs alone, so it fails by
    itself and the others still commit."""
    try:
        conn.execute("BEGIN IMMEDIATE")
    except Exception as exc:  # e.g. locked past busy_timeout: every caller gets it (503)
        return [(False, exc)] * len(writes)
    try:
        results = _run_group(conn, writes)
        conn.execute("COMMIT")
    except Exception as exc:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        if len(writes) == 1:
            return [(False, exc)]
        return [outcome for write in writes for outcome in _commit_writes(conn, [write])]
    return [(not isinstance(result, KeyChanged), result) for result in results]


def _run_group(conn: sqlite3.Connection, writes: list[tuple[str, Any]]) -> list[Any]:
    """Every write of the group inside the open transaction; results in the group's order.

    The writes of a group were all in flight together, so any order is a valid one: general
    work runs first in arrival order, then the token inserts, then the consumptions.
    """
    results: list[Any] = [None] * len(writes)
    inserts, consumes = [], []
    for index, (kind, payload) in enumerate(writes):
        if kind == "work":
            results[index] = payload(conn)
        elif kind == "insert_session":
            inserts.append(index)
        else:
            consumes.append(index)
    inserts = _admitted(conn, writes, inserts, results)
    for start in range(0, len(inserts), ROWS_PER_STATEMENT):
        chunk = inserts[start : start + ROWS_PER_STATEMENT]
        # No RETURNING: each returned row would be one more step, each handing the GIL back
        # and forth with the busy event loop; callers need only know the insert committed.
        values = [writes[index][1][0] for index in chunk]
        conn.execute(
            INSERT_SESSION_HEAD + ", ".join([SESSION_ROW] * len(chunk)),
            [value for row_values in values for value in row_values],
        )
        _count_usage(conn, "created", [(v[2], v[7]) for v in values])
    for start in range(0, len(consumes), ROWS_PER_STATEMENT):
        chunk = consumes[start : start + ROWS_PER_STATEMENT]
        rows = conn.execute(
            CONSUME_SESSIONS.format(batch=", ".join(["(?, ?, ?, ?)"] * len(chunk))),
            [value for i, index in enumerate(chunk) for value in (i, *writes[index][1])],
        ).fetchall()
        won = {bytes(row["token"]): row for row in rows}
        _count_usage(conn, "consumed", [(row["api_key_id"], row["consumed_at"]) for row in rows])
        # A token asked for twice in one group is won by the first asker only.
        for index in chunk:
            results[index] = won.pop(writes[index][1][0], None)
    return results


def _admitted(
    conn: sqlite3.Connection, writes: list[tuple[str, Any]], inserts: list[int], results: list[Any]
) -> list[int]:
    """The token inserts whose key is still in the state they were admitted on (read once per
    key in the group); the others get KeyChanged as their result and insert nothing."""
    current: dict[int, tuple[Any, ...] | None] = {}
    admitted = []
    for index in inserts:
        values, key_state = writes[index][1]
        if key_state is not None:
            key_id = values[2]
            if key_id not in current:
                row = conn.execute(KEY_STATE, (key_id,)).fetchone()
                current[key_id] = None if row is None else tuple(row)
            if current[key_id] != key_state:
                results[index] = KeyChanged(key_id)
                continue
        admitted.append(index)
    return admitted


# Usage is kept for the longest window listings show (30 days) and a day more.
USAGE_KEPT_HOURS = 31 * 24


def _count_usage(conn: sqlite3.Connection, column: str, events: list[tuple[Any, int]]) -> None:
    """Add (api_key_id, time) events to key_usage's hourly counters, one row per key and hour."""
    counts: dict[tuple[int, int], int] = {}
    for key_id, at in events:
        if key_id is not None:
            slot = (int(key_id), int(at) // HOUR_MS)
            counts[slot] = counts.get(slot, 0) + 1
    if counts:
        conn.executemany(
            f"INSERT INTO key_usage (api_key_id, hour, {column}) VALUES (?, ?, ?)"
            " ON CONFLICT (api_key_id, hour)"
            f" DO UPDATE SET {column} = {column} + excluded.{column}",
            [(key_id, hour, n) for (key_id, hour), n in counts.items()],
        )


# What key_usage reports per key, in the order its query selects them.
USAGE_FIELDS = (
    "sessions_created_24h",
    "sessions_consumed_24h",
    "sessions_created_30d",
    "sessions_consumed_30d",
)
NO_USAGE = dict.fromkeys(USAGE_FIELDS, 0)


def key_usage(conn: sqlite3.Connection, org_id: int, now: int) -> dict[int, dict[str, int]]:
    """Sessions created and consumed per key of org_id in the last 24 hours and 30 days (by
    the hour: the current hour and the 23 or 719 before it)."""
    hour = now // HOUR_MS
    rows = conn.execute(
        "SELECT api_key_id,"
        " coalesce(sum(created) FILTER (WHERE hour > ?), 0),"
        " coalesce(sum(consumed) FILTER (WHERE hour > ?), 0),"
        " coalesce(sum(created), 0), coalesce(sum(consumed), 0)"
        " FROM key_usage WHERE hour > ?"
        " AND api_key_id IN (SELECT id FROM api_keys WHERE org_id = ?) GROUP BY api_key_id",
        (hour - 24, hour - 24, hour - 30 * 24, org_id),
    ).fetchall()
    return {int(row[0]): dict(zip(USAGE_FIELDS, row[1:], strict=True)) for row in rows}


def _checkpoint_and_close(conn: sqlite3.Connection) -> None:
    with contextlib.suppress(sqlite3.Error):
        checkpoint(conn)
    conn.close()


# A token has finished when it expired, was consumed or was revoked; each way has its own
# indexed time column, so every batch is a range scan, however large the table.
_FINISHED_BEFORE = (
    "expires_at < ?",
    "status = 'consumed' AND consumed_at < ?",
    "status = 'revoked' AND revoked_at < ?",
)


def delete_finished_sessions(conn: sqlite3.Connection, cutoff: int, batch: int) -> int:
    """Delete up to `batch` tokens that finished before cutoff (in the caller's transaction)."""
    deleted = 0
    for condition in _FINISHED_BEFORE:
        deleted += conn.execute(
            f"DELETE FROM sessions WHERE id IN (SELECT id FROM sessions WHERE {condition} LIMIT ?)",
            (cutoff, batch - deleted),
        ).rowcount
        if deleted >= batch:
            break
    return deleted


def count_finished_sessions(conn: sqlite3.Connection, cutoff: int) -> int:
    """How many tokens finished before cutoff (what a purge would delete)."""
    row = conn.execute(
        "SELECT count(*) FROM sessions WHERE " + " OR ".join(f"({c})" for c in _FINISHED_BEFORE),
        (cutoff, cutoff, cutoff),
    ).fetchone()
    return int(row[0])


def insert_sessions(conn: sqlite3.Connection, rows: Iterable[tuple[Any, ...]]) -> None:
    """Insert many tokens in the caller's transaction (the benchmark's seeding), in
    insert_session's column order."""
    conn.executemany(INSERT_SESSION, rows)
