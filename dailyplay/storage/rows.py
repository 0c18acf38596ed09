"""Rows of either engine as the storage types: the column lists both engines select, and the
parsers of their rows (sqlite3.Row and asyncpg's Record both read a column by name)."""

from __future__ import annotations

import json
from typing import Any

from .types import ApiKey, AuditEntry, KeyState, ListedSession, Org, SessionQuery, allow_list

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
LISTED_SESSION_COLUMNS = (
    "id, token, org_id, api_key_id, game_id, stream_id, external_ref, metadata, status,"
    " created_at, expires_at, consumed_at, revoked_at, player_uuid"
)


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


def listed_session(row: Any) -> ListedSession:
    """A row of LISTED_SESSION_COLUMNS."""
    values = list(row)
    values[1] = bytes(values[1])
    return ListedSession._make(values)


def session_conditions(query: SessionQuery, parameter: Any) -> tuple[str, list[Any]]:
    """The WHERE conditions (after org_id's) of a SessionQuery and their values;
    parameter(n) is the engine's n-th placeholder, counting from 2 (org_id is the first)."""
    conditions: list[str] = []
    values: list[Any] = []

    def add(condition: str, *given: Any) -> None:
        marks = [parameter(len(values) + 2 + i) for i in range(len(given))]
        conditions.append(condition.format(*marks))
        values.extend(given)

    if query.external_ref is not None:
        add("external_ref = {}", query.external_ref)
    if query.status == "active":
        add("status = 'active' AND expires_at > {}", query.now)
    elif query.status == "expired":
        add("status = 'active' AND expires_at <= {}", query.now)
    elif query.status is not None:
        add("status = {}", query.status)
    if query.game_id is not None:
        add("game_id = {}", query.game_id)
    if query.stream_id is not None:
        add("stream_id = {}", query.stream_id)
    if query.created_after is not None:
        add("created_at > {}", query.created_after)
    if query.created_before is not None:
        add("created_at < {}", query.created_before)
    if query.before_id is not None:
        add("id < {}", query.before_id)
    return "".join(f" AND {c}" for c in conditions), values
