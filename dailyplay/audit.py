"""The audit trail as the API and the CLI show it."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from .clock import iso_from_ms
from .storage.types import AuditEntry


def json_list(text: str | None) -> list[int] | None:
    """An allow-list column (JSON array text, or NULL for no list) as a list."""
    return None if text is None else json.loads(text)


# An API key's columns whose stored form differs from the API's (keys.api_key_data): audit
# changes are kept as stored and shown as the API shows the key.
_API_FORM: dict[str, Callable[[Any], Any]] = {
    "is_active": bool,
    "allowed_game_ids": json_list,
    "allowed_stream_ids": json_list,
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
