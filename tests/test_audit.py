"""The audit trail: every key, membership and org change, who made it, read by admins only."""

from __future__ import annotations

import getpass
from typing import Any

import pytest
from conftest import API, World, add_org, assert_error, cli_json, run_cli, sql

pytestmark = pytest.mark.both_engines

AUDIT = f"{API}?action=audit-log"


def entries(world: World, **params: Any) -> dict[str, Any]:
    query = "".join(f"&{k}={v}" for k, v in {"org_id": world.org_id, **params}.items())
    response = world.client.get(AUDIT + query, headers=world.bearer())
    assert response.status_code == 200, response.text
    return response.json()["data"]


def key_entries(world: World) -> list[dict[str, Any]]:
    return [e for e in entries(world)["entries"] if e["action"].startswith("api_key.")]


def test_every_key_change_is_recorded_with_who_when_and_what(world: World) -> None:
    key = world.create_key(rate_limit_per_minute=10, allowed_game_ids=[42])
    key_id = key["id"]
    bearer = world.bearer()

    def patch(**body: Any) -> None:
        response = world.client.patch(
            API, json={"id": key_id, "org_id": world.org_id, **body}, headers=bearer
        )
        assert response.status_code == 200, response.text

    patch(name="CRM 2", rate_limit_per_minute=20)
    patch(allowed_game_ids=None, allowed_stream_ids=[7, 8], expires_at="2099-01-02T03:04:05Z")
    patch(is_active=False)
    patch(is_active=True)
    deleted = world.client.delete(f"{API}?id={key_id}&org_id={world.org_id}", headers=bearer)
    assert deleted.status_code == 200
    found = key_entries(world)
    assert [e["action"] for e in found] == [
        "api_key.delete",
        "api_key.reactivate",
        "api_key.revoke",
        "api_key.update",
        "api_key.update",
        "api_key.create",
    ]
    assert all(e["actor"] == world.admin for e in found)
    assert all(e["api_key_id"] == key_id and e["org_id"] == world.org_id for e in found)
    assert all(e["client_ip"] == "198.51.100.7" for e in found)
    ids = [e["id"] for e in found]
    assert ids == sorted(ids, reverse=True)
    # Every value in the API's own types: booleans, arrays, RFC 3339 times.
    assert found[4]["changes"] == {
        "name": {"from": "CRM", "to": "CRM 2"},
        "rate_limit_per_minute": {"from": 10, "to": 20},
    }
    assert found[3]["changes"] == {
        "allowed_game_ids": {"from": [42], "to": None},
        "allowed_stream_ids": {"from": None, "to": [7, 8]},
        "expires_at": {"from": None, "to": "2099-01-02T03:04:05.000Z"},
    }
    assert found[2]["changes"] == {"is_active": {"from": True, "to": False}}
    assert found[1]["changes"] == {"is_active": {"from": False, "to": True}}
    assert found[5]["changes"] == {
        "name": {"from": None, "to": "CRM"},
        "description": {"from": None, "to": None},
        "allowed_game_ids": {"from": None, "to": [42]},
        "allowed_stream_ids": {"from": None, "to": None},
        "rate_limit_per_minute": {"from": None, "to": 10},
        "rate_limit_per_day": {"from": None, "to": 10000},
        "expires_at": {"from": None, "to": None},
    }
    assert found[0]["changes"] is None
    assert found[0]["at"].endswith("Z")
    # The raw key and its hash are never in the trail.
    trail = sql(world.settings, "SELECT changes FROM audit_log")
    stored = " ".join(str(changes) for (changes,) in trail)
    assert key["key"] not in stored and key["key"][8:] not in stored and "argon2" not in stored


def test_refused_changes_leave_no_entry(world: World) -> None:
    before = len(entries(world)["entries"])
    member = world.bearer(world.member)
    assert_error(
        world.client.post(API, json={"org_id": world.org_id, "name": "x"}, headers=member), 403
    )
    missing = world.client.delete(f"{API}?id=999&org_id={world.org_id}", headers=world.bearer())
    assert_error(missing, 404)
    assert len(entries(world)["entries"]) == before


def test_pages_follow_next_before_id_to_the_end(world: World) -> None:
    for n in range(5):
        world.create_key(name=f"k{n}")
    everything = entries(world, limit=200)["entries"]
    seen: list[int] = []
    page = entries(world, limit=2)
    while True:
        seen += [e["id"] for e in page["entries"]]
        if page["next_before_id"] is None:
            break
        assert page["next_before_id"] == page["entries"][-1]["id"]
        page = entries(world, limit=2, before_id=page["next_before_id"])
    assert seen == [e["id"] for e in everything]
    assert len(seen) >= 5 + 3  # the keys, the org and its two members


def test_only_admins_of_the_org_read_it(world: World) -> None:
    url = f"{AUDIT}&org_id={world.org_id}"
    assert_error(world.client.get(url), 401)
    assert_error(world.client.get(url, headers=world.bearer(world.member)), 403)
    assert_error(world.client.get(url, headers=world.bearer("user_stranger")), 403)
    other = add_org(world.settings, name="Other", members={"user_other": "admin"})
    assert_error(
        world.client.get(f"{AUDIT}&org_id={world.org_id}", headers=world.bearer("user_other")),
        403,
    )
    assert (
        world.client.get(f"{AUDIT}&org_id={other}", headers=world.bearer("user_other")).status_code
        == 200
    )


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ("", "'org_id' is required"),
        ("&limit=0", "'limit' must be an integer from 1 to 200"),
        ("&limit=201", "'limit' must be an integer from 1 to 200"),
        ("&before_id=x", "'before_id' must be an integer"),
        ("&page=2", "unknown query parameter 'page'"),
    ],
)
def test_bad_paging_is_a_clear_400(world: World, query: str, fragment: str) -> None:
    org = "" if query == "" else f"&org_id={world.org_id}"
    response = world.client.get(AUDIT + org + query, headers=world.bearer())
    assert_error(response, 400, fragment)


def test_cli_changes_are_recorded_as_cli_with_the_os_user_and_audit_prints_them(tmp_path) -> None:
    env = {"DAILYPLAY_DATABASE_PATH": str(tmp_path / "a.db")}
    org = cli_json("org", "create", "--name", "Acme", env=env)["id"]
    cli_json("org", "set-tier", "--org", str(org), "--tier", "business", env=env)
    cli_json("org", "set-tier", "--org", str(org), "--tier", "business", env=env)  # no change
    cli_json("member", "add", "--org", str(org), "--user", "u1", "--role", "admin", env=env)
    cli_json("member", "add", "--org", str(org), "--user", "u1", "--role", "member", env=env)
    cli_json("member", "remove", "--org", str(org), "--user", "u1", env=env)
    trail = cli_json("audit", "--org", str(org), env=env)
    assert [e["action"] for e in trail] == [
        "member.remove",
        "member.role_change",
        "member.add",
        "org.tier_change",
        "org.create",
    ]
    assert {e["actor"] for e in trail} == {f"cli:{getpass.getuser()}"}
    assert trail[1]["changes"]["role"] == {"from": "admin", "to": "member"}
    assert trail[3]["changes"] == {"tier": {"from": "free", "to": "business"}}
    assert len(cli_json("audit", "--org", str(org), "--limit", "2", env=env)) == 2
    missing = run_cli("audit", "--org", "999", env=env)
    assert missing.returncode == 1 and "not found" in missing.stderr
