"""Session tokens: create, validate and consume, with every error they can answer."""

from __future__ import annotations

import json
import re
import time
import uuid
from datetime import datetime

import pytest
from conftest import API, World, add_org, assert_error, sql

from dailyplay.tokens import clock_prefix

pytestmark = pytest.mark.both_engines

ISO_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def test_create_session_returns_the_contract_fields(world: World, api_key: str) -> None:
    before = time.time()
    response = world.create_session(
        api_key,
        game_id=42,
        external_ref="user-12345",
        metadata={"campaign": "summer"},
        expires_in_minutes=60,
    )
    assert response.status_code == 200
    body = response.json()
    assert body["success"] is True
    data = body["data"]
    assert set(data) == {"token", "game_id", "stream_id", "expires_at", "external_ref"}
    token = uuid.UUID(data["token"])
    assert token.version == 4 and str(token) == data["token"]
    # Its first 16 bits are the clock of its creation (dailyplay/tokens.py), so that tokens
    # made together sit together in the token index.
    [(created_at,)] = sql(world.settings, "SELECT created_at FROM sessions")
    assert token.int >> 112 == clock_prefix(created_at)
    assert data["game_id"] == 42 and data["stream_id"] is None
    assert data["external_ref"] == "user-12345"
    assert ISO_MS.fullmatch(data["expires_at"])
    expires = datetime.fromisoformat(data["expires_at"]).timestamp()
    assert before + 3600 - 2 <= expires <= time.time() + 3600 + 2


def test_default_expiry_is_a_day(world: World, api_key: str) -> None:
    data = world.create_session(api_key, stream_id=7).json()["data"]
    expires = datetime.fromisoformat(data["expires_at"]).timestamp()
    assert abs(expires - (time.time() + 1440 * 60)) < 5
    assert data["game_id"] is None and data["stream_id"] == 7


def test_validate_reports_an_active_token_without_consuming_it(world: World, api_key: str) -> None:
    token = world.token(api_key, game_id=42, stream_id=9, external_ref="r", metadata={"a": [1]})
    for _ in range(3):
        response = world.client.get(f"{API}?action=validate-session&token={token}")
        assert response.status_code == 200
        assert response.json() == {
            "success": True,
            "data": {
                "valid": True,
                "status": "active",
                "game_id": 42,
                "stream_id": 9,
                "expires_at": response.json()["data"]["expires_at"],
                "external_ref": "r",
                "metadata": {"a": [1]},
            },
        }
    assert sql(world.settings, "SELECT status FROM sessions") == [("active",)]


METADATA = {
    "name": 'Zoë 🎮 "quoted" \\ \u2028',
    "nested": {"list": [1, -2.5, 1e-07, 12345678901234567890123, True, None, []], "empty": {}},
    "big": 2**70,
    "float": 0.1,
}


def test_metadata_comes_back_as_it_was_sent(world: World, api_key: str) -> None:
    # Stored metadata is written into answers as it was stored, not parsed and encoded again.
    token = world.token(api_key, game_id=1, metadata=METADATA)
    validated = world.client.get(f"{API}?action=validate-session&token={token}")
    assert validated.json()["data"]["metadata"] == METADATA
    consumed = world.client.post(f"{API}?action=consume-session", json={"token": token})
    assert consumed.json()["data"]["metadata"] == METADATA
    # The answer is well-formed JSON as Python's own parser reads it, float text included.
    assert json.loads(consumed.content)["data"]["metadata"]["nested"]["list"][2] == 1e-07


def test_consume_once_then_410(world: World, api_key: str) -> None:
    token = world.token(api_key, game_id=42, external_ref="order-1", metadata={"k": "v"})
    response = world.client.post(
        f"{API}?action=consume-session", json={"token": token, "player_uuid": "player-7"}
    )
    assert response.status_code == 200
    data = response.json()["data"]
    assert data == {
        "session_id": data["session_id"],
        "org_id": world.org_id,
        "stream_id": None,
        "game_id": 42,
        "external_ref": "order-1",
        "metadata": {"k": "v"},
    }
    assert isinstance(data["session_id"], int)
    assert sql(world.settings, "SELECT status, player_uuid FROM sessions") == [
        ("consumed", "player-7")
    ]
    again = world.client.post(f"{API}?action=consume-session", json={"token": token})
    assert_error(again, 410, "already been consumed")
    validated = world.client.get(f"{API}?action=validate-session&token={token}").json()["data"]
    assert validated["valid"] is False and validated["status"] == "consumed"


def test_uppercase_token_is_the_same_token(world: World, api_key: str) -> None:
    token = world.token(api_key)
    response = world.client.post(f"{API}?action=consume-session", json={"token": token.upper()})
    assert response.status_code == 200


def test_expired_token_is_reported_and_cannot_be_consumed(world: World, api_key: str) -> None:
    token = world.token(api_key, game_id=1, expires_in_minutes=1)
    sql(world.settings, "UPDATE sessions SET expires_at = ?", (int(time.time() * 1000) - 1,))
    data = world.client.get(f"{API}?action=validate-session&token={token}").json()["data"]
    assert data["status"] == "expired" and data["valid"] is False
    response = world.client.post(f"{API}?action=consume-session", json={"token": token})
    assert_error(response, 410, "expired")
    assert sql(world.settings, "SELECT status FROM sessions") == [("active",)]


