"""API key management: list, create, update, delete; secrets never leave the create response."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import API, World, add_org, assert_error, running_app, sql

pytestmark = pytest.mark.both_engines

HIDDEN = {"key", "key_hash"}


def test_create_returns_the_raw_key_once_and_stores_only_argon2id(world: World) -> None:
    data = world.create_key(
        name="Production CRM",
        description="issues game links",
        allowed_game_ids=[43, 42, 42],
        allowed_stream_ids=None,
        rate_limit_per_minute=5,
        rate_limit_per_day=100,
        expires_at="2099-01-01T00:00:00Z",
    )
    raw = data["key"]
    assert raw.startswith("dpk_") and len(raw) == 44
    assert data["key_prefix"] == raw[:8]
    assert data["name"] == "Production CRM" and data["description"] == "issues game links"
    assert data["allowed_game_ids"] == [42, 43] and data["allowed_stream_ids"] is None
    assert data["rate_limit_per_minute"] == 5 and data["rate_limit_per_day"] == 100
    assert data["expires_at"] == "2099-01-01T00:00:00.000Z"
    assert data["is_active"] is True and data["org_id"] == world.org_id
    stored = sql(
        world.settings, "SELECT key_hash, key_prefix FROM api_keys WHERE id = ?", (data["id"],)
    )
    key_hash, prefix = stored[0]
    assert key_hash.startswith("$argon2id$") and raw not in key_hash and prefix == raw[:8]


def test_defaults(world: World) -> None:
    data = world.create_key()
    assert data["rate_limit_per_minute"] == 60 and data["rate_limit_per_day"] == 10000
    assert data["expires_at"] is None and data["description"] is None
    assert data["allowed_game_ids"] is None and data["allowed_stream_ids"] is None


def test_listing_never_shows_the_secret(world: World) -> None:
    created = [world.create_key(name=f"key {i}") for i in range(2)]
    response = world.client.get(f"{API}?org_id={world.org_id}", headers=world.bearer(world.member))
    assert response.status_code == 200
    listed = response.json()["data"]
    assert [k["id"] for k in listed] == [k["id"] for k in created]
    for item in listed:
        assert not HIDDEN & set(item)
    text = response.text
    for key in created:
        assert key["key"] not in text and key["key"][8:] not in text
        assert "$argon2" not in text


def test_database_file_never_contains_a_raw_key(settings, rsa_key, request) -> None:
    with running_app(settings) as client:
        world = World(
            client, settings, add_org(settings, members={"a": "admin"}), "a", "a", rsa_key
        )
        keys = [world.create_key()["key"] for _ in range(3)]
        for key in keys:
            world.token(key)
    # The app has shut down: every page is in the files read here.
    blobs = b""
    if settings.database.engine == "postgresql":
        server = request.getfixturevalue("postgres_server")
        blobs = server.stored_bytes(settings.database.url.rsplit("/", 1)[1])
    for suffix in ("", "-wal", "-shm"):
        path = Path(settings.database.path + suffix)
        if path.exists():
            blobs += path.read_bytes()
    assert len(blobs) > 10_000
    for key in keys:
        assert key.encode() not in blobs
        assert key[4:].encode() not in blobs  # not even the secret part alone
        assert key[:8].encode() in blobs  # the prefix is stored, so the search above can hit


def test_listing_is_scoped_to_the_org(world: World, settings) -> None:
    other = add_org(settings, "Other", members={world.admin: "admin"})
    world.create_key(org_id=other, name="other org's")
    mine = world.create_key(name="mine")
    listed = world.client.get(f"{API}?org_id={world.org_id}", headers=world.bearer()).json()["data"]
    assert [k["id"] for k in listed] == [mine["id"]]


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"name": "x"}, 400, "'org_id' is required"),
        ({"org_id": 1}, 400, "'name' is required"),
        ({"org_id": 1, "name": ""}, 400, "name"),
        ({"org_id": 1, "name": "   "}, 400, "name"),
        ({"org_id": 1, "name": 5}, 400, "name"),
        ({"org_id": 1, "name": "x" * 256}, 400, "name"),
        ({"org_id": "1", "name": "x"}, 400, "org_id"),
        ({"org_id": 0, "name": "x"}, 400, "org_id"),
        ({"org_id": 1, "name": "x", "description": 3}, 400, "description"),
        ({"org_id": 1, "name": "x", "allowed_game_ids": [0]}, 400, "allowed_game_ids"),
        ({"org_id": 1, "name": "x", "allowed_game_ids": "42"}, 400, "allowed_game_ids"),
        ({"org_id": 1, "name": "x", "allowed_stream_ids": [True]}, 400, "allowed_stream_ids"),
        ({"org_id": 1, "name": "x", "allowed_stream_ids": [1.5]}, 400, "allowed_stream_ids"),
        ({"org_id": 1, "name": "x", "rate_limit_per_minute": 0}, 400, "rate_limit_per_minute"),
        ({"org_id": 1, "name": "x", "rate_limit_per_day": -5}, 400, "rate_limit_per_day"),
        ({"org_id": 1, "name": "x", "rate_limit_per_day": None}, 400, "rate_limit_per_day"),
        ({"org_id": 1, "name": "x", "expires_at": "2000-01-01T00:00:00Z"}, 400, "future"),
        ({"org_id": 1, "name": "x", "expires_at": "2099-01-01T00:00:00"}, 400, "offset"),
        ({"org_id": 1, "name": "x", "expires_at": "2099-01-01T00:00Z"}, 400, "RFC 3339"),
        ({"org_id": 1, "name": "x", "expires_at": "2099-01-01 00:00:00Z"}, 400, "RFC 3339"),
        ({"org_id": 1, "name": "x", "expires_at": "20990101T000000Z"}, 400, "RFC 3339"),
        ({"org_id": 1, "name": "x", "expires_at": "2099-02-29T00:00:00Z"}, 400, "RFC 3339"),
        ({"org_id": 1, "name": "x", "expires_at": "2099-01-01T12:00:60Z"}, 400, "RFC 3339"),
        ({"org_id": 1, "name": "x", "expires_at": "2099-01-01T00:00:00+24:00"}, 400, "RFC 3339"),
        ({"org_id": 1, "name": "x", "expires_at": "\uff12099-01-01T00:00:00Z"}, 400, "RFC 3339"),
        ({"org_id": 1, "name": "\t\r\n "}, 400, "name"),
        ({"org_id": 1.5, "name": "x"}, 400, "org_id"),
        ({"org_id": 1, "name": "x", "expires_at": "2099-01-01"}, 400, "expires_at"),
        ({"org_id": 1, "name": "x", "expires_at": "tomorrow"}, 400, "expires_at"),
        ({"org_id": 1, "name": "x", "expires_at": 4102444800}, 400, "expires_at"),
        ({"org_id": 1, "name": "x", "key": "dpk_" + "a" * 40}, 400, "unknown field 'key'"),
    ],
)
def test_create_rejects_bad_input(world: World, body: dict, status: int, fragment: str) -> None:
    body = {**body, "org_id": world.org_id} if body.get("org_id") == 1 else body
    response = world.client.post(API, json=body, headers=world.bearer())
    assert_error(response, status, fragment)
    assert sql(world.settings, "SELECT count(*) FROM api_keys") == [(0,)]


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        ("2099-01-01T00:00:00Z", "2099-01-01T00:00:00.000Z"),
        ("2099-01-01t00:00:00z", "2099-01-01T00:00:00.000Z"),
        ("2099-01-01T02:00:00.123456789+02:00", "2099-01-01T00:00:00.123Z"),
        ("2098-12-31T23:59:60Z", "2099-01-01T00:00:00.000Z"),
        ("2098-12-31T20:59:60-03:00", "2099-01-01T00:00:00.000Z"),
        ("2096-02-29T00:00:00-00:00", "2096-02-29T00:00:00.000Z"),
        # Past year 9999 in UTC: kept at the last instant the API can write back.
        ("9999-12-31T23:59:59-23:59", "9999-12-31T23:59:59.999Z"),
    ],
)
def test_create_accepts_every_rfc3339_date_time(world: World, sent: str, stored: str) -> None:
    """The same forms JSON Schema's date-time format accepts, which the served document cites."""
    assert world.create_key(expires_at=sent)["expires_at"] == stored


