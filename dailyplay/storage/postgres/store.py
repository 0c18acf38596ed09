"""PostgreSQL: the service's named async operations over a pool of asyncpg connections."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ... import audit, sessions
from ...batch import Batcher
from ...clock import HOUR_MS
from ...config import DatabaseSettings
from ..errors import (
    ClaimLost,
    Duplicate,
    KeyChanged,
    StorageBusy,
    StorageError,
    StorageFull,
    StorageUnavailable,
)
from ..rows import (
    API_KEY_COLUMNS,
    AUDIT_COLUMNS,
    LISTED_SESSION_COLUMNS,
    ORG_COLUMNS,
    SESSION_COLUMNS,
    api_key,
    audit_entry,
    key_state,
    listed_session,
    org,
    session_conditions,
)
from ..types import (
    CLAIMED,
    MUTABLE_KEY_COLUMNS,
    USAGE_FIELDS,
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
    StoredKey,
    claim_outcome,
)
from .pool import ConnectionPool
from .schema import migrate, read_version, translated

if TYPE_CHECKING:
    import asyncpg

log = logging.getLogger("dailyplay.db")
T = TypeVar("T")

# Tokens deleted per transaction by retention: each batch locks only its own rows, briefly.
PURGE_BATCH = 500
# How often token counts per key and hour (key listings' usage) are added to the database.
USAGE_FLUSH_SECONDS = 1.0
# Longest a new connection may take to open (each worker opens its own, when its pool needs one).
CONNECT_TIMEOUT_SECONDS = 5.0

INSERT_SESSION = (
    "INSERT INTO sessions (token, org_id, api_key_id, game_id, stream_id, external_ref,"
    " metadata, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
)
# A token is stored only while its key (and the key's organization) is exactly in the state the
# request was admitted on. FOR KEY SHARE holds the key's and the org's rows until the token is
# committed (its foreign keys take that lock anyway); a change to either (update_api_key,
# delete_api_key, set_org_tier) first locks the row FOR UPDATE, so it waits for the tokens in
# flight and then revokes them, or they wait for it and find the row changed (PostgreSQL
# re-checks the WHERE on the row's new version) and store nothing.
INSERT_ADMITTED_SESSION = (
    "WITH admitted AS (SELECT 1 FROM api_keys k JOIN orgs o ON o.id = k.org_id"
    " WHERE k.id = $3 AND k.org_id = $10 AND k.key_hash = $11 AND k.is_active = $12"
    " AND k.allowed_game_ids IS NOT DISTINCT FROM $13::jsonb"
    " AND k.allowed_stream_ids IS NOT DISTINCT FROM $14::jsonb"
    " AND k.rate_limit_per_minute = $15 AND k.rate_limit_per_day = $16"
    " AND k.expires_at IS NOT DISTINCT FROM $17 AND o.tier = $18"
    " FOR KEY SHARE OF k, o)"
    " INSERT INTO sessions (token, org_id, api_key_id, game_id, stream_id, external_ref,"
    " metadata, created_at, expires_at)"
    " SELECT $1, $2, $3, $4, $5, $6, $7::json, $8, $9 FROM admitted"
)
# Tokens with their idempotency keys' answers, in one statement: each stored only while its
# request still holds the claim (the row, locked FOR UPDATE in key order, so a take-over waits
# for this transaction and then finds the key done) and its key is as admitted (the check of
# INSERT_ADMITTED_SESSIONS). Returns the tokens whose claim was held, and those stored.
INSERT_CLAIMED_SESSIONS = (
    "WITH b AS (SELECT * FROM unnest($1::bytea[], $2::bigint[], $3::bigint[], $4::bigint[],"
    " $5::bigint[], $6::text[], $7::text[], $8::bigint[], $9::bigint[], $10::bigint[],"
    " $11::text[], $12::boolean[], $13::jsonb[], $14::jsonb[], $15::bigint[], $16::bigint[],"
    " $17::bigint[], $18::text[], $19::text[], $20::text[], $21::integer[], $22::bytea[])"
    " AS b(token, org_id, api_key_id, game_id, stream_id, external_ref, metadata, created_at,"
    " expires_at, k_org, k_hash, k_active, k_games, k_streams, k_per_minute, k_per_day,"
    " k_expires, k_tier, idem, claim, status, body)),"
    " held AS (SELECT b.* FROM b JOIN idempotency_keys i ON i.api_key_id = b.api_key_id"
    " AND i.idem_key = b.idem AND i.claim = b.claim AND i.state = 'pending'"
    " ORDER BY b.api_key_id, b.idem FOR UPDATE OF i),"
    " admitted AS (SELECT held.* FROM held JOIN api_keys k ON k.id = held.api_key_id"
    " JOIN orgs o ON o.id = k.org_id"
    " WHERE k.org_id = held.k_org AND k.key_hash = held.k_hash AND k.is_active = held.k_active"
    " AND k.allowed_game_ids IS NOT DISTINCT FROM held.k_games"
    " AND k.allowed_stream_ids IS NOT DISTINCT FROM held.k_streams"
    " AND k.rate_limit_per_minute = held.k_per_minute AND k.rate_limit_per_day = held.k_per_day"
    " AND k.expires_at IS NOT DISTINCT FROM held.k_expires AND o.tier = held.k_tier"
    " FOR KEY SHARE OF k, o),"
    " inserted AS (INSERT INTO sessions (token, org_id, api_key_id, game_id, stream_id,"
    " external_ref, metadata, created_at, expires_at)"
    " SELECT token, org_id, api_key_id, game_id, stream_id, external_ref, metadata::json,"
    " created_at, expires_at FROM admitted RETURNING token),"
    " done AS (UPDATE idempotency_keys i SET state = 'done', status = a.status, body = a.body"
    " FROM admitted a WHERE i.api_key_id = a.api_key_id AND i.idem_key = a.idem"
    " AND a.token IN (SELECT token FROM inserted) RETURNING 1)"
    " SELECT (SELECT coalesce(array_agg(token), '{}') FROM held),"
    " (SELECT coalesce(array_agg(token), '{}') FROM inserted), (SELECT count(*) FROM done)"
)
# Idempotency-Key claims (storage.types.Claim): a new key in one statement; a key in use is read
# locked, and taken over when claim_outcome allows.
# New keys of one loop turn's claims, in key order (two batches claiming the same keys wait for
# each other rather than deadlock); a key already there, or twice in the batch, is claimed by
# nobody here. Returns the claims stored.
CLAIM_NEW_KEYS = (
    "INSERT INTO idempotency_keys (api_key_id, idem_key, fingerprint, claim, state, created_at,"
    " locked_until) SELECT k, i, f, c, 'pending', n, l FROM unnest($1::bigint[], $2::text[],"
    " $3::bytea[], $4::text[], $5::bigint[], $6::bigint[]) AS b(k, i, f, c, n, l)"
    " ORDER BY k, i ON CONFLICT (api_key_id, idem_key) DO NOTHING RETURNING claim"
)
READ_KEY_LOCKED = (
    "SELECT fingerprint, state, status, body, created_at, locked_until FROM idempotency_keys"
    " WHERE api_key_id = $1 AND idem_key = $2 FOR UPDATE"
)
TAKE_OVER_KEY = (
    "UPDATE idempotency_keys SET fingerprint = $3, claim = $4, state = 'pending', status = NULL,"
    " body = NULL, created_at = $5, locked_until = $6 WHERE api_key_id = $1 AND idem_key = $2"
)
COMPLETE_KEY = (
    "UPDATE idempotency_keys SET state = 'done', status = $4, body = $5"
    " WHERE api_key_id = $1 AND idem_key = $2 AND claim = $3 AND state = 'pending'"
)
RELEASE_KEY = (
    "DELETE FROM idempotency_keys"
    " WHERE api_key_id = $1 AND idem_key = $2 AND claim = $3 AND state = 'pending'"
)
# One statement: of concurrent consumers of a token, PostgreSQL lets exactly one update the row;
# the others wait for it, re-check the WHERE on the consumed row and update nothing.
CONSUME_SESSION = (
    "UPDATE sessions SET status = 'consumed', consumed_at = $3, player_uuid = $2"
    " WHERE token = $1 AND status = 'active' AND expires_at > $3"
    f" RETURNING {SESSION_COLUMNS}"
)
GET_SESSION = f"SELECT {SESSION_COLUMNS} FROM sessions WHERE token = $1"
# The batched forms (dailyplay.batch): one statement for the calls of one loop turn.
GET_SESSIONS = f"SELECT token, {SESSION_COLUMNS} FROM sessions WHERE token = ANY($1::bytea[])"
# Rows are locked in token order (ORDER BY under FOR UPDATE), so two batches that share tokens
# wait for each other rather than deadlock; a row another consumer took meanwhile is re-checked
# and left out.
CONSUME_SESSIONS = (
    "WITH b AS (SELECT * FROM unnest($1::bytea[], $2::text[], $3::bigint[]) AS b(t, p, n)),"
    " locked AS (SELECT s.id, b.p, b.n FROM sessions s JOIN b ON s.token = b.t"
    " WHERE s.status = 'active' AND s.expires_at > b.n ORDER BY s.token FOR UPDATE OF s)"
    " UPDATE sessions SET status = 'consumed', consumed_at = locked.n, player_uuid = locked.p"
    " FROM locked WHERE sessions.id = locked.id"
    " RETURNING sessions.token, "
    + ", ".join(f"sessions.{c.strip()}" for c in SESSION_COLUMNS.split(","))
)
INSERT_ADMITTED_SESSIONS = (
    "WITH b AS (SELECT * FROM unnest($1::bytea[], $2::bigint[], $3::bigint[], $4::bigint[],"
    " $5::bigint[], $6::text[], $7::text[], $8::bigint[], $9::bigint[], $10::bigint[],"
    " $11::text[], $12::boolean[], $13::jsonb[], $14::jsonb[], $15::bigint[], $16::bigint[],"
    " $17::bigint[], $18::text[]) AS b(token, org_id, api_key_id, game_id, stream_id,"
    " external_ref, metadata, created_at, expires_at, k_org, k_hash, k_active, k_games,"
    " k_streams, k_per_minute, k_per_day, k_expires, k_tier)),"
    " admitted AS (SELECT b.* FROM b JOIN api_keys k ON k.id = b.api_key_id"
    " JOIN orgs o ON o.id = k.org_id"
    " WHERE k.org_id = b.k_org AND k.key_hash = b.k_hash AND k.is_active = b.k_active"
    " AND k.allowed_game_ids IS NOT DISTINCT FROM b.k_games"
    " AND k.allowed_stream_ids IS NOT DISTINCT FROM b.k_streams"
    " AND k.rate_limit_per_minute = b.k_per_minute AND k.rate_limit_per_day = b.k_per_day"
    " AND k.expires_at IS NOT DISTINCT FROM b.k_expires AND o.tier = b.k_tier"
    " FOR KEY SHARE OF k, o)"
    " INSERT INTO sessions (token, org_id, api_key_id, game_id, stream_id, external_ref,"
    " metadata, created_at, expires_at)"
    " SELECT token, org_id, api_key_id, game_id, stream_id, external_ref, metadata::json,"
    " created_at, expires_at FROM admitted RETURNING token"
)
KEY_STATE = (
    "SELECT k.id, k.org_id, k.key_hash, k.is_active, k.allowed_game_ids,"
    " k.allowed_stream_ids, k.rate_limit_per_minute, k.rate_limit_per_day,"
    " k.expires_at, o.tier FROM api_keys k JOIN orgs o ON o.id = k.org_id"
    " WHERE k.id = $1"
)
# Tokens that already expired keep reporting `expired`; only live ones turn `revoked`.
REVOKE_KEY_SESSIONS = (
    "UPDATE sessions SET status = 'revoked', revoked_at = $1"
    " WHERE api_key_id = $2 AND status = 'active' AND expires_at > $1"
)
# A token has finished when it expired, was consumed or was revoked; each way has its own
# indexed time column, so every batch is a range scan, however large the table.
_FINISHED_BEFORE = (
    "expires_at < $1",
    "status = 'consumed' AND consumed_at < $1",
    "status = 'revoked' AND revoked_at < $1",
)


def _stored_form(row: Any) -> dict[str, Any]:
    """A key row in the stored forms the audit trail records (those of SQLite's columns and
    keys.key_changes): is_active 0 or 1, allow-lists as JSON text (jsonb prints `[1, 2]`, as
    json.dumps does)."""
    stored = dict(row)
    stored["is_active"] = int(stored["is_active"])
    return stored


async def _record_audit(
    conn: asyncpg.Connection,
    at: int,
    org_id: int,
    by: Actor,
    action: str,
    api_key_id: int | None,
    changes: dict[str, Any] | None,
) -> None:
    """One audit entry, in the caller's transaction (so it exists exactly when the change does)."""
    await conn.execute(
        "INSERT INTO audit_log (at, org_id, actor, action, api_key_id, client_ip, changes)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7::json)",
        at, org_id, by.name, action, api_key_id, by.client_ip,
        None if changes is None else json.dumps(changes, ensure_ascii=False),
    )  # fmt: skip


