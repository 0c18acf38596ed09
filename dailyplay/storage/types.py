"""Values that cross the storage seam."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


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
