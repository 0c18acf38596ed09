"""The PostgreSQL engine: one database shared by every worker process of every host.

- `store.PostgresStore`: the server's named async operations over a pool of asyncpg connections
  per worker process (database.pool_min .. pool_max). PostgreSQL orders concurrent writers;
  every guarantee holds across hosts.
- `schema`: the schema (`schema.sql` beside it), its migrations (the same version numbers as
  SQLite's), and the translation of asyncpg's errors into the storage layer's.

asyncpg is an optional dependency (`pip install 'dailyplay[postgres]'`): it is imported when a
store opens, so that SQLite users never need it.
"""

from .schema import MIGRATIONS, SCHEMA_VERSION, migrate, translated
from .store import PURGE_BATCH, PostgresStore

__all__ = ["MIGRATIONS", "PURGE_BATCH", "SCHEMA_VERSION", "PostgresStore", "migrate", "translated"]
