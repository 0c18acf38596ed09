"""The storage layer's own exceptions: what callers above it catch, whatever the engine.

An engine translates its driver's errors into these at its boundary, so the HTTP layer, the
background tasks and the CLI never see a driver's exception for a condition they handle. An
error that is none of these (a bug, a corrupt file) stays the driver's and is a 500.
"""

from __future__ import annotations


class KeyChanged(Exception):
    """The API key's row is no longer the one the request was admitted on; nothing was stored."""


class SchemaError(RuntimeError):
    """The database file's schema is newer than this program, or cannot be migrated."""


class Duplicate(Exception):
    """What was to be stored clashes with what is stored (an organization's external id)."""


class StorageError(Exception):
    """The storage could not do what was asked, for now; a write was not stored. The message is
    the engine's own description, for logs."""


class StorageBusy(StorageError):
    """Another process held the write lock past the configured wait: retry shortly."""


class QueryTooLong(StorageError):
    """A listing walked more rows than its time allows (a filter no index serves, in a large
    table) and was given up: narrow it."""


class StorageFull(StorageError):
    """A write was refused for want of space (the disk, a quota, the file's page limit): it can
    succeed once an operator frees space."""


class StorageUnavailable(StorageError):
    """The database cannot be read or written right now (read-only, I/O error, unreachable)."""


class ClaimLost(Exception):
    """The request's claim on an idempotency key passed to another request (this one outlived
    its lock); nothing was stored."""
