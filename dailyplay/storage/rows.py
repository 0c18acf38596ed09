"""Rows of either engine as the storage types: the column lists both engines select, and the
parsers of their rows (sqlite3.Row and asyncpg's Record both read a column by name)."""

from __future__ import annotations

import json
from typing import Any

from .types import ApiKey, AuditEntry, KeyState, Org, allow_list

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


def key_state(row: Any) -> KeyState:
    """A row of the key's columns joined with its org's tier (each engine's KEY_STATE)."""
    return KeyState(
        key_id=row["id"],
        org_id=row["org_id"],
        key_hash=row["key_hash"],
        is_active=bool(row["is_active"]),
        allowed_game_ids=allow_list(row["allowed_game_ids"]),
        allowed_stream_ids=allow_list(row["allowed_stream_ids"]),
        rate_limit_per_minute=row["rate_limit_per_minute"],
        rate_limit_per_day=row["rate_limit_per_day"],
        expires_at=row["expires_at"],
        tier=row["tier"],
    )


def org(row: Any) -> Org:
    """A row of ORG_COLUMNS."""
    return Org(row["id"], row["name"], row["tier"], row["external_id"], row["created_at"])


def api_key(row: Any) -> ApiKey:
    """A row of API_KEY_COLUMNS."""
    return ApiKey(
        id=row["id"],
        org_id=row["org_id"],
        name=row["name"],
        description=row["description"],
        key_prefix=row["key_prefix"],
        is_active=bool(row["is_active"]),
        allowed_game_ids=allow_list(row["allowed_game_ids"]),
        allowed_stream_ids=allow_list(row["allowed_stream_ids"]),
        rate_limit_per_minute=row["rate_limit_per_minute"],
        rate_limit_per_day=row["rate_limit_per_day"],
        expires_at=row["expires_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        last_used_at=row["last_used_at"],
    )


def audit_entry(row: Any) -> AuditEntry:
    """A row of AUDIT_COLUMNS; its changes are stored as JSON text."""
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