@pytest.mark.parametrize(
    "token",
    [
        None,
        "",
        "abc",
        "123e4567-e89b-42d3-a456-42661417400",
        "g" * 36,
        "123e4567e89b42d3a456426614174000aaaa",
        "{123e4567-e89b-42d3-a456-42661417400}",
    ],
)
def test_malformed_token_is_400(world: World, token: str | None) -> None:
    url = f"{API}?action=validate-session" + ("" if token is None else f"&token={token}")
    assert_error(world.client.get(url), 400, "token")
    body = {} if token is None else {"token": token}
    assert_error(world.client.post(f"{API}?action=consume-session", json=body), 400, "token")


def test_token_of_wrong_type_is_400(world: World) -> None:
    for value in (123, True, ["x"], {"a": 1}):
        response = world.client.post(f"{API}?action=consume-session", json={"token": value})
        assert_error(response, 400, "token")


def test_unknown_token_is_404(world: World) -> None:
    token = str(uuid.uuid4())
    assert_error(world.client.get(f"{API}?action=validate-session&token={token}"), 404, "not found")
    response = world.client.post(f"{API}?action=consume-session", json={"token": token})
    assert_error(response, 404, "not found")


def test_player_uuid_must_be_a_short_string(world: World, api_key: str) -> None:
    token = world.token(api_key)
    for bad in (5, "x" * 256, ["a"]):
        response = world.client.post(
            f"{API}?action=consume-session", json={"token": token, "player_uuid": bad}
        )
        assert_error(response, 400, "player_uuid")
    assert sql(world.settings, "SELECT status FROM sessions") == [("active",)]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({}, "game_id"),
        ({"external_ref": "x"}, "game_id"),
        ({"game_id": None, "stream_id": None}, "game_id"),
        ({"game_id": 0}, "game_id"),
        ({"game_id": -1}, "game_id"),
        ({"game_id": 2**63}, "game_id"),
        ({"game_id": True}, "game_id"),
        ({"game_id": 1.5}, "game_id"),
        ({"game_id": "42"}, "game_id"),
        ({"stream_id": [1]}, "stream_id"),
        ({"game_id": 1, "external_ref": "x" * 256}, "external_ref"),
        ({"game_id": 1, "external_ref": 5}, "external_ref"),
        ({"game_id": 1, "metadata": [1, 2]}, "metadata"),
        ({"game_id": 1, "metadata": "text"}, "metadata"),
        ({"game_id": 1, "metadata": {"x": "y" * 9000}}, "metadata"),
        ({"game_id": 1, "expires_in_minutes": 0}, "expires_in_minutes"),
        ({"game_id": 1, "expires_in_minutes": 525601}, "expires_in_minutes"),
        ({"game_id": 1, "expires_in_minutes": "60"}, "expires_in_minutes"),
        ({"game_id": 1, "color": "red"}, "unknown field 'color'"),
    ],
)
def test_create_session_rejects_bad_bodies(
    world: World, api_key: str, body: dict, fragment: str
) -> None:
    response = world.client.post(
        f"{API}?action=create-session", json=body, headers={"x-api-key": api_key}
    )
    assert_error(response, 400, fragment)
    assert sql(world.settings, "SELECT count(*) FROM sessions") == [(0,)]


def test_limits_of_the_ranges_are_accepted(world: World, api_key: str) -> None:
    data = world.create_session(
        api_key,
        game_id=2**63 - 1,
        stream_id=1,
        expires_in_minutes=525600,
        external_ref="x" * 255,
        metadata={"x": "y" * 8000},
    ).json()["data"]
    assert data["game_id"] == 2**63 - 1


def test_metadata_depth_is_bounded(world: World, api_key: str) -> None:
    deep: dict = {}
    node = deep
    for _ in range(40):
        node["a"] = {}
        node = node["a"]
    response = world.create_session(api_key, game_id=1, metadata=deep)
    assert_error(response, 400, "nested")


def test_configured_expiry_maximum(make_settings, rsa_key) -> None:
    from conftest import running_app

    settings = make_settings(sessions={"max_expires_minutes": 60, "default_expires_minutes": 30})
    with running_app(settings) as client:
        world = World(
            client, settings, add_org(settings, members={"a": "admin"}), "a", "a", rsa_key
        )
        key = world.create_key()["key"]
        assert_error(world.create_session(key, game_id=1, expires_in_minutes=61), 400, "60")
        data = world.create_session(key, game_id=1).json()["data"]
        expires = datetime.fromisoformat(data["expires_at"]).timestamp()
        assert abs(expires - (time.time() + 1800)) < 5


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        (None, "missing"),
        ("", "missing"),
        ("dpk_123", "malformed"),
        ("dpk_" + "A" * 40, "malformed"),
        ("xyz_" + "a" * 40, "malformed"),
        ("dpk_" + "a" * 40, "invalid"),
    ],
)
def test_create_session_rejects_bad_keys(world: World, header: str | None, fragment: str) -> None:
    headers = {} if header is None else {"x-api-key": header}
    response = world.client.post(
        f"{API}?action=create-session", json={"game_id": 1}, headers=headers
    )
    assert_error(response, 401, fragment)


