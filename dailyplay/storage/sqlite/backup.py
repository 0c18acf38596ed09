"""SQLite: a consistent copy of a database file, live or not."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

from ...config import DatabaseSettings
from .schema import connect, reraise, translated


class BackupFailed(Exception):
    """The copy could not be made or failed its integrity check; nothing was put in place."""


def backup_file(settings: DatabaseSettings, dest: Path) -> dict[str, Any]:
    """Copy the database to dest through SQLite's online backup API, from one read snapshot
    (writers go on meanwhile): written beside dest, checked with quick_check, made one
    self-contained file (no -wal), and only then moved into place. Returns its schema version,
    token count and check result."""
    partial = dest.with_name(dest.name + ".partial")
    try:
        source = connect(settings)
    except sqlite3.Error as exc:
        reraise(exc)
    try:
        partial.unlink(missing_ok=True)
        target = sqlite3.connect(partial, isolation_level=None)
        try:
            source.backup(target)
            check = target.execute("PRAGMA quick_check").fetchone()[0]
            target.execute("PRAGMA journal_mode = DELETE")
            version = target.execute("PRAGMA user_version").fetchone()[0]
            sessions = target.execute("SELECT count(*) FROM sessions").fetchone()[0]
        finally:
            target.close()
        if check != "ok":
            raise BackupFailed(f"the copy failed its integrity check: {check}")
        os.replace(partial, dest)
    except sqlite3.Error as exc:
        error = translated(exc)
        raise (BackupFailed(str(exc)) if error is exc else error) from exc
    except OSError as exc:
        raise BackupFailed(str(exc)) from exc
    finally:
        source.close()
        partial.unlink(missing_ok=True)
    return {"schema_version": version, "sessions": sessions, "integrity": check}
