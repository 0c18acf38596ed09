"""SQLite: the SQL shared by the server and the CLI, and the audit trail's insert (the rows
they return are parsed by storage.rows)."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from ..rows import API_KEY_COLUMNS, SESSION_COLUMNS
from ..types import Actor


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
