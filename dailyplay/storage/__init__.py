"""Storage: everything the service keeps, behind named operations (`Store`, in `base`).

Nothing outside this package holds SQL or imports a database driver. Callers use the types of
`storage.types` and catch the exceptions of `storage.errors`. The engine is SQLite
(`storage.sqlite`, the default) or PostgreSQL (`storage.postgres`), chosen by the scheme of
database.url in `store_for`. Both have the same schema versions.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from ..config import DatabaseSettings
from .base import Store
from .sqlite.schema import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "Store", "store_for", "with_store"]

T = TypeVar("T")


def store_for(
    settings: DatabaseSettings,
    observe_commit: Callable[[float, int, bool], None] | None = None,
) -> Store:
    """The store the settings describe, not yet open: the PostgreSQL database of
    settings.url, or the SQLite file at settings.path. observe_commit is told of each SQLite
    group commit (seconds holding the write lock, writes, whether it waited for another process
    first), for metrics."""
    if settings.engine == "postgresql":
        from .postgres import PostgresStore

        return PostgresStore(settings, observe_commit)
    from .sqlite import Database

    return Database(settings, observe_commit)


async def with_store(settings: DatabaseSettings, work: Callable[[Store], Awaitable[T]]) -> T:
    """await work(the store the settings describe), opened first (the schema created or
    migrated) and closed afterwards, whatever work does."""
    store = store_for(settings)
    await store.open()
    try:
        return await work(store)
    finally:
        await store.close()
