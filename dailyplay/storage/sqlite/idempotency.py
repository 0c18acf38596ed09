"""SQLite: Idempotency-Key claims, run in a transaction of the writer (the caller's)."""

from __future__ import annotations

import secrets
import sqlite3
from typing import Any, NamedTuple

from ..errors import KeyChanged
from ..types import CLAIMED, Claim, Completion, IdempotencyRequest, StoredKey, claim_outcome

# Keys and rows of one statement, at most (SQLite binds at most 32,766 values).
ROWS_PER_STATEMENT = 200


class ClaimAsk(NamedTuple):
    """A claim queued for the next group commit (Database.claim_idempotency_key)."""

    request: IdempotencyRequest
    now: int
    locked_until: int
    stale_before: int


# A join with the keys asked for (not a row-value IN, which SQLite answers with a scan).
READ_KEYS = (
    "SELECT i.api_key_id, i.idem_key, i.fingerprint, i.state, i.status, i.body, i.created_at,"
    " i.locked_until FROM (VALUES {pairs}) AS asked JOIN idempotency_keys i"
    " ON i.api_key_id = asked.column1 AND i.idem_key = asked.column2"
)
# A claim writes the whole row: a new one, or one it takes over (past retention, or pending
# with its holder gone), which starts over as if new.
CLAIM_ROW = "(?, ?, ?, ?, 'pending', NULL, NULL, ?, ?)"
CLAIM_KEYS = (
    "INSERT INTO idempotency_keys (api_key_id, idem_key, fingerprint, claim, state, status, body,"
    " created_at, locked_until) VALUES {rows}"
    " ON CONFLICT (api_key_id, idem_key) DO UPDATE SET fingerprint = excluded.fingerprint,"
    " claim = excluded.claim, state = 'pending', status = NULL, body = NULL,"
    " created_at = excluded.created_at, locked_until = excluded.locked_until"
)
HELD_AND_DONE = (
    "SELECT 1 FROM idempotency_keys"
    " WHERE api_key_id = ? AND idem_key = ? AND claim = ? AND state = 'done'"
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
OLD_KEYS = "SELECT api_key_id, idem_key FROM idempotency_keys WHERE created_at < ? LIMIT ?"
DELETE_KEY = "DELETE FROM idempotency_keys WHERE api_key_id = ? AND idem_key = ?"


def claim_keys(conn: sqlite3.Connection, asks: list[ClaimAsk]) -> list[Claim]:
    """Claim each ask's key for its request, or say what holds it (types.claim_outcome): the
    claims of one group commit, with one read and one write per ROWS_PER_STATEMENT keys. Of
    two asks for one key in the group, the first decides and the second finds it held."""
    found: dict[tuple[int, str], StoredKey] = {}
    pairs = list(dict.fromkeys((ask.request.api_key_id, ask.request.key) for ask in asks))
    for start in range(0, len(pairs), ROWS_PER_STATEMENT):
        chunk = pairs[start : start + ROWS_PER_STATEMENT]
        rows = conn.execute(
            READ_KEYS.format(pairs=", ".join(["(?, ?)"] * len(chunk))),
            [value for pair in chunk for value in pair],
        ).fetchall()
        for row in rows:
            found[(row[0], row[1])] = StoredKey(*row[2:])
    claims: list[Claim] = []
    writes: list[tuple[Any, ...]] = []
    for request, now, locked_until, stale_before in asks:
        pair = (request.api_key_id, request.key)
        outcome = claim_outcome(found.get(pair), request.fingerprint, now, stale_before)
        if outcome is None:
            claim = secrets.token_hex(8)
            found[pair] = StoredKey(request.fingerprint, "pending", None, None, now, locked_until)
            writes.append((*pair, request.fingerprint, claim, now, locked_until))
            outcome = Claim(CLAIMED, claim=claim)
        claims.append(outcome)
    try:
        for start in range(0, len(writes), ROWS_PER_STATEMENT):
            chunk = writes[start : start + ROWS_PER_STATEMENT]
            conn.execute(
                CLAIM_KEYS.format(rows=", ".join([CLAIM_ROW] * len(chunk))),
                [value for row in chunk for value in row],
            )
    except sqlite3.IntegrityError:  # an API key was deleted meanwhile
        if len(asks) == 1:
            raise KeyChanged(asks[0].request.api_key_id) from None
        raise  # the group's writes are tried one by one, and this one fails alone
    return claims


def complete_key(conn: sqlite3.Connection, completion: Completion) -> bool:
    """Store the claim's answer; False when the claim is no longer the caller's."""
    c = completion
    return bool(
        conn.execute(COMPLETE_KEY, (c.status, c.body, c.api_key_id, c.key, c.claim)).rowcount
    )


def complete_keys(conn: sqlite3.Connection, completions: list[Completion]) -> list[bool]:
    """complete_key for each, in one executemany when (as nearly always) every claim is still
    the caller's; then which were."""
    changed = conn.executemany(
        COMPLETE_KEY, [(c.status, c.body, c.api_key_id, c.key, c.claim) for c in completions]
    ).rowcount
    if changed == len(completions):
        return [True] * len(completions)
    return [
        conn.execute(HELD_AND_DONE, (c.api_key_id, c.key, c.claim)).fetchone() is not None
        for c in completions
    ]


def release_key(conn: sqlite3.Connection, api_key_id: int, key: str, claim: str) -> None:
    """Give a pending claim up: the next request with the key starts afresh."""
    conn.execute(RELEASE_KEY, (api_key_id, key, claim))


def purge_keys(conn: sqlite3.Connection, cutoff: int, batch: int) -> int:
    """Delete up to `batch` keys created before cutoff (in the caller's transaction)."""
    old = conn.execute(OLD_KEYS, (cutoff, batch)).fetchall()
    conn.executemany(DELETE_KEY, [tuple(row) for row in old])
    return len(old)
