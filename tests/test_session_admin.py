"""revoke-session and list-sessions: an integrator's view of the tokens its key's organization
minted (a refund takes a play back; support finds the tokens of an order and sees whether each
was used)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import pytest
from conftest import API, World, add_org, assert_error, running_app, sql

from dailyplay import config

pytestmark = [pytest.mark.both_engines]


def revoke(world: World, key: str, token: str, **extra: Any) -> httpx.Response:
    return world.client.post(
        f"{API}?action=revoke-session",
        json={"token": token, **extra},
        headers={"x-api-key": key},
    )


def listing(world: World, key: str, **params: Any) -> httpx.Response:
    query = "".join(f"&{name}={value}" for name, value in params.items())
    return world.client.get(f"{API}?action=list-sessions{query}", headers={"x-api-key": key})


def listed(world: World, key: str, **params: Any) -> dict[str, Any]:
    response = listing(world, key, **params)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"success", "data"} and body["success"] is True
    assert set(body["data"]) == {"sessions", "next_cursor"}
    return body["data"]


def consume(world: World, token: str, player: str | None = None) -> httpx.Response:
    body = {"token": token} if player is None else {"token": token, "player_uuid": player}
    return world.client.post(f"{API}?action=consume-session", json=body)


# --- revoke-session ---------------------------------------------------------------------------


def test_revoking_an_active_token_takes_the_play_back(world: World, api_key: str) -> None:
    token = world.token(api_key, game_id=7, external_ref="order-1", metadata={"sku": "A"})
    response = revoke(world, api_key, token, reason="refund of order-1")
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert data["token"] == token and data["status"] == "revoked"
    assert data["game_id"] == 7 and data["external_ref"] == "order-1"
    assert data["metadata"] == {"sku": "A"}
    assert data["revoked_at"] is not None and data["consumed_at"] is None
    assert "x-ratelimit-remaining" in response.headers
    validated = world.client.get(f"{API}?action=validate-session&token={token}").json()["data"]
    assert validated["valid"] is False and validated["status"] == "revoked"
    assert_error(consume(world, token), 410, "revoked")
    # Revoking again is idempotent: the same answer, and one audit entry in all.
    again = revoke(world, api_key, token)
    assert again.status_code == 200 and again.json()["data"] == data
    entries = sql(
        world.settings,
        "SELECT action, actor, changes FROM audit_log WHERE action = 'session.revoke'",
    )
    assert len(entries) == 1
    _action, actor, changes = entries[0]
    assert actor.startswith("api_key:") and token in changes and "refund of order-1" in changes


def test_a_consumed_or_expired_token_cannot_be_revoked(world: World, api_key: str) -> None:
    consumed = world.token(api_key)
    assert consume(world, consumed).status_code == 200
    assert_error(revoke(world, api_key, consumed), 410, "consumed")
    expiring = world.token(api_key, game_id=3, expires_in_minutes=1)
    sql(
        world.settings,
        "UPDATE sessions SET expires_at = ? WHERE game_id = 3",
        (int(time.time() * 1000) - 1,),
    )
    assert_error(revoke(world, api_key, expiring), 410, "expired")
    assert sql(world.settings, "SELECT count(*) FROM sessions WHERE status = 'revoked'") == [(0,)]
    assert sql(
        world.settings, "SELECT count(*) FROM audit_log WHERE action = 'session.revoke'"
    ) == [(0,)]


def test_another_organizations_token_is_not_found_and_stays_active(
    world: World, api_key: str, settings: config.Settings, rsa_key
) -> None:
    other_org = add_org(settings, members={"boss": "admin"})
    other = World(world.client, settings, other_org, "boss", "boss", rsa_key)
    other_key = other.create_key()["key"]
    theirs = other.token(other_key, game_id=42, external_ref="theirs")
    refused = revoke(world, api_key, theirs)
    assert_error(refused, 404, "not found")
    assert_error(revoke(world, api_key, str(uuid.uuid4())), 404, "not found")
    assert world.client.get(f"{API}?action=validate-session&token={theirs}").json()["data"]["valid"]
    # Nor does listing show it.
    assert listed(world, api_key, external_ref="theirs")["sessions"] == []


def test_bad_revocations_are_400_and_change_nothing(world: World, api_key: str) -> None:
    token = world.token(api_key)
    for body in (
        {},
        {"token": "not-a-uuid"},
        {"token": token, "reason": 12},
        {"token": token, "reason": "x" * 501},
        {"token": token, "colour": "blue"},
    ):
        response = world.client.post(
            f"{API}?action=revoke-session", json=body, headers={"x-api-key": api_key}
        )
        assert_error(response, 400)
    assert_error(revoke(world, "dpk_" + "0" * 40, token), 401)
    no_key = world.client.post(f"{API}?action=revoke-session", json={"token": token})
    assert_error(no_key, 401, "missing API key")
    assert world.client.get(f"{API}?action=revoke-session").status_code == 405
    assert sql(world.settings, "SELECT status FROM sessions") == [("active",)]


def test_a_revoked_key_can_neither_revoke_nor_list(world: World) -> None:
    key = world.create_key()
    token = world.token(key["key"])
    assert listed(world, key["key"])["sessions"][0]["token"] == token  # remembered from here on
    world.client.patch(
        API,
        json={"id": key["id"], "org_id": world.org_id, "is_active": False},
        headers=world.bearer(),
    )
    assert_error(revoke(world, key["key"], token), 401, "revoked")
    assert_error(listing(world, key["key"]), 401, "revoked")


def test_an_expired_key_or_an_org_off_business_can_neither_revoke_nor_list(
    world: World, api_key: str
) -> None:
    token = world.token(api_key, game_id=1, external_ref="order-3")
    other = world.create_key(name="old")
    now = int(time.time() * 1000)
    sql(world.settings, "UPDATE api_keys SET expires_at = ? WHERE id = ?", (now - 1, other["id"]))
    assert_error(revoke(world, other["key"], token), 401, "expired")
    assert_error(listing(world, other["key"]), 401, "expired")
    sql(world.settings, "UPDATE orgs SET tier = 'free' WHERE id = ?", (world.org_id,))
    assert_error(revoke(world, api_key, token), 403, "Business")
    assert_error(listing(world, api_key), 403, "Business")
    # Nothing changed: the token is still active, and no revocation was audited.
    assert sql(world.settings, "SELECT status, revoked_at FROM sessions") == [("active", None)]
    assert sql(
        world.settings, "SELECT count(*) FROM audit_log WHERE action = 'session.revoke'"
    ) == [(0,)]


# --- list-sessions -----------------------------------------------------------------------------


def test_listing_finds_an_orders_tokens_and_whether_each_was_played(
    world: World, api_key: str
) -> None:
    first = world.token(api_key, external_ref="order-9", game_id=1)
    second = world.token(api_key, external_ref="order-9", game_id=2)
    world.token(api_key, game_id=42, external_ref="order-10")
    assert consume(world, first, player="player-1").status_code == 200
    data = listed(world, api_key, external_ref="order-9")
    assert data["next_cursor"] is None
    items = data["sessions"]
    assert [item["token"] for item in items] == [second, first]  # newest first
    played = items[1]
    assert played["status"] == "consumed" and played["player_uuid"] == "player-1"
    assert played["consumed_at"] is not None and played["game_id"] == 1
    assert items[0]["status"] == "active" and items[0]["consumed_at"] is None
    assert set(played) == {
        "token", "status", "game_id", "stream_id", "external_ref", "metadata", "created_at",
        "expires_at", "consumed_at", "revoked_at", "player_uuid", "api_key_id",
    }  # fmt: skip
    assert isinstance(played["api_key_id"], int)


def test_filters_combine(world: World, api_key: str) -> None:
    tokens = {
        name: world.token(api_key, game_id=game, stream_id=stream, external_ref="f")
        for name, game, stream in [("a", 1, 10), ("b", 1, 20), ("c", 2, 10), ("d", 2, 20)]
    }
    assert consume(world, tokens["a"]).status_code == 200
    assert revoke(world, api_key, tokens["b"]).status_code == 200

    def tokens_for(**params: Any) -> set[str]:
        return {item["token"] for item in listed(world, api_key, **params)["sessions"]}

    assert tokens_for(game_id=1) == {tokens["a"], tokens["b"]}
    assert tokens_for(stream_id=10) == {tokens["a"], tokens["c"]}
    assert tokens_for(game_id=2, stream_id=20) == {tokens["d"]}
    assert tokens_for(status="consumed") == {tokens["a"]}
    assert tokens_for(status="revoked") == {tokens["b"]}
    assert tokens_for(status="active") == {tokens["c"], tokens["d"]}
    assert tokens_for(status="expired") == set()
    sql(
        world.settings,
        "UPDATE sessions SET expires_at = ?"
        " WHERE status = 'active' AND game_id = 2 AND stream_id = 20",
        (int(time.time() * 1000) - 1,),
    )
    assert tokens_for(status="expired") == {tokens["d"]}
    assert tokens_for(status="active") == {tokens["c"]}
    # Times: created_after and created_before are exclusive bounds.
    created = {item["token"]: item["created_at"] for item in listed(world, api_key)["sessions"]}
    newest = max(created.values())
    assert tokens_for(created_after=newest.replace("+00:00", "Z")) == set()
    assert tokens["d"] in tokens_for(created_before="2999-01-01T00:00:00Z")
    assert tokens_for(created_before="2000-01-01T00:00:00Z") == set()


def test_pages_follow_the_cursor_and_stay_stable_under_new_tokens(
    world: World, api_key: str
) -> None:
    made = [world.token(api_key, game_id=42, external_ref="p") for _ in range(7)]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"external_ref": "p", "limit": 3}
        if cursor:
            params["cursor"] = cursor
        data = listed(world, api_key, **params)
        seen += [item["token"] for item in data["sessions"]]
        pages += 1
        # A token made between two pages lands before the first page, not in a later one.
        world.token(api_key, game_id=42, external_ref="p")
        cursor = data["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == made[::-1]
    assert len(listed(world, api_key, external_ref="p", limit=500)["sessions"]) == 10


def test_bad_listing_queries_are_400(world: World, api_key: str) -> None:
    for params in (
        {"status": "played"},
        {"limit": 0},
        {"limit": 501},
        {"limit": "ten"},
        {"game_id": -1},
        {"stream_id": "x"},
        {"created_after": "yesterday"},
        {"created_before": "2027-13-01T00:00:00Z"},
        {"cursor": "abc"},
        {"cursor": "s1.!!!"},
        {"cursor": "s1.0"},
        {"cursor": "s1.1234567890123456789"},
        {"colour": "blue"},
        {"external_ref": "x" * 256},
    ):
        assert_error(listing(world, api_key, **params), 400)
    assert_error(listing(world, "dpk_" + "0" * 40), 401)
    assert_error(
        world.client.get(
            f"{API}?action=list-sessions&limit=1&limit=2", headers={"x-api-key": api_key}
        ),
        400,
    )


def test_listing_and_revoking_count_against_the_keys_limits(make_settings, rsa_key) -> None:
    settings = make_settings()
    with running_app(settings) as client:
        world = World(
            client, settings, add_org(settings, members={"a": "admin"}), "a", "a", rsa_key
        )
        key = world.create_key(rate_limit_per_minute=2)["key"]
        assert listing(world, key).status_code == 200
        assert listing(world, key).headers["x-ratelimit-remaining"] == "0"
        assert_error(listing(world, key), 429, "per-minute")
        assert_error(revoke(world, key, str(uuid.uuid4())), 429, "per-minute")


@pytest.mark.slow
def test_a_revocation_racing_a_consumption_lets_exactly_one_win(
    settings: config.Settings, tmp_path, rsa_key
) -> None:
    """Each of 60 tokens revoked and consumed at once through `dailyplay serve --workers 2`:
    per token, exactly one of the two gets 200 and the other 410, and the stored state is the
    winner's."""
    from concurrent.futures import ThreadPoolExecutor

    from conftest import serve
    from test_resilience import make_key

    settings = settings.replace("limits", public_per_minute=0, failed_auth_per_minute=0)
    org = add_org(settings, members={"admin": "admin"})
    with serve(settings, tmp_path, workers=2) as server:
        key = make_key(server.url, org, rsa_key)
        with httpx.Client(base_url=server.url, timeout=30) as http:
            tokens = [
                http.post(
                    f"{API}?action=create-session", json={"game_id": 1}, headers={"x-api-key": key}
                ).json()["data"]["token"]
                for _ in range(60)
            ]

        def race(token: str) -> tuple[int, int]:
            with (
                httpx.Client(base_url=server.url, timeout=30) as a,
                httpx.Client(base_url=server.url, timeout=30) as b,
                ThreadPoolExecutor(2) as pool,
            ):
                revoked = pool.submit(
                    a.post, f"{API}?action=revoke-session", json={"token": token},
                    headers={"x-api-key": key},
                )  # fmt: skip
                consumed = pool.submit(
                    b.post, f"{API}?action=consume-session", json={"token": token}
                )
                return revoked.result().status_code, consumed.result().status_code

        with ThreadPoolExecutor(6) as pool:
            outcomes = dict(zip(tokens, pool.map(race, tokens), strict=True))
        assert "Traceback" not in server.log()
    stored = {
        str(uuid.UUID(bytes=bytes(token))): status
        for token, status in sql(settings, "SELECT token, status FROM sessions")
    }
    for token, (revoked, consumed) in outcomes.items():
        assert sorted((revoked, consumed)) == [200, 410], (token, revoked, consumed)
        assert stored[token] == ("revoked" if revoked == 200 else "consumed")


