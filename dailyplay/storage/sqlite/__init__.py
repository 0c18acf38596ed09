"""The SQLite engine: one database file in WAL mode, shared by the worker processes of one host.

- `store.Database`: the server's named async operations. Writes go through group commits on one
  writer thread (`engine`), ordered across processes by a file lock; reads run on the event loop
  through a read-only connection; a thread of its own checkpoints the WAL.
- `admin`: synchronous operations on a plain connection, which `store` runs inside its
  transactions (and test set-up and the benchmark's seeding call directly).
- `schema`: the schema, its migrations, connections and their PRAGMAs, and the translation of
  SQLite's errors into the storage layer's.
- `statements`: the SQL they share, and the parsing of its rows into the storage types.
- `backup`: a consistent copy of the file, live or not (`dailyplay backup`).
"""

from ..errors import KeyChanged, SchemaError
from ..rows import API_KEY_COLUMNS, SESSION_COLUMNS
from ..types import CLI, MUTABLE_KEY_COLUMNS, NO_USAGE, USAGE_FIELDS, Actor
from .admin import (
    PURGE_BATCH,
    count_finished_sessions,
    create_org,
    delete_api_key_in,
    delete_finished_sessions,
    delete_member,
    find_org_by_external_id,
    insert_api_key,
    insert_sessions,
    key_usage,
    list_api_keys,
    list_audit,
    list_members,
    list_orgs,
    set_org_tier,
    update_api_key_in,
    upsert_member,
)
from .backup import BackupFailed, backup_file
from .engine import MAX_GROUP, Checkpointer, WriterLock, WriterThread
from .schema import (
    MIGRATIONS,
    SCHEMA_VERSION,
    _statements,
    checkpoint,
    connect,
    is_busy,
    is_full,
    migrate,
    schema_text,
    transaction,
)
from .statements import GET_SESSION, KEY_STATE, record_audit
from .store import Database

__all__ = [
    "API_KEY_COLUMNS",
    "CLI",
    "GET_SESSION",
    "KEY_STATE",
    "MAX_GROUP",
    "MIGRATIONS",
    "MUTABLE_KEY_COLUMNS",
    "NO_USAGE",
    "PURGE_BATCH",
    "SCHEMA_VERSION",
    "SESSION_COLUMNS",
    "USAGE_FIELDS",
    "Actor",
    "BackupFailed",
    "Checkpointer",
    "Database",
    "KeyChanged",
    "SchemaError",
    "WriterLock",
    "WriterThread",
    "_statements",
    "backup_file",
    "checkpoint",
    "connect",
    "count_finished_sessions",
    "create_org",
    "delete_api_key_in",
    "delete_finished_sessions",
    "delete_member",
    "find_org_by_external_id",
    "insert_api_key",
    "insert_sessions",
    "is_busy",
    "is_full",
    "key_usage",
    "list_api_keys",
    "list_audit",
    "list_members",
    "list_orgs",
    "migrate",
    "record_audit",
    "schema_text",
    "set_org_tier",
    "transaction",
    "update_api_key_in",
    "upsert_member",
]  # fmt: skip
