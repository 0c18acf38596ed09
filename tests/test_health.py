"""GET / (where to go), GET /healthz and GET /readyz, and the schema step that readiness
writes into."""

from __future__ import annotations

import sqlite3

import pytest
from conftest import API, AppClient, add_a_page, assert_error, cap_pages, running_app, sql

import dailyplay
from dailyplay import config
from dailyplay.storage import sqlite as db
from dailyplay.storage.errors import StorageFull


def test_healthz_says_the_process_is_alive(client: AppClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"success": True, "data": {"status": "ok"}}


def test_readyz_writes_through_to_the_file(client: AppClient, settings: config.Settings) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json() == {
        "success": True,
        "data": {"status": "ready", "schema_version": db.SCHEMA_VERSION},
    }
    first = sql(settings, "SELECT checked_at FROM readiness")
    assert len(first) == 1
    assert client.get("/readyz").status_code == 200
    assert sql(settings, "SELECT count(*) FROM readiness") == [(1,)]
    assert sql(settings, "SELECT checked_at FROM readiness")[0][0] >= first[0][0]


def test_readyz_is_503_when_the_database_refuses_writes(settings: config.Settings) -> None:
    with running_app(settings) as client:
        database = client.app.state.services.db

        async def refuse_writes() -> None:
            await database.run_on_writer(lambda conn: conn.execute("PRAGMA query_only = ON"))

        client.portal.call(refuse_writes)
        response = client.get("/readyz")
        assert_error(response, 503, "not ready: database cannot be written")
        assert "readonly" in response.json()["error"]
        assert response.headers["retry-after"] == "5"
        # Liveness is a different question.
        assert client.get("/healthz").status_code == 200


def test_readyz_is_503_when_the_file_has_another_schema_version(
    settings: config.Settings,
) -> None:
    with running_app(settings) as client:
        conn = sqlite3.connect(settings.database.path, isolation_level=None)
        conn.execute(f"PRAGMA user_version = {db.SCHEMA_VERSION + 1}")
        conn.close()
        assert_error(client.get("/readyz"), 503, "schema version is")


def _schema(path: str) -> list[tuple[str, str]]:
    conn = sqlite3.connect(path)
    try:
        return sorted(
            conn.execute("SELECT name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")
        )
    finally:
        conn.close()


def test_a_version_1_file_is_brought_to_the_schema_of_a_new_one(
    settings: config.Settings, tmp_path
) -> None:
    fresh = settings.replace("database", path=str(tmp_path / "fresh.db")).database
    old = settings.replace("database", path=str(tmp_path / "old.db")).database
    db.connect(fresh).close()
    # A file as version 1 made it: the first step only, without what version 2 added.
    added = ("readiness", "sessions_by_expiry", "_consumed_by_time", "_revoked_by_time")
    conn = sqlite3.connect(old.path, isolation_level=None)
    for statement in db._statements(db.schema_text()):
        if not any(name in statement for name in added):
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    assert not set(added) & set(dict(_schema(old.path)))
    assert "sessions_by_expiry" not in dict(_schema(old.path))
    migrated = db.connect(old)
    assert migrated.execute("PRAGMA user_version").fetchone()[0] == db.SCHEMA_VERSION
    migrated.close()
    assert _schema(old.path) == _schema(fresh.path)


def test_readyz_is_503_after_a_background_write_was_refused_for_want_of_space(
    settings: config.Settings,
) -> None:
    """Not only a request's write: one of the server's own (usage counters, retention) refused
    with SQLITE_FULL turns readiness to 503 as well, though the probe's row still fits."""
    with running_app(settings) as client:
        database = client.app.state.services.db
        assert client.get("/readyz").status_code == 200

        def fill(conn: sqlite3.Connection) -> None:
            cap_pages(conn)
            add_a_page(conn)

        with pytest.raises(StorageFull) as refused:
            client.portal.call(database.run_on_writer, fill)
        assert db.is_full(refused.value.__cause__)
        assert_error(client.get("/readyz"), 503, "not ready: the disk is full")
        assert client.get("/healthz").status_code == 200


def test_the_root_says_where_to_go_and_every_link_answers(client: AppClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    data = response.json()["data"]
    assert data["service"] == "dailyplay" and data["version"] == dailyplay.__version__
    links = data["links"]
    assert links["api"] == API
    for name, path in links.items():
        if name != "api":  # the API answers 401 without credentials
            assert client.get(path).status_code == 200, (name, path)


def test_the_root_leaves_out_metrics_served_elsewhere(make_settings) -> None:
    for metrics in ({"enabled": False}, {"port": 9787}):
        with running_app(make_settings(metrics=metrics)) as client:
            assert client.get("/").json()["data"]["links"]["metrics"] is None
