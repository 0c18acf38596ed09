"""Shared fixtures: settings on a fresh database, real signing keys, apps and servers.

Settings are on a fresh SQLite file, or, in the modules marked `both_engines`, on each engine in
turn: every test there runs once on SQLite and once on a fresh database of a throwaway
PostgreSQL server (bench/postgres.py), as the service's own role, which is no superuser.
A test of such a module that is about SQLite's own machinery is marked `sqlite_only`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio.from_thread
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from starlette.applications import Starlette

from dailyplay import config, storage
from dailyplay.app import create_app
from dailyplay.clock import now_ms
from dailyplay.storage import sqlite as db
from dailyplay.storage.types import CLI

API = "/api/org-api-keys"

# DAILYPLAY_TEST_FUZZ_SEED=random picks the conformance tests' seed once here, so the header can
# show it and a failing run can be repeated with DAILYPLAY_TEST_FUZZ_SEED=<that number>.
if os.environ.get("DAILYPLAY_TEST_FUZZ_SEED") == "random":
    os.environ["DAILYPLAY_TEST_FUZZ_SEED"] = str(int.from_bytes(os.urandom(4), "big"))


def pytest_report_header() -> str:
    return f"schemathesis seed: {os.environ.get('DAILYPLAY_TEST_FUZZ_SEED') or 'fixed (20261128)'}"


@dataclass
class SigningKey:
    private: Any
    public_pem: bytes
    algorithm: str
    kid: str

    def sign(self, claims: dict[str, Any], headers: dict[str, Any] | None = None) -> str:
        return jwt.encode(
            claims,
            self.private,
            algorithm=self.algorithm,
            headers={"kid": self.kid, **(headers or {})},
        )


def _public_pem(private: Any) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="session")
def rsa_key() -> SigningKey:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return SigningKey(private, _public_pem(private), "RS256", "rsa-1")


@pytest.fixture(scope="session")
def other_rsa_key() -> SigningKey:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return SigningKey(private, _public_pem(private), "RS256", "rsa-2")


@pytest.fixture(scope="session")
def ec_key() -> SigningKey:
    private = ec.generate_private_key(ec.SECP256R1())
    return SigningKey(private, _public_pem(private), "ES256", "ec-1")


def claims_for(user: str, lifetime: int = 300, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": user, "iat": now, "exp": now + lifetime, **extra}


ENGINES = ("sqlite", "postgresql")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test of a module marked both_engines runs on each engine (unless sqlite_only); a
    test marked postgres runs on PostgreSQL only."""
    definition = metafunc.definition
    if "limits_storage" in metafunc.fixturenames and definition.get_closest_marker(
        "both_limit_storages"
    ):
        metafunc.parametrize(
            "limits_storage",
            ["local", pytest.param("redis", marks=[pytest.mark.redis])],
            indirect=True,
        )
    if "engine" not in metafunc.fixturenames:
        return
    if definition.get_closest_marker("postgres"):
        metafunc.parametrize("engine", ["postgresql"], indirect=True)
    elif definition.get_closest_marker("both_engines") and not definition.get_closest_marker(
        "sqlite_only"
    ):
        metafunc.parametrize(
            "engine",
            [pytest.param(engine, marks=[pytest.mark.postgres] if engine == "postgresql" else [])
             for engine in ENGINES],
            indirect=True,
        )  # fmt: skip


@pytest.fixture
def engine(request: pytest.FixtureRequest) -> str:
    """The engine of this test's settings: SQLite, unless the test runs on each engine."""
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture
def limits_storage(request: pytest.FixtureRequest) -> str:
    """Where this test's settings count rate limits: in the process, unless the test runs on
    each kind (both_limit_storages): then also in Redis (limits.storage_uri)."""
    return str(getattr(request, "param", "local"))


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    """A throwaway PostgreSQL server for the whole run, with the service's role."""
    from bench.postgres import ThrowawayPostgres, binaries

    require(
        "PostgreSQL",
        binaries() is not None,
        "install Debian's postgresql package (.ci/run does), or skip with -m 'not postgres'",
    )
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        require("asyncpg", False, "pip install -e '.[test]'")
    server = ThrowawayPostgres().start()
    try:
        server.setup_role()
        yield server
    finally:
        server.remove()


