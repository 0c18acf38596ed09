"""Dispatch, the one error shape, bad bodies and CORS: every bad request is a clear 4xx."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import API, World, assert_error, cap_pages, running_app, sql

from dailyplay import config
from dailyplay.app import FULL_RETRY_AFTER_SECONDS

pytestmark = pytest.mark.both_engines


@pytest.mark.parametrize(
    ("method", "url", "allow"),
    [
        ("GET", f"{API}?action=create-session", "POST"),
        ("PUT", f"{API}?action=create-session", "POST"),
        ("POST", f"{API}?action=validate-session", "GET"),
        ("DELETE", f"{API}?action=validate-session", "GET"),
        ("HEAD", f"{API}?action=validate-session", "GET"),
        ("GET", f"{API}?action=consume-session", "POST"),
        ("PUT", API, "GET, POST, PATCH, DELETE"),
        ("OPTIONS", API, "GET, POST, PATCH, DELETE"),
        ("TRACE", API, "GET, POST, PATCH, DELETE"),
    ],
)
def test_wrong_method_is_405_with_an_accurate_allow(
    world: World, method: str, url: str, allow: str
) -> None:
    response = world.client.request(method, url)
    assert response.status_code == 405
    assert response.headers["allow"] == allow
    if method != "HEAD":
        assert_error(response, 405, "not allowed")


@pytest.mark.parametrize(
    "query", ["action=nope", "action=", "action=CREATE-SESSION", "action=create-session%00"]
)
def test_unknown_action_is_400(world: World, query: str) -> None:
    assert_error(world.client.post(f"{API}?{query}", json={}), 400, "unknown action")


def test_duplicated_query_parameters_are_400(world: World, api_key: str) -> None:
    token = world.token(api_key)
    assert_error(
        world.client.get(f"{API}?action=validate-session&action=validate-session&token={token}"),
        400,
        "'action' is given more than once",
    )
    assert_error(
        world.client.get(f"{API}?action=validate-session&token={token}&token={uuid.uuid4()}"),
        400,
        "'token' is given more than once",
    )
    assert_error(
        world.client.get(f"{API}?org_id={world.org_id}&org_id=2", headers=world.bearer()),
        400,
        "'org_id' is given more than once",
    )


def test_unknown_query_parameters_are_400(world: World, api_key: str) -> None:
    token = world.token(api_key)
    assert_error(
        world.client.get(f"{API}?action=validate-session&token={token}&debug=1"),
        400,
        "unknown query parameter 'debug'",
    )
    response = world.client.post(
        f"{API}?action=create-session&game_id=1",
        json={"game_id": 1},
        headers={"x-api-key": api_key},
    )
    assert_error(response, 400, "unknown query parameter 'game_id'")
    assert sql(world.settings, "SELECT count(*) FROM sessions") == [(1,)]


def test_unknown_path_is_a_json_404(world: World) -> None:
    for path in (
        "/index.html",
        "/api",
        "/api/org-api-keys/",
        "/api/org-api-keys/1",
        "/../etc/passwd",
        "/%2e%2e/",
    ):
        assert_error(world.client.get(path), 404, "not found")


@pytest.mark.parametrize(
    ("content", "headers", "status", "fragment"),
    [
        (b"", {"content-type": "application/json"}, 400, "required"),
        (b"   ", {"content-type": "application/json"}, 400, "required"),
        (b"{", {"content-type": "application/json"}, 400, "not valid JSON"),
        (b"[1, 2]", {"content-type": "application/json"}, 400, "JSON object"),
        (b'"text"', {"content-type": "application/json"}, 400, "JSON object"),
        (b"null", {"content-type": "application/json"}, 400, "JSON object"),
        (b'{"token": NaN}', {"content-type": "application/json"}, 400, "not valid JSON"),
        (b'{"token": Infinity}', {"content-type": "application/json"}, 400, "not valid JSON"),
        (
            b'{"token": "a", "token": "b"}',
            {"content-type": "application/json"},
            400,
            "duplicate key",
        ),
        (b'{"token": "\xff\xfe"}', {"content-type": "application/json"}, 400, "UTF-8"),
        (b'{"token": "\\ud800"}', {"content-type": "application/json"}, 400, "surrogate"),
        (b'{"a": {"b": "\\udfff"}}', {"content-type": "application/json"}, 400, "surrogate"),
        (b'\xef\xbb\xbf{"token": "x"}', {"content-type": "application/json"}, 400, "BOM"),
        (b"[" * 100_00 + b"]" * 100_00, {"content-type": "application/json"}, 400, ""),
        (
            b'{"token": ' + b"9" * 5000 + b"}",
            {"content-type": "application/json"},
            400,
            "not valid JSON",
        ),
        (b'{"token": "x"}', {"content-type": "text/plain"}, 415, "application/json"),
        (b'{"token": "x"}', {}, 415, "application/json"),
        (
            b"token=x",
            {"content-type": "application/x-www-form-urlencoded"},
            415,
            "application/json",
        ),
    ],
)
def test_bad_bodies_get_a_clear_4xx(
    world: World, content: bytes, headers: dict, status: int, fragment: str
) -> None:
    response = world.client.post(f"{API}?action=consume-session", content=content, headers=headers)
    assert_error(response, status, fragment)


def test_json_content_type_with_charset_is_accepted(world: World, api_key: str) -> None:
    token = world.token(api_key)
    response = world.client.post(
        f"{API}?action=consume-session",
        content=f'{{"token": "{token}"}}'.encode(),
        headers={"content-type": "application/json; charset=utf-8"},
    )
    assert response.status_code == 200


def test_oversized_body_is_413_and_nothing_is_stored(world: World, api_key: str) -> None:
    big = b'{"game_id": 1, "external_ref": "' + b"x" * 70_000 + b'"}'
    response = world.client.post(
        f"{API}?action=create-session",
        content=big,
        headers={"x-api-key": api_key, "content-type": "application/json"},
    )
    assert_error(response, 413, "65536")
    assert sql(world.settings, "SELECT count(*) FROM sessions") == [(0,)]


def test_oversized_streamed_body_without_length_is_413(world: World, api_key: str) -> None:
    async def chunks():
        for _ in range(100):
            yield b"x" * 4096

    response = world.client.post(
        f"{API}?action=consume-session",
        content=chunks(),
        headers={"content-type": "application/json"},
    )
    assert_error(response, 413, "larger than")


def test_configured_body_limit(make_settings) -> None:
    settings = make_settings(limits={"max_body_bytes": 2048, "max_metadata_bytes": 1024})
    with running_app(settings) as client:
        response = client.post(
            f"{API}?action=consume-session",
            content=b"{" + b" " * 3000 + b"}",
            headers={"content-type": "application/json"},
        )
        assert_error(response, 413, "2048")


def test_errors_never_echo_secrets(world: World, api_key: str) -> None:
    forged = api_key[:-1] + ("0" if api_key[-1] != "0" else "1")
    for response in (
        world.create_session(forged),
        world.create_session(api_key, game_id=1, color="x"),
        world.client.get(f"{API}?action=validate-session&token={api_key}"),
    ):
        assert response.status_code in (400, 401)
        assert api_key not in response.text and forged not in response.text
        assert api_key[8:20] not in response.text


def test_cors_preflight_and_simple_requests(make_settings, rsa_key) -> None:
    settings = make_settings(cors={"allow_origins": ["https://game.example.com"]})
    with running_app(settings) as client:
        preflight = client.request(
            "OPTIONS",
            f"{API}?action=consume-session",
            headers={
                "origin": "https://game.example.com",
                "access-control-request-method": "POST",
                "access-control-request-headers": "content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://game.example.com"
        assert "POST" in preflight.headers["access-control-allow-methods"]
        refused = client.request(
            "OPTIONS",
            f"{API}?action=consume-session",
            headers={"origin": "https://evil.example.com", "access-control-request-method": "POST"},
        )
        assert_error(refused, 400, "origin")
        response = client.get(
            f"{API}?action=validate-session&token={uuid.uuid4()}",
            headers={"origin": "https://game.example.com"},
        )
        assert response.status_code == 404
        assert response.headers["access-control-allow-origin"] == "https://game.example.com"
        other = client.get(
            f"{API}?action=validate-session&token={uuid.uuid4()}",
            headers={"origin": "https://evil.example.com"},
        )
        assert "access-control-allow-origin" not in other.headers


def test_no_cors_headers_unless_configured(world: World) -> None:
    response = world.client.get(
        f"{API}?action=validate-session&token={uuid.uuid4()}",
        headers={"origin": "https://game.example.com"},
    )
    assert "access-control-allow-origin" not in response.headers


@contextlib.contextmanager
def lock_held_elsewhere(settings: config.Settings, key_id: int) -> Iterator[None]:
    """Another process holding what a token's insert needs: SQLite's write lock, or, on
    PostgreSQL, the key's row (as a change to the key does while it commits)."""
    if settings.database.engine == "sqlite":
        import sqlite3

        blocker = sqlite3.connect(settings.database.path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        return
    import asyncpg

    async def lock() -> Any:
        conn = await asyncpg.connect(settings.database.url)
        await conn.execute("BEGIN")
        await conn.execute("SELECT 1 FROM api_keys WHERE id = $1 FOR UPDATE", key_id)
        return conn

    import anyio.from_thread

    with anyio.from_thread.start_blocking_portal() as portal:
        conn = portal.call(lock)
        try:
            yield
        finally:
            portal.call(conn.close)


def test_a_database_locked_past_the_busy_timeout_is_a_503_and_nothing_is_stored(
    make_settings, rsa_key
) -> None:
    from conftest import World, add_org

    settings = make_settings(database={"busy_timeout_ms": 200, "statement_timeout_ms": 200})
    with running_app(settings) as client:
        world = World(
            client, settings, add_org(settings, members={"a": "admin"}), "a", "a", rsa_key
        )
        key = world.create_key()
        with lock_held_elsewhere(settings, key["id"]):
            response = world.create_session(key["key"])
            assert_error(response, 503, "busy")
            assert response.headers["retry-after"] == "1"
            assert "\ndailyplay_db_busy_errors_total 1.0\n" in client.get("/metrics").text
        assert sql(settings, "SELECT count(*) FROM sessions") == [(0,)]
        assert world.create_session(key["key"]).status_code == 200


@pytest.mark.sqlite_only
def test_a_full_database_is_a_503_that_says_so_and_nothing_is_stored(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """A full disk (SQLITE_FULL) refuses writes until space is freed: the client gets a 503 it
    may retry, not an anonymous 500, and the log says what is wrong, once per refused request,
    without a traceback. Reproduced with max_page_count on the writing connection, which fails
    a write exactly as a full disk does."""
    db = world.client.app.state.services.db
    api_key = world.create_key(rate_limit_per_minute=10_000)["key"]
    created = world.create_session(api_key)
    assert created.status_code == 200
    token = created.json()["data"]["token"]

    world.client.portal.call(db.run_on_writer, cap_pages)
    stored = sql(world.settings, "SELECT count(*) FROM sessions")[0][0]
    with caplog.at_level(logging.ERROR, logger="dailyplay"):
        for _ in range(500):  # until an insert needs a page the file may not have
            response = world.create_session(api_key)
            if response.status_code != 200:
                break
            stored += 1
        assert_error(response, 503, "full")
        assert response.headers["retry-after"] == "60"
        # Reads go on.
        validated = world.client.get(f"{API}?action=validate-session&token={token}")
        assert validated.status_code == 200
        # Readiness says so, though its own probe (a row rewritten in place) still succeeds.
        assert_error(world.client.get("/readyz"), 503, "the disk is full")
    assert sql(world.settings, "SELECT count(*) FROM sessions") == [(stored,)]
    full = [r for r in caplog.records if "full" in r.getMessage()]
    assert full and all(r.exc_info is None for r in full), caplog.text
    assert "unhandled error" not in caplog.text
    world.client.portal.call(
        db.run_on_writer, lambda conn: conn.execute("PRAGMA max_page_count = 1073741823")
    )
    assert world.create_session(api_key).status_code == 200
    db._full_at -= FULL_RETRY_AFTER_SECONDS  # a minute on: ready again
    assert world.client.get("/readyz").status_code == 200


def test_an_unexpected_error_is_a_json_500_with_the_request_id_logged_once(
    world: World, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault no handler expects (here the database layer raising) is answered in the API's
    error shape, carries the request id, and is logged once with its traceback; the answer
    names no detail of it."""

    async def broken(token: bytes) -> None:
        raise RuntimeError("disk on fire: /var/lib/secret-path")

    monkeypatch.setattr(world.client.app.state.services.db, "get_session", broken)
    with caplog.at_level(logging.ERROR, logger="dailyplay"):
        response = world.client.get(
            f"{API}?action=validate-session&token={uuid.uuid4()}",
            headers={"x-request-id": "req-500"},
        )
    assert_error(response, 500, "internal server error")
    assert "disk on fire" not in response.text
    assert response.headers["x-request-id"] == "req-500"
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1, [record.getMessage() for record in errors]
    assert errors[0].exc_info is not None and "disk on fire" in str(errors[0].exc_info[1])
    # The process goes on answering.
    assert world.client.get("/healthz").status_code == 200


def test_a_database_that_refuses_writes_is_a_503_with_retry_after_and_nothing_stored(
    world: World, api_key: str, caplog: pytest.LogCaptureFixture, request: pytest.FixtureRequest
) -> None:
    """A write the database cannot take (here a read-only file; on another engine, a server out
    of reach) is the storage layer's StorageUnavailable: 503 with Retry-After and one log line
    without a traceback, not a 500; reads go on."""
    token = world.token(api_key)
    db = world.client.app.state.services.db
    before = sql(world.settings, "SELECT count(*) FROM sessions")
    if world.settings.database.engine == "sqlite":
        world.client.portal.call(
            db.run_on_writer, lambda conn: conn.execute("PRAGMA query_only = ON")
        )
        refusal = "readonly"
    else:
        # As after a fail-over to a standby: every new connection is read-only, and the
        # service's open ones are cut (its pool opens new ones by itself).
        name = world.settings.database.url.rsplit("/", 1)[1]
        server = request.getfixturevalue("postgres_server")
        asyncio.run(
            server.admin(
                f"ALTER DATABASE {name} SET default_transaction_read_only = on",
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                f" WHERE datname = '{name}' AND pid <> pg_backend_pid()",
            )
        )
        time.sleep(0.3)
        refusal = "read-only transaction"
    with caplog.at_level(logging.ERROR, logger="dailyplay"):
        response = world.create_session(api_key)
    assert_error(response, 503, "the database is unavailable, so nothing was done")
    assert response.headers["retry-after"] == "5"
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None, [r.getMessage() for r in errors]
    assert refusal in errors[0].getMessage()
    assert sql(world.settings, "SELECT count(*) FROM sessions") == before
    validated = world.client.get(f"{API}?action=validate-session&token={token}")
    assert validated.status_code == 200, validated.text
