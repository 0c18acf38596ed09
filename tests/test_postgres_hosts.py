"""Several hosts on one PostgreSQL database: two `dailyplay serve` processes on different ports,
two workers each, as two app hosts behind a load balancer would run (on one machine here).

Exactly-once consumption across hosts, no answered write lost when a host is killed, 503s (never
500s, never hangs) while the database is down and recovery without a restart, and the pool's
bound on connections.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import pytest
from conftest import API, SigningKey, add_org, serve, sql
from test_resilience import Ledger, _load, make_key
from test_server import assert_each_consumed_once, race_to_consume

from dailyplay import config

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


@pytest.fixture
def quiet_settings(settings: config.Settings) -> config.Settings:
    """No per-address limits: these tests send a lot from one address on purpose."""
    return settings.replace("limits", public_per_minute=0, failed_auth_per_minute=0)


def _create_tokens(urls: list[str], key: str, count: int) -> list[str]:
    """count fresh tokens, created through the hosts in turn."""

    def create(i: int) -> str:
        response = httpx.post(
            f"{urls[i % len(urls)]}{API}?action=create-session",
            json={"game_id": 1},
            headers={"x-api-key": key},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        return str(response.json()["data"]["token"])

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(create, range(count)))


def test_each_token_is_consumed_exactly_once_by_clients_racing_over_two_hosts(
    quiet_settings: config.Settings, tmp_path, rsa_key: SigningKey
) -> None:
    settings = quiet_settings
    org = add_org(settings, members={"admin": "admin"})
    tokens_wanted, processes, threads = 1000, 4, 2  # 8 racing clients
    with (
        serve(settings, tmp_path, workers=2) as first,
        serve(settings, tmp_path, workers=2) as second,
    ):
        urls = [first.url, second.url]
        key = make_key(first.url, org, rsa_key, rate_limit_per_day=100_000)
        tokens = _create_tokens(urls, key, tokens_wanted)
        results = race_to_consume(urls, tokens, processes, threads, timeout=180)  # both hosts
        assert "Traceback" not in first.log() + second.log()
    assert len(results) == tokens_wanted * processes * threads
    assert_each_consumed_once(results, tokens)
    assert sql(settings, "SELECT count(*) FROM sessions WHERE status = 'consumed'") == [
        (tokens_wanted,)
    ]


def _stored(settings: config.Settings) -> dict[str, tuple[str, str | None]]:
    return {
        str(uuid.UUID(bytes=bytes(token))): (status, ref)
        for token, status, ref in sql(settings, "SELECT token, status, external_ref FROM sessions")
    }


def test_a_host_killed_under_load_loses_nothing_it_answered_and_the_other_keeps_serving(
    quiet_settings: config.Settings, tmp_path, rsa_key: SigningKey
) -> None:
    settings = quiet_settings
    org = add_org(settings, members={"admin": "admin"})
    ledgers = {"killed": Ledger(), "other": Ledger()}
    stop = threading.Event()
    with (
        serve(settings, tmp_path, workers=2) as killed,
        serve(settings, tmp_path, workers=2) as other,
    ):
        key = make_key(killed.url, org, rsa_key, allowed_game_ids=[1])
        threads = [
            threading.Thread(
                target=_load, args=([server.url], key, ledgers[name], stop, n), daemon=True
            )
            for n, (name, server) in enumerate(
                [("killed", killed), ("other", other)] * 3  # three clients on each host
            )
        ]
        for thread in threads:
            thread.start()
        time.sleep(2.0)
        os.killpg(killed.process.pid, signal.SIGKILL)
        killed.process.wait(timeout=10)
        answered_at_kill = len(ledgers["other"].created)
        time.sleep(2.0)
        answered_after = len(ledgers["other"].created)
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        assert "Traceback" not in other.log()
    rows = _stored(settings)
    for name, ledger in ledgers.items():
        assert len(ledger.created) > 50 and ledger.consumed, (name, len(ledger.created))
        for token, (ref, _meta) in ledger.created.items():
            assert token in rows, f"a token created through the {name} host was lost"
            assert rows[token][1] == ref and rows[token][0] in ("active", "consumed")
        for token in ledger.consumed:
            assert rows[token][0] == "consumed", f"a token consumed through {name} came back"
        assert not ledger.rejected_refs & {ref for _, ref in rows.values()}
    # The other host answered throughout: every request it was sent got an answer, and it
    # went on creating tokens after the kill.
    assert ledgers["other"].lost_answers == 0
    assert answered_after - answered_at_kill > 50, (answered_at_kill, answered_after)


@dataclass
class Outcomes:
    """What clients saw: (time sent, seconds taken, status, Retry-After) per request."""

    rows: list[tuple[float, float, int, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, sent: float, taken: float, status: int, retry_after: str | None) -> None:
        with self.lock:
            self.rows.append((sent, taken, status, retry_after))


def _create_and_consume(url: str, key: str, outcomes: Outcomes, stop: threading.Event) -> None:
    with httpx.Client(timeout=30) as http:
        while not stop.is_set():
            sent = time.monotonic()
            response = http.post(
                f"{url}{API}?action=create-session", json={"game_id": 1}, headers={"x-api-key": key}
            )
            outcomes.add(
                sent,
                time.monotonic() - sent,
                response.status_code,
                response.headers.get("retry-after"),
            )
            if response.status_code == 200:
                token = response.json()["data"]["token"]
                sent = time.monotonic()
                consumed = http.post(f"{url}{API}?action=consume-session", json={"token": token})
                outcomes.add(
                    sent,
                    time.monotonic() - sent,
                    consumed.status_code,
                    consumed.headers.get("retry-after"),
                )
            else:
                time.sleep(0.05)


def test_while_postgresql_is_down_requests_get_503_and_both_hosts_recover_by_themselves(
    make_settings, tmp_path, rsa_key: SigningKey
) -> None:
    from bench.postgres import ThrowawayPostgres

    database = ThrowawayPostgres().start()  # one of its own: this test stops it
    try:
        database.setup_role()
        settings = make_settings(
            database={"url": database.create_database(), "statement_timeout_ms": 2000},
            limits={"public_per_minute": 0, "failed_auth_per_minute": 0},
        )
        org = add_org(settings, members={"admin": "admin"})
        outcomes = {"first": Outcomes(), "second": Outcomes()}
        stop = threading.Event()
        with (
            serve(settings, tmp_path, workers=2) as first,
            serve(settings, tmp_path, workers=2) as second,
        ):
            hosts = {"first": first.url, "second": second.url}
            key = make_key(first.url, org, rsa_key)
            threads = [
                threading.Thread(
                    target=_create_and_consume, args=(url, key, outcomes[name], stop), daemon=True
                )
                for name, url in list(hosts.items()) * 2
            ]
            for thread in threads:
                thread.start()
            time.sleep(1.5)
            down_at = time.monotonic()
            database.stop("fast")
            time.sleep(1.0)
            not_ready = {
                name: httpx.get(f"{url}/readyz", timeout=15) for name, url in hosts.items()
            }
            time.sleep(2.0)
            restart_at = time.monotonic()
            database.start()
            up_at = time.monotonic()
            # Both hosts serve again by themselves: no restart.
            recovered = {}
            for name, url in hosts.items():
                deadline = time.monotonic() + 20
                while True:
                    ready = httpx.get(f"{url}/readyz", timeout=15)
                    if ready.status_code == 200:
                        recovered[name] = time.monotonic() - up_at
                        break
                    assert time.monotonic() < deadline, f"{name} never became ready: {ready.text}"
                    time.sleep(0.2)
            time.sleep(1.5)
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
            logs = first.log() + second.log()
    finally:
        database.remove()
    for name, response in not_ready.items():
        assert response.status_code == 503, (name, response.text)
        assert response.json()["success"] is False
    for name, seen in outcomes.items():
        statuses = Counter(status for _, _, status, _ in seen.rows)
        errors = [line for line in logs.splitlines() if '"level": "ERROR"' in line]
        assert set(statuses) <= {200, 503}, (name, statuses, errors[:3])
        during = [row for row in seen.rows if down_at + 0.5 < row[0] < restart_at]
        assert during and all(row[2] == 503 for row in during), (
            name,
            Counter(r[2] for r in during),
        )
        assert all(row[3] in ("1", "5") for row in seen.rows if row[2] == 503)
        # Never a hang: at most about the statement timeout (2 s) for a wait, plus a margin.
        assert max(taken for _, taken, _, _ in seen.rows) < 6.0, name
        after = [row for row in seen.rows if row[0] > up_at + recovered[name] + 0.5]
        assert after and all(row[2] == 200 for row in after), (name, Counter(r[2] for r in after))
    assert "Traceback" not in logs
    assert "database unavailable" in logs


def test_a_host_never_opens_more_connections_than_its_pools_allow(
    quiet_settings: config.Settings, tmp_path, rsa_key: SigningKey, postgres_server
) -> None:
    settings = quiet_settings.replace("database", pool_min=1, pool_max=3)
    name = settings.database.url.rsplit("/", 1)[1]
    org = add_org(settings, members={"admin": "admin"})
    stop = threading.Event()
    seen: list[int] = []
    with (
        serve(settings, tmp_path, workers=2) as first,
        serve(settings, tmp_path, workers=2) as second,
    ):
        key = make_key(first.url, org, rsa_key, allowed_game_ids=[1])
        ledger = Ledger()
        threads = [
            threading.Thread(target=_load, args=([url], key, ledger, stop, n), daemon=True)
            for n, url in enumerate([first.url, second.url] * 12)
        ]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            seen.append(postgres_server.connections(name))
            time.sleep(0.05)
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    # 2 hosts x 2 workers x pool_max 3; more than the pools' minimum shows the load needed more.
    assert max(seen) <= 2 * 2 * 3, Counter(seen)
    assert max(seen) > 2 * 2 * 1, Counter(seen)
    assert len(ledger.created) > 100
