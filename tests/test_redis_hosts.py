"""Several hosts sharing one Redis for their limits (and one PostgreSQL database): two
`dailyplay serve` processes on different ports, two workers each, as two app hosts behind a
load balancer run (on one machine here).

Every limit is exact across the four processes; Redis killed under load costs no 5xx and no
wait, limits then hold per process, and exact shared counting resumes once Redis is back,
without restarting anything.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import API, SigningKey, add_org, inside_one_minute, serve
from test_metrics import scrape, value
from test_resilience import make_key

from dailyplay import config
from dailyplay.counters import PROBE_SECONDS

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

PROXY = "127.0.0.0/8"  # the tests' own address, so that X-Forwarded-For names the client


@pytest.fixture
def shared_settings(settings: config.Settings, redis_url: str) -> config.Settings:
    settings = settings.replace(
        "limits",
        storage_uri=redis_url,
        public_per_minute=100,
        failed_auth_per_minute=30,
    )
    return settings.replace("server", trusted_proxies=[PROXY])


def _spread(urls: list[str], send, count: int, threads: int = 16) -> Counter:
    """count requests spread over every host, `threads` at a time: their statuses."""

    def one(i: int) -> int:
        return int(send(urls[i % len(urls)], i).status_code)

    with ThreadPoolExecutor(threads) as pool:
        return Counter(pool.map(one, range(count)))


def _creator(key: str, client: str):
    def send(url: str, _i: int) -> httpx.Response:
        return httpx.post(
            f"{url}{API}?action=create-session",
            json={"game_id": 1},
            headers={"x-api-key": key, "x-forwarded-for": client},
            timeout=30,
        )

    return send


def test_every_limit_is_exact_across_two_hosts_of_two_workers(
    shared_settings: config.Settings, tmp_path, rsa_key: SigningKey
) -> None:
    settings = shared_settings
    org = add_org(settings, members={"admin": "admin"})
    with (
        serve(settings, tmp_path, workers=2) as first,
        serve(settings, tmp_path, workers=2) as second,
    ):
        urls = [first.url, second.url]
        per_minute = make_key(first.url, org, rsa_key, rate_limit_per_minute=100)
        inside_one_minute()  # each count below within one clock minute
        assert _spread(urls, _creator(per_minute, "192.0.2.1"), 300) == {200: 100, 429: 200}
        per_day = make_key(
            first.url, org, rsa_key, rate_limit_per_minute=10_000, rate_limit_per_day=150
        )
        inside_one_minute()
        assert _spread(urls, _creator(per_day, "192.0.2.2"), 300) == {200: 150, 429: 150}

        def validate(url: str, _i: int) -> httpx.Response:
            return httpx.get(
                f"{url}{API}?action=validate-session&token={uuid.uuid4()}",
                headers={"x-forwarded-for": "192.0.2.3"},
                timeout=30,
            )

        inside_one_minute()
        assert _spread(urls, validate, 300) == {404: 100, 429: 200}

        guessing = _creator("dpk_" + "0" * 40, "192.0.2.4")
        inside_one_minute(20)  # the lockout and what follows it
        assert _spread(urls, guessing, 100) == {401: 30, 429: 70}
        # Locked out on every process, good key or not; another address is not.
        good = make_key(first.url, org, rsa_key)
        assert _spread(urls, _creator(good, "192.0.2.4"), 20) == {429: 20}
        assert _spread(urls, _creator(good, "192.0.2.5"), 20) == {200: 20}
        assert "Traceback" not in first.log() + second.log()


def _metrics(url: str) -> dict:
    response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200
    return scrape(response.text)


def test_redis_killed_under_load_degrades_limits_not_the_service_and_recovers(
    shared_settings: config.Settings, tmp_path, rsa_key: SigningKey, redis_server
) -> None:
    settings = shared_settings.replace("limits", public_per_minute=0)
    org = add_org(settings, members={"admin": "admin"})
    answers: list[tuple[str, int, float]] = []  # (phase, status, seconds)
    phase = ["before"]
    stop = threading.Event()
    with (
        serve(settings, tmp_path, workers=2) as first,
        serve(settings, tmp_path, workers=2) as second,
    ):
        urls = [first.url, second.url]
        busy = make_key(first.url, org, rsa_key, rate_limit_per_day=1_000_000)

        def load(n: int) -> None:
            with httpx.Client(timeout=10) as http:
                i = 0
                while not stop.is_set():
                    i += 1
                    url = urls[(n + i) % 2]
                    started = time.monotonic()
                    if i % 2:
                        response = http.post(
                            f"{url}{API}?action=create-session",
                            json={"game_id": 1},
                            headers={"x-api-key": busy, "x-forwarded-for": f"192.0.2.{n}"},
                        )
                    else:
                        response = http.get(
                            f"{url}{API}?action=validate-session&token={uuid.uuid4()}",
                            headers={"x-forwarded-for": f"198.51.100.{n}"},
                        )
                    answers.append((phase[0], response.status_code, time.monotonic() - started))

        threads = [threading.Thread(target=load, args=(n,), daemon=True) for n in range(6)]
        for thread in threads:
            thread.start()
        time.sleep(2.0)
        phase[0] = "down"
        redis_server.kill()
        time.sleep(3.0)
        # Limits still hold, per process: a key limited to 10 a minute gets at most 10 from
        # each of the four processes.
        during = make_key(first.url, org, rsa_key, rate_limit_per_minute=10)
        inside_one_minute()
        while_down = _spread(urls, _creator(during, "192.0.2.50"), 120, threads=4)
        errors = value(_metrics(first.url), "dailyplay_limits_storage_errors_total")
        phase[0] = "back"
        redis_server.start()
        time.sleep(PROBE_SECONDS + 2.0)
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        after = make_key(first.url, org, rsa_key, rate_limit_per_minute=50)
        inside_one_minute()
        shared_again = _spread(urls, _creator(after, "192.0.2.60"), 150)
        assert "Traceback" not in first.log() + second.log()
        logs = first.log() + second.log()
    statuses = Counter(status for _, status, _ in answers)
    assert set(statuses) <= {200, 404}, statuses
    assert all(200 <= s < 500 for s in while_down), while_down
    assert 10 <= while_down[200] <= 40 and while_down[429] >= 80, while_down
    assert errors >= 1
    slowest = {p: max(s for q, _, s in answers if q == p) for p in ("before", "down", "back")}
    # Redis refusing connections costs nothing; a timeout would cost at most 0.25 s.
    assert slowest["down"] < slowest["before"] + 0.25 + 0.5, slowest
    assert shared_again == {200: 50, 429: 100}, shared_again
    assert logs.count("counting in this process until it answers again") <= 4  # once per process
    assert "answers again; limits are shared again" in logs
