"""A key's row is remembered between requests, yet every change made elsewhere (another worker,
the CLI, plain SQL) counts from the next request: nothing is created on old state, and nothing
is refused on it."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from typing import Any

import pytest
from conftest import API, World, add_org, assert_error, sql, with_store

from dailyplay import config
from dailyplay.keys import new_api_key
from dailyplay.storage import Store
from dailyplay.storage.errors import KeyChanged
from dailyplay.storage.types import CLI, NewSession

pytestmark = pytest.mark.both_engines

NOW = 1_800_000_000_000


def sessions(world: World) -> int:
    return int(sql(world.settings, "SELECT count(*) FROM sessions")[0][0])


def remembered_key(world: World, **fields: Any) -> dict[str, Any]:
    """A new key that this process has already used once (its row is remembered)."""
    key = world.create_key(**fields)
    assert world.create_session(key["key"], game_id=1).status_code == 200
    return key


def test_a_key_revoked_elsewhere_is_refused_at_once_and_stores_nothing(world: World) -> None:
    key = remembered_key(world)
    before = sessions(world)
    sql(world.settings, "UPDATE api_keys SET is_active = FALSE WHERE id = ?", (key["id"],))
    assert_error(world.create_session(key["key"]), 401, "revoked")
    # The key's state answers before the body's faults, as for a key read fresh.
    response = world.client.post(
        f"{API}?action=create-session", json={"game_id": "x"}, headers={"x-api-key": key["key"]}
    )
    assert_error(response, 401, "revoked")
    assert sessions(world) == before


def test_a_key_deleted_or_expired_elsewhere_is_refused_at_once(world: World) -> None:
    deleted = remembered_key(world)
    expiring = remembered_key(world)
    before = sessions(world)
    sql(world.settings, "DELETE FROM api_keys WHERE id = ?", (deleted["id"],))
    assert_error(world.create_session(deleted["key"]), 401, "invalid")
    sql(
        world.settings,
        "UPDATE api_keys SET expires_at = ? WHERE id = ?",
        (int(time.time() * 1000) + 300, expiring["id"]),
    )
    time.sleep(0.4)  # past the new expiry, which the remembered row did not have
    assert_error(world.create_session(expiring["key"]), 401, "expired")
    assert sessions(world) == before


def test_an_org_moved_off_business_elsewhere_is_refused_and_back_on_is_served(
    world: World,
) -> None:
    key = remembered_key(world)
    sql(world.settings, "UPDATE orgs SET tier = 'free' WHERE id = ?", (world.org_id,))
    assert_error(world.create_session(key["key"]), 403, "business")
    sql(world.settings, "UPDATE orgs SET tier = 'business' WHERE id = ?", (world.org_id,))
    assert world.create_session(key["key"]).status_code == 200


def test_allow_lists_changed_elsewhere_count_both_ways(world: World) -> None:
    key = remembered_key(world, allowed_game_ids=[1, 2])
    sql(world.settings, "UPDATE api_keys SET allowed_game_ids = '[1]' WHERE id = ?", (key["id"],))
    before = sessions(world)
    assert_error(world.create_session(key["key"], game_id=2), 403, "game 2")
    assert sessions(world) == before
    # Widened elsewhere: the remembered list would refuse game 3; the current one allows it.
    assert_error(world.create_session(key["key"], game_id=3), 403, "game 3")
    sql(
        world.settings, "UPDATE api_keys SET allowed_game_ids = '[1, 3]' WHERE id = ?", (key["id"],)
    )
    response = world.create_session(key["key"], game_id=3)
    assert response.status_code == 200, response.text
    assert sql(
        world.settings,
        "SELECT game_id FROM sessions WHERE api_key_id = ? ORDER BY id",
        (key["id"],),
    ) == [(1,), (3,)]


def test_a_limit_raised_elsewhere_is_not_refused_on_the_old_one(world: World) -> None:
    key = remembered_key(world, rate_limit_per_minute=2)
    assert world.create_session(key["key"]).status_code == 200
    assert_error(world.create_session(key["key"]), 429, "per-minute limit of 2")
    sql(world.settings, "UPDATE api_keys SET rate_limit_per_minute = 50 WHERE id = ?", (key["id"],))
    response = world.create_session(key["key"])
    assert response.status_code == 200, response.text
    assert response.headers["x-ratelimit-limit"] == "50"


# --- the check inside the inserting transaction -------------------------------------------------


def test_an_insert_admitted_on_an_old_reading_of_its_key_stores_nothing(
    settings: config.Settings,
) -> None:
    org = add_org(settings)
    _raw, values = new_api_key(org, "CRM", NOW, per_minute=60, per_day=1000)
    tokens = [uuid.uuid4().bytes for _ in range(4)]

    def session(token: bytes, key_id: int) -> NewSession:
        return NewSession(token, org, key_id, 1, None, None, None, NOW, NOW + 60_000)

    async def main(store: Store) -> tuple[int, list[Any]]:
        key = await store.insert_api_key(values, CLI)
        state = await store.get_api_key_for_request(key.id)
        assert state is not None
        # As another process would have changed it meanwhile:
        changed = dataclasses.replace(state, rate_limit_per_minute=61)
        # Together (one group on SQLite): two on the current reading, one on an old one, one
        # unchecked.
        outcomes = await asyncio.gather(
            store.insert_session(session(tokens[0], key.id), state),
            store.insert_session(session(tokens[1], key.id), changed),
            store.insert_session(session(tokens[2], key.id), state),
            store.insert_session(session(tokens[3], key.id)),
            return_exceptions=True,
        )
        return key.id, outcomes

    key_id, outcomes = with_store(settings, main)
    assert isinstance(outcomes[1], KeyChanged)
    assert all(outcomes[i] is None for i in (0, 2, 3)), outcomes
    stored = {bytes(t) for (t,) in sql(settings, "SELECT token FROM sessions")}
    assert stored == {tokens[0], tokens[2], tokens[3]}
    # The usage counters count what was stored, not what was asked for.
    assert sql(settings, "SELECT sum(created) FROM key_usage WHERE api_key_id = ?", (key_id,)) == [
        (3,)
    ]
