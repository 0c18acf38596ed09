"""The names of the API's operations, for routing, logs and metrics alike."""

from __future__ import annotations

# The `action` query parameter's values, each an operation of its own.
ACTIONS = (
    "create-session",
    "validate-session",
    "consume-session",
    "revoke-session",
    "list-sessions",
    "audit-log",
)
# The key-management operations (no action), by method.
KEY_MANAGEMENT = {
    "GET": "list-api-keys",
    "POST": "create-api-key",
    "PATCH": "update-api-key",
    "DELETE": "delete-api-key",
}


def operation_name(method: str, action: str | None) -> str:
    """The operation a request asks for; "other" for an unknown action or method."""
    if action is None:
        return KEY_MANAGEMENT.get(method, "other")
    return action if action in ACTIONS else "other"