def test_wrong_secret_with_a_known_prefix_is_401(world: World, api_key: str) -> None:
    forged = api_key[:8] + ("0" if api_key[8] != "0" else "1") + api_key[9:]
    assert_error(world.create_session(forged), 401, "invalid")
    assert sql(world.settings, "SELECT count(*) FROM sessions") == [(0,)]


def test_revoked_deleted_and_expired_keys_are_401(world: World) -> None:
    revoked = world.create_key()
    response = world.client.patch(
        API,
        json={"id": revoked["id"], "org_id": world.org_id, "is_active": False},
        headers=world.bearer(),
    )
    assert response.status_code == 200
    assert_error(world.create_session(revoked["key"]), 401, "revoked")

    deleted = world.create_key()
    assert world.create_session(deleted["key"]).status_code == 200
    response = world.client.delete(
        f"{API}?id={deleted['id']}&org_id={world.org_id}", headers=world.bearer()
    )
    assert response.status_code == 200
    assert_error(world.create_session(deleted["key"]), 401, "invalid")

    expiring = world.create_key()
    assert world.create_session(expiring["key"]).status_code == 200
    sql(
        world.settings,
        "UPDATE api_keys SET expires_at = ? WHERE id = ?",
        (int(time.time() * 1000) - 1, expiring["id"]),
    )
    assert_error(world.create_session(expiring["key"]), 401, "expired")


def test_non_business_org_gets_403(world: World, api_key: str) -> None:
    sql(world.settings, "UPDATE orgs SET tier = 'free' WHERE id = ?", (world.org_id,))
    assert_error(world.create_session(api_key), 403, "business")
    assert sql(world.settings, "SELECT count(*) FROM sessions") == [(0,)]


def test_allow_lists_are_enforced(world: World) -> None:
    key = world.create_key(allowed_game_ids=[42, 43], allowed_stream_ids=[7])["key"]
    assert world.create_session(key, game_id=42).status_code == 200
    assert world.create_session(key, stream_id=7).status_code == 200
    assert world.create_session(key, game_id=43, stream_id=7).status_code == 200
    assert_error(world.create_session(key, game_id=44), 403, "game 44")
    assert_error(world.create_session(key, stream_id=8), 403, "stream 8")
    assert_error(world.create_session(key, game_id=42, stream_id=8), 403, "stream 8")
    assert sql(world.settings, "SELECT count(*) FROM sessions") == [(3,)]
    none_allowed = world.create_key(allowed_game_ids=[])["key"]
    assert_error(world.create_session(none_allowed, game_id=1), 403, "game 1")


def test_revoking_a_key_revokes_its_live_tokens_for_good(world: World) -> None:
    key = world.create_key()
    other = world.create_key()
    live = world.token(key["key"])
    used = world.token(key["key"])
    expired = world.token(key["key"])
    untouched = world.token(other["key"])
    assert (
        world.client.post(f"{API}?action=consume-session", json={"token": used}).status_code == 200
    )
    sql(
        world.settings,
        "UPDATE sessions SET expires_at = 1 WHERE token = ?",
        (uuid.UUID(expired).bytes,),
    )

    def patch(active: bool) -> dict:
        response = world.client.patch(
            API,
            json={"id": key["id"], "org_id": world.org_id, "is_active": active},
            headers=world.bearer(),
        )
        assert response.status_code == 200, response.text
        return response.json()["data"]

    assert patch(False)["revoked_sessions"] == 1

    def status(token: str) -> str:
        return world.client.get(f"{API}?action=validate-session&token={token}").json()["data"][
            "status"
        ]

    assert [status(t) for t in (live, used, expired, untouched)] == [
        "revoked",
        "consumed",
        "expired",
        "active",
    ]
    assert_error(
        world.client.post(f"{API}?action=consume-session", json={"token": live}), 410, "revoked"
    )
    patch(True)
    assert status(live) == "revoked"
    assert world.create_session(key["key"]).status_code == 200


def test_deleting_a_key_revokes_its_tokens_and_keeps_their_history(world: World) -> None:
    key = world.create_key()
    token = world.token(key["key"])
    response = world.client.delete(
        f"{API}?id={key['id']}&org_id={world.org_id}", headers=world.bearer()
    )
    assert response.json()["data"] == {"id": key["id"], "deleted": True, "revoked_sessions": 1}
    data = world.client.get(f"{API}?action=validate-session&token={token}").json()["data"]
    assert data["status"] == "revoked"
    assert_error(
        world.client.post(f"{API}?action=consume-session", json={"token": token}), 410, "revoked"
    )


def test_tokens_record_their_org(world: World, settings) -> None:
    other_org = add_org(settings, "Other", members={world.admin: "admin"})
    key = world.create_key(org_id=other_org)["key"]
    token = world.token(key)
    data = world.client.post(f"{API}?action=consume-session", json={"token": token}).json()["data"]
    assert data["org_id"] == other_org
