"""Storage: everything the service keeps, behind named operations.

Nothing outside this package holds SQL or imports a database driver. The engine is SQLite
(`storage.sqlite`); callers catch this package's own exceptions (`storage.errors`).
"""
