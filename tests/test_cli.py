"""The CLI as an operator runs it: JSON on stdout, clear errors and non-zero exits."""

from __future__ import annotations

import argparse
import getpass
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import API, cli_json, run_cli, running_app, sql

from dailyplay.cli import build_parser
from dailyplay.storage import sqlite as db


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {"DAILYPLAY_DATABASE_PATH": str(tmp_path / "cli.db")}


def test_init_db_creates_a_wal_database(env: dict[str, str], tmp_path: Path) -> None:
    data = cli_json("init-db", env=env)
    assert data["schema_version"] == db.SCHEMA_VERSION and data["journal_mode"] == "wal"
    assert Path(data["database"]) == tmp_path / "cli.db"
    assert cli_json("init-db", env=env)["schema_version"] == db.SCHEMA_VERSION  # again


def test_org_and_member_lifecycle(env: dict[str, str]) -> None:
    org = cli_json(
        "org", "create", "--name", "Acme", "--tier", "business", "--external-id", "org_1", env=env
    )
    assert org["name"] == "Acme" and org["tier"] == "business" and org["external_id"] == "org_1"
    free = cli_json("org", "create", "--name", "Free Co", env=env)
    assert free["tier"] == "free"
    assert [o["id"] for o in cli_json("org", "list", env=env)] == [org["id"], free["id"]]
    assert (
        cli_json("org", "set-tier", "--org", str(free["id"]), "--tier", "business", env=env)["tier"]
        == "business"
    )
    member = cli_json(
        "member", "add", "--org", str(org["id"]), "--user", "user_1", "--role", "admin", env=env
    )
    assert member["role"] == "admin"
    assert (
        cli_json("member", "add", "--org", str(org["id"]), "--user", "user_1", env=env)["role"]
        == "member"
    )
    assert [m["user_id"] for m in cli_json("member", "list", "--org", str(org["id"]), env=env)] == [
        "user_1"
    ]
    assert (
        cli_json("member", "remove", "--org", str(org["id"]), "--user", "user_1", env=env)[
            "removed"
        ]
        is True
    )
    assert cli_json("member", "list", "--org", str(org["id"]), env=env) == []


