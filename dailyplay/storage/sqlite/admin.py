"""SQLite: synchronous operations on a connection, for the CLI and maintenance."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterable
from typing import Any

from ... import audit, sessions
from ...clock import HOUR_MS
from ..errors import Duplicate
from ..rows import (
    API_KEY_COLUMNS,
    AUDIT_COLUMNS,
    LISTED_SESSION_COLUMNS,
    ORG_COLUMNS,
    api_key,
    audit_entry,
    listed_session,
    org,
    session_conditions,
)
from ..types import (
    CLI,
    MUTABLE_KEY_COLUMNS,
    USAGE_FIELDS,
    Actor,
    ApiKey,
    AuditEntry,
    ListedSession,
    Member,
    NewApiKey,
    Org,
    OrgListing,
    SessionQuery,
)
from .statements import INSERT_API_KEY, INSERT_SESSION, REVOKE_KEY_SESSIONS, record_audit

# Tokens deleted per transaction by retention.
PURGE_BATCH = 500


def create_org(
    conn: sqlite3.Connection,
    name: str,
    tier: str,
    external_id: str | None,
    now: int,
    by: Actor = CLI,
) -> Org:
    """A new organization, with its audit entry, in the caller's transaction; Duplicate when
    another has the same external id."""
    try:
        row: sqlite3.Row = conn.execute(
            "INSERT INTO orgs (name, tier, external_id, created_at) VALUES (?, ?, ?, ?)"
            f" RETURNING {ORG_COLUMNS}",
            (name, tier, external_id, now),
        ).fetchone()
    except sqlite3.IntegrityError:
        raise Duplicate(
            f"an organization with external id {external_id!r} already exists"
        ) from None
    changes = audit.org_created(name, tier, external_id)
    record_audit(conn, now, row["id"], by, "org.create", None, changes)
    return org(row)


def list_orgs(conn: sqlite3.Connection) -> list[OrgListing]:
    rows = conn.execute(
        "SELECT o.id, o.name, o.tier, o.external_id, o.created_at,"
        " (SELECT count(*) FROM org_members m WHERE m.org_id = o.id) AS members,"
        " (SELECT count(*) FROM api_keys k WHERE k.org_id = o.id) AS api_keys"
        " FROM orgs o ORDER BY o.id"
    ).fetchall()
    return [OrgListing(org(row), row["members"], row["api_keys"]) for row in rows]


def get_org(conn: sqlite3.Connection, org_id: int) -> Org | None:
    row = conn.execute(f"SELECT {ORG_COLUMNS} FROM orgs WHERE id = ?", (org_id,)).fetchone()
    return None if row is None else org(row)


def find_org_by_external_id(conn: sqlite3.Connection, external_id: str) -> Org | None:
    row = conn.execute(
        f"SELECT {ORG_COLUMNS} FROM orgs WHERE external_id = ?", (external_id,)
    ).fetchone()
    return None if row is None else org(row)


def set_org_tier(
    conn: sqlite3.Connection, org_id: int, tier: str, now: int, by: Actor = CLI
) -> Org | None:
    before = conn.execute("SELECT tier FROM orgs WHERE id = ?", (org_id,)).fetchone()
    row: sqlite3.Row | None = conn.execute(
        f"UPDATE orgs SET tier = ? WHERE id = ? RETURNING {ORG_COLUMNS}", (tier, org_id)
    ).fetchone()
    changes = None if row is None else audit.tier_changed(before["tier"], tier)
    if changes is not None:
        record_audit(conn, now, org_id, by, "org.tier_change", None, changes)
    return None if row is None else org(row)


def upsert_member(
    conn: sqlite3.Connection, org_id: int, user_id: str, role: str, now: int, by: Actor = CLI
) -> Member:
    before = conn.execute(
        "SELECT role FROM org_members WHERE org_id = ? AND user_id = ?", (org_id, user_id)
    ).fetchone()
    change = audit.membership_changed(user_id, None if before is None else before["role"], role)
    if change is not None:
        record_audit(conn, now, org_id, by, change[0], None, change[1])
    row: sqlite3.Row = conn.execute(
        "INSERT INTO org_members (org_id, user_id, role, created_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (org_id, user_id) DO UPDATE SET role = excluded.role"
        " RETURNING org_id, user_id, role, created_at",
        (org_id, user_id, role, now),
    ).fetchone()
    return Member(row["org_id"], row["user_id"], row["role"], row["created_at"])


def delete_member(
    conn: sqlite3.Connection, org_id: int, user_id: str, now: int, by: Actor = CLI
) -> bool:
    cursor = conn.execute(
        "DELETE FROM org_members WHERE org_id = ? AND user_id = ? RETURNING role",
        (org_id, user_id),
    )
    removed = cursor.fetchone()
    if removed is not None:
        changes = audit.member_removed(user_id, removed["role"])
        record_audit(conn, now, org_id, by, "member.remove", None, changes)
    return removed is not None


def list_members(conn: sqlite3.Connection, org_id: int) -> list[Member]:
    rows = conn.execute(
        "SELECT org_id, user_id, role, created_at FROM org_members WHERE org_id = ?"
        " ORDER BY user_id",
        (org_id,),
    ).fetchall()
    return [Member(r["org_id"], r["user_id"], r["role"], r["created_at"]) for r in rows]


def update_api_key_in(
    conn: sqlite3.Connection,
    org_id: int,
    key_id: int,
    changes: dict[str, Any],
    now: int,
    by: Actor,
) -> tuple[ApiKey | None, int]:
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
    action, diff = audit.key_updated(before, changes)
    record_audit(conn, now, org_id, by, action, key_id, diff)
    return api_key(row), revoked


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


def insert_api_key(conn: sqlite3.Connection, values: NewApiKey, by: Actor) -> ApiKey:
    """Insert one key and its audit entry, in the caller's transaction."""
    row: sqlite3.Row = conn.execute(INSERT_API_KEY, values).fetchone()
    changes = audit.key_created(values)
    record_audit(conn, row["created_at"], row["org_id"], by, "api_key.create", row["id"], changes)
    return api_key(row)