@pytest.fixture
def postgres_url(postgres_server: Any) -> str:
    """A database on the throwaway server, owned by the service's role, with the current schema
    and no rows (one database, emptied for each test: a new one costs 0.2 s)."""
    return str(postgres_server.emptied_database("dailyplay_tests"))


@pytest.fixture
def fresh_postgres_url(postgres_server: Any) -> Iterator[str]:
    """A new database without even a schema, dropped afterwards."""
    url = postgres_server.create_database()
    yield url
    postgres_server.drop_database(url.rsplit("/", 1)[1])


@pytest.fixture(scope="session")
def redis_server() -> Iterator[Any]:
    """A throwaway Redis server for the whole run (its data flushed by redis_url)."""
    from bench.redis import ThrowawayRedis, binary

    require(
        "redis-server",
        binary() is not None,
        "install Debian's redis-server package (.ci/run does)",
    )
    try:
        import redis  # noqa: F401
    except ImportError:
        require("the redis package", False, "pip install -e '.[test]'")
    server = ThrowawayRedis().start()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture
def redis_url(redis_server: Any) -> str:
    """limits.storage_uri of the throwaway Redis, emptied for this test (and started again if
    an earlier test killed it)."""
    redis_server.resume()
    if not redis_server.ping():
        redis_server.kill()
        redis_server.start()
    redis_server.flush()
    return str(redis_server.url)


@pytest.fixture
def make_settings(
    tmp_path: Path,
    rsa_key: SigningKey,
    engine: str,
    limits_storage: str,
    request: pytest.FixtureRequest,
) -> Callable[..., config.Settings]:
    """Settings on a fresh database of the test's engine (tmp_path's SQLite file, or a
    PostgreSQL database), with rate limits counted where limits_storage says, verifying JWTs
    with rsa_key; sections overridable."""
    pem = tmp_path / "jwt-public.pem"
    pem.write_bytes(rsa_key.public_pem)
    url = request.getfixturevalue("postgres_url") if engine == "postgresql" else ""
    shared = request.getfixturevalue("redis_url") if limits_storage == "redis" else ""

    def build(**sections: dict[str, Any]) -> config.Settings:
        settings = config.Settings()
        settings = settings.replace("database", path=str(tmp_path / "dailyplay.db"), url=url)
        settings = settings.replace("auth", jwt_public_key=str(pem))
        settings = settings.replace("limits", storage_uri=shared)
        for section, values in sections.items():
            settings = settings.replace(section, **values)
        return settings

    return build


def inside_one_minute(seconds: float = 10.0) -> None:
    """Wait for the next clock minute if this one has fewer than `seconds` left, so that the
    requests that follow share one rate-limit window."""
    left = 60 - time.time() % 60
    if left < seconds:
        time.sleep(left + 0.2)


@pytest.fixture
def fresh_minute() -> None:
    """Start well inside a clock minute, so a test's requests share one rate-limit window."""
    inside_one_minute()


@pytest.fixture
def settings(make_settings: Callable[..., config.Settings]) -> config.Settings:
    return make_settings()


