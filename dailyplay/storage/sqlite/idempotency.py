"""SQLite: Idempotency-Key claims, run in a transaction of the writer (the caller's)."""

from __future__ import annotations

import secrets
import sqlite3

from ..errors import KeyChanged
from ..types import CLAIMED, Claim, Completion, IdempotencyRequest, StoredKey, claim_outcome

READ_KEY = (
    "SELECT fingerprint, state, status, body, created_at, locked_until FROM idempotency_keys"
    " WHERE api_key_id = ? AND idem_key = ?"
)
# A claim writes the whole row: a new one, or one it takes over (past retention, or pending
# with its holder gone), which starts over as if new.
CLAIM_KEY = (
    "INSERT INTO idempotency_keys (api_key_id, idem_key, fingerprint, claim, state, status, body,"
    " created_at, locked_until) VALUES (?, ?, ?, ?, 'pending', NULL, NULL, ?, ?)"
    " ON CONFLICT (api_key_id, idem_key) DO UPDATE SET fingerprint = excluded.fingerprint,"
    " claim = excluded.claim, state = 'pending', status = NULL, body = NULL,"
    " created_at = excluded.created_at, locked_until = excluded.locked_until"
)
# Only the claim's holder completes or releases it, and only while it is pending.
COMPLETE_KEY = (
    "UPDATE idempotency_keys SET state = 'done', status = ?, body = ?"
    " WHERE api_key_id = ? AND idem_key = ? AND claim = ? AND state = 'pending'"
)
RELEASE_KEY = (
    "DELETE FROM idempotency_keys"
    " WHERE api_key_id = ? AND idem_key = ? AND claim = ? AND state = 'pending'"
)
PURGE_KEYS = (
    "DELETE FROM idempotency_keys WHERE (api_key_id, idem_key) IN"
    " (SELECT api_key_id, idem_key FROM idempotency_keys WHERE created_at < ? LIMIT ?)"
)


def claim_key(
    conn: sqlite3.Connection,
    request: IdempotencyRequest,
    now: int,
    locked_until: int,
    stale_before: int,
) -> Claim:
    """Claim the key for the request, or say what holds it (types.claim_outcome)."""
    row = conn.execute(READ_KEY, (request.api_key_id, request.key)).fetchone()
    found = claim_outcome(
        None if row is None else StoredKey(*row), request.fingerprint, now, stale_before
    )
    if found is not None:
        return found
    claim = secrets.token_hex(8)
    try:
        conn.execute(
            CLAIM_KEY,
            (request.api_key_id, request.key, request.fingerprint, claim, now, locked_until),
        )
    except sqlite3.IntegrityError:  # the API key was deleted meanwhile
        raise KeyChanged(request.api_key_id) from None
    return Claim(CLAIMED, claim=claim)


def complete_key(conn: sqlite3.Connection, completion: Completion) -> bool:
    """Store the claim's answer; False when the claim is no longer the caller's."""
    c = completion
    return bool(
        conn.execute(COMPLETE_KEY, (c.status, c.body, c.api_key_id, c.key, c.claim)).rowcount
    )


def release_key(conn: sqlite3.Connection, api_key_id: int, key: str, claim: str) -> None:
    """Give a pending claim up: the next request with the key starts afresh."""
    conn.execute(RELEASE_KEY, (api_key_id, key, claim))


def purge_keys(conn: sqlite3.Connection, cutoff: int, batch: int) -> int:
    """Delete up to `batch` keys created before cutoff (in the caller's transaction)."""
    return int(conn.execute(PURGE_KEYS, (cutoff, batch)).rowcount)
