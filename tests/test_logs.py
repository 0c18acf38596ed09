"""Request ids and the one log line per request: fields, both formats, no secrets."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
from conftest import (
    API,
    AppClient,
    World,
    assert_error,
    run_cli,
    running_app,
    serve,
    stop,
)

from dailyplay.inputs import query_items
from dailyplay.logs import ACCESS_FIELDS, FLUSH_SECONDS, RedactSecretsFilter, _operation


class Lines:
    """The request lines an in-process app wrote to stderr (fd 2, which pytest captures)."""

    def __init__(
        self, capfd: pytest.CaptureFixture[str], client: AppClient, marker: str = "dailyplay.access"
    ):
        self.capfd = capfd
        self.client = client
        self.marker = marker  # what tells a request line from anything else on stderr
        self.text = ""

    @property
    def lines(self) -> list[str]:
        assert self.client.app.request_lines is not None
        self.client.app.request_lines.flush()
        self.text += self.capfd.readouterr().err
        return [line for line in self.text.splitlines() if self.marker in line]


@pytest.fixture
def access_lines_on() -> Iterator[None]:
    """Request lines on, as with the default server.log_level (info)."""
    logger = logging.getLogger("dailyplay.access")
    level = logger.level
    logger.setLevel(logging.INFO)
    yield
    logger.setLevel(level)


@pytest.fixture
def json_lines(world: World, capfd: pytest.CaptureFixture[str], access_lines_on: None) -> Lines:
    capfd.readouterr()
    return Lines(capfd, world.client)


def test_a_good_request_id_is_kept_and_returned(world: World) -> None:
    response = world.client.get("/healthz", headers={"x-request-id": "lb-7f3a.9:x_Y"})
    assert response.headers["x-request-id"] == "lb-7f3a.9:x_Y"


@pytest.mark.parametrize("given", ["", "has space", "x" * 129, "ü-nicode", "a\tb"])
def test_an_unusable_request_id_is_replaced(world: World, given: str) -> None:
    headers = {"x-request-id": given.encode()} if given else {}
    response = world.client.get("/healthz", headers=headers)
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])


def test_generated_request_ids_are_distinct(world: World) -> None:
    ids = {world.client.get("/healthz").headers["x-request-id"] for _ in range(200)}
    assert len(ids) == 200


def test_errors_carry_the_request_id_too(world: World) -> None:
    for response in (world.client.get("/nowhere"), world.client.delete("/healthz")):
        assert response.status_code in (404, 405)
        assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])


def test_each_request_logs_one_line_with_who_and_what(world: World, json_lines: Lines) -> None:
    key_data = world.create_key()
    key = key_data["key"]
    created = world.create_session(key)
    token = created.json()["data"]["token"]
    validated = world.client.get(
        f"{API}?action=validate-session&token={token}", headers={"x-request-id": "req-1"}
    )
    consumed = world.client.post(f"{API}?action=consume-session", json={"token": token})
    bearer = world.bearer()
    listed = world.client.get(f"{API}?org_id={world.org_id}", headers=bearer)
    wrong_key = world.create_session(key[:-4] + "0000")
    assert_error(wrong_key, 401)
    logged = json_lines.lines
    lines = [json.loads(line) for line in logged]
    assert len(lines) == 6
    by_op = {line["operation"]: line for line in lines}
    assert by_op[None]["status"] == 200  # createApiKey and listApiKeys have no action
    create = [line for line in lines if line["operation"] == "create-session"]
    assert create[0] == {
        **create[0],
        "method": "POST",
        "path": "/api/org-api-keys",
        "status": 200,
        "org_id": world.org_id,
        "key_id": key_data["id"],
        "key_prefix": key[:8],
        "client_ip": "198.51.100.7",
        "request_id": created.headers["x-request-id"],
        "level": "info",
        "logger": "dailyplay.access",
    }
    assert create[1]["status"] == 401 and create[1]["key_prefix"] == key[:8]
    assert create[1]["key_id"] is None
    assert isinstance(create[0]["latency_ms"], float)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", create[0]["time"])
    assert by_op["validate-session"]["request_id"] == "req-1" == validated.headers["x-request-id"]
    assert by_op["validate-session"]["org_id"] == world.org_id
    assert by_op["consume-session"]["org_id"] == world.org_id
    assert consumed.status_code == 200
    listing = [line for line in lines if line["method"] == "GET" and line["operation"] is None]
    assert listed.status_code == 200
    assert listing[0]["user_id"] == world.admin and listing[0]["org_id"] == world.org_id
    # Never a raw key, its secret part, a token or a JWT.
    text = "\n".join(logged)
    jwt = bearer["authorization"].split()[1]
    for secret in (key, key[8:], token, jwt, jwt.split(".")[2]):
        assert secret not in text


def test_text_lines_read_well_in_a_terminal(
    make_settings, capfd: pytest.CaptureFixture[str], access_lines_on: None
) -> None:
    with running_app(make_settings(server={"log_format": "text"})) as client:
        capfd.readouterr()
        client.get("/healthz", headers={"x-request-id": "abc"})
        lines = Lines(capfd, client, marker=" INFO    GET ").lines
    assert len(lines) == 1
    assert re.fullmatch(
        r"\S+Z INFO    GET /healthz - 200 [\d.]+ms client_ip=198\.51\.100\.7 request_id=abc",
        lines[0],
    )


def test_request_lines_are_off_below_info(world: World, capfd: pytest.CaptureFixture[str]) -> None:
    """server.log_level = "warning" (the dailyplay.access logger not at info) writes none."""
    logger = logging.getLogger("dailyplay.access")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        capfd.readouterr()
        world.client.get("/healthz")
        assert Lines(capfd, world.client).lines == []
    finally:
        logger.setLevel(level)


def test_serve_rejects_an_unknown_log_format(tmp_path) -> None:
    result = run_cli("serve", "--log-format", "xml", env={"DAILYPLAY_DATABASE_PATH": "x.db"})
    assert result.returncode == 2 and "--log-format" in result.stderr
    bad = run_cli("init-db", env={"DAILYPLAY_SERVER_LOG_FORMAT": "xml"}, cwd=tmp_path)
    assert bad.returncode == 2 and "server.log_format must be json or text" in bad.stderr


@pytest.mark.parametrize(
    "query",
    [
        b"",
        b"action=validate-session&token=0b5c1234-1234-4234-8234-123456789012",
        b"org_id=1",
        b"token=1&action=consume-session&action=x",
        b"action",
        b"action=&x=1",
        b"x=1&action=Bad",
        b"action=a%62c",
        b"act%69on=create-session",
        b"action=create+session",
        b"action=" + b"a" * 41,
        b"&&action=audit-log&",
    ],
)
def test_the_logged_operation_is_the_action_the_api_reads(query: bytes) -> None:
    actions = [
        v for k, v in parse_qsl(query.decode("latin-1"), keep_blank_values=True) if k == "action"
    ]
    expected = None
    if actions:
        expected = actions[0] if re.fullmatch(r"[a-z-]{1,40}", actions[0]) else "(invalid)"
    # Twice: a valid action is remembered after its first match.
    assert _operation(query_items(query)) == expected
    assert _operation(query_items(query)) == expected


def test_secrets_sent_in_the_path_or_request_id_stay_out_of_the_line(
    world: World, json_lines: Lines
) -> None:
    key = world.create_key()["key"]
    token = world.token(key)
    world.client.get(f"/{key}")
    world.client.get(f"/sessions/{token}/x&token={token}")
    world.client.get(f"{API}?action=validate-session&token={token}", headers={"x-request-id": key})
    kept = "550e8400-e29b-41d4-a716-446655440000"
    world.client.get(f"{API}?action=validate-session&token={token}", headers={"x-request-id": kept})
    logged = json_lines.lines
    lines = [json.loads(line) for line in logged[-4:]]
    assert [line["path"] for line in lines[:2]] == [
        f"/{key[:8]}[redacted]",
        "/sessions/[redacted]/x&token=[redacted]",
    ]
    assert lines[2]["request_id"] == f"{key[:8]}[redacted]"
    assert lines[3]["request_id"] == kept  # a UUID request id is the caller's, not a secret
    text = "\n".join(logged)
    assert key[8:] not in text and token not in text


def test_other_loggers_lines_are_redacted_by_the_filter() -> None:
    record = logging.LogRecord(
        "uvicorn.error", logging.WARNING, __file__, 1, "bad request %s",
        ("GET /api?token=0b5c1234-1234-4234-8234-123456789012&k=dpk_" + "a" * 40,), None,
    )  # fmt: skip
    assert RedactSecretsFilter().filter(record)
    assert record.getMessage() == "bad request GET /api?token=[redacted]&k=dpk_aaaa[redacted]"


# --- through `dailyplay serve`: every line written, none torn, none holding up a request ----------


def request_lines(log: str) -> dict[str, dict[str, Any]]:
    """The request lines of a server's log by request id; every line of the log must be a whole
    JSON object (none torn by another worker's write)."""
    found: dict[str, dict[str, Any]] = {}
    for text in log.splitlines():
        if not text.startswith('{"time":'):
            continue  # the command's own announcement on stdout; a torn line fails below
        line = json.loads(text)
        if line.get("logger") == "dailyplay.access":
            assert list(line) == ["time", "level", "logger", *ACCESS_FIELDS], line
            assert line["request_id"] not in found, f"two lines for {line['request_id']}"
            found[line["request_id"]] = line
    return found


def send_tagged(url: str, tag: str, count: int, threads: int = 1) -> set[str]:
    """count requests (validate-session of unknown tokens, and /healthz) from threads, each
    with its own X-Request-ID; returns the ids."""

    def run(worker: int) -> set[str]:
        ids = set()
        with httpx.Client(base_url=url, timeout=10) as client:
            for i in range(count // threads):
                request_id = f"{tag}-{worker}-{i}"
                path = (
                    f"{API}?action=validate-session&token={uuid.uuid4()}" if i % 2 else "/healthz"
                )
                response = client.get(path, headers={"x-request-id": request_id})
                assert response.status_code in (200, 404)
                ids.add(request_id)
        return ids

    with ThreadPoolExecutor(threads) as pool:
        return set().union(*pool.map(run, range(threads)))


@pytest.mark.slow
def test_every_request_gets_one_whole_line_across_workers_and_sigterm_writes_them_all(
    settings, tmp_path: Path
) -> None:
    with serve(settings, tmp_path, workers=2) as server:
        sent = send_tagged(server.url, "burst", 800, threads=8)
        stop(server.process)  # at once: the last lines are still in memory
        log = server.log()
    lines = request_lines(log)
    assert sent <= set(lines), f"{len(sent - set(lines))} requests have no line"
    assert {lines[i]["status"] for i in sent} == {200, 404}
    assert all(lines[i]["client_ip"] == "127.0.0.1" for i in sent)


@pytest.mark.slow
def test_kill_9_loses_no_line_older_than_the_flush_interval(settings, tmp_path: Path) -> None:
    with serve(settings, tmp_path) as server:
        sent = send_tagged(server.url, "before-kill", 200)
        time.sleep(5 * FLUSH_SECONDS)
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=10)
        log = server.log()
    assert sent <= set(request_lines(log))


@pytest.mark.slow
def test_a_stderr_nobody_reads_does_not_hold_up_requests(settings, tmp_path: Path) -> None:
    """stderr is a pipe that nobody reads: once it and the in-memory bound are full, requests
    are still answered at once, the dropped lines are counted in the metrics, and reported
    once stderr takes lines again."""
    drained: list[bytes] = []
    with serve(settings, tmp_path, stderr_pipe=True) as server:
        stderr = server.process.stderr
        assert stderr is not None
        # Long paths make long lines: the 64 KiB pipe and the 1 MiB bound fill in ~140 requests.
        slowest = 0.0
        with httpx.Client(base_url=server.url, timeout=10) as client:
            for i in range(400):
                started = time.monotonic()
                assert client.get(f"/{i}-{'x' * 8000}").status_code == 404
                slowest = max(slowest, time.monotonic() - started)
            time.sleep(2 * FLUSH_SECONDS + 1)  # the metrics' own flush interval is 1 s
            metrics = client.get("/metrics").text
        assert slowest < 0.5, slowest
        dropped = re.search(r"^dailyplay_log_lines_dropped_total (\S+)$", metrics, re.M)
        assert dropped and float(dropped.group(1)) > 100, metrics[-2000:]

        reader = threading.Thread(target=lambda: drained.extend(iter(stderr.readline, b"")))
        reader.start()
        deadline = time.monotonic() + 10
        while not any(b"request lines were dropped" in line for line in drained):
            assert time.monotonic() < deadline, b"".join(drained)[-2000:]
            time.sleep(0.1)
        time.sleep(1.2)
        after = httpx.get(f"{server.url}/metrics", timeout=10).text
        stop(server.process)
        reader.join(timeout=10)  # stderr reached its end: the reader is done with it
    warning = next(json.loads(line) for line in drained if b"were dropped" in line)
    assert warning["level"] == "warning" and warning["logger"] == "dailyplay.access"
    # every drop counted, the scrape's own line included; none since stderr drains again
    total = re.search(r"^dailyplay_log_lines_dropped_total (\S+)$", after, re.M)
    assert total and int(warning["message"].split()[0]) == int(float(total.group(1)))
