"""Key usage in listings and `dailyplay stats`: tokens created/consumed per key, 24 h and 30 d."""

from __future__ import annotations

import time

import pytest
from conftest import API, World, cli_json, database_env, sql, with_store

from dailyplay.clock import HOUR_MS, now_ms
from dailyplay.storage import Store

pytestmark = pytest.mark.both_engines


def listing(world: World) -> dict[int, dict]:
    response = world.client.get(f"{API}?org_id={world.org_id}", headers=world.bearer())
    assert response.status_code == 200, response.text
    return {key["id"]: key for key in response.json()["data"]}


def test_listings_count_tokens_created_and_consumed_per_key(world: World) -> None:
    a, b, idle = world.create_key(name="a"), world.create_key(name="b"), world.create_key(name="c")
    tokens = [world.token(a["key"]) for _ in range(3)]
    world.token(b["key"])
    for token in tokens[:2]:
        consumed = world.client.post(f"{API}?action=consume-session", json={"token": token})
        assert consumed.status_code == 200
    again = world.client.post(f"{API}?action=consume-session", json={"token": tokens[0]})
    assert again.status_code == 410  # a refused consumption is not counted
    keys = listing(world)
    assert keys[a["id"]]["usage"] == {
        "sessions_created_24h": 3,
        "sessions_consumed_24h": 2,
        "sessions_created_30d": 3,
        "sessions_consumed_30d": 2,
    }
    assert keys[b["id"]]["usage"]["sessions_created_24h"] == 1
    assert keys[b["id"]]["usage"]["sessions_consumed_30d"] == 0
    assert set(keys[idle["id"]]["usage"].values()) == {0}
    # last_used_at is stored by the once-a-second usage flush.
    deadline = time.monotonic() + 5
    while listing(world)[a["id"]]["last_used_at"] is None:
        assert time.monotonic() < deadline, "last_used_at never set"
        time.sleep(0.2)
    assert listing(world)[idle["id"]]["last_used_at"] is None


def test_windows_count_by_the_hour_and_old_hours_are_pruned(world: World) -> None:
    key = world.create_key()
    hour = now_ms() // HOUR_MS
    for hours_ago, created, consumed in (
        (0, 1, 1),
        (23, 2, 0),
        (24, 4, 4),
        (719, 8, 0),
        (720, 16, 16),
    ):
        sql(
            world.settings,
            "INSERT INTO key_usage (api_key_id, hour, created, consumed) VALUES (?, ?, ?, ?)",
            (key["id"], hour - hours_ago, created, consumed),
        )
    assert listing(world)[key["id"]]["usage"] == {
        "sessions_created_24h": 3,
        "sessions_consumed_24h": 1,
        "sessions_created_30d": 15,
        "sessions_consumed_30d": 5,
    }
    stats = cli_json(
        "stats", "--org", str(world.org_id),
        env=database_env(world.settings),
    )  # fmt: skip
    assert stats[0]["sessions_created_30d"] == 15 and stats[0]["key_prefix"] == key["key_prefix"]

    async def prune(store: Store) -> None:
        day = now_ms() // 86_400_000
        await store.prune_rate_counters(0, day - 1)

    with_store(world.settings, prune)
    oldest = sql(world.settings, "SELECT min(hour) FROM key_usage")[0][0]
    assert oldest >= hour - 31 * 24 - 24
    assert sql(world.settings, "SELECT count(*) FROM key_usage WHERE hour < ?", (hour - 800,)) == [
        (0,)
    ]


def test_deleting_a_key_deletes_its_usage(world: World) -> None:
    key = world.create_key()
    world.token(key["key"])
    deleted = world.client.delete(
        f"{API}?id={key['id']}&org_id={world.org_id}", headers=world.bearer()
    )
    assert deleted.status_code == 200
    assert sql(
        world.settings, "SELECT count(*) FROM key_usage WHERE api_key_id = ?", (key["id"],)
    ) == [(0,)]