def test_config_flag_is_accepted_everywhere(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[database]\npath = "{tmp_path / "flag.db"}"\n')
    cli_json("--config", str(cfg), "org", "create", "--name", "A")
    assert len(cli_json("org", "list", "--config", str(cfg))) == 1
    assert (tmp_path / "flag.db").exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["org", "set-tier", "--org", "99", "--tier", "free"], "organization 99 not found"),
        (["member", "add", "--org", "99", "--user", "u"], "organization 99 not found"),
        (["member", "remove", "--org", "1", "--user", "ghost"], "not a member"),
        (["org", "create", "--name", ""], "name"),
        (["org", "create", "--name", "x", "--tier", "gold"], "tier"),
        (["member", "add", "--org", "abc", "--user", "u"], "--org"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_errors_exit_non_zero_with_a_message(
    env: dict[str, str], args: list[str], fragment: str
) -> None:
    cli_json("org", "create", "--name", "Acme", env=env)
    result = run_cli(*args, env=env)
    assert result.returncode != 0
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr


def test_duplicate_external_id(env: dict[str, str]) -> None:
    cli_json("org", "create", "--name", "A", "--external-id", "org_x", env=env)
    result = run_cli("org", "create", "--name", "B", "--external-id", "org_x", env=env)
    assert result.returncode == 1 and "already exists" in result.stderr


def test_bad_config_is_reported(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[server]\nport = 70000\n")
    result = run_cli("--config", str(cfg), "org", "list")
    assert result.returncode == 2 and "server.port" in result.stderr
    result = run_cli(
        "org", "list", env={"DAILYPLAY_DATABASE_PATH": str(tmp_path / "no" / "dir.db")}
    )
    assert result.returncode == 1 and "does not exist" in result.stderr


def test_python_dash_m_and_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("dailyplay ")


def test_output_is_json(env: dict[str, str]) -> None:
    result = run_cli("org", "list", env=env)
    assert json.loads(result.stdout) == []


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[Any]:
    """(command path, its parser, its one-line summary) for every subcommand, nested ones too."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            summaries = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield (*path, name), sub, summaries.get(name)
                yield from _commands(sub, (*path, name))


def test_every_command_and_flag_says_what_it_is_for_and_its_default(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "300")  # no line breaks inside a default
    found = list(_commands(build_parser()))
    assert len(found) >= 15
    for path, sub, summary in found:
        assert summary and sub.description == summary, path
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            assert action.help, (path, action.dest)
        text = sub.format_help()
        for action in sub._actions:
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert f"(default: {action.default})" in " ".join(text.split()), (path, action)


def test_help_through_the_command_shows_defaults() -> None:
    result = run_cli("demo", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "start a ready-to-try instance with a key and a token" in text
    assert "port of the API (default: 8787)" in text
    assert "address the API listens on (default: 127.0.0.1)" in text


# --- API keys without Clerk ---------------------------------------------------------------------


def test_key_lifecycle_through_the_cli_works_against_the_api(
    env: dict[str, str], make_settings, tmp_path: Path
) -> None:
    org = str(cli_json("org", "create", "--name", "Shop", "--tier", "business", env=env)["id"])
    created = cli_json(
        "key", "create", "--org", org, "--name", "Checkout", "--game", "42", "--game", "7",
        "--per-minute", "5", "--expires", "2099-01-01T00:00:00Z", env=env,
    )  # fmt: skip
    raw = created["key"]
    assert raw.startswith("dpk_") and created["key_prefix"] == raw[:8]
    assert created["allowed_game_ids"] == [7, 42] and created["allowed_stream_ids"] is None
    assert created["rate_limit_per_minute"] == 5 and created["rate_limit_per_day"] == 10000
    assert created["expires_at"] == "2099-01-01T00:00:00.000Z" and created["is_active"] is True
    settings = make_settings(database={"path": env["DAILYPLAY_DATABASE_PATH"]})
    stored = sql(settings, "SELECT key_hash FROM api_keys")[0][0]
    assert stored.startswith("$argon2id$") and raw not in stored

    listed = cli_json("key", "list", "--org", org, env=env)
    assert [k["id"] for k in listed] == [created["id"]]
    assert "key" not in listed[0] and "key_hash" not in listed[0]

    with running_app(settings) as client:
        headers = {"x-api-key": raw}
        made = client.post(f"{API}?action=create-session", json={"game_id": 42}, headers=headers)
        assert made.status_code == 200, made.text
        other = client.post(f"{API}?action=create-session", json={"game_id": 43}, headers=headers)
        assert other.status_code == 403
        token = made.json()["data"]["token"]

        revoked = cli_json("key", "revoke", "--org", org, "--id", str(created["id"]), env=env)
        assert revoked["is_active"] is False and revoked["revoked_sessions"] == 1
        status = client.get(f"{API}?action=validate-session&token={token}").json()["data"]
        assert status["status"] == "revoked"
        assert (
            client.post(
                f"{API}?action=create-session", json={"game_id": 42}, headers=headers
            ).status_code
            == 401
        )

    deleted = cli_json("key", "delete", "--org", org, "--id", str(created["id"]), env=env)
    assert deleted == {"id": created["id"], "deleted": True, "revoked_sessions": 0}
    assert cli_json("key", "list", "--org", org, env=env) == []
    trail = [e for e in cli_json("audit", "--org", org, env=env) if e["api_key_id"]]
    assert [e["action"] for e in trail] == ["api_key.delete", "api_key.revoke", "api_key.create"]
    assert all(e["actor"] == f"cli:{getpass.getuser()}" for e in trail)
    assert trail[1]["changes"] == {"is_active": {"from": True, "to": False}}


@pytest.mark.parametrize(
    ("args", "status", "fragment"),
    [
        (["--name", " "], 2, "'name'"),
        (["--name", "x", "--per-minute", "0"], 2, "rate_limit_per_minute"),
        (["--name", "x", "--per-day", "-3"], 2, "rate_limit_per_day"),
        (["--name", "x", "--game", "0"], 2, "allowed_game_ids"),
        (["--name", "x", "--expires", "2001-01-01T00:00:00Z"], 2, "must be in the future"),
        (["--name", "x", "--expires", "tomorrow"], 2, "RFC 3339"),
        (["--name", "x", "--description", "d" * 1001], 2, "description"),
    ],
)
def test_key_create_refuses_bad_input_and_stores_nothing(
    env: dict[str, str], make_settings, args: list[str], status: int, fragment: str
) -> None:
    org = str(cli_json("org", "create", "--name", "Shop", "--tier", "business", env=env)["id"])
    result = run_cli("key", "create", "--org", org, *args, env=env)
    assert result.returncode == status, result.stderr
    assert fragment in result.stderr and result.stdout == ""
    settings = make_settings(database={"path": env["DAILYPLAY_DATABASE_PATH"]})
    assert sql(settings, "SELECT count(*) FROM api_keys") == [(0,)]
    assert sql(settings, "SELECT count(*) FROM audit_log WHERE action LIKE 'api_key.%'") == [(0,)]


def test_key_commands_name_what_is_missing(env: dict[str, str]) -> None:
    free = str(cli_json("org", "create", "--name", "Free Co", env=env)["id"])
    result = run_cli("key", "create", "--org", free, "--name", "x", env=env)
    assert result.returncode == 1 and "not on the Business tier" in result.stderr
    assert "set-tier" in result.stderr
    for command in (["create", "--name", "x"], ["list"]):
        missing = run_cli("key", *command, "--org", "99", env=env)
        assert missing.returncode == 1 and "organization 99 not found" in missing.stderr
    for command in ("revoke", "delete"):
        missing = run_cli("key", command, "--org", free, "--id", "5", env=env)
        assert missing.returncode == 1
        assert f"API key 5 not found in organization {free}" in missing.stderr