def _seed_active(settings: config.Settings, org_id: int, count: int) -> None:
    import os
    import sqlite3

    now = int(time.time() * 1000)
    conn = sqlite3.connect(settings.database.path)
    with conn:
        conn.executemany(
            "INSERT INTO sessions (token, org_id, game_id, created_at, expires_at)"
            " VALUES (?, ?, 1, ?, ?)",
            ((os.urandom(16), org_id, now, now + 86_400_000) for _ in range(count)),
        )
    conn.close()


@pytest.mark.sqlite_only
def test_a_listing_no_index_serves_runs_beside_the_event_loop_and_has_a_deadline(
    settings: config.Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """status=revoked in an organization of 600,000 active tokens walks them all: on SQLite
    that runs on a thread (the loop keeps turning), and past its deadline it is given up."""
    import asyncio

    from dailyplay.storage import store_for
    from dailyplay.storage.errors import QueryTooLong
    from dailyplay.storage.sqlite import store as sqlite_store
    from dailyplay.storage.types import SessionQuery

    org = add_org(settings)
    _seed_active(settings, org, 600_000)
    query = SessionQuery(now=int(time.time() * 1000), limit=51, status="revoked")

    async def main() -> tuple[float, float]:
        store = store_for(settings.database)
        await store.open()
        gaps: list[float] = []
        listing = asyncio.ensure_future(store.list_sessions(org, query))
        started = last = time.perf_counter()
        while not listing.done():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
        assert await listing == []
        spent = time.perf_counter() - started
        monkeypatch.setattr(sqlite_store, "LIST_SECONDS", 0.005)
        with pytest.raises(QueryTooLong):
            await store.list_sessions(org, query)
        await store.close()
        return spent, max(gaps)

    spent, longest_gap = asyncio.run(main())
    assert spent > 0.02, spent  # a walk of every row, long enough to tell
    assert longest_gap < spent / 3, (longest_gap, spent)
