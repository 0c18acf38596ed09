"""Values that cross the storage seam."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, NamedTuple

# A key's settings: what a create request gives and its audit entry records.
KEY_SETTINGS = (
    "name",
    "description",
    "allowed_game_ids",
    "allowed_stream_ids",
    "rate_limit_per_minute",
    "rate_limit_per_day",
    "expires_at",
)
# The API key columns an update may change (keys.key_changes gives their stored forms).
MUTABLE_KEY_COLUMNS = frozenset({*KEY_SETTINGS, "is_active"})


def allow_list(text: str | None) -> list[int] | None:
    """An allow-list as stored (JSON array text, or None for no list) as a list."""
    return None if text is None else json.loads(text)


# What key usage reports per key, in this order.
USAGE_FIELDS = (
    "sessions_created_24h",
    "sessions_consumed_24h",
    "sessions_created_30d",
    "sessions_consumed_30d",
)
NO_USAGE = dict.fromkeys(USAGE_FIELDS, 0)
# Usage is kept for the longest window listings show (30 days) and a day more.
USAGE_KEPT_HOURS = 31 * 24


@dataclass(frozen=True)
class Actor:
    """Who makes a change, for the audit log: a JWT `sub` with the caller's address, or 'cli'."""

    name: str
    client_ip: str | None = None


CLI = Actor("cli")


class NewSession(NamedTuple):
    """A session token to store."""

    token: bytes  # the UUID's 16 bytes
    org_id: int
    api_key_id: int
    game_id: int | None
    stream_id: int | None
    external_ref: str | None
    metadata: str | None  # compact JSON text, as inputs.metadata_json wrote it
    created_at: int  # ms since the epoch, as every time here
    expires_at: int


class Session(NamedTuple):
    """A stored session token, as validate and consume read it. (A NamedTuple rather than a
    dataclass: one is built on every game launch, and a tuple's construction costs a sixth.)"""

    id: int
    org_id: int
    api_key_id: int | None  # None once its key is deleted
    game_id: int | None
    stream_id: int | None
    external_ref: str | None
    metadata: str | None  # compact JSON text, as stored
    status: str  # active, consumed or revoked as stored; an expired one still says active
    created_at: int
    expires_at: int
    consumed_at: int | None
    revoked_at: int | None


class ListedSession(NamedTuple):
    """A stored session token as list-sessions and revoke-session show it."""

    id: int
    token: bytes
    org_id: int
    api_key_id: int | None
    game_id: int | None
    stream_id: int | None
    external_ref: str | None
    metadata: str | None
    status: str  # as stored: an expired one still says active
    created_at: int
    expires_at: int
    consumed_at: int | None
    revoked_at: int | None
    player_uuid: str | None


# A status to list by: expired is stored as active, past its expiry.
SESSION_STATUSES = ("active", "consumed", "expired", "revoked")


@dataclass(frozen=True)
class SessionQuery:
    """Which of an organization's tokens list-sessions asks for (None: any), newest first."""

    now: int  # what active and expired mean
    limit: int
    external_ref: str | None = None
    status: str | None = None
    game_id: int | None = None
    stream_id: int | None = None
    created_after: int | None = None  # exclusive
    created_before: int | None = None  # exclusive
    before_id: int | None = None  # the page after the token of this id


@dataclass(frozen=True)
class KeyState:
    """One reading of what decides whether an API key may create a token, and how: its row and
    its organization's tier. A token is stored only if this reading still holds inside the
    transaction that stores it (else KeyChanged)."""

    key_id: int
    org_id: int
    key_hash: str
    is_active: bool
    allowed_game_ids: list[int] | None  # None: every game
    allowed_stream_ids: list[int] | None
    rate_limit_per_minute: int
    rate_limit_per_day: int
    expires_at: int | None
    tier: str


@dataclass(frozen=True)
class Org:
    id: int
    name: str
    tier: str  # free or business
    external_id: str | None  # the Clerk organization id, when it has one
    created_at: int


@dataclass(frozen=True)
class OrgListing:
    """An organization with how many members and API keys it has."""

    org: Org
    members: int
    api_keys: int


@dataclass(frozen=True)
class Member:
    org_id: int
    user_id: str  # the Clerk user id (a JWT's sub)
    role: str  # admin or member
    created_at: int


class NewApiKey(NamedTuple):
    """An API key to store. Allow-lists are given as their stored JSON text (keys.id_list_json),
    as key changes are: the audit trail records stored forms."""

    org_id: int
    name: str
    description: str | None
    key_prefix: str
    key_hash: str  # argon2id; the raw key is never stored
    allowed_game_ids: str | None
    allowed_stream_ids: str | None
    rate_limit_per_minute: int
    rate_limit_per_day: int
    expires_at: int | None
    created_at: int
    updated_at: int


@dataclass(frozen=True)
class ApiKey:
    """A stored API key, without its hash."""

    id: int
    org_id: int
    name: str
    description: str | None
    key_prefix: str
    is_active: bool
    allowed_game_ids: list[int] | None  # None: every game
    allowed_stream_ids: list[int] | None
    rate_limit_per_minute: int
    rate_limit_per_day: int
    expires_at: int | None
    created_at: int
    updated_at: int
    last_used_at: int | None


@dataclass(frozen=True)
class AuditEntry:
    """One change in an organization's audit trail; changes as stored: column -> {from, to}."""

    id: int
    at: int
    org_id: int
    actor: str
    action: str
    api_key_id: int | None
    client_ip: str | None
    changes: dict[str, Any] | None


# --- Idempotency-Key ------------------------------------------------------------------------------


class IdempotencyRequest(NamedTuple):
    """A create-session sent with an Idempotency-Key: the key's scope (the API key sending it),
    the key, and the request's fingerprint (SHA-256 of method, action and canonical body)."""

    api_key_id: int
    key: str
    fingerprint: bytes


# What a claim on an idempotency key found (Claim.outcome).
CLAIMED = "claimed"  # the request holds the key now: it goes on, then completes or releases it
REPLAY = "replay"  # an earlier request with the key finished: its stored answer
IN_FLIGHT = "in_flight"  # an earlier request with the key holds it, until locked_until
MISMATCH = "mismatch"  # the key was used with another request


class Claim(NamedTuple):
    outcome: str
    claim: str | None = None  # CLAIMED: the holder's name, to complete or release the claim
    status: int | None = None  # REPLAY: the stored answer
    body: bytes | None = None
    locked_until: int | None = None  # IN_FLIGHT


class Completion(NamedTuple):
    """The answer to store for a claimed idempotency key (with its token, for a 200)."""

    api_key_id: int
    key: str
    claim: str
    status: int
    body: bytes


class StoredKey(NamedTuple):
    """An idempotency key's row, as a claim reads it."""

    fingerprint: bytes
    state: str
    status: int | None
    body: bytes | None
    created_at: int
    locked_until: int


def claim_outcome(
    row: StoredKey | None, fingerprint: bytes, now: int, stale_before: int
) -> Claim | None:
    """What a claim finds in the key's row: None when the request may take the key (no row, a
    row past retention, or a pending one whose holder outlived its lock: it died)."""
    if row is None or row.created_at < stale_before:
        return None
    if bytes(row.fingerprint) != fingerprint:
        return Claim(MISMATCH)
    if row.state == "done":
        assert row.status is not None and row.body is not None
        return Claim(REPLAY, status=row.status, body=bytes(row.body))
    if row.locked_until > now:
        return Claim(IN_FLIGHT, locked_until=row.locked_until)
    return None
