"""Every HTTP answer is the same on both engines: one script of requests (successes, refusals
and errors of every operation) against the app on SQLite and on PostgreSQL; status, headers
and body must be equal but for what is generated (tokens, keys, times, request ids)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from conftest import API, SigningKey, add_org, claims_for, running_app

from dailyplay import config

pytestmark = pytest.mark.postgres

# What differs from run to run by design, replaced before comparing.
GENERATED = [
    (re.compile(r"dpk_[A-Za-z0-9_-]{20,}"), "<key>"),
    (re.compile(r"dpk_[0-9a-f]{4}"), "<prefix>"),
    (re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"), "<uuid>"),
    (re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z"), "<time>"),
    (re.compile(r"[0-9a-f]{32}"), "<request id>"),
]
# Headers that carry a time or a length of generated text.
VARYING_HEADERS = {"date", "x-request-id", "content-length", "x-ratelimit-reset", "retry-after"}


def _normalized(text: str) -> str:
    for pattern, placeholder in GENERATED:
        text = pattern.sub(placeholder, text)
    return text


def _script(settings: config.Settings, signing: SigningKey) -> list[tuple[str, int, Any, str]]:
    """The answers to one fixed series of requests: (what, status, headers, normalized body)."""
    org = add_org(settings, external_id="org_alike", members={"admin": "admin", "m": "member"})
    other = add_org(settings, "Other", tier="free", members={"admin": "admin"})
    admin = {"authorization": f"Bearer {signing.sign(claims_for('admin'))}"}
    member = {"authorization": f"Bearer {signing.sign(claims_for('m'))}"}
    answers = []
    with running_app(settings) as client:

        def call(what: str, method: str, url: str, **kwargs: Any) -> Any:
            response = client.request(method, url, **kwargs)
            headers = {
                k: v for k, v in sorted(response.headers.items()) if k not in VARYING_HEADERS
            }
            answers.append((what, response.status_code, headers, _normalized(response.text)))
            return response

        call("list, empty", "GET", f"{API}?org_id={org}", headers=admin)
        key = call(
            "create key", "POST", API, headers=admin,
            json={"org_id": org, "name": "CRM", "allowed_game_ids": [1, 2],
                  "rate_limit_per_minute": 4, "description": "shop"},
        ).json()["data"]  # fmt: skip
        call("create key, bad", "POST", API, headers=admin, json={"org_id": org, "name": ""})
        call("create key, member", "POST", API, headers=member, json={"org_id": org, "name": "x"})
        call(
            "create key, free org", "POST", API, headers=admin, json={"org_id": other, "name": "x"}
        )
        call("list", "GET", f"{API}?org_id={org}", headers=admin)
        with_key = {"x-api-key": key["key"]}
        created = call(
            "create session", "POST", f"{API}?action=create-session", headers=with_key,
            json={"game_id": 1, "external_ref": "order-1", "metadata": {"b": [1, 2], "a": "x"}},
        ).json()["data"]  # fmt: skip
        token = created["token"]
        keyed = {**with_key, "idempotency-key": "order-2"}
        for what, body in (
            ("create session, keyed", {"game_id": 2, "external_ref": "order-2"}),
            ("create session, keyed again: replayed", {"external_ref": "order-2", "game_id": 2}),
            ("create session, key reused", {"game_id": 1, "external_ref": "order-2"}),
        ):
            call(what, "POST", f"{API}?action=create-session", headers=keyed, json=body)
        call(
            "create session, game refused", "POST", f"{API}?action=create-session",
            headers=with_key, json={"game_id": 3},
        )  # fmt: skip
        call(
            "create session, bad body", "POST", f"{API}?action=create-session",
            headers=with_key, json={"game_id": "x"},
        )  # fmt: skip
        call(
            "create session, limited", "POST", f"{API}?action=create-session",
            headers=with_key, json={"game_id": 2},
        )  # fmt: skip
        call(
            "create session, over the minute's limit", "POST", f"{API}?action=create-session",
            headers=with_key, json={"game_id": 2},
        )  # fmt: skip
        call("validate", "GET", f"{API}?action=validate-session&token={token}")
        call("validate, unknown", "GET", f"{API}?action=validate-session&token={'0' * 32}")
        call(
            "consume", "POST", f"{API}?action=consume-session",
            json={"token": token, "player_uuid": "11111111-2222-4333-8444-555555555555"},
        )  # fmt: skip
        call("consume again", "POST", f"{API}?action=consume-session", json={"token": token})
        call("validate consumed", "GET", f"{API}?action=validate-session&token={token}")
        call(
            "update key", "PATCH", API, headers=admin,
            json={"id": key["id"], "org_id": org, "is_active": False, "allowed_stream_ids": [9]},
        )  # fmt: skip
        call(
            "create session, revoked key", "POST", f"{API}?action=create-session",
            headers=with_key, json={"game_id": 1},
        )  # fmt: skip
        call("update key, missing", "PATCH", API, headers=admin, json={"id": 999, "org_id": org})
        call("delete key", "DELETE", f"{API}?id={key['id']}&org_id={org}", headers=admin)
        call("delete key again", "DELETE", f"{API}?id={key['id']}&org_id={org}", headers=admin)
        call("audit", "GET", f"{API}?action=audit-log&org_id={org}", headers=admin)
        call("audit, member", "GET", f"{API}?action=audit-log&org_id={org}", headers=member)
        call("readyz", "GET", "/readyz")
    return answers


def test_every_answer_is_the_same_on_sqlite_and_postgresql(
    make_settings, rsa_key: SigningKey, tmp_path, postgres_url: str, fresh_minute: None
) -> None:
    lite = make_settings(database={"url": "", "path": str(tmp_path / "alike.db")})
    pg = make_settings(database={"url": postgres_url})
    on_sqlite, on_postgresql = _script(lite, rsa_key), _script(pg, rsa_key)
    assert len(on_sqlite) == len(on_postgresql)
    for mine, theirs in zip(on_sqlite, on_postgresql, strict=True):
        assert mine == theirs, f"{mine[0]}:\n  SQLite:     {mine[1:]}\n  PostgreSQL: {theirs[1:]}"
    statuses = {what: status for what, status, _, _ in on_sqlite}
    # The script went through every kind of answer, not only successes.
    assert {200, 400, 401, 403, 404, 410, 422, 429} <= set(statuses.values()), statuses
    assert statuses["create session, keyed again: replayed"] == 200