def test_integers_may_be_written_as_whole_json_numbers(world: World) -> None:
    """JSON has one number type; 60.0 is the integer 60 (as JSON Schema counts), 60.5 is not."""
    key = world.create_key(rate_limit_per_minute=60.0, allowed_game_ids=[42.0, 42, 7])
    assert key["rate_limit_per_minute"] == 60
    assert key["allowed_game_ids"] == [7, 42]
    assert_error(
        world.client.post(
            API,
            content=b'{"org_id": 1, "name": "x", "rate_limit_per_day": 1e400}',
            headers={**world.bearer(), "content-type": "application/json"},
        ),
        400,
        "too large",
    )
    assert sql(world.settings, "SELECT count(*) FROM api_keys") == [(1,)]


def test_create_needs_business_tier(world: World) -> None:
    sql(world.settings, "UPDATE orgs SET tier = 'free'")
    assert_error(
        world.client.post(API, json={"org_id": world.org_id, "name": "x"}, headers=world.bearer()),
        403,
        "business",
    )
    assert sql(world.settings, "SELECT count(*) FROM api_keys") == [(0,)]


def test_update_changes_the_mutable_fields(world: World) -> None:
    key = world.create_key()
    future = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    response = world.client.patch(
        API,
        json={
            "id": key["id"],
            "org_id": world.org_id,
            "name": "renamed",
            "description": "d",
            "allowed_game_ids": [1],
            "allowed_stream_ids": [2, 3],
            "rate_limit_per_minute": 7,
            "rate_limit_per_day": 70,
            "expires_at": future,
        },
        headers=world.bearer(),
    )
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert data["name"] == "renamed" and data["description"] == "d"
    assert data["allowed_game_ids"] == [1] and data["allowed_stream_ids"] == [2, 3]
    assert data["rate_limit_per_minute"] == 7 and data["rate_limit_per_day"] == 70
    assert data["expires_at"] is not None and not HIDDEN & set(data)
    cleared = world.client.patch(
        API,
        json={
            "id": key["id"],
            "org_id": world.org_id,
            "expires_at": None,
            "allowed_game_ids": None,
        },
        headers=world.bearer(),
    ).json()["data"]
    assert cleared["expires_at"] is None and cleared["allowed_game_ids"] is None
    assert cleared["name"] == "renamed"


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({}, "nothing to update"),
        ({"is_active": "false"}, "is_active"),
        ({"is_active": 0}, "is_active"),
        ({"name": ""}, "name"),
        ({"rate_limit_per_minute": 0}, "rate_limit_per_minute"),
        ({"expires_at": "2001-01-01T00:00:00Z"}, "future"),
        ({"key_hash": "x"}, "unknown field 'key_hash'"),
        ({"org": 1}, "unknown field 'org'"),
    ],
)
def test_update_rejects_bad_input(world: World, extra: dict, fragment: str) -> None:
    key = world.create_key()
    before = sql(world.settings, "SELECT * FROM api_keys")
    response = world.client.patch(
        API, json={"id": key["id"], "org_id": world.org_id, **extra}, headers=world.bearer()
    )
    assert_error(response, 400, fragment)
    assert sql(world.settings, "SELECT * FROM api_keys") == before


