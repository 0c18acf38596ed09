"""GET /metrics: what is counted, bounded labels, every worker's numbers, elsewhere or off."""

from __future__ import annotations

import http.client as http_client
import json
import random
import socket
import time
import uuid
from pathlib import Path

import httpx
import pytest
from conftest import (
    API,
    AppClient,
    World,
    add_org,
    free_port,
    issue_api_key,
    run_cli,
    running_app,
    serve,
    sql,
    write_config,
)
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from dailyplay import metrics as metrics_module
from dailyplay.clock import now_ms
from dailyplay.storage import sqlite as db


def scrape(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """{(sample name, labels): value} of an exposition."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def series(samples: dict, name: str, *labels: str) -> dict[tuple[str, ...], float]:
    """{label values: value} of every series of one metric."""
    return {
        tuple(dict(sample_labels)[label] for label in labels): sample_value
        for (sample_name, sample_labels), sample_value in samples.items()
        if sample_name == name
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def metrics_of(client: AppClient) -> dict:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    return scrape(response.text)


@pytest.mark.usefixtures("fresh_minute")
def test_sessions_rejections_auth_failures_and_rate_limits_are_counted(world: World) -> None:
    client = world.client
    key = world.create_key(rate_limit_per_minute=3, allowed_game_ids=[42])["key"]
    token = world.token(key)
    assert world.create_session(key, game_id=7).status_code == 403  # not on the allow-list
    assert client.get(f"{API}?action=validate-session&token={token}").status_code == 200
    assert client.post(f"{API}?action=consume-session", json={"token": token}).status_code == 200
    assert client.post(f"{API}?action=consume-session", json={"token": token}).status_code == 410
    assert client.get(f"{API}?action=validate-session&token={token}").json()["data"]["valid"] is (
        False
    )
    unknown = str(uuid.uuid4())
    assert client.get(f"{API}?action=validate-session&token={unknown}").status_code == 404
    assert client.post(f"{API}?action=consume-session", json={"token": unknown}).status_code == 404
    world.token(key)
    assert world.create_session(key).status_code == 429  # the fourth in this minute
    no_key = client.post(f"{API}?action=create-session", json={"game_id": 42})
    assert no_key.status_code == 401
    wrong_key = client.post(
        f"{API}?action=create-session",
        json={"game_id": 42},
        headers={"x-api-key": "dpk_" + "0" * 40},
    )
    assert wrong_key.status_code == 401
    assert client.get(f"{API}?org_id={world.org_id}").status_code == 401  # no bearer
    member_create = client.post(
        API, json={"org_id": world.org_id, "name": "x"}, headers=world.bearer(world.member)
    )
    assert member_create.status_code == 403

    m = metrics_of(client)
    assert value(m, "dailyplay_sessions_created_total") == 2
    assert value(m, "dailyplay_sessions_validated_total") == 1
    assert value(m, "dailyplay_sessions_consumed_total") == 1
    assert series(m, "dailyplay_sessions_rejected_total", "operation", "reason") == {
        ("create-session", "not_allowed"): 1,
        ("consume-session", "consumed"): 1,
        ("validate-session", "consumed"): 1,
        ("validate-session", "not_found"): 1,
        ("consume-session", "not_found"): 1,
    }
    assert series(m, "dailyplay_auth_failures_total", "kind") == {
        ("api_key_missing",): 1,
        ("api_key_invalid",): 1,
        ("bearer_missing",): 1,
        ("not_admin",): 1,
    }
    assert series(m, "dailyplay_rate_limited_total", "limit") == {("key_per_minute",): 1}
    assert series(m, "dailyplay_http_requests_total", "operation", "status") == {
        ("create-api-key", "200"): 1,
        ("create-api-key", "403"): 1,
        ("create-session", "200"): 2,
        ("create-session", "403"): 1,
        ("create-session", "429"): 1,
        ("create-session", "401"): 2,
        ("validate-session", "200"): 2,
        ("validate-session", "404"): 1,
        ("consume-session", "200"): 1,
        ("consume-session", "410"): 1,
        ("consume-session", "404"): 1,
        ("list-api-keys", "401"): 1,
    }
    latency = "dailyplay_http_request_duration_seconds"
    assert value(m, f"{latency}_count", operation="create-session") == 6
    assert value(m, f"{latency}_bucket", operation="create-session", le="+Inf") == 6
    assert 0 < value(m, f"{latency}_sum", operation="create-session") < 5
    # Writes: the key, two tokens, one consumption; each group commit is observed.
    commits = value(m, "dailyplay_db_commit_duration_seconds_count")
    assert commits >= 1
    assert value(m, "dailyplay_db_commit_writes_count") == commits
    assert value(m, "dailyplay_db_commit_writes_sum") >= 4
    assert value(m, "dailyplay_db_busy_retries_total") == 0


def test_expired_and_revoked_tokens_are_rejected_by_their_reason(world: World) -> None:
    key_row = world.create_key()
    expiring, revoked = world.token(key_row["key"]), world.token(key_row["key"])
    sql(
        world.settings,
        "UPDATE sessions SET expires_at = 1 WHERE token = ?",
        (uuid.UUID(expiring).bytes,),
    )
    world.client.patch(
        API,
        json={"id": key_row["id"], "org_id": world.org_id, "is_active": False},
        headers=world.bearer(),
    )
    for token in (expiring, revoked):
        gone = world.client.post(f"{API}?action=consume-session", json={"token": token})
        assert gone.status_code == 410
    assert world.create_session(key_row["key"]).status_code == 401
    m = metrics_of(world.client)
    reason = "dailyplay_sessions_rejected_total"
    assert value(m, reason, operation="consume-session", reason="expired") == 1
    assert value(m, reason, operation="consume-session", reason="revoked") == 1
    assert value(m, "dailyplay_auth_failures_total", kind="api_key_revoked") == 1


def test_labels_stay_bounded_whatever_the_caller_sends(client: AppClient) -> None:
    client.get(f"{API}?action=no-such-thing")
    client.get(f"{API}?action=%3Cscript%3E")
    client.get("/some/path/that/does/not/exist")
    client.request("PUT", API)
    m = metrics_of(client)
    operations = {
        dict(labels)["operation"] for name, labels in m if name == "dailyplay_http_requests_total"
    }
    assert operations == {"other"}
    assert value(m, "dailyplay_http_requests_total", operation="other", status="400") == 2
    assert value(m, "dailyplay_http_requests_total", operation="other", status="404") == 1
    assert value(m, "dailyplay_http_requests_total", operation="other", status="405") == 1


@pytest.mark.usefixtures("fresh_minute")
def test_failed_auth_lockouts_and_client_limits_are_counted(make_settings) -> None:
    settings = make_settings(limits={"failed_auth_per_minute": 2, "public_per_minute": 3})
    with running_app(settings) as client:
        for _ in range(3):
            client.post(
                f"{API}?action=create-session",
                json={"game_id": 1},
                headers={"x-api-key": "dpk_" + "1" * 40},
            )
        for _ in range(4):
            client.get(f"{API}?action=validate-session&token={uuid.uuid4()}")
        m = metrics_of(client)
    assert value(m, "dailyplay_auth_failures_total", kind="api_key_invalid") == 2
    assert value(m, "dailyplay_rate_limited_total", limit="failed_auth") == 1
    assert value(m, "dailyplay_rate_limited_total", limit="client_ip") == 1


def _key_for(settings) -> str:
    org = add_org(settings)
    conn = db.connect(settings.database)
    raw, _row = issue_api_key(conn, org, "metrics", now_ms(), per_minute=10_000, per_day=100_000)
    conn.close()
    return raw


@pytest.mark.slow
def creates_per_worker(directory: Path) -> dict[str, float]:
    """create-session 200s counted by each worker, from its own metric file."""
    counts = {}
    for path in directory.glob("counter_*.db"):
        samples = {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for metric in MultiProcessCollector.merge([str(path)])
            for sample in metric.samples
        }
        counts[path.stem] = value(
            samples, "dailyplay_http_requests_total", operation="create-session", status="200"
        )
    return counts


def test_every_scrape_sums_all_workers_and_the_files_go_with_the_server(
    settings, tmp_path: Path
) -> None:
    """Connections opened together are spread over both workers (each has a listening socket
    of its own), and a scrape answered by either worker counts every request."""
    key = _key_for(settings)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    connections, each = 16, 5
    with serve(settings, tmp_path, workers=2, env={"TMPDIR": str(scratch)}) as server:
        # Opened back to back before any request, as a connection pool or wrk opens them.
        host, port = server.url.removeprefix("http://").split(":")
        sockets = [socket.create_connection((host, int(port))) for _ in range(connections)]
        statuses = []
        for _ in range(each):
            for sock in sockets:
                http = http_client.HTTPConnection(host, int(port))
                http.sock = sock
                body = json.dumps({"game_id": 3})
                http.request(
                    "POST",
                    f"{API}?action=create-session",
                    body,
                    {"x-api-key": key, "content-type": "application/json"},
                )
                response = http.getresponse()
                response.read()
                statuses.append(response.status)
        for sock in sockets:
            sock.close()
        assert statuses == [200] * connections * each
        (directory,) = scratch.glob("dailyplay-metrics-*")
        # A request is counted just after its answer is sent: give the last ones a moment.
        deadline = time.monotonic() + 5
        while sum((per_worker := creates_per_worker(directory)).values()) < connections * each:
            assert time.monotonic() < deadline, per_worker
            time.sleep(0.05)
        assert len(per_worker) == 2 and all(count > 0 for count in per_worker.values()), per_worker
        assert sum(per_worker.values()) == connections * each
        for _ in range(6):
            m = scrape(httpx.get(f"{server.url}/metrics").text)
            assert value(m, "dailyplay_sessions_created_total") == connections * each
            assert (
                value(m, "dailyplay_http_requests_total", operation="create-session", status="200")
                == connections * each
            )
    assert list(scratch.iterdir()) == []


@pytest.mark.slow
def test_metrics_on_a_port_of_their_own(make_settings, tmp_path: Path) -> None:
    port = free_port()
    settings = make_settings(metrics={"port": port})
    with serve(settings, tmp_path) as server:
        httpx.get(f"{server.url}{API}?action=validate-session&token={uuid.uuid4()}")
        assert httpx.get(f"{server.url}/metrics").status_code == 404
        # The worker adds its tallies to the shared files once a second (metrics.FLUSH_SECONDS).
        started = time.monotonic()
        while True:
            own = httpx.get(f"http://127.0.0.1:{port}/metrics")
            assert own.status_code == 200
            m = scrape(own.text)
            labels = {"operation": "validate-session", "status": "404"}
            if value(m, "dailyplay_http_requests_total", **labels) == 1:
                break
            assert time.monotonic() - started < 3, own.text
            time.sleep(0.1)
        assert value(m, "dailyplay_http_requests_total", operation="metrics", status="404") == 1


@pytest.mark.slow
def test_a_taken_metrics_port_stops_serve_with_a_clear_error(make_settings, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = make_settings(metrics={"port": port}).replace("server", port=free_port())
        result = run_cli("serve", "--config", str(write_config(settings, tmp_path / "c.toml")))
    assert result.returncode == 1
    assert f"cannot listen for metrics on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_tallied_observations_flush_to_exactly_what_direct_ones_give() -> None:
    """Metrics tallies on the request path and adds up in flush(); the result must be what
    prometheus-client's own observe() and inc() would have made of the same events."""
    rng = random.Random(7)
    bounds = metrics_module.LATENCY_BUCKETS
    # Every bound exactly, just either side of it, zero, past the last bound, and random ones.
    values = [
        0.0,
        1e9,
        *bounds,
        *(b * (1 + 1e-9) for b in bounds),
        *(b * (1 - 1e-9) for b in bounds),
    ]
    values += [rng.expovariate(50) for _ in range(2000)]
    tallied = metrics_module.Metrics()
    direct_registry = CollectorRegistry()
    direct = Histogram("commit_seconds", "x", registry=direct_registry, buckets=bounds)
    direct_waits = Counter("waits", "x", registry=direct_registry)
    for i, seconds in enumerate(values):
        tallied.observe_commit(seconds, 3, waited=i % 3 == 0)
        direct.observe(seconds)
        if i % 3 == 0:
            direct_waits.inc()

    def samples(metric: Histogram | Counter) -> list[tuple[str, dict[str, str], float]]:
        return [
            (s.name.rsplit("_", 1)[-1], s.labels, s.value)
            for family in metric.collect()
            for s in family.samples
            if not s.name.endswith("_created")
        ]

    assert all(value == 0 for _, _, value in samples(tallied.commit_seconds))  # not yet flushed
    tallied.flush()
    tallied.flush()  # a second flush adds nothing twice
    expected = [(name, labels, pytest.approx(value)) for name, labels, value in samples(direct)]
    assert samples(tallied.commit_seconds) == expected
    assert samples(tallied.busy_retries) == samples(direct_waits)


def test_every_operation_the_api_serves_has_its_own_name_and_no_other_is_named() -> None:
    """Logs and metrics name operations from dailyplay.operations, routing from api.OPERATIONS:
    the two agree, so no served operation is counted as "other" and no label is never used."""
    from dailyplay.api import OPERATIONS
    from dailyplay.operations import ACTIONS, KEY_MANAGEMENT, operation_name

    assert set(OPERATIONS) == {*ACTIONS, None}
    assert {operation_name(m, None) for m in OPERATIONS[None]} == set(KEY_MANAGEMENT.values())
    for action, methods in OPERATIONS.items():
        for method in methods:
            assert operation_name(method, action) != "other", (method, action)
    assert operation_name("GET", "no-such-action") == "other"
    assert operation_name("PUT", None) == "other"
