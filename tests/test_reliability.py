"""Defences that hold in one process: lockout after failed authentications, slow bodies,
a bounded number of requests in progress, timing of key checks, and JWKS fetches that never
hold up session operations."""

from __future__ import annotations

import asyncio
import gc
import sqlite3
import statistics
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import API, SigningKey, World, add_org, assert_error, claims_for, running_app, sql
from test_jwks import JwksServer

from dailyplay import config
from dailyplay.keys import generate_api_key


@pytest.fixture
def settings(make_settings) -> config.Settings:
    """The module's app: failed-auth lockout after 5, a 1 s body timeout, 2 requests at once."""
    return make_settings(
        limits={"failed_auth_per_minute": 5, "body_timeout_seconds": 1},
        server={"max_concurrent_requests": 2},
    )


def unknown_token_url() -> str:
    return f"{API}?action=validate-session&token={uuid.uuid4()}"


# --- failed authentications ---------------------------------------------------------------------


@pytest.mark.both_limit_storages
def test_bad_api_keys_lock_the_address_out_even_for_a_good_key(world: World, api_key: str) -> None:
    for _ in range(5):
        assert_error(world.create_session(generate_api_key()), 401, "invalid API key")
    locked = world.create_session(api_key)
    assert_error(locked, 429, "too many failed authentications")
    assert 1 <= int(locked.headers["retry-after"]) <= 60
    assert locked.headers["x-ratelimit-remaining"] == "0"
    assert sql(world.settings, "SELECT count(*) FROM sessions") == [(0,)]
    # A request without any key cannot guess anything: it still gets the 401 that says why.
    assert_error(
        world.client.post(f"{API}?action=create-session", json={"game_id": 1}), 401, "missing"
    )
    # Operations that need no credential are not affected.
    assert world.client.get(unknown_token_url()).status_code == 404
    # Nor is another address.
    with running_app(world.settings, client_ip="203.0.113.10") as other:
        response = other.post(
            f"{API}?action=create-session", json={"game_id": 1}, headers={"x-api-key": api_key}
        )
        assert response.status_code == 200, response.text


@pytest.mark.both_limit_storages
def test_bad_jwts_lock_the_address_out_of_key_management(
    world: World, other_rsa_key: SigningKey
) -> None:
    forged = {"authorization": f"Bearer {other_rsa_key.sign(claims_for(world.admin))}"}
    for _ in range(5):
        assert_error(world.client.get(f"{API}?org_id={world.org_id}", headers=forged), 401)
    before = sql(world.settings, "SELECT * FROM api_keys")
    response = world.client.post(
        API, json={"org_id": world.org_id, "name": "x"}, headers=world.bearer()
    )
    assert_error(response, 429, "too many failed authentications")
    assert sql(world.settings, "SELECT * FROM api_keys") == before


@pytest.mark.both_limit_storages
def test_successful_and_forbidden_requests_do_not_count(world: World, api_key: str) -> None:
    for _ in range(10):
        assert world.create_session(api_key).status_code == 200
        # 403 (a member may not create keys) is not a failed authentication.
        response = world.client.post(
            API, json={"org_id": world.org_id, "name": "x"}, headers=world.bearer(world.member)
        )
        assert_error(response, 403)
    assert world.create_session(api_key).status_code == 200


def test_lockout_can_be_switched_off(make_settings, rsa_key: SigningKey) -> None:
    settings = make_settings(limits={"failed_auth_per_minute": 0})
    with running_app(settings) as client:
        for _ in range(50):
            response = client.post(
                f"{API}?action=create-session",
                json={"game_id": 1},
                headers={"x-api-key": generate_api_key()},
            )
            assert_error(response, 401)


# --- slow bodies and requests in progress ---------------------------------------------------------


async def trickle(first: bytes, pause: float, rest: bytes) -> AsyncIterator[bytes]:
    yield first
    await asyncio.sleep(pause)
    yield rest


def test_a_body_slower_than_the_timeout_gets_408_and_nothing_is_stored(
    world: World, api_key: str
) -> None:
    started = time.monotonic()
    response = world.client.post(
        f"{API}?action=create-session",
        content=trickle(b'{"game_id": ', 3, b"1}"),
        headers={"x-api-key": api_key, "content-type": "application/json"},
    )
    assert_error(response, 408, "within 1 seconds")
    assert response.headers["connection"] == "close"
    assert time.monotonic() - started < 2.5
    assert sql(world.settings, "SELECT count(*) FROM sessions") == [(0,)]
    # A body that is merely a little slow is fine.
    response = world.client.post(
        f"{API}?action=create-session",
        content=trickle(b'{"game_id": ', 0.2, b"1}"),
        headers={"x-api-key": api_key, "content-type": "application/json"},
    )
    assert response.status_code == 200, response.text


