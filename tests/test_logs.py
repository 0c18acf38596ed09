"""Request ids and the one log line per request: fields, both formats, no secrets."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from urllib.parse import parse_qsl

import pytest
from conftest import API, World, assert_error, run_cli

from dailyplay.inputs import query_items
from dailyplay.logs import JsonFormatter, RedactSecretsFilter, TextFormatter, _operation


class Lines(logging.Handler):
    def __init__(self, formatter: logging.Formatter):
        super().__init__(logging.INFO)
        self.setFormatter(formatter)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def json_lines() -> Iterator[Lines]:
    logger = logging.getLogger("dailyplay.access")
    handler = Lines(JsonFormatter())
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


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
    lines = [json.loads(line) for line in json_lines.lines]
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
    text = "\n".join(json_lines.lines)
    jwt = bearer["authorization"].split()[1]
    for secret in (key, key[8:], token, jwt, jwt.split(".")[2]):
        assert secret not in text


def test_text_lines_read_well_in_a_terminal(world: World) -> None:
    logger = logging.getLogger("dailyplay.access")
    handler = Lines(TextFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        world.client.get("/healthz", headers={"x-request-id": "abc"})
    finally:
        logger.removeHandler(handler)
    assert re.fullmatch(
        r"\S+Z INFO    GET /healthz - 200 [\d.]+ms client_ip=198\.51\.100\.7 request_id=abc",
        handler.lines[0],
    )


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
    lines = [json.loads(line) for line in json_lines.lines[-4:]]
    assert [line["path"] for line in lines[:2]] == [
        f"/{key[:8]}[redacted]",
        "/sessions/[redacted]/x&token=[redacted]",
    ]
    assert lines[2]["request_id"] == f"{key[:8]}[redacted]"
    assert lines[3]["request_id"] == kept  # a UUID request id is the caller's, not a secret
    text = "\n".join(json_lines.lines)
    assert key[8:] not in text and token not in text


def test_other_loggers_lines_are_redacted_by_the_filter() -> None:
    record = logging.LogRecord(
        "uvicorn.error", logging.WARNING, __file__, 1, "bad request %s",
        ("GET /api?token=0b5c1234-1234-4234-8234-123456789012&k=dpk_" + "a" * 40,), None,
    )  # fmt: skip
    assert RedactSecretsFilter().filter(record)
    assert record.getMessage() == "bad request GET /api?token=[redacted]&k=dpk_aaaa[redacted]"
