"""The audit trail: what each change records (engines store it in the change's transaction)
and how the API and the CLI show it. Changes are recorded in stored forms, column -> {"from":
..., "to": ...}; a value that did not change is not recorded."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .clock import iso_from_ms
from .storage.types import KEY_SETTINGS, AuditEntry, NewApiKey, allow_list

Changes = dict[str, dict[str, Any]]


def org_created(name: str, tier: str, external_id: str | None) -> Changes:
    return {
        "name": {"from": None, "to": name},
        "tier": {"from": None, "to": tier},
        "external_id": {"from": None, "to": external_id},
    }


def tier_changed(before: str, after: str) -> Changes | None:
    """None when the tier stays what it was (nothing to record)."""
    return None if before == after else {"tier": {"from": before, "to": after}}


def membership_changed(user_id: str, before: str | None, role: str) -> tuple[str, Changes] | None:
    """(action, changes) for giving user_id `role` where they had `before` (None: not a
    member); None when nothing changes."""
    if before == role:
        return None
    action = "member.add" if before is None else "member.role_change"
    return action, {
        "user_id": {"from": None if before is None else user_id, "to": user_id},
        "role": {"from": before, "to": role},
    }


def member_removed(user_id: str, role: str) -> Changes:
    return {"user_id": {"from": user_id, "to": None}, "role": {"from": role, "to": None}}


def session_revoked(token: str, reason: str | None) -> Changes:
    """Revoking an active session token (revoke-session): which token, and why if given."""
    return {
        "session": {
            "from": {"token": token, "status": "active"},
            "to": {"token": token, "status": "revoked", "reason": reason},
        }
    }


def key_created(values: NewApiKey) -> Changes:
    return {column: {"from": None, "to": getattr(values, column)} for column in KEY_SETTINGS}


def key_updated(before: Mapping[str, Any], changes: Mapping[str, Any]) -> tuple[str, Changes]:
    """(action, changes) for applying changes (stored forms) to a key stored as `before`:
    api_key.revoke or api_key.reactivate when is_active changes, else api_key.update."""
    diff = {
        column: {"from": before[column], "to": value}
        for column, value in changes.items()
        if before[column] != value
    }
    action = "api_key.update"
    if "is_active" in diff:
        action = "api_key.reactivate" if changes["is_active"] else "api_key.revoke"
    return action, diff


# An API key's columns whose stored form differs from the API's (keys.api_key_data): audit
# changes are kept as stored and shown as the API shows the key.
_API_FORM: dict[str, Callable[[Any], Any]] = {
    "is_active": bool,
    "allowed_game_ids": allow_list,
    "allowed_stream_ids": allow_list,
    "expires_at": iso_from_ms,
}


def _changes_in_api_form(changes: dict[str, Any]) -> dict[str, Any]:
    shown: dict[str, Any] = {}
    for column, change in changes.items():
        form = _API_FORM.get(column)
        shown[column] = (
            {side: form(value) for side, value in change.items()}
            if form is not None and isinstance(change, dict)
            else change
        )
    return shown


def audit_entry(entry: AuditEntry) -> dict[str, Any]:
    """An audit entry as the API and the CLI show it: ISO times, and changes as an object whose
    values have the API's types (booleans, arrays, RFC 3339 times)."""
    return {
        "id": entry.id,
        "at": iso_from_ms(entry.at),
        "org_id": entry.org_id,
        "actor": entry.actor,
        "action": entry.action,
        "api_key_id": entry.api_key_id,
        "client_ip": entry.client_ip,
        "changes": None if entry.changes is None else _changes_in_api_form(entry.changes),
    }