def test_update_and_delete_need_id_and_org(world: World) -> None:
    assert_error(
        world.client.patch(API, json={"org_id": world.org_id, "name": "x"}, headers=world.bearer()),
        400,
        "'id' is required",
    )
    assert_error(
        world.client.patch(API, json={"id": 1, "name": "x"}, headers=world.bearer()),
        400,
        "'org_id' is required",
    )
    assert_error(
        world.client.delete(f"{API}?org_id={world.org_id}", headers=world.bearer()),
        400,
        "'id' is required",
    )
    assert_error(world.client.delete(f"{API}?id=1", headers=world.bearer()), 400, "org_id")
    assert_error(
        world.client.delete(f"{API}?id=abc&org_id={world.org_id}", headers=world.bearer()),
        400,
        "'id' must be",
    )
    assert_error(world.client.get(API, headers=world.bearer()), 400, "org_id")
    assert_error(world.client.get(f"{API}?org_id=-3", headers=world.bearer()), 400, "org_id")
    assert_error(
        world.client.get(f"{API}?org_id=99999999999999999999", headers=world.bearer()),
        400,
        "org_id",
    )
    for bad in ("1.5", "1e-1", "01", "0x1", " 1", "1e400", "NaN", "\uff11"):
        response = world.client.get(API, params={"org_id": bad}, headers=world.bearer())
        assert_error(response, 400, "'org_id' must be an integer")


