"""SQLite: the service's named async operations over one database file."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from ...config import DatabaseSettings
from ..errors import QueryTooLong, StorageUnavailable
from ..rows import key_state
from ..types import (
    USAGE_KEPT_HOURS,
    Actor,
    ApiKey,
    AuditEntry,
    Claim,
    Completion,
    IdempotencyRequest,
    KeyState,
    ListedSession,
    Member,
    NewApiKey,
    NewSession,
    Org,
    OrgListing,
    Session,
    SessionQuery,
)
from .admin import (
    PURGE_BATCH,
    count_finished_sessions,
    create_org,
    delete_api_key_in,
    delete_finished_sessions,
    delete_member,
    find_org_by_external_id,
    get_org,
    insert_api_key,
    key_usage,
    list_api_keys,
    list_audit,
    list_members,
    list_orgs,
    list_sessions,
    revoke_session_in,
    set_org_tier,
    update_api_key_in,
    upsert_member,
)
from .engine import (
    READER_BUSY_TIMEOUT_MS,
    Checkpointer,
    WriterLock,
    WriterThread,
    _checkpoint_and_close,
    _Write,
)
from .idempotency import ClaimAsk, complete_key, purge_keys, release_key
from .schema import _open, check_directory, connect, reraise
from .statements import GET_SESSION, KEY_STATE

T = TypeVar("T")
log = logging.getLogger("dailyplay.db")


# Longest a list-sessions query may run before it is given up.
LIST_SECONDS = 5.0


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
        check_directory(self.settings)
        try:
            lock = WriterLock(self.settings.path)
        except OSError as exc:
            raise StorageUnavailable(
                f"cannot open {self.settings.path}-writer.lock: {exc.strerror}"
            ) from exc
        self._writer_thread = WriterThread(
            lock, self._committed, self._observe_commit, self.note_full
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
        try:
            self._reader = _open(
                self.settings, read_only=True, busy_timeout_ms=READER_BUSY_TIMEOUT_MS
            )
        except sqlite3.Error as exc:
            await self.close()
            reraise(exc)

    async def describe(self) -> dict[str, Any]:
        """What init-db reports: the database file, its schema version and journal mode."""
        mode = self._read_with(lambda conn: conn.execute("PRAGMA journal_mode").fetchone()[0])
        return {
            "database": str(Path(self.settings.path).resolve()),
            "schema_version": self._user_version(),
            "journal_mode": mode,
        }

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
    # SQLite's errors leave as the storage layer's (schema.translated).
    def _read_one(self, sql: str, params: Iterable[Any]) -> sqlite3.Row | None:
        try:
            row: sqlite3.Row | None = self.reader.execute(sql, tuple(params)).fetchone()
        except sqlite3.Error as exc:
            reraise(exc)
        return row

    def _read_all(self, sql: str, params: Iterable[Any]) -> list[sqlite3.Row]:
        try:
            return self.reader.execute(sql, tuple(params)).fetchall()
        except sqlite3.Error as exc:
            reraise(exc)

    def _read_with(self, read: Callable[..., T], *args: Any) -> T:
        """read(the read connection, *args), its SQLite errors translated."""
        try:
            return read(self.reader, *args)
        except sqlite3.Error as exc:
            reraise(exc)

    # --- health ----------------------------------------------------------------------------------

    async def schema_version(self) -> int:
        """PRAGMA user_version as the read connection sees it."""
        return self._user_version()

    def _user_version(self) -> int:
        return int(self._read_with(lambda conn: conn.execute("PRAGMA user_version").fetchone()[0]))

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

    async def list_audit(self, org_id: int, limit: int, before_id: int | None) -> list[AuditEntry]:
        """An org's audit entries, newest first, with ids below before_id when given."""
        return self._read_with(list_audit, org_id, limit, before_id)

    # --- an organization's session tokens --------------------------------------------------------

    async def revoke_session(
        self, org_id: int, token: bytes, now: int, by: Actor, reason: str | None
    ) -> tuple[str, ListedSession | None]:
        """revoke_session_in, in one transaction of the writer."""
        return await self._in_transaction(
            lambda conn: revoke_session_in(conn, org_id, token, now, by, reason)
        )

    async def list_sessions(self, org_id: int, query: SessionQuery) -> list[ListedSession]:
        """The org's tokens the query asks for, newest first. On a thread, with a connection of
        its own: a filter no index serves (a rare status in a large organization) may walk
        many rows, and must not hold up the event loop meanwhile; past LIST_SECONDS it is given
        up (QueryTooLong)."""
        return await asyncio.to_thread(self._list_sessions_apart, org_id, query)

    def _list_sessions_apart(self, org_id: int, query: SessionQuery) -> list[ListedSession]:
        conn = _open(self.settings, read_only=True)
        deadline = time.monotonic() + LIST_SECONDS
        conn.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
        try:
            return list_sessions(conn, org_id, query)
        except sqlite3.OperationalError as exc:
            if time.monotonic() > deadline:
                raise QueryTooLong(f"gave up after {LIST_SECONDS:g} s") from None
            reraise(exc)
        finally:
            conn.close()

    # --- retention -------------------------------------------------------------------------------

    async def count_finished_sessions(self, cutoff: int) -> int:
        """How many tokens finished before cutoff (what a purge would delete)."""
        return self._read_with(count_finished_sessions, cutoff)

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

    async def get_org(self, org_id: int) -> Org | None:
        return self._read_with(get_org, org_id)

    async def list_orgs(self) -> list[OrgListing]:
        return self._read_with(list_orgs)

    async def find_org_by_external_id(self, external_id: str) -> Org | None:
        return self._read_with(find_org_by_external_id, external_id)

    async def create_org(
        self, name: str, tier: str, external_id: str | None, now: int, by: Actor
    ) -> Org:
        return await self._in_transaction(
            lambda conn: create_org(conn, name, tier, external_id, now, by)
        )

    async def set_org_tier(self, org_id: int, tier: str, now: int, by: Actor) -> Org | None:
        return await self._in_transaction(lambda conn: set_org_tier(conn, org_id, tier, now, by))

    async def upsert_member(
        self, org_id: int, user_id: str, role: str, now: int, by: Actor
    ) -> Member | None:
        def work(conn: sqlite3.Connection) -> Member | None:
            if get_org(conn, org_id) is None:
                return None
            return upsert_member(conn, org_id, user_id, role, now, by)

        return await self._in_transaction(work)

    async def delete_member(self, org_id: int, user_id: str, now: int, by: Actor) -> bool:
        return await self._in_transaction(
            lambda conn: delete_member(conn, org_id, user_id, now, by)
        )

    async def list_members(self, org_id: int) -> list[Member]:
        return self._read_with(list_members, org_id)

    async def get_member_role(self, org_id: int, user_id: str) -> str | None:
        row = self._read_one(
            "SELECT role FROM org_members WHERE org_id = ? AND user_id = ?", (org_id, user_id)
        )
        return None if row is None else str(row["role"])

    # --- API keys ------------------------------------------------------------------------------

    async def list_api_keys(self, org_id: int) -> list[ApiKey]:
        return self._read_with(list_api_keys, org_id)

    async def key_usage(self, org_id: int, now: int) -> dict[int, dict[str, int]]:
        """Per key of the org: sessions created/consumed in the last 24 h and 30 days."""
        return self._read_with(key_usage, org_id, now)

    async def insert_api_key(self, values: NewApiKey, by: Actor) -> ApiKey:
        """Insert one key and its audit entry."""
        return await self._in_transaction(lambda conn: insert_api_key(conn, values, by))

    async def update_api_key(
        self, org_id: int, key_id: int, changes: dict[str, Any], now: int, by: Actor
    ) -> tuple[ApiKey | None, int]:
        """update_api_key_in, in one transaction of the writer."""
        return await self._in_transaction(
            lambda conn: update_api_key_in(conn, org_id, key_id, changes, now, by)
        )

    async def delete_api_key(self, org_id: int, key_id: int, now: int, by: Actor) -> int | None:
        """delete_api_key_in, in one transaction of the writer."""
        return await self._in_transaction(
            lambda conn: delete_api_key_in(conn, org_id, key_id, now, by)
        )

    async def find_api_key_hashes(self, key_prefix: str) -> list[tuple[int, str]]:
        """(id, key_hash) of every key whose first 8 characters are key_prefix."""
        rows = self._read_all(
            "SELECT id, key_hash FROM api_keys WHERE key_prefix = ?", (key_prefix,)
        )
        return [(int(row["id"]), str(row["key_hash"])) for row in rows]

    async def get_api_key_for_request(self, key_id: int) -> KeyState | None:
        """The key's current state and its org's tier, read now; None if there is no such key."""
        row = self._read_one(KEY_STATE, (key_id,))
        return None if row is None else key_state(row)

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
        self,
        session: NewSession,
        admitted_on: KeyState | None = None,
        completion: Completion | None = None,
    ) -> None:
        """Store a token; returns once it is committed. With admitted_on, the token is stored
        only if its key is still in exactly that state inside the transaction; else KeyChanged
        is raised and nothing is stored. With completion, the idempotency key's answer is
        stored in the same transaction, if the claim is still the caller's; else ClaimLost."""
        await self._enqueue("insert_session", (session, admitted_on, completion))

    # --- Idempotency-Key ---------------------------------------------------------------------

    async def claim_idempotency_key(
        self, request: IdempotencyRequest, now: int, locked_until: int, stale_before: int
    ) -> Claim:
        claim: Claim = await self._enqueue(
            "claim_key", ClaimAsk(request, now, locked_until, stale_before)
        )
        return claim

    async def complete_idempotency_key(self, completion: Completion) -> bool:
        return await self._in_transaction(lambda conn: complete_key(conn, completion))

    async def release_idempotency_key(self, api_key_id: int, key: str, claim: str) -> None:
        await self._in_transaction(lambda conn: release_key(conn, api_key_id, key, claim))

    async def purge_idempotency_keys(self, cutoff: int, batch: int = PURGE_BATCH) -> int:
        deleted = 0
        while True:
            done = await self._in_transaction(lambda conn: purge_keys(conn, cutoff, batch))
            deleted += done
            if done < batch:
                return deleted

    async def get_session(self, token: bytes) -> Session | None:
        # One SQL string object for every call: a string built per call (validate-session's
        # every request) is hashed anew for the statement cache.
        row = self._read_one(GET_SESSION, (token,))
        return None if row is None else Session._make(row)

    async def consume_session(
        self, token: bytes, player_uuid: str | None, now: int
    ) -> Session | None:
        """Atomically mark an active, unexpired token consumed; None when it was not."""
        session: Session | None = await self._enqueue("consume_session", (token, player_uuid, now))
        return session