def list_api_keys(conn: sqlite3.Connection, org_id: int) -> list[ApiKey]:
    """An org's keys (never their hashes), oldest first."""
    rows = conn.execute(
        f"SELECT {API_KEY_COLUMNS} FROM api_keys WHERE org_id = ? ORDER BY id", (org_id,)
    ).fetchall()
    return [api_key(row) for row in rows]


def list_audit(
    conn: sqlite3.Connection, org_id: int, limit: int, before_id: int | None = None
) -> list[AuditEntry]:
    """An org's audit entries, newest first, with ids below before_id when given."""
    rows = conn.execute(
        f"SELECT {AUDIT_COLUMNS} FROM audit_log WHERE org_id = ? AND id < ?"
        " ORDER BY id DESC LIMIT ?",
        (org_id, before_id if before_id is not None else 2**63 - 1, limit),
    ).fetchall()
    return [audit_entry(row) for row in rows]


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


def revoke_session_in(
    conn: sqlite3.Connection, org_id: int, token: bytes, now: int, by: Actor, reason: str | None
) -> tuple[str, ListedSession | None]:
    """In the caller's transaction: revoke the org's token if it is active (with its audit
    entry). (its state before: active, consumed, expired or revoked; the token as it is now),
    or ("not_found", None) when the org has no such token."""
    row = conn.execute(
        f"SELECT {LISTED_SESSION_COLUMNS} FROM sessions WHERE token = ? AND org_id = ?",
        (token, org_id),
    ).fetchone()
    if row is None:
        return "not_found", None
    found = listed_session(row)
    state = sessions.status(found, now)
    if state != "active":
        return state, found
    row = conn.execute(
        "UPDATE sessions SET status = 'revoked', revoked_at = ? WHERE id = ?"
        f" RETURNING {LISTED_SESSION_COLUMNS}",
        (now, found.id),
    ).fetchone()
    changes = audit.session_revoked(str(uuid.UUID(bytes=token)), reason)
    record_audit(conn, now, org_id, by, "session.revoke", found.api_key_id, changes)
    return state, listed_session(row)


def list_sessions(
    conn: sqlite3.Connection, org_id: int, query: SessionQuery
) -> list[ListedSession]:
    where, values = session_conditions(query, lambda _n: "?")
    rows = conn.execute(
        f"SELECT {LISTED_SESSION_COLUMNS} FROM sessions WHERE org_id = ?{where}"
        " ORDER BY id DESC LIMIT ?",
        (org_id, *values, query.limit),
    ).fetchall()
    return [listed_session(row) for row in rows]