def test_query_integers_may_be_written_as_whole_json_numbers(world: World) -> None:
    """As in bodies (and JSON Schema), 7.0 and 7e0 are the integer 7 in a query string too."""
    key = world.create_key()
    for written in (f"{world.org_id}.0", f"{world.org_id}e0"):
        response = world.client.get(API, params={"org_id": written}, headers=world.bearer())
        assert response.status_code == 200, response.text
        assert [k["id"] for k in response.json()["data"]] == [key["id"]]
    response = world.client.delete(
        API, params={"id": f"{key['id']}.0", "org_id": str(world.org_id)}, headers=world.bearer()
    )
    assert response.status_code == 200, response.text


def test_key_of_another_org_is_404_and_untouched(world: World, settings) -> None:
    other = add_org(settings, "Other", members={"user_other": "admin"})
    sql(settings, "INSERT INTO org_members VALUES (?, ?, 'admin', 0)", (other, world.admin))
    theirs = world.create_key(org_id=other)
    sql(settings, "DELETE FROM org_members WHERE org_id = ? AND user_id = ?", (other, world.admin))
    before = sql(settings, "SELECT * FROM api_keys")
    # The admin of world.org_id names their own org but the other org's key id.
    response = world.client.patch(
        API,
        json={"id": theirs["id"], "org_id": world.org_id, "is_active": False},
        headers=world.bearer(),
    )
    assert_error(response, 404, "not found")
    response = world.client.delete(
        f"{API}?id={theirs['id']}&org_id={world.org_id}", headers=world.bearer()
    )
    assert_error(response, 404, "not found")
    assert sql(settings, "SELECT * FROM api_keys") == before
    assert world.create_session(theirs["key"]).status_code == 200


def test_unknown_key_id_is_404(world: World) -> None:
    assert_error(
        world.client.patch(
            API, json={"id": 999, "org_id": world.org_id, "name": "x"}, headers=world.bearer()
        ),
        404,
        "API key 999",
    )
    assert_error(
        world.client.delete(f"{API}?id=999&org_id={world.org_id}", headers=world.bearer()),
        404,
        "API key 999",
    )


def test_delete_removes_the_key(world: World) -> None:
    key = world.create_key()
    response = world.client.delete(
        f"{API}?id={key['id']}&org_id={world.org_id}", headers=world.bearer()
    )
    assert response.status_code == 200
    assert sql(world.settings, "SELECT count(*) FROM api_keys") == [(0,)]
    assert_error(
        world.client.delete(f"{API}?id={key['id']}&org_id={world.org_id}", headers=world.bearer()),
        404,
    )


def test_key_ids_are_never_reused(world: World) -> None:
    first = world.create_key()
    world.client.delete(f"{API}?id={first['id']}&org_id={world.org_id}", headers=world.bearer())
    second = world.create_key()
    assert second["id"] > first["id"]
    assert_error(world.create_session(first["key"]), 401)


def test_last_used_at_is_recorded_without_a_write_per_request(world: World) -> None:
    key = world.create_key()
    assert key["last_used_at"] is None
    writes_before = sql(world.settings, "SELECT last_used_at FROM api_keys")
    world.token(key["key"])
    # Not written by the request itself...
    assert sql(world.settings, "SELECT last_used_at FROM api_keys") == writes_before
    # ...but by the background flush, about a second later.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        listed = world.client.get(f"{API}?org_id={world.org_id}", headers=world.bearer()).json()[
            "data"
        ]
        if listed[0]["last_used_at"] is not None:
            break
        time.sleep(0.2)
    used = datetime.fromisoformat(listed[0]["last_used_at"])
    assert abs(used.timestamp() - time.time()) < 10


def test_stored_allow_lists_are_json(world: World) -> None:
    key = world.create_key(allowed_game_ids=[3, 1])
    stored = sql(world.settings, "SELECT allowed_game_ids FROM api_keys WHERE id = ?", (key["id"],))
    assert json.loads(stored[0][0]) == [1, 3]
