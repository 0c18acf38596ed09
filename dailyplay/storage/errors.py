"""The storage layer's own exceptions: what callers above it catch, whatever the engine."""

from __future__ import annotations


class KeyChanged(Exception):
    """The API key's row is no longer the one the request was admitted on; nothing was stored."""


class SchemaError(RuntimeError):
    """The database file's schema is newer than this program, or cannot be migrated."""