class PostgresStore:
    """The service's storage on PostgreSQL: named async operations over a connection pool.

    Each worker process has a pool of its own (database.pool_min .. pool_max connections). Every
    operation is one statement, or one transaction, on a connection of the pool; PostgreSQL
    orders concurrent writers itself, on every host, so there is no writer thread or file lock
    here. Token counts per key and hour (usage in key listings) are added up in the process and
    written once a second, not once per token.
    """

    def __init__(
        self,
        settings: DatabaseSettings,
        observe_commit: Callable[[float, int, bool], None] | None = None,
    ):
        self.settings = settings
        self._pool: ConnectionPool | None = None
        self._timeout = settings.statement_timeout_ms / 1000
        # Token counts not yet written: (key id, hour) -> [created, consumed].
        self._usage: dict[tuple[int, int], list[int]] = {}
        self._usage_task: asyncio.Task[None] | None = None
        self._full_at: float | None = None
        # The calls of one loop turn, one statement each (batch.Batcher).
        self._gets: Batcher[bytes, Session | None] = Batcher(self._get_sessions)
        self._consumes: Batcher[tuple[bytes, str | None, int], Session | None] = Batcher(
            self._consume_sessions
        )
        self._inserts: Batcher[tuple[NewSession, KeyState], BaseException | None] = Batcher(
            self._insert_admitted
        )
        self._claimed_inserts: Batcher[
            tuple[NewSession, KeyState, Completion], BaseException | None
        ] = Batcher(self._insert_claimed)
        self._new_claims: Batcher[tuple[int, str, bytes, str, int, int], bool | BaseException] = (
            Batcher(self._claim_new_keys)
        )

    # --- life ----------------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the pool (its first connections prove the server is reachable), then migrate."""
        try:
            import asyncpg
        except ImportError:
            raise StorageUnavailable(
                "database.url names PostgreSQL, which needs the asyncpg driver: "
                "pip install 'dailyplay[postgres]'"
            ) from None
        timeout_ms = int(self.settings.statement_timeout_ms)
        url = self.settings.url
        server_settings = {
            "application_name": "dailyplay",
            "statement_timeout": str(timeout_ms),
            "lock_timeout": str(timeout_ms),
            "idle_in_transaction_session_timeout": str(max(timeout_ms, 10_000)),
        }

        async def connect() -> asyncpg.Connection:
            return await asyncpg.connect(
                url,
                timeout=CONNECT_TIMEOUT_SECONDS,
                # The client gives up a little after the server would have cancelled.
                command_timeout=self._timeout + 1,
                server_settings=server_settings,
            )

        self._pool = ConnectionPool(
            connect, self.settings.pool_min, self.settings.pool_max, self._timeout
        )
        try:
            await self._pool.open()
            await self._with_connection(migrate)
        except BaseException as exc:
            await self.close()
            if isinstance(exc, Exception):
                raise translated(exc) from exc
            raise
        self._usage_task = asyncio.create_task(self._write_usage_every_second())

    async def close(self) -> None:
        """Finish the batches under way, write the usage counted so far, then close every
        connection."""
        for batcher in (
            self._new_claims,
            self._claimed_inserts,
            self._inserts,
            self._consumes,
            self._gets,
        ):
            await batcher.drain()
        task, self._usage_task = self._usage_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            try:
                await self._write_usage()
            except Exception as exc:
                log.warning("storing token usage at shutdown failed: %s", translated(exc))
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close(self._timeout)

    @property
    def pool(self) -> ConnectionPool:
        if self._pool is None:
            raise RuntimeError("database is not open")
        return self._pool

    # Each operation takes a connection from the pool, gives it back (or closes it when it
    # failed in a way that may leave it unusable: _give_back), and raises what the driver
    # raised translated (schema.translated): the pool's waits and the server's refusals alike.
    # The three used per request are written out, without a closure or a context manager.

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        pool = self.pool
        conn = pool.take()
        try:
            if conn is None:
                conn = await pool.acquire()
            rows = await conn.fetch(sql, *args)
        except BaseException as exc:
            error = self._failed(conn, exc)
            if error is exc:
                raise
            raise error from exc
        pool.release(conn)
        return list(rows)

    async def _fetchrow(self, sql: str, *args: Any) -> Any:
        pool = self.pool
        conn = pool.take()
        try:
            if conn is None:
                conn = await pool.acquire()
            row = await conn.fetchrow(sql, *args)
        except BaseException as exc:
            error = self._failed(conn, exc)
            if error is exc:
                raise
            raise error from exc
        pool.release(conn)
        return row

    async def _execute(self, sql: str, *args: Any) -> str:
        pool = self.pool
        conn = pool.take()
        try:
            if conn is None:
                conn = await pool.acquire()
            status: str = await conn.execute(sql, *args)
        except BaseException as exc:
            error = self._failed(conn, exc)
            if error is exc:
                raise
            raise error from exc
        pool.release(conn)
        return status

    async def _with_connection(self, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        pool = self.pool
        conn = pool.take()
        try:
            if conn is None:
                conn = await pool.acquire()
            result = await work(conn)
        except BaseException as exc:
            error = self._failed(conn, exc)
            if error is exc:
                raise
            raise error from exc
        pool.release(conn)
        return result

    async def _in_transaction(self, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """await work(connection) inside one transaction, committed before this returns."""

        async def transaction(conn: asyncpg.Connection) -> T:
            async with conn.transaction():
                return await work(conn)

        return await self._with_connection(transaction)

    def _failed(self, conn: Any, exc: BaseException) -> BaseException:
        """What to raise for exc, having given conn (if any) back to the pool, or closed it when
        exc may have left it out of step with the server."""
        if conn is not None:
            if _may_have_broken(exc):
                self.pool.discard(conn)
            else:
                self.pool.release(conn)
        return self._translated(exc)

    def _translated(self, exc: BaseException) -> BaseException:
        error = translated(exc)
        if isinstance(error, StorageFull):
            self._full_at = time.monotonic()
        return error

    # --- health --------------------------------------------------------------------------------

    async def schema_version(self) -> int:
        return await self._with_connection(read_version)

    async def describe(self) -> dict[str, Any]:
        """What init-db reports: the database (its url without a password), its schema
        version and the server's version."""
        server = await self._fetchrow("SHOW server_version")
        return {
            "database": self.settings.display,
            "schema_version": await self.schema_version(),
            "server_version": server[0],
        }

    def seconds_since_full(self) -> float | None:
        return None if self._full_at is None else time.monotonic() - self._full_at

    async def probe_write(self, now: int) -> None:
        await self._execute(
            "INSERT INTO readiness (id, checked_at) VALUES (1, $1)"
            " ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at",
            now,
        )

    # --- organizations -------------------------------------------------------------------------

    async def get_org(self, org_id: int) -> Org | None:
        row = await self._fetchrow(f"SELECT {ORG_COLUMNS} FROM orgs WHERE id = $1", org_id)
        return None if row is None else org(row)

    async def list_orgs(self) -> list[OrgListing]:
        rows = await self._fetch(
            "SELECT o.id, o.name, o.tier, o.external_id, o.created_at,"
            " (SELECT count(*) FROM org_members m WHERE m.org_id = o.id) AS members,"
            " (SELECT count(*) FROM api_keys k WHERE k.org_id = o.id) AS api_keys"
            " FROM orgs o ORDER BY o.id"
        )
        return [OrgListing(org(row), row["members"], row["api_keys"]) for row in rows]

    async def find_org_by_external_id(self, external_id: str) -> Org | None:
        row = await self._fetchrow(
            f"SELECT {ORG_COLUMNS} FROM orgs WHERE external_id = $1", external_id
        )
        return None if row is None else org(row)

    async def create_org(
        self, name: str, tier: str, external_id: str | None, now: int, by: Actor
    ) -> Org:

        async def work(conn: asyncpg.Connection) -> Org:
            row = await conn.fetchrow(
                "INSERT INTO orgs (name, tier, external_id, created_at) VALUES ($1, $2, $3, $4)"
                f" ON CONFLICT (external_id) DO NOTHING RETURNING {ORG_COLUMNS}",
                name, tier, external_id, now,
            )  # fmt: skip
            if row is None:
                raise Duplicate(f"an organization with external id {external_id!r} already exists")
            changes = audit.org_created(name, tier, external_id)
            await _record_audit(conn, now, row["id"], by, "org.create", None, changes)
            return org(row)

        result: Org = await self._in_transaction(work)
        return result

    async def set_org_tier(self, org_id: int, tier: str, now: int, by: Actor) -> Org | None:
        async def work(conn: asyncpg.Connection) -> Org | None:
            # FOR UPDATE: tokens being stored under the old tier finish first (INSERT_ADMITTED_
            # SESSION); later ones see the new tier.
            before = await conn.fetchrow("SELECT tier FROM orgs WHERE id = $1 FOR UPDATE", org_id)
            if before is None:
                return None
            row = await conn.fetchrow(
                f"UPDATE orgs SET tier = $1 WHERE id = $2 RETURNING {ORG_COLUMNS}", tier, org_id
            )
            changes = audit.tier_changed(before["tier"], tier)
            if changes is not None:
                await _record_audit(conn, now, org_id, by, "org.tier_change", None, changes)
            return org(row)

        result: Org | None = await self._in_transaction(work)
        return result

    async def upsert_member(
        self, org_id: int, user_id: str, role: str, now: int, by: Actor
    ) -> Member | None:
        async def work(conn: asyncpg.Connection) -> Member | None:
            found = await conn.fetchval("SELECT 1 FROM orgs WHERE id = $1 FOR KEY SHARE", org_id)
            if found is None:
                return None
            before = await conn.fetchval(
                "SELECT role FROM org_members WHERE org_id = $1 AND user_id = $2 FOR UPDATE",
                org_id, user_id,
            )  # fmt: skip
            change = audit.membership_changed(user_id, before, role)
            if change is not None:
                await _record_audit(conn, now, org_id, by, change[0], None, change[1])
            row = await conn.fetchrow(
                "INSERT INTO org_members (org_id, user_id, role, created_at)"
                " VALUES ($1, $2, $3, $4)"
                " ON CONFLICT (org_id, user_id) DO UPDATE SET role = excluded.role"
                " RETURNING org_id, user_id, role, created_at",
                org_id, user_id, role, now,
            )  # fmt: skip
            return Member(row["org_id"], row["user_id"], row["role"], row["created_at"])

        result: Member | None = await self._in_transaction(work)
        return result

    async def delete_member(self, org_id: int, user_id: str, now: int, by: Actor) -> bool:
        async def work(conn: asyncpg.Connection) -> bool:
            role = await conn.fetchval(
                "DELETE FROM org_members WHERE org_id = $1 AND user_id = $2 RETURNING role",
                org_id, user_id,
            )  # fmt: skip
            if role is None:
                return False
            changes = audit.member_removed(user_id, role)
            await _record_audit(conn, now, org_id, by, "member.remove", None, changes)
            return True

        removed: bool = await self._in_transaction(work)
        return removed

    async def list_members(self, org_id: int) -> list[Member]:
        rows = await self._fetch(
            "SELECT org_id, user_id, role, created_at FROM org_members WHERE org_id = $1"
            ' ORDER BY user_id COLLATE "C"',
            org_id,
        )
        return [Member(r["org_id"], r["user_id"], r["role"], r["created_at"]) for r in rows]

    async def get_member_role(self, org_id: int, user_id: str) -> str | None:
        row = await self._fetchrow(
            "SELECT role FROM org_members WHERE org_id = $1 AND user_id = $2", org_id, user_id
        )
        return None if row is None else str(row["role"])

    # --- API keys ------------------------------------------------------------------------------

    async def list_api_keys(self, org_id: int) -> list[ApiKey]:
        rows = await self._fetch(
            f"SELECT {API_KEY_COLUMNS} FROM api_keys WHERE org_id = $1 ORDER BY id", org_id
        )
        return [api_key(row) for row in rows]

    async def key_usage(self, org_id: int, now: int) -> dict[int, dict[str, int]]:
        """Per key of the org: tokens created and consumed in the last 24 hours and 30 days
        (by the hour: the current hour and the 23 or 719 before it). This process's counts are
        written first; other processes' are at most a second behind."""
        await self._write_usage()
        hour = now // HOUR_MS
        rows = await self._fetch(
            "SELECT api_key_id,"
            " coalesce(sum(created) FILTER (WHERE hour > $1), 0),"
            " coalesce(sum(consumed) FILTER (WHERE hour > $1), 0),"
            " coalesce(sum(created), 0), coalesce(sum(consumed), 0)"
            " FROM key_usage WHERE hour > $2"
            " AND api_key_id IN (SELECT id FROM api_keys WHERE org_id = $3) GROUP BY api_key_id",
            hour - 24, hour - 30 * 24, org_id,
        )  # fmt: skip
        return {
            int(row[0]): dict(zip(USAGE_FIELDS, map(int, row[1:]), strict=True)) for row in rows
        }

    async def insert_api_key(self, values: NewApiKey, by: Actor) -> ApiKey:
        async def work(conn: asyncpg.Connection) -> ApiKey:
            row = await conn.fetchrow(
                "INSERT INTO api_keys (org_id, name, description, key_prefix, key_hash,"
                " allowed_game_ids, allowed_stream_ids, rate_limit_per_minute,"
                " rate_limit_per_day, expires_at, created_at, updated_at)"
                " VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7::jsonb, $8, $9, $10, $11, $12)"
                f" RETURNING {API_KEY_COLUMNS}",
                *values,
            )
            changes = audit.key_created(values)
            await _record_audit(
                conn, row["created_at"], row["org_id"], by, "api_key.create", row["id"], changes
            )
            return api_key(row)

        key: ApiKey = await self._in_transaction(work)
        return key

    async def update_api_key(
        self, org_id: int, key_id: int, changes: dict[str, Any], now: int, by: Actor
    ) -> tuple[ApiKey | None, int]:
        unknown = set(changes) - MUTABLE_KEY_COLUMNS
        if unknown:
            raise ValueError(f"not a mutable API key column: {sorted(unknown)}")

        async def work(conn: asyncpg.Connection) -> tuple[ApiKey | None, int]:
            # FOR UPDATE: tokens being stored on the key's old state finish first, and are
            # revoked below when it is deactivated (INSERT_ADMITTED_SESSION).
            before = await conn.fetchrow(
                f"SELECT {API_KEY_COLUMNS} FROM api_keys WHERE id = $1 AND org_id = $2"
                " FOR UPDATE",
                key_id, org_id,
            )  # fmt: skip
            if before is None:
                return None, 0
            columns = list(changes)
            values = [bool(changes[c]) if c == "is_active" else changes[c] for c in columns]
            assignments = ", ".join(
                f"{c} = ${i}" + ("::jsonb" if c.startswith("allowed_") else "")
                for i, c in enumerate(columns, start=1)
            )
            n = len(columns)
            row = await conn.fetchrow(
                f"UPDATE api_keys SET {assignments}, updated_at = ${n + 1}"
                f" WHERE id = ${n + 2} RETURNING {API_KEY_COLUMNS}",
                *values, now, key_id,
            )  # fmt: skip
            revoked = 0
            if changes.get("is_active") == 0:
                revoked = _row_count(await conn.execute(REVOKE_KEY_SESSIONS, now, key_id))
            action, diff = audit.key_updated(_stored_form(before), changes)
            await _record_audit(conn, now, org_id, by, action, key_id, diff)
            return api_key(row), revoked

        result: tuple[ApiKey | None, int] = await self._in_transaction(work)
        return result

    async def delete_api_key(self, org_id: int, key_id: int, now: int, by: Actor) -> int | None:
        async def work(conn: asyncpg.Connection) -> int | None:
            found = await conn.fetchval(
                "SELECT 1 FROM api_keys WHERE id = $1 AND org_id = $2 FOR UPDATE", key_id, org_id
            )
            if found is None:
                return None
            revoked = _row_count(await conn.execute(REVOKE_KEY_SESSIONS, now, key_id))
            await conn.execute("DELETE FROM api_keys WHERE id = $1", key_id)
            await conn.execute("DELETE FROM key_usage WHERE api_key_id = $1", key_id)
            await _record_audit(conn, now, org_id, by, "api_key.delete", key_id, None)
            return revoked

        result: int | None = await self._in_transaction(work)
        if result is not None:
            # Counts this process has not written yet would bring the key's usage back.
            for slot in [slot for slot in self._usage if slot[0] == key_id]:
                del self._usage[slot]
        return result

    async def find_api_key_hashes(self, key_prefix: str) -> list[tuple[int, str]]:
        rows = await self._fetch(
            "SELECT id, key_hash FROM api_keys WHERE key_prefix = $1", key_prefix
        )
        return [(int(row["id"]), str(row["key_hash"])) for row in rows]

    async def get_api_key_for_request(self, key_id: int) -> KeyState | None:
        row = await self._fetchrow(KEY_STATE, key_id)
        return None if row is None else key_state(row)

    async def revoke_session(
        self, org_id: int, token: bytes, now: int, by: Actor, reason: str | None
    ) -> tuple[str, ListedSession | None]:
        """As the SQLite store's: the row held FOR UPDATE, so that a consume of the same token
        waits and then finds it revoked, or this waits for the consume."""

        async def work(conn: asyncpg.Connection) -> tuple[str, ListedSession | None]:
            row = await conn.fetchrow(
                f"SELECT {LISTED_SESSION_COLUMNS} FROM sessions WHERE token = $1 AND org_id = $2"
                " FOR UPDATE",
                token, org_id,
            )  # fmt: skip
            if row is None:
                return "not_found", None
            found = listed_session(row)
            state = sessions.status(found, now)
            if state != "active":
                return state, found
            row = await conn.fetchrow(
                "UPDATE sessions SET status = 'revoked', revoked_at = $1 WHERE id = $2"
                f" RETURNING {LISTED_SESSION_COLUMNS}",
                now, found.id,
            )  # fmt: skip
            changes = audit.session_revoked(str(uuid.UUID(bytes=token)), reason)
            await _record_audit(conn, now, org_id, by, "session.revoke", found.api_key_id, changes)
            return state, listed_session(row)

        result: tuple[str, ListedSession | None] = await self._in_transaction(work)
        return result

    async def list_sessions(self, org_id: int, query: SessionQuery) -> list[ListedSession]:
        where, values = session_conditions(query, lambda n: f"${n}")
        rows = await self._fetch(
            f"SELECT {LISTED_SESSION_COLUMNS} FROM sessions WHERE org_id = $1{where}"
            f" ORDER BY id DESC LIMIT ${len(values) + 2}",
            org_id, *values, query.limit,
        )  # fmt: skip
        return [listed_session(row) for row in rows]

    async def list_audit(self, org_id: int, limit: int, before_id: int | None) -> list[AuditEntry]:
        rows = await self._fetch(
            f"SELECT {AUDIT_COLUMNS} FROM audit_log WHERE org_id = $1 AND id < $2"
            " ORDER BY id DESC LIMIT $3",
            org_id, before_id if before_id is not None else 2**63 - 1, limit,
        )  # fmt: skip
        return [audit_entry(row) for row in rows]

    # --- rate limits and usage -----------------------------------------------------------------

    async def record_key_usage(
        self, last_used: dict[int, int], counter_deltas: dict[tuple[int, str, int], int]
    ) -> dict[tuple[int, str, int], int]:
        # Rows in one order on every host: two flushes never wait for each other in a cycle.
        used = sorted(last_used.items())
        counters = sorted(counter_deltas.items())

        async def work(conn: asyncpg.Connection) -> dict[tuple[int, str, int], int]:
            if used:
                await conn.execute(
                    "UPDATE api_keys SET last_used_at = greatest(coalesce(last_used_at, 0), u.at)"
                    " FROM unnest($1::bigint[], $2::bigint[]) AS u(id, at)"
                    " WHERE api_keys.id = u.id",
                    [key_id for key_id, _ in used], [at for _, at in used],
                )  # fmt: skip
            if not counters:
                return {}
            rows = await conn.fetch(
                "INSERT INTO rate_counters (api_key_id, span, period, hits)"
                " SELECT u.k, u.s, u.p, u.h"
                " FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::bigint[])"
                " AS u(k, s, p, h)"
                " WHERE EXISTS (SELECT 1 FROM api_keys WHERE id = u.k)"
                " ON CONFLICT (api_key_id, span, period)"
                " DO UPDATE SET hits = rate_counters.hits + excluded.hits"
                " RETURNING api_key_id, span, period, hits",
                [slot[0] for slot, _ in counters],
                [slot[1] for slot, _ in counters],
                [slot[2] for slot, _ in counters],
                [delta for _, delta in counters],
            )
            return {
                (row["api_key_id"], row["span"], row["period"]): int(row["hits"]) for row in rows
            }

        totals: dict[tuple[int, str, int], int] = await self._in_transaction(work)
        return totals

    async def prune_rate_counters(self, minute_before: int, day_before: int) -> None:
        async def work(conn: asyncpg.Connection) -> None:
            await conn.execute(
                "DELETE FROM rate_counters WHERE (span = 'minute' AND period < $1)"
                " OR (span = 'day' AND period < $2)",
                minute_before, day_before,
            )  # fmt: skip
            await conn.execute(
                "DELETE FROM key_usage WHERE hour < $1", (day_before + 1) * 24 - USAGE_KEPT_HOURS
            )

        await self._in_transaction(work)

    async def get_rate_counters(self, key_id: int, minute: int, day: int) -> dict[str, int]:
        rows = await self._fetch(
            "SELECT span, hits FROM rate_counters WHERE api_key_id = $1"
            " AND ((span = 'minute' AND period = $2) OR (span = 'day' AND period = $3))",
            key_id, minute, day,
        )  # fmt: skip
        return {str(row["span"]): int(row["hits"]) for row in rows}

    def _count(self, key_id: int | None, at: int, column: int) -> None:
        if key_id is not None:
            slot = (key_id, at // HOUR_MS)
            counts = self._usage.get(slot)
            if counts is None:
                counts = self._usage[slot] = [0, 0]
            counts[column] += 1

    async def _write_usage(self) -> None:
        """Add the token counts of this process to key_usage, in one statement."""
        if not self._usage:
            return
        pending, self._usage = self._usage, {}
        slots = sorted(pending)
        try:
            await self._execute(
                "INSERT INTO key_usage (api_key_id, hour, created, consumed)"
                " SELECT u.k, u.h, u.c, u.n"
                " FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[])"
                " AS u(k, h, c, n)"
                " WHERE EXISTS (SELECT 1 FROM api_keys WHERE id = u.k)"
                " ON CONFLICT (api_key_id, hour) DO UPDATE SET"
                " created = key_usage.created + excluded.created,"
                " consumed = key_usage.consumed + excluded.consumed",
                [slot[0] for slot in slots],
                [slot[1] for slot in slots],
                [pending[slot][0] for slot in slots],
                [pending[slot][1] for slot in slots],
            )
        except BaseException:
            # Kept for the next attempt.
            for slot, (created, consumed) in pending.items():
                counts = self._usage.setdefault(slot, [0, 0])
                counts[0] += created
                counts[1] += consumed
            raise

    async def _write_usage_every_second(self) -> None:
        while True:
            await asyncio.sleep(USAGE_FLUSH_SECONDS)
            try:
                await self._write_usage()
            except Exception as exc:
                log.warning("storing token usage failed (will retry): %s", exc)

    # --- sessions ------------------------------------------------------------------------------

    async def insert_session(
        self,
        session: NewSession,
        admitted_on: KeyState | None = None,
        completion: Completion | None = None,
    ) -> None:
        if completion is not None:
            if admitted_on is None:
                raise ValueError("an idempotent insert is admitted on a key's state")
            await self._claimed_inserts.submit((session, admitted_on, completion))
            return
        if admitted_on is None:
            await self._execute(INSERT_SESSION, *session)
            self._count(session.api_key_id, session.created_at, 0)
            return
        await self._inserts.submit((session, admitted_on))

    async def _insert_admitted(
        self, batch: list[tuple[NewSession, KeyState]]
    ) -> list[BaseException | None]:
        """Store each token whose key is still in the state it was admitted on, in one
        statement; the others' result is KeyChanged."""
        import asyncpg

        if len(batch) == 1:
            session, a = batch[0]
            status = await self._execute(
                INSERT_ADMITTED_SESSION,
                *session,
                a.org_id, a.key_hash, a.is_active, _json_list(a.allowed_game_ids),
                _json_list(a.allowed_stream_ids), a.rate_limit_per_minute,
                a.rate_limit_per_day, a.expires_at, a.tier,
            )  # fmt: skip
            stored = {session.token} if _row_count(status) else set()
        else:
            columns: list[list[Any]] = [[] for _ in range(18)]
            for session, a in batch:
                for column, value in zip(
                    columns,
                    (*session, a.org_id, a.key_hash, a.is_active,
                     _json_list(a.allowed_game_ids), _json_list(a.allowed_stream_ids),
                     a.rate_limit_per_minute, a.rate_limit_per_day, a.expires_at, a.tier),
                    strict=True,
                ):  # fmt: skip
                    column.append(value)
            try:
                rows = await self._fetch(INSERT_ADMITTED_SESSIONS, *columns)
            except StorageError:
                raise
            except asyncpg.PostgresError:
                # One row the database refuses (a constraint) must not fail the others.
                return [await self._alone(self._insert_admitted, item) for item in batch]
            stored = {bytes(row[0]) for row in rows}
        results: list[BaseException | None] = []
        for session, _state in batch:
            if session.token in stored:
                self._count(session.api_key_id, session.created_at, 0)
                results.append(None)
            else:
                results.append(KeyChanged(session.api_key_id))
        return results

    async def _insert_claimed(
        self, batch: list[tuple[NewSession, KeyState, Completion]]
    ) -> list[BaseException | None]:
        """Store each token whose request still holds its idempotency claim and whose key is
        still as admitted, with the claim's answer, in one statement; the others' result is
        ClaimLost or KeyChanged."""
        import asyncpg

        columns: list[list[Any]] = [[] for _ in range(22)]
        for session, a, c in batch:
            for column, value in zip(
                columns,
                (*session, a.org_id, a.key_hash, a.is_active,
                 _json_list(a.allowed_game_ids), _json_list(a.allowed_stream_ids),
                 a.rate_limit_per_minute, a.rate_limit_per_day, a.expires_at, a.tier,
                 c.key, c.claim, c.status, c.body),
                strict=True,
            ):  # fmt: skip
                column.append(value)
        try:
            held, stored, _done = await self._fetchrow(INSERT_CLAIMED_SESSIONS, *columns)
        except StorageError:
            raise
        except asyncpg.PostgresError:
            if len(batch) == 1:
                raise
            # One row the database refuses (a constraint) must not fail the others.
            return [await self._alone(self._insert_claimed, item) for item in batch]
        held, stored = {bytes(t) for t in held}, {bytes(t) for t in stored}
        results: list[BaseException | None] = []
        for session, _state, completion in batch:
            if session.token in stored:
                self._count(session.api_key_id, session.created_at, 0)
                results.append(None)
            elif session.token in held:
                results.append(KeyChanged(session.api_key_id))
            else:
                results.append(ClaimLost(completion.key))
        return results

    async def _alone(self, run: Callable[[list[Any]], Awaitable[list[Any]]], item: Any) -> Any:
        """run([item])'s one result, or the exception it raised."""
        try:
            [result] = await run([item])
        except Exception as exc:
            return exc
        return result

    async def get_session(self, token: bytes) -> Session | None:
        session: Session | None = await self._gets.submit(token)
        return session

    async def _get_sessions(self, tokens: list[bytes]) -> list[Session | None]:
        if len(tokens) == 1:
            row = await self._fetchrow(GET_SESSION, tokens[0])
            return [None if row is None else Session._make(row)]
        rows = await self._fetch(GET_SESSIONS, tokens)
        found = {bytes(row[0]): Session._make(row[1:]) for row in rows}
        return [found.get(token) for token in tokens]

    async def consume_session(
        self, token: bytes, player_uuid: str | None, now: int
    ) -> Session | None:
        session: Session | None = await self._consumes.submit((token, player_uuid, now))
        return session

    async def _consume_sessions(
        self, asks: list[tuple[bytes, str | None, int]]
    ) -> list[Session | None]:
        """Consume the tokens asked for, in one statement. A token asked for twice in one
        batch is won by its first asker only (the others get None, as they would a moment
        later)."""
        first: dict[bytes, int] = {}
        for index, ask in enumerate(asks):
            first.setdefault(ask[0], index)
        results: list[Session | None] = [None] * len(asks)
        if len(first) == 1:
            index = next(iter(first.values()))
            row = await self._fetchrow(CONSUME_SESSION, *asks[index])
            won = {} if row is None else {asks[index][0]: Session._make(row)}
        else:
            unique = [asks[index] for index in first.values()]
            rows = await self._fetch(
                CONSUME_SESSIONS,
                [ask[0] for ask in unique],
                [ask[1] for ask in unique],
                [ask[2] for ask in unique],
            )
            won = {bytes(row[0]): Session._make(row[1:]) for row in rows}
        for token, session in won.items():
            index = first[token]
            results[index] = session
            self._count(session.api_key_id, asks[index][2], 1)
        return results

    # --- Idempotency-Key -------------------------------------------------------------------------

    async def claim_idempotency_key(
        self, request: IdempotencyRequest, now: int, locked_until: int, stale_before: int
    ) -> Claim:

        key_id, key, fingerprint = request
        claim = secrets.token_hex(8)

        async def in_use(conn: asyncpg.Connection) -> Claim | None:
            row = await conn.fetchrow(READ_KEY_LOCKED, key_id, key)
            if row is None:
                return None  # released or purged meanwhile: try a new claim again
            found = claim_outcome(StoredKey(*row), fingerprint, now, stale_before)
            if found is None:
                await conn.execute(
                    TAKE_OVER_KEY, key_id, key, fingerprint, claim, now, locked_until
                )
                found = Claim(CLAIMED, claim=claim)
            return found

        for _attempt in range(3):
            claimed = await self._new_claims.submit(
                (key_id, key, fingerprint, claim, now, locked_until)
            )
            if claimed:
                return Claim(CLAIMED, claim=claim)
            found = await self._in_transaction(in_use)
            if found is not None:
                return found
        raise StorageBusy(f"idempotency key {key_id} kept changing")

    async def _claim_new_keys(
        self, batch: list[tuple[int, str, bytes, str, int, int]]
    ) -> list[bool | BaseException]:
        """Claim the keys of a loop turn's requests that no row holds yet (CLAIM_NEW_KEYS):
        for each, whether its claim was stored; KeyChanged when its API key is gone."""
        import asyncpg

        try:
            rows = await self._fetch(
                CLAIM_NEW_KEYS, *(list(column) for column in zip(*batch, strict=True))
            )
        except asyncpg.ForeignKeyViolationError:
            if len(batch) == 1:
                return [KeyChanged(batch[0][0])]  # the API key was deleted meanwhile
            return [await self._alone(self._claim_new_keys, ask) for ask in batch]
        stored = {row[0] for row in rows}
        return [ask[3] in stored for ask in batch]

    async def complete_idempotency_key(self, completion: Completion) -> bool:
        c = completion
        status = await self._execute(COMPLETE_KEY, c.api_key_id, c.key, c.claim, c.status, c.body)
        return _row_count(status) > 0

    async def release_idempotency_key(self, api_key_id: int, key: str, claim: str) -> None:
        await self._execute(RELEASE_KEY, api_key_id, key, claim)

    async def purge_idempotency_keys(self, cutoff: int, batch: int = PURGE_BATCH) -> int:
        deleted = 0
        while True:
            status = await self._execute(
                "DELETE FROM idempotency_keys WHERE (api_key_id, idem_key) IN"
                " (SELECT api_key_id, idem_key FROM idempotency_keys WHERE created_at < $1"
                " LIMIT $2 FOR UPDATE SKIP LOCKED)",
                cutoff, batch,
            )  # fmt: skip
            done = _row_count(status)
            deleted += done
            if done < batch:
                return deleted

    # --- retention -----------------------------------------------------------------------------

    async def count_finished_sessions(self, cutoff: int) -> int:
        row = await self._fetchrow(
            "SELECT count(*) FROM sessions WHERE "
            + " OR ".join(f"({c})" for c in _FINISHED_BEFORE),
            cutoff,
        )
        return int(row[0])

    async def purge_finished_sessions(self, cutoff: int, batch: int = PURGE_BATCH) -> int:
        """Delete tokens that finished before cutoff, `batch` per statement (each its own
        transaction, locking only the rows it deletes and skipping rows another transaction
        holds); returns how many."""
        deleted = 0
        for condition in _FINISHED_BEFORE:
            while True:
                status = await self._execute(
                    "DELETE FROM sessions WHERE id IN (SELECT id FROM sessions"
                    f" WHERE {condition} LIMIT $2 FOR UPDATE SKIP LOCKED)",
                    cutoff, batch,
                )  # fmt: skip
                done = _row_count(status)
                deleted += done
                if done < batch:
                    break
        return deleted


def _may_have_broken(exc: BaseException) -> bool:
    """Whether a connection may be unfit for another statement after exc: the client gave up on
    a statement under way (a timeout, a cancellation), the connection failed or was cut by the
    server, or the driver lost track of its protocol. After anything else (the server refused
    a statement, or this module raised an error of its own, such as Duplicate) the transaction
    was rolled back and the connection is fit; the pool still checks that it is open and
    outside a transaction."""
    import asyncpg

    return not isinstance(exc, Exception) or isinstance(
        exc,
        TimeoutError
        | OSError
        | asyncpg.InterfaceError
        | asyncpg.InternalClientError
        | asyncpg.PostgresConnectionError
        | asyncpg.OperatorInterventionError,
    )


def _json_list(ids: list[int] | None) -> str | None:
    """An allow-list as the JSON text a jsonb parameter takes (None: every id)."""
    return None if ids is None else json.dumps(ids)


def _row_count(status: str) -> int:
    """The rows a command touched, from its status ('UPDATE 3', 'INSERT 0 1', 'DELETE 0')."""
    return int(status.rpartition(" ")[2])
