"""The CLI as an operator runs it: JSON on stdout, clear errors and non-zero exits."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import cli_json, run_cli

from dailyplay import db
from dailyplay.cli import build_parser


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
