"""A throwaway PostgreSQL server for the tests and the benchmark: initdb in a temporary
directory, a free port on 127.0.0.1, removed when stopped.

The service connects as `dailyplay`, a role that is no superuser and owns its database (what
docs/operations.md tells operators to create); set-up runs as the superuser `postgres` over the
server's Unix socket. PostgreSQL refuses to run as root: as root, the server's commands run as
the `postgres` user (Debian's package creates it), through runuser.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

ROLE = "dailyplay"
PASSWORD = "throwaway-dailyplay-password"  # noqa: S105 - a test server on 127.0.0.1


def binaries() -> Path | None:
    """The directory of PostgreSQL's server programs (initdb, pg_ctl), or None."""
    on_path = shutil.which("pg_ctl")
    if on_path and Path(on_path).with_name("initdb").exists():
        return Path(on_path).parent
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4])
    )
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ThrowawayPostgres:
    """One PostgreSQL server of its own. durable=False turns fsync off (the tests: nothing here
    is about PostgreSQL's own durability, and each test makes a database); the benchmark keeps
    PostgreSQL's defaults, as users run it."""

    def __init__(self, durable: bool = False, max_connections: int = 300):
        bindir = binaries()
        if bindir is None:
            raise FileNotFoundError("PostgreSQL's server programs (initdb, pg_ctl) are missing")
        self.bindir = bindir
        self.durable = durable
        self.max_connections = max_connections
        self.port = _free_port()
        # Not under pytest's per-user temporary directory, which only root may enter.
        self.directory = Path(tempfile.mkdtemp(prefix="dailyplay-pg-"))
        self.data = self.directory / "data"
        self.log = self.directory / "server.log"
        self._as_postgres = os.geteuid() == 0
        self._databases = 0

    def _run(self, *command: str) -> None:
        argv = [str(self.bindir / command[0]), *command[1:]]
        if self._as_postgres:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        subprocess.run(argv, check=True, capture_output=True, timeout=120)

    def start(self) -> ThrowawayPostgres:
        if self._as_postgres:
            shutil.chown(self.directory, "postgres", "postgres")
        if not self.data.exists():
            self._run(
                "initdb", "-D", str(self.data), "-U", "postgres", "--auth-local=trust",
                "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C.UTF-8",
            )  # fmt: skip
        options = [
            f"-p {self.port}",
            f"-k {self.directory}",
            "-c listen_addresses=127.0.0.1",
            f"-c max_connections={self.max_connections}",
        ]
        if not self.durable:
            options += ["-c fsync=off", "-c full_page_writes=off", "-c synchronous_commit=off"]
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", " ".join(options),
            "-w", "-t", "60", "start",
        )  # fmt: skip
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (mode immediate: as if it crashed); start() brings it back."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # not running
            self.stop("immediate")
        shutil.rmtree(self.directory, ignore_errors=True)

    # --- databases ------------------------------------------------------------------------------

    def url(self, database: str, password: bool = True) -> str:
        """The service's url for a database (the role's password in it, unless password=False)."""
        secret = f":{PASSWORD}" if password else ""
        return f"postgresql://{ROLE}{secret}@127.0.0.1:{self.port}/{database}"

    async def admin(self, *statements: str, database: str = "postgres") -> list[Any]:
        """Run statements as the superuser; the rows of the last."""
        import asyncpg

        conn = await asyncpg.connect(
            host=str(self.directory), port=self.port, user="postgres", database=database
        )
        try:
            rows: list[Any] = []
            for statement in statements:
                rows = await conn.fetch(statement)
            return rows
        finally:
            await conn.close()

    def setup_role(self) -> None:
        """The service's role: it may log in, and nothing more (it owns its databases)."""
        asyncio.run(self.admin(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'"))

    def create_database(self, name: str | None = None) -> str:
        """A new, empty database owned by the service's role; its url."""
        if name is None:
            self._databases += 1
            name = f"dailyplay_{self._databases}"
        asyncio.run(self.admin(f'CREATE DATABASE "{name}" OWNER {ROLE}'))
        return self.url(name)

    def emptied_database(self, name: str) -> str:
        """A database of the service's role with the current schema and no rows (ids start at
        1 again, settings made with ALTER DATABASE are reset): made the first time, emptied
        the next ones; its url. Much faster than a new database per test. Nothing may be
        connected to it but what the caller starts afterwards."""
        exists = asyncio.run(self.admin(f"SELECT 1 FROM pg_database WHERE datname = '{name}'"))
        if not exists:
            return self.create_database(name)
        asyncio.run(self._empty(name))
        return self.url(name)

    async def _empty(self, name: str) -> None:
        # From another database: a setting on this one (read-only, say) would bind this session.
        await self.admin(
            f'ALTER DATABASE "{name}" RESET ALL',
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            f" WHERE datname = '{name}' AND pid <> pg_backend_pid()",
        )
        tables = await self.admin(
            "SELECT string_agg(quote_ident(tablename), ', ') FROM pg_tables"
            " WHERE schemaname = 'public' AND tablename <> 'dailyplay_schema'",
            database=name,
        )
        if tables[0][0]:
            await self.admin(f"TRUNCATE {tables[0][0]} RESTART IDENTITY", database=name)

    def drop_database(self, name: str) -> None:
        asyncio.run(self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    def connections(self, database: str) -> int:
        """The connections open to a database now (the superuser's own excluded)."""
        rows = asyncio.run(
            self.admin(
                "SELECT count(*) FROM pg_stat_activity"
                f" WHERE datname = '{database}' AND usename = '{ROLE}'"
            )
        )
        return int(rows[0][0])

    def stored_bytes(self, database: str) -> bytes:
        """Every byte PostgreSQL keeps for a database: its files and the whole WAL, after a
        checkpoint (the server's files; the caller must be able to read them)."""
        rows = asyncio.run(
            self.admin("CHECKPOINT", f"SELECT oid FROM pg_database WHERE datname = '{database}'")
        )
        directories = [self.data / "base" / str(rows[0][0]), self.data / "pg_wal"]
        return b"".join(
            path.read_bytes()
            for directory in directories
            for path in sorted(directory.iterdir())
            if path.is_file()
        )
