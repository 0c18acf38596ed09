"""limits.storage_uri: the setting, and what the service does when Redis fails or hangs.

The counting itself runs on Redis in test_ratelimit.py, test_ratelimit_windows.py and the
lockout tests of test_reliability.py (both_limit_storages); several processes and hosts sharing
one Redis are in test_redis_hosts.py.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import uuid

import pytest
from conftest import (
    API,
    World,
    add_org,
    assert_error,
    free_port,
    inside_one_minute,
    running_app,
)
from test_metrics import metrics_of, value

from dailyplay import config
from dailyplay.config import library_uri
from dailyplay.counters import PROBE_SECONDS

pytestmark = [pytest.mark.usefixtures("fresh_minute")]


# --- the setting ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "for_limits"),
    [
        ("redis://cache:6379/0", "async+redis://cache:6379/0"),
        ("rediss://:pw@cache:6380/2", "async+rediss://:pw@cache:6380/2"),
        ("redis+unix:///run/redis.sock?db=1", "async+redis+unix:///run/redis.sock?db=1"),
        (
            "redis+sentinel://s1:26379,s2:26379/main",
            "async+redis+sentinel://s1:26379,s2:26379/main",
        ),
        ("redis+cluster://n1:7000,n2:7000", "async+redis+cluster://n1:7000,n2:7000"),
        ("REDIS://cache:6379", "async+redis://cache:6379"),
        ("async+redis://cache:6379", "async+redis://cache:6379"),
    ],
)
def test_the_redis_uris_users_know_are_translated_for_limits(given: str, for_limits: str) -> None:
    assert library_uri(given) == for_limits
    settings = config.load(env={"DAILYPLAY_LIMITS_STORAGE_URI": given})
    assert settings.limits.storage_uri == given


@pytest.mark.parametrize(
    "uri", ["memcached://myhost:11211", "memory://", "mongodb://u:hunter2@db", "myhost:6379", "x"]
)
def test_other_storages_are_refused_without_echoing_the_uri(uri: str) -> None:
    with pytest.raises(config.ConfigError) as refused:
        config.load(env={"DAILYPLAY_LIMITS_STORAGE_URI": uri})
    message = str(refused.value)
    assert "limits.storage_uri" in message and "redis://" in message
    assert "hunter2" not in message and "myhost" not in message


def test_the_timeout_is_bounded_and_the_password_never_shown() -> None:
    for bad in ("0", "9", "10001"):
        with pytest.raises(config.ConfigError, match="storage_timeout_ms"):
            config.load(env={"DAILYPLAY_LIMITS_STORAGE_TIMEOUT_MS": bad})
    limits = config.load(
        env={"DAILYPLAY_LIMITS_STORAGE_URI": "rediss://app:s3cret@cache:6380/1?password=x"}
    ).limits
    assert limits.storage_display == "rediss://app@cache:6380/1"
    assert config.load(env={}).limits.storage_display == "this process"


def test_without_the_redis_package_serve_says_which_extra_to_install(tmp_path) -> None:
    # As on an install without the [redis] extra: redis cannot be imported.
    code = (
        "import sys; sys.modules['redis'] = None; "
        "from dailyplay.cli import main; sys.exit(main(['serve', '--port', sys.argv[1]]))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAILYPLAY_")}
    env["DAILYPLAY_LIMITS_STORAGE_URI"] = "redis://127.0.0.1:6379/0"
    env["DAILYPLAY_DATABASE_PATH"] = str(tmp_path / "dailyplay.db")
    result = subprocess.run(
        [sys.executable, "-c", code, str(free_port())],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert "pip install 'dailyplay[redis]'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "dailyplay.db").exists()  # stopped before anything was made


# --- Redis failing ------------------------------------------------------------------------------


@pytest.fixture
def shared_settings(make_settings, redis_url: str) -> config.Settings:
    return make_settings(
        limits={"storage_uri": redis_url, "storage_timeout_ms": 250, "public_per_minute": 1000}
    )


def _timed(call) -> tuple[float, int]:
    started = time.monotonic()
    response = call()
    return time.monotonic() - started, response.status_code


def test_a_hung_redis_costs_at_most_the_timeout_and_limits_hold_in_the_process(
    shared_settings: config.Settings, redis_server, rsa_key, caplog: pytest.LogCaptureFixture
) -> None:
    settings = shared_settings
    org = add_org(settings, members={"a": "admin"})
    caplog.set_level(logging.WARNING, logger="dailyplay.ratelimit")
    with running_app(settings) as client, running_app(settings) as other:
        world = World(client, settings, org, "a", "a", rsa_key)
        key = world.create_key(rate_limit_per_minute=6)["key"]
        assert world.create_session(key).status_code == 200
        assert world.create_session(key).status_code == 200
        redis_server.pause()  # connections stay open, nothing answers
        try:
            answers = [_timed(lambda: world.create_session(key)) for _ in range(8)]
            answers += [
                _timed(lambda: client.get(f"{API}?action=validate-session&token={uuid.uuid4()}"))
                for _ in range(5)
            ]
            ready = client.get("/readyz")
            metrics = metrics_of(client)
        finally:
            redis_server.resume()
        # The first request waits out the timeout; the rest do not wait for Redis at all.
        assert max(seconds for seconds, _ in answers) < 0.25 + 0.5, answers
        assert sorted(seconds for seconds, _ in answers)[-2] < 0.2, answers
        statuses = [status for _, status in answers]
        # The process knew of 2 hits from Redis's answers: 4 more, then 429.
        assert statuses == [200] * 4 + [429] * 4 + [404] * 5, statuses
        assert ready.status_code == 200, ready.text
        assert value(metrics, "dailyplay_limits_storage_errors_total") >= 1
        warnings = [r for r in caplog.records if "rate-limit storage" in r.getMessage()]
        assert len(warnings) == 1 and "counting in this process" in warnings[0].getMessage()
        assert "hunter" not in caplog.text

        # Redis answers again: within a probe interval, counting is shared once more.
        time.sleep(PROBE_SECONDS + 1.0)
        fresh = world.create_key(rate_limit_per_minute=3)["key"]
        inside_one_minute(5)
        other_world = World(other, settings, org, "a", "a", rsa_key)
        assert world.create_session(fresh).status_code == 200
        assert other_world.create_session(fresh).status_code == 200
        assert world.create_session(fresh).status_code == 200
        assert_error(other_world.create_session(fresh), 429, "per-minute limit of 3")
        assert any("answers again" in r.getMessage() for r in caplog.records)


def test_redis_down_at_start_is_no_reason_not_to_serve(
    make_settings, redis_server, rsa_key
) -> None:
    redis_server.kill()
    settings = make_settings(limits={"storage_uri": redis_server.url, "failed_auth_per_minute": 3})
    org = add_org(settings, members={"a": "admin"})
    with running_app(settings) as client:
        assert client.get("/readyz").status_code == 200
        world = World(client, settings, org, "a", "a", rsa_key)
        key = world.create_key(rate_limit_per_minute=2)["key"]
        statuses = [world.create_session(key).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
        # The lockout holds in the process too.
        bad = {"x-api-key": "dpk_" + "0" * 40}
        failures = [
            client.post(f"{API}?action=create-session", json={"game_id": 1}, headers=bad)
            for _ in range(4)
        ]
        assert [r.status_code for r in failures] == [401, 401, 401, 429]
        assert_error(world.create_session(key), 429, "too many failed authentications")
