"""Rate limits: per key per minute and per day (kept across restarts and processes), per IP."""

from __future__ import annotations

import time
import uuid

import pytest
from conftest import API, AppClient, World, add_org, assert_error, running_app, sql

from dailyplay.app import create_app

pytestmark = [
    pytest.mark.both_engines,
    pytest.mark.both_limit_storages,
    pytest.mark.usefixtures("fresh_minute"),
]


def test_per_minute_limit_counts_down_then_429(world: World) -> None:
    key = world.create_key(rate_limit_per_minute=3, rate_limit_per_day=1000)["key"]
    remaining = []
    for _ in range(3):
        response = world.create_session(key)
        assert response.status_code == 200
        assert response.headers["x-ratelimit-limit"] == "3"
        remaining.append(int(response.headers["x-ratelimit-remaining"]))
        reset = int(response.headers["x-ratelimit-reset"])
        assert time.time() < reset <= time.time() + 61
    assert remaining == [2, 1, 0]
    refused = world.create_session(key)
    assert_error(refused, 429, "per-minute limit of 3")
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-remaining"] == "0"
    assert sql(world.settings, "SELECT count(*) FROM sessions") == [(3,)]


def test_bad_requests_carry_the_headers_too(world: World) -> None:
    key = world.create_key(rate_limit_per_minute=5)["key"]
    response = world.create_session(key, color="blue")
    assert response.status_code == 400
    assert response.headers["x-ratelimit-remaining"] == "4"


def test_keys_are_limited_separately(world: World) -> None:
    first = world.create_key(rate_limit_per_minute=1)["key"]
    second = world.create_key(rate_limit_per_minute=1)["key"]
    assert world.create_session(first).status_code == 200
    assert_error(world.create_session(first), 429)
    assert world.create_session(second).status_code == 200


def test_day_quota_survives_a_restart(make_settings, rsa_key) -> None:
    settings = make_settings()
    with running_app(settings) as client:
        world = World(
            client, settings, add_org(settings, members={"a": "admin"}), "a", "a", rsa_key
        )
        key = world.create_key(rate_limit_per_minute=100, rate_limit_per_day=2)["key"]
        assert world.create_session(key).status_code == 200
        assert world.create_session(key).status_code == 200
        assert_error(world.create_session(key), 429, "per-day limit of 2")
    # A new process on the same database: the day's quota is still used up.
    with running_app(settings) as client:
        world.client = client
        refused = world.create_session(key)
        assert_error(refused, 429, "per-day")
        seconds_to_midnight = 86400 - time.time() % 86400
        assert abs(int(refused.headers["retry-after"]) - seconds_to_midnight) <= 2
    assert sql(settings, "SELECT count(*) FROM sessions") == [(2,)]


def test_minute_quota_survives_a_restart(make_settings, rsa_key) -> None:
    settings = make_settings()
    with running_app(settings) as client:
        world = World(
            client, settings, add_org(settings, members={"a": "admin"}), "a", "a", rsa_key
        )
        key = world.create_key(rate_limit_per_minute=2)["key"]
        assert world.create_session(key).status_code == 200
    with running_app(settings) as client:
        world.client = client
        assert world.create_session(key).status_code == 200
        assert_error(world.create_session(key), 429, "per-minute")


def test_two_processes_share_one_quota(make_settings, rsa_key) -> None:
    settings = make_settings()
    with running_app(settings) as first:
        world = World(first, settings, add_org(settings, members={"a": "admin"}), "a", "a", rsa_key)
        key = world.create_key(rate_limit_per_minute=1000, rate_limit_per_day=10)["key"]
        for _ in range(6):
            assert world.create_session(key).status_code == 200
        time.sleep(1.5)  # the first app's background flush adds its 6 to the shared count
        second = AppClient(create_app(settings))
        try:
            world.client = second
            statuses = [world.create_session(key).status_code for _ in range(6)]
        finally:
            second.close()
    assert statuses == [200] * 4 + [429] * 2
    assert sql(settings, "SELECT count(*) FROM sessions") == [(10,)]


def test_lowering_a_limit_applies_at_once(world: World) -> None:
    key = world.create_key(rate_limit_per_minute=10)
    for _ in range(3):
        assert world.create_session(key["key"]).status_code == 200
    world.client.patch(
        API,
        json={"id": key["id"], "org_id": world.org_id, "rate_limit_per_minute": 1},
        headers=world.bearer(),
    )
    time.sleep(1.5)  # counts reach the database; the new limit reads them back
    assert_error(world.create_session(key["key"]), 429, "per-minute limit of 1")


def test_public_operations_are_limited_per_client_ip(make_settings) -> None:
    settings = make_settings(limits={"public_per_minute": 3})
    token = uuid.uuid4()
    with running_app(settings, client_ip="203.0.113.1") as client:
        for _ in range(3):
            assert client.get(f"{API}?action=validate-session&token={token}").status_code == 404
        refused = client.post(f"{API}?action=consume-session", json={"token": str(token)})
        assert_error(refused, 429, "3 requests per minute")
        assert int(refused.headers["retry-after"]) >= 1


def test_forwarded_for_is_believed_only_from_trusted_proxies(make_settings) -> None:
    settings = make_settings(
        limits={"public_per_minute": 2}, server={"trusted_proxies": ["10.0.0.0/8"]}
    )
    token = uuid.uuid4()
    url = f"{API}?action=validate-session&token={token}"
    with running_app(settings, client_ip="10.1.2.3") as proxy:
        for client_address in ("203.0.113.7", "203.0.113.8"):
            headers = {"x-forwarded-for": f"{client_address}, 10.9.9.9"}
            assert proxy.get(url, headers=headers).status_code == 404
            assert proxy.get(url, headers=headers).status_code == 404
            assert_error(proxy.get(url, headers=headers), 429)
    with running_app(settings, client_ip="192.0.2.50") as untrusted:
        # A forged header from an untrusted peer does not buy a fresh quota.
        for i in range(2):
            assert (
                untrusted.get(url, headers={"x-forwarded-for": f"198.51.100.{i}"}).status_code
                == 404
            )
        assert_error(untrusted.get(url, headers={"x-forwarded-for": "198.51.100.99"}), 429)


def test_zero_disables_the_public_limit(make_settings) -> None:
    settings = make_settings(limits={"public_per_minute": 0})
    with running_app(settings) as client:
        for _ in range(20):
            assert (
                client.get(f"{API}?action=validate-session&token={uuid.uuid4()}").status_code == 404
            )