def test_past_max_concurrent_requests_the_answer_is_an_immediate_503(
    world: World, api_key: str
) -> None:
    def slow_create() -> int:
        return world.client.post(
            f"{API}?action=create-session",
            content=trickle(b'{"game_id": ', 0.8, b"1}"),
            headers={"x-api-key": api_key, "content-type": "application/json"},
        ).status_code

    with ThreadPoolExecutor(2) as pool:
        slow = [pool.submit(slow_create) for _ in range(2)]
        time.sleep(0.3)  # both are now in progress, waiting for their bodies
        started = time.monotonic()
        refused = world.client.get(unknown_token_url())
        assert time.monotonic() - started < 0.5
        assert_error(refused, 503, "at capacity")
        assert refused.headers["retry-after"] == "1"
        # Liveness still answers: a busy process is not a dead one.
        assert world.client.get("/healthz").status_code == 200
        assert [future.result() for future in slow] == [200, 200]
    # Capacity is given back once they finish.
    assert world.client.get(unknown_token_url()).status_code == 404


def test_api_requests_in_progress_count_against_capacity_for_every_path(
    world: World, api_key: str
) -> None:
    """The API's route is reached without the router, but shares the worker's one capacity."""

    def slow_create() -> int:
        return world.client.post(
            f"{API}?action=create-session",
            content=trickle(b'{"game_id": ', 0.8, b"1}"),
            headers={"x-api-key": api_key, "content-type": "application/json"},
        ).status_code

    with ThreadPoolExecutor(2) as pool:
        slow = [pool.submit(slow_create) for _ in range(2)]
        time.sleep(0.3)
        assert_error(world.client.get("/openapi.json"), 503, "at capacity")
        assert_error(world.client.get("/readyz"), 503, "at capacity")
        assert [future.result() for future in slow] == [200, 200]
    assert world.client.get("/openapi.json").status_code == 200


# --- timing of key checks -------------------------------------------------------------------------


def test_unknown_prefix_and_wrong_secret_take_the_same_time(world: World, api_key: str) -> None:
    """Both run one argon2 verification; the first attempt with each fresh key is timed."""
    prefix = api_key[:8]
    unknown, wrong = [], []
    with running_app(world.settings.replace("limits", failed_auth_per_minute=0)) as client:
        timed = World(
            client, world.settings, world.org_id, world.admin, world.member, world.signing
        )
        for _ in range(15):
            unknown.append(first_attempt_on(timed, generate_api_key()))
            wrong.append(first_attempt_on(timed, prefix + generate_api_key()[8:]))
    ratio = statistics.median(wrong) / statistics.median(unknown)
    assert 0.75 < ratio < 1.33, (statistics.median(wrong), statistics.median(unknown))
    # And both really paid for argon2 (a cached or short-circuited answer is ~100x faster).
    assert min(unknown + wrong) > 0.005, (min(unknown), min(wrong))


def first_attempt_on(world: World, key: str) -> float:
    started = time.perf_counter()
    assert_error(world.create_session(key), 401, "invalid API key")
    return time.perf_counter() - started


# --- JWKS fetches do not hold up session operations ---------------------------------------------


def test_a_slow_jwks_fetch_does_not_block_session_operations(
    make_settings, rsa_key: SigningKey
) -> None:
    jwks = JwksServer()
    try:
        jwks.publish(rsa_key)
        jwks.delay = 2.0
        settings = make_settings(
            auth={"jwt_public_key": "", "jwks_url": jwks.url, "jwks_timeout_seconds": 5}
        )
        with running_app(settings) as client:
            org = add_org(settings, members={"u": "admin"})
            bearer = {"authorization": f"Bearer {rsa_key.sign(claims_for('u'))}"}
            with ThreadPoolExecutor(1) as pool:
                started = time.monotonic()
                pending = pool.submit(client.get, f"{API}?org_id={org}", headers=bearer)
                time.sleep(0.2)  # the JWKS fetch is now in progress
                latencies = []
                while not pending.done():
                    t0 = time.monotonic()
                    assert client.get(unknown_token_url()).status_code == 404
                    latencies.append(time.monotonic() - t0)
                    time.sleep(0.05)
                assert pending.result().status_code == 200
                assert time.monotonic() - started >= 2.0
            assert len(latencies) >= 10
            assert max(latencies) < 0.5, latencies
    finally:
        jwks.close()


# --- latency -------------------------------------------------------------------------------------


def test_objects_made_at_start_up_are_left_out_of_full_collections(make_settings) -> None:
    """A full GC pass over everything start-up made took 20-30 ms every few seconds under load;
    the app freezes it once started, so those passes only see what requests leave behind."""
    gc.unfreeze()
    with running_app(make_settings()):
        frozen = gc.get_freeze_count()
    gc.unfreeze()
    assert frozen > 10_000


# --- durability settings --------------------------------------------------------------------------


@pytest.mark.parametrize(("configured", "expected"), [("FULL", 2), ("NORMAL", 1)])
def test_the_writer_runs_in_wal_mode_with_the_configured_synchronous(
    make_settings, configured: str, expected: int
) -> None:
    """FULL (the default) syncs the WAL on every commit: a consumption survives power loss."""
    settings = make_settings(database={"synchronous": configured})
    with running_app(settings) as client:
        database = client.app.state.services.db

        def read(conn: sqlite3.Connection) -> dict[str, object]:
            names = ("journal_mode", "synchronous", "busy_timeout")
            return {name: conn.execute(f"PRAGMA {name}").fetchone()[0] for name in names}

        async def pragmas() -> dict[str, object]:
            return await database.run_on_writer(read)

        assert client.portal.call(pragmas) == {
            "journal_mode": "wal",
            "synchronous": expected,
            "busy_timeout": settings.database.busy_timeout_ms,
        }