class AppClient:
    """A synchronous httpx client for the ASGI app in this process, its lifespan entered.

    httpx's ASGITransport does not run the lifespan, so this enters it on an event loop in a
    background thread and sends every request there.
    """

    def __init__(self, app: Starlette, client_ip: str = "198.51.100.7"):
        self.app = app
        self._portal_cm = anyio.from_thread.start_blocking_portal()
        self.portal = self._portal_cm.__enter__()
        self._lifespan = app.router.lifespan_context(app)
        self.portal.call(self._lifespan.__aenter__)
        transport = httpx.ASGITransport(
            app=app, raise_app_exceptions=False, client=(client_ip, 40000)
        )
        self._client = httpx.AsyncClient(transport=transport, base_url="http://testserver")

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return self.portal.call(functools.partial(self._client.request, method, url, **kwargs))

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def patch(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("PATCH", url, **kwargs)

    def delete(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("DELETE", url, **kwargs)

    def close(self) -> None:
        try:
            self.portal.call(self._client.aclose)
            self.portal.call(self._lifespan.__aexit__, None, None, None)
        finally:
            self._portal_cm.__exit__(None, None, None)


@contextlib.contextmanager
def running_app(settings: config.Settings, client_ip: str = "198.51.100.7") -> Iterator[AppClient]:
    client = AppClient(create_app(settings), client_ip)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def client(settings: config.Settings) -> Iterator[AppClient]:
    with running_app(settings) as test_client:
        yield test_client


# --- data set up the way an operator would (the CLI's own functions) ----------------------------


def with_store(settings: config.Settings, work: Callable[[Any], Any]) -> Any:
    """await work(store) on the settings' database (either engine), opened and closed here."""
    import asyncio

    return asyncio.run(storage.with_store(settings.database, work))


def database_env(settings: config.Settings) -> dict[str, str]:
    """The environment that points a `dailyplay` command at the settings' database."""
    return {
        "DAILYPLAY_DATABASE_PATH": settings.database.path,
        "DAILYPLAY_DATABASE_URL": settings.database.url,
    }


def add_org(
    settings: config.Settings,
    name: str = "Acme Games",
    tier: str = "business",
    external_id: str | None = None,
    members: dict[str, str] | None = None,
) -> int:
    async def work(store: Any) -> int:
        org = await store.create_org(name, tier, external_id, now_ms(), CLI)
        for user, role in (members or {}).items():
            await store.upsert_member(org.id, user, role, now_ms(), CLI)
        return int(org.id)

    return int(with_store(settings, work))


def cap_pages(conn: Any) -> None:
    """The file may not grow past its size now: a write that needs a new page fails with
    SQLITE_FULL, exactly as on a full disk (max_page_count holds for this connection)."""
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")


def add_a_page(conn: Any) -> None:
    """A write that needs a new page (a new table): refused with SQLITE_FULL after cap_pages."""
    conn.execute("CREATE TABLE filler (x)")


def sql(settings: config.Settings, statement: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """Run one statement on the database directly (to look, or to set up a state), on either
    engine: `?` marks a parameter, as SQLite writes it."""
    if settings.database.engine == "postgresql":
        return _postgres_sql(settings.database.url, statement, params)
    conn = db.connect(settings.database)
    try:
        return [tuple(row) for row in conn.execute(statement, params).fetchall()]
    finally:
        conn.close()


def _postgres_sql(url: str, statement: str, params: tuple[Any, ...]) -> list[Any]:
    import asyncio
    import re

    import asyncpg

    numbered = iter(range(1, len(params) + 1))
    text = re.sub(r"\?", lambda _match: f"${next(numbered)}", statement)

    async def run() -> list[Any]:
        conn = await asyncpg.connect(url)
        try:
            return [tuple(row) for row in await conn.fetch(text, *params)]
        finally:
            await conn.close()

    return asyncio.run(run())


@dataclass
class World:
    """A Business org with an admin and a member, a bearer for each, and helpers."""

    client: AppClient
    settings: config.Settings
    org_id: int
    admin: str
    member: str
    signing: SigningKey

    def bearer(self, user: str | None = None, **claims: Any) -> dict[str, str]:
        token = self.signing.sign(claims_for(user or self.admin, **claims))
        return {"authorization": f"Bearer {token}"}

    def create_key(self, expect: int = 200, **fields: Any) -> dict[str, Any]:
        body = {"org_id": self.org_id, "name": "CRM", **fields}
        response = self.client.post(API, json=body, headers=self.bearer())
        assert response.status_code == expect, response.text
        return response.json()["data"] if expect == 200 else response.json()

    def create_session(self, key: str, **body: Any) -> httpx.Response:
        return self.client.post(
            f"{API}?action=create-session", json=body or {"game_id": 42}, headers={"x-api-key": key}
        )

    def token(self, key: str, **body: Any) -> str:
        response = self.create_session(key, **body)
        assert response.status_code == 200, response.text
        return str(response.json()["data"]["token"])


@pytest.fixture
def world(client: AppClient, settings: config.Settings, rsa_key: SigningKey) -> World:
    org_id = add_org(settings, members={"user_admin": "admin", "user_member": "member"})
    return World(client, settings, org_id, "user_admin", "user_member", rsa_key)


@pytest.fixture
def api_key(world: World) -> str:
    return str(world.create_key()["key"])


def assert_error(response: httpx.Response, status: int, fragment: str = "") -> None:
    """An error in the one JSON shape, with the status and a message containing fragment."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["success"] is False
    assert set(body) == {"success", "error"}
    assert isinstance(body["error"], str) and body["error"]
    assert fragment.lower() in body["error"].lower(), body["error"]


# --- a real `dailyplay serve` process ------------------------------------------------------------


def require(what: str, present: bool, how: str) -> None:
    """For tests that need something from outside Python (a browser, a server binary, a load
    generator): skip, saying how to get it, when it is missing here; fail under CI=true, so
    that CI can never skip them silently."""
    if present:
        return
    message = f"{what} is missing: {how}"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{message} (CI=true: every test must run)")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(settings: config.Settings, path: Path) -> Path:
    from dailyplay.demo import write_config as write

    write(settings, path)
    return path


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def dailyplay_command() -> list[str]:
    return [sys.executable, "-m", "dailyplay"]


@contextlib.contextmanager
def serve(
    settings: config.Settings,
    tmp_path: Path,
    workers: int = 1,
    env: dict[str, str] | None = None,
    stderr_pipe: bool = False,
) -> Iterator[Server]:
    """Start `dailyplay serve` on a free port; stop it with SIGTERM (SIGKILL if it hangs).
    Its output goes to server.log(); with stderr_pipe, stderr is process.stderr instead."""
    port = free_port()
    cfg = write_config(
        settings.replace("server", port=port, workers=workers), tmp_path / f"serve-{port}.toml"
    )
    log_path = tmp_path / f"serve-{port}.log"
    scratch = tmp_path / f"serve-{port}-tmp"  # what a server killed with -9 leaves behind
    scratch.mkdir()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DAILYPLAY_")},
        "TMPDIR": str(scratch),
        **(env or {}),
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*dailyplay_command(), "serve", "--config", str(cfg)],
            stdout=log,
            stderr=subprocess.PIPE if stderr_pipe else subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    server = Server(process, f"http://127.0.0.1:{port}", log_path)
    try:
        wait_until_serving(server)
        yield server
    finally:
        stop(process)
        if process.stderr is not None:
            process.stderr.close()


def wait_until_serving(server: Server, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"server exited early:\n{server.log()}")
        try:
            httpx.get(f"{server.url}{API}?action=validate-session", timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError(f"server did not start:\n{server.log()}")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)


@contextlib.contextmanager
def running_demo(
    tmp_path: Path, game: bool = True
) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, Any]]]:
    """`dailyplay demo` in tmp_path/demo on free ports, serving; yields it and its JSON summary
    once the API answers. Its guide (stderr) goes to tmp_path/demo.log."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAILYPLAY_")}
    ports = ["--port", str(free_port()), "--game-port", str(free_port() if game else 0)]
    with (tmp_path / "demo.log").open("wb") as log:
        process = subprocess.Popen(
            [*dailyplay_command(), "demo", "--dir", str(tmp_path / "demo"), *ports],
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
            cwd=tmp_path,
            start_new_session=True,
        )
    try:
        text = ""
        info = None
        assert process.stdout is not None
        while info is None:
            line = process.stdout.readline().decode()
            assert line, "demo exited before printing its summary"
            text += line
            try:
                info = json.loads(text)
            except ValueError:
                continue
        wait_until_serving(Server(process, info["url"], tmp_path / "demo.log"))
        yield process, info
    finally:
        stop(process)
        assert process.stdout is not None
        process.stdout.close()


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DAILYPLAY_")}
    return subprocess.run(
        [*dailyplay_command(), *args],
        capture_output=True,
        text=True,
        env={**base, **(env or {})},
        cwd=cwd,
        timeout=60,
        check=False,
    )


def cli_json(*args: str, **kwargs: Any) -> Any:
    result = run_cli(*args, **kwargs)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def issue_api_key(
    conn: Any, org_id: int, name: str, now: int, *, per_minute: int, per_day: int
) -> tuple[str, Any]:
    """A key stored through a sync SQLite connection (test set-up): the raw key and the key."""
    from dailyplay.keys import new_api_key

    raw_key, values = new_api_key(org_id, name, now, per_minute=per_minute, per_day=per_day)
    return raw_key, db.insert_api_key(conn, values, db.CLI)
