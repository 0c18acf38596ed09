"""PostgreSQL: the service's named async operations over a pool of asyncpg connections."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ... import audit
from ...clock import HOUR_MS
from ...config import DatabaseSettings
from ..errors import Duplicate, KeyChanged, StorageFull, StorageUnavailable
from ..types import (
    MUTABLE_KEY_COLUMNS,
    USAGE_FIELDS,
    Actor,
    ApiKey,
    AuditEntry,
    KeyState,
    Member,
    NewApiKey,
    NewSession,
    Org,
    OrgListing,
    Session,
    allow_list,
)
from .schema import migrate, read_version, translated

if TYPE_CHECKING:
    import asyncpg

log = logging.getLogger("dailyplay.db")

# Tokens deleted per transaction by retention: each batch locks only its own rows, briefly.
PURGE_BATCH = 500
# How often token counts per key and hour (key listings' usage) are added to the database.
USAGE_FLUSH_SECONDS = 1.0
# Usage is kept for the longest window listings show (30 days) and a day more.
USAGE_KEPT_HOURS = 31 * 24
# Longest a new connection may take to open (each worker opens its own, when its pool needs one).
CONNECT_TIMEOUT_SECONDS = 5.0

ORG_COLUMNS = "id, name, tier, external_id, created_at"
API_KEY_COLUMNS = (
    "id, org_id, name, description, key_prefix, is_active, allowed_game_ids, allowed_stream_ids,"
    " rate_limit_per_minute, rate_limit_per_day, expires_at, created_at, updated_at, last_used_at"
)
SESSION_COLUMNS = (
    "id, org_id, api_key_id, game_id, stream_id, external_ref, metadata, status, created_at,"
    " expires_at, consumed_at, revoked_at"
)
AUDIT_COLUMNS = "id, at, org_id, actor, action, api_key_id, client_ip, changes"
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
# One statement: of concurrent consumers of a token, PostgreSQL lets exactly one update the row;
# the others wait for it, re-check the WHERE on the consumed row and update nothing.
CONSUME_SESSION = (
    "UPDATE sessions SET status = 'consumed', consumed_at = $3, player_uuid = $2"
    " WHERE token = $1 AND status = 'active' AND expires_at > $3"
    f" RETURNING {SESSION_COLUMNS}"
)
GET_SESSION = f"SELECT {SESSION_COLUMNS} FROM sessions WHERE token = $1"
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


def _org(row: Any) -> Org:
    return Org(row["id"], row["name"], row["tier"], row["external_id"], row["created_at"])


def _api_key(row: Any) -> ApiKey:
    return ApiKey(
        id=row["id"],
        org_id=row["org_id"],
        name=row["name"],
        description=row["description"],
        key_prefix=row["key_prefix"],
        is_active=row["is_active"],
        allowed_game_ids=allow_list(row["allowed_game_ids"]),
        allowed_stream_ids=allow_list(row["allowed_stream_ids"]),
        rate_limit_per_minute=row["rate_limit_per_minute"],
        rate_limit_per_day=row["rate_limit_per_day"],
        expires_at=row["expires_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        last_used_at=row["last_used_at"],
    )


def _key_state(row: Any) -> KeyState:
    return KeyState(
        key_id=row["id"],
        org_id=row["org_id"],
        key_hash=row["key_hash"],
        is_active=row["is_active"],
        allowed_game_ids=allow_list(row["allowed_game_ids"]),
        allowed_stream_ids=allow_list(row["allowed_stream_ids"]),
        rate_limit_per_minute=row["rate_limit_per_minute"],
        rate_limit_per_day=row["rate_limit_per_day"],
        expires_at=row["expires_at"],
        tier=row["tier"],
    )


def _stored_form(row: Any) -> dict[str, Any]:
    """A key row in the stored forms the audit trail records (those of SQLite's columns and
    keys.key_changes): is_active 0 or 1, allow-lists as JSON text (jsonb prints `[1, 2]`, as
    json.dumps does)."""
    stored = dict(row)
    stored["is_active"] = int(stored["is_active"])
    return stored


def _audit_entry(row: Any) -> AuditEntry:
    changes = row["changes"]
    return AuditEntry(
        id=row["id"],
        at=row["at"],
        org_id=row["org_id"],
        actor=row["actor"],
        action=row["action"],
        api_key_id=row["api_key_id"],
        client_ip=row["client_ip"],
        changes=None if changes is None else json.loads(changes),
    )


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
        self._pool: asyncpg.Pool | None = None
        self._timeout = settings.statement_timeout_ms / 1000
        # Token counts not yet written: (key id, hour) -> [created, consumed].
        self._usage: dict[tuple[int, int], list[int]] = {}
        self._usage_task: asyncio.Task[None] | None = None
        self._full_at: float | None = None

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
        try:
            self._pool = await asyncpg.create_pool(
                self.settings.url,
                min_size=self.settings.pool_min,
                max_size=self.settings.pool_max,
                timeout=CONNECT_TIMEOUT_SECONDS,
                # The client gives up a little after the server would have cancelled.
                command_timeout=self._timeout + 1,
                server_settings={
                    "application_name": "dailyplay",
                    "statement_timeout": str(timeout_ms),
                    "lock_timeout": str(timeout_ms),
                    "idle_in_transaction_session_timeout": str(max(timeout_ms, 10_000)),
                },
            )
            async with self._pool.acquire(timeout=self._timeout) as conn:
                await migrate(conn)
        except BaseException as exc:
            await self.close()
            if isinstance(exc, Exception):
                raise translated(exc) from exc
            raise
        self._usage_task = asyncio.create_task(self._write_usage_every_second())

    async def close(self) -> None:
        """Write the usage counted so far, then close every connection."""
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
            try:
                await asyncio.wait_for(pool.close(), timeout=self._timeout)
            except (TimeoutError, OSError):
                pool.terminate()

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("database is not open")
        return self._pool

    # Each operation catches what the driver raises and raises it translated (schema.translated):
    # the pool's waits and the server's refusals alike. A connection whose protocol fell out of
    # step (the server cut the session while a statement was under way) is closed rather than
    # given back to the pool.

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        try:
            async with self.pool.acquire(timeout=self._timeout) as conn:
                try:
                    return list(await conn.fetch(sql, *args))
                except Exception as exc:
                    _close_if_broken(conn, exc)
                    raise
        except Exception as exc:
            raise self._translated(exc) from exc

    async def _fetchrow(self, sql: str, *args: Any) -> Any:
        try:
            async with self.pool.acquire(timeout=self._timeout) as conn:
                try:
                    return await conn.fetchrow(sql, *args)
                except Exception as exc:
                    _close_if_broken(conn, exc)
                    raise
        except Exception as exc:
            raise self._translated(exc) from exc

    async def _execute(self, sql: str, *args: Any) -> str:
        try:
            async with self.pool.acquire(timeout=self._timeout) as conn:
                try:
                    status: str = await conn.execute(sql, *args)
                    return status
                except Exception as exc:
                    _close_if_broken(conn, exc)
                    raise
        except Exception as exc:
            raise self._translated(exc) from exc

    async def _in_transaction(self, work: Callable[[asyncpg.Connection], Any]) -> Any:
        """await work(connection) inside one transaction, committed before this returns."""
        try:
            async with self.pool.acquire(timeout=self._timeout) as conn:
                try:
                    async with conn.transaction():
                        return await work(conn)
                except Exception as exc:
                    _close_if_broken(conn, exc)
                    raise
        except Exception as exc:
            raise self._translated(exc) from exc

    def _translated(self, exc: BaseException) -> BaseException:
        error = translated(exc)
        if isinstance(error, StorageFull):
            self._full_at = time.monotonic()
        return error

    # --- health --------------------------------------------------------------------------------

    async def schema_version(self) -> int:
        try:
            async with self.pool.acquire(timeout=self._timeout) as conn:
                try:
                    return await read_version(conn)
                except Exception as exc:
                    _close_if_broken(conn, exc)
                    raise
        except Exception as exc:
            raise self._translated(exc) from exc

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
        return None if row is None else _org(row)

    async def list_orgs(self) -> list[OrgListing]:
        rows = await self._fetch(
            "SELECT o.id, o.name, o.tier, o.external_id, o.created_at,"
            " (SELECT count(*) FROM org_members m WHERE m.org_id = o.id) AS members,"
            " (SELECT count(*) FROM api_keys k WHERE k.org_id = o.id) AS api_keys"
            " FROM orgs o ORDER BY o.id"
        )
        return [OrgListing(_org(row), row["members"], row["api_keys"]) for row in rows]

    async def find_org_by_external_id(self, external_id: str) -> Org | None:
        row = await self._fetchrow(
            f"SELECT {ORG_COLUMNS} FROM orgs WHERE external_id = $1", external_id
        )
        return None if row is None else _org(row)

    async def create_org(
        self, name: str, tier: str, external_id: str | None, now: int, by: Actor
    ) -> Org:
        import asyncpg

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
            return _org(row)

        try:
            result: Org = await self._in_transaction(work)
        except asyncpg.UniqueViolationError:  # pragma: no cover - ON CONFLICT catches it first
            raise Duplicate(
                f"an organization with external id {external_id!r} already exists"
            ) from None
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
            return _org(row)

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
        return [_api_key(row) for row in rows]

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
            return _api_key(row)

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
            return _api_key(row), revoked

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
        return None if row is None else _key_state(row)

    async def list_audit(self, org_id: int, limit: int, before_id: int | None) -> list[AuditEntry]:
        rows = await self._fetch(
            f"SELECT {AUDIT_COLUMNS} FROM audit_log WHERE org_id = $1 AND id < $2"
            " ORDER BY id DESC LIMIT $3",
            org_id, before_id if before_id is not None else 2**63 - 1, limit,
        )  # fmt: skip
        return [_audit_entry(row) for row in rows]

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
        self, session: NewSession, admitted_on: KeyState | None = None
    ) -> None:
        if admitted_on is None:
            await self._execute(INSERT_SESSION, *session)
        else:
            a = admitted_on
            status = await self._execute(
                INSERT_ADMITTED_SESSION,
                *session,
                a.org_id, a.key_hash, a.is_active,
                None if a.allowed_game_ids is None else json.dumps(a.allowed_game_ids),
                None if a.allowed_stream_ids is None else json.dumps(a.allowed_stream_ids),
                a.rate_limit_per_minute, a.rate_limit_per_day, a.expires_at, a.tier,
            )  # fmt: skip
            if _row_count(status) == 0:
                raise KeyChanged(session.api_key_id)
        self._count(session.api_key_id, session.created_at, 0)

    async def get_session(self, token: bytes) -> Session | None:
        row = await self._fetchrow(GET_SESSION, token)
        return None if row is None else Session._make(row)

    async def consume_session(
        self, token: bytes, player_uuid: str | None, now: int
    ) -> Session | None:
        row = await self._fetchrow(CONSUME_SESSION, token, player_uuid, now)
        if row is None:
            return None
        session = Session._make(row)
        self._count(session.api_key_id, now, 1)
        return session

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


def _close_if_broken(conn: Any, exc: Exception) -> None:
    """Close a connection that failed in a way that leaves it unusable: its protocol out of
    step with the server's (asyncpg's InternalClientError)."""
    import asyncpg

    if isinstance(exc, asyncpg.InternalClientError):
        conn.terminate()


def _row_count(status: str) -> int:
    """The rows a command touched, from its status ('UPDATE 3', 'INSERT 0 1', 'DELETE 0')."""
    return int(status.rpartition(" ")[2])
