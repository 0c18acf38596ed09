"""The docs describe the product as it is: every setting, command, link and example they show is
one the program has, and the examples run."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import (
    API,
    Server,
    free_port,
    require,
    run_cli,
    running_demo,
    stop,
    wait_until_serving,
)

from dailyplay import cli, config

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SECTIONS = {section for section, _key, _default, _help in config.settings_table()}
# Named in the docs on purpose although they are no setting.
OTHER_VARIABLES = {
    "DAILYPLAY_CONFIG",  # the config file
    "DAILYPLAY_SERVR_PORT",  # the example of a misspelt variable that start-up warns about
}


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def code_blocks(path: Path, language: str = "sh", text: str | None = None) -> list[str]:
    """The code blocks of a doc (or of a part of it, text) in that language."""
    text = read(path) if text is None else text
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.M | re.S)


def section(path: Path, heading: str) -> str:
    """The text under a heading, up to the next heading of the same or a higher level."""
    text = read(path)
    level = heading.split(" ")[0]
    start = text.index(f"\n{heading}\n") + len(heading) + 2
    ends = [m.start() for m in re.finditer(rf"^#{{1,{len(level)}}} ", text[start:], flags=re.M)]
    return text[start : start + ends[0]] if ends else text[start:]


def commands(block: str) -> list[list[str]]:
    """The simple commands of a shell block: continuation lines joined, comments dropped,
    split at `&&`, `;` and `|`, a `$(...)` taken as one word."""
    found = []
    for line in block.replace("\\\n", " ").splitlines():
        try:
            words = shlex.split(re.sub(r"\$\([^)]*\)", "X", line), comments=True)
        except ValueError:  # quoting this splitter does not follow (nested $(...)), not ours
            if re.match(r"\s*\S*dailyplay ", line):
                raise
            continue
        current: list[str] = []
        for word in [*words, "&&"]:
            if word in ("&&", ";", "|", "||"):
                if current:
                    found.append(current)
                current = []
            else:
                current.append(word)
    return found


def shell_env(**extra: str) -> dict[str, str]:
    """This environment without DAILYPLAY_* settings, this Python's commands (`dailyplay`)
    first on PATH, plus extra: what a user who installed it and pastes the docs has."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("DAILYPLAY_")},
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        **extra,
    }


def shell(
    script: str, env: dict[str, str], cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """script run by bash as a pasted example is: stopping at the first failing command."""
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def command_parser(words: list[str]) -> tuple[argparse.ArgumentParser, list[str], str]:
    """The (sub)parser that the leading words of a `dailyplay` command select, and the rest."""
    parser, rest, name = cli.build_parser(), list(words), "dailyplay"
    while rest and rest[0] in subcommands(parser):
        name += f" {rest[0]}"
        parser = subcommands(parser)[rest.pop(0)]
    return parser, rest, name


def test_the_configuration_reference_lists_every_setting_with_its_default_and_variable() -> None:
    """docs/configuration.md's table is the settings' declarations, in their order."""

    def literal(value: Any) -> str:
        return json.dumps(value, separators=(", ", ": "))

    rows = re.findall(
        r"^\| `([a-z_.]+)` \| `([A-Z_]+)` \| `([^`]*)` \| (.+) \|$",
        section(ROOT / "docs" / "configuration.md", "## Every setting"),
        flags=re.M,
    )
    documented = [(name, variable, default) for name, variable, default, _meaning in rows]
    expected = [
        (f"{s}.{k}", f"DAILYPLAY_{s.upper()}_{k.upper()}", literal(default))
        for s, k, default, _help in config.settings_table()
    ]
    assert documented == expected
    assert all(meaning.strip() for *_, meaning in rows)


def test_every_setting_and_variable_the_docs_name_exists() -> None:
    names = {f"{s}.{k}" for s, k, _default, _help in config.settings_table()}
    variables = set(config.setting_variables()) | OTHER_VARIABLES
    for path in DOCS:
        text = read(path)
        for name in re.findall(rf"`((?:{'|'.join(SECTIONS)})\.[a-z_]+)", text):
            assert name in names, f"{path.name} names {name}, which is no setting"
        for variable in re.findall(r"\bDAILYPLAY_[A-Z][A-Z0-9_]*", text):
            if not variable.startswith("DAILYPLAY_TEST_"):
                assert variable in variables, f"{path.name} names {variable}, which is no setting"


def test_every_dailyplay_command_in_the_docs_examples_parses() -> None:
    """Each `dailyplay ...` line of a shell example is a command line the CLI accepts."""
    checked = 0
    for path in DOCS:
        for block in code_blocks(path):
            for words in commands(block):
                if Path(words[0]).name != "dailyplay":
                    continue
                try:
                    cli.build_parser().parse_args(words[1:])
                except SystemExit as exc:
                    pytest.fail(f"{path.name}: `{shlex.join(words)}` is refused ({exc})")
                checked += 1
    assert checked >= 10


def test_every_command_and_flag_in_the_docs_prose_and_tables_exists() -> None:
    """Inline `dailyplay ...` mentions (with placeholders such as ID) name real subcommands and
    flags; the command reference in docs/operations.md lists every subcommand."""
    listed = set()
    for path in DOCS:
        for span in re.findall(r"`(dailyplay [^`]+)`", read(path)):
            words = re.sub(r"[\[\]|]", " ", span).split()
            parser, rest, name = command_parser(words[1:])
            assert name != "dailyplay", f"{path.name}: `{span}` names no command"
            known = {o for action in parser._actions for o in action.option_strings}
            for flag in (w.split("=")[0] for w in rest if w.startswith("--")):
                assert flag in known, f"{path.name}: `{span}`: {name} has no {flag}"
            if path.name == "operations.md":
                listed.add(name)
    parser = cli.build_parser()
    every = set()
    for command, sub in subcommands(parser).items():
        nested = subcommands(sub)
        every |= (
            {f"dailyplay {command} {n}" for n in nested} if nested else {f"dailyplay {command}"}
        )
    assert every <= listed, f"not in docs/operations.md: {sorted(every - listed)}"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_links_between_the_docs_resolve() -> None:
    for path in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", read(path)):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            assert linked.exists(), f"{path.name} links to {target}, which does not exist"
            if anchor:
                headings = re.findall(r"^#+ (.+)$", read(linked), flags=re.M)
                assert anchor in {slug(h) for h in headings}, f"{path.name}: no #{anchor}"


def test_what_the_code_points_at_in_the_docs_exists() -> None:
    """A comment or docstring that sends the reader to a doc (and a section of it) names one
    that exists."""
    sources = [*sorted((ROOT / "dailyplay").rglob("*.py")), *sorted((ROOT / "bench").glob("*.py"))]
    sources += [ROOT / "pyproject.toml", *sorted((ROOT / "tests").glob("*.py"))]
    pointers = 0
    for source in sources:
        for doc, heading in re.findall(r'(docs/[a-z]+\.md)(?:, "([^"]+)")?', read(source)):
            assert (ROOT / doc).exists(), f"{source.name} points at {doc}"
            if heading:
                headings = re.findall(r"^#+ (.+)$", read(ROOT / doc), flags=re.M)
                assert heading in headings, f'{source.name} points at {doc}, "{heading}"'
            pointers += 1
    assert pointers >= 3


def test_the_readme_is_a_front_door_to_the_reference() -> None:
    readme = read(ROOT / "README.md")
    assert len(readme.encode()) <= 15 * 1024
    for path in DOCS[1:]:
        assert f"(docs/{path.name})" in readme, f"README.md does not link docs/{path.name}"


def test_the_docs_speak_of_the_product_not_of_periods_of_work() -> None:
    ordinal = r"(first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|"
    ordinal += r"twelfth|thirteenth|fourteenth|fifteenth|\d+(st|nd|rd|th))"
    for path in [*DOCS, *sorted((ROOT / "dailyplay").rglob("*.py"))]:
        text = read(path)
        found = re.search(rf"\b{ordinal} session\b", text, flags=re.I)
        assert not found, f"{path.name}: {found.group(0)!r}"
    performance = read(ROOT / "docs" / "performance.md")
    assert 150 <= performance.count("\n") <= 260


@pytest.mark.slow
def test_running_it_for_real_works_as_the_readme_writes_it(tmp_path: Path) -> None:
    """The README's lines, run as written in a fresh directory with this repository's
    config.toml (only the port moved to a free one): the database is made, the organization
    and admin exist, `dailyplay serve` with 2 workers answers, and the key command works."""
    readme = ROOT / "README.md"
    [block] = code_blocks(readme, text=section(readme, "## Running it for real"))
    assert "dailyplay serve" in block
    shutil.copy(ROOT / "config.toml", tmp_path / "config.toml")
    port = free_port()
    env = shell_env(DAILYPLAY_SERVER_PORT=str(port))
    lines = [line for line in block.splitlines() if not line.startswith("pip install")]
    serve_line = lines.pop()
    assert serve_line.startswith("dailyplay serve")
    ran = shell("\n".join(lines), env, tmp_path, timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert (tmp_path / "dailyplay.db").exists()
    with (tmp_path / "serve.log").open("wb") as log:
        server = subprocess.Popen(
            ["bash", "-c", f"exec {serve_line}"],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until_serving(Server(server, f"http://127.0.0.1:{port}", tmp_path / "serve.log"))
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
        assert ready.status_code == 200, ready.text
        made = shell('dailyplay key create --org 1 --name "Shop"', env, tmp_path)
        assert made.returncode == 0, made.stderr
        key = json.loads(made.stdout)["key"]
        created = httpx.post(
            f"http://127.0.0.1:{port}{API}?action=create-session",
            json={"game_id": 42},
            headers={"x-api-key": key},
        )
        assert created.status_code == 200, created.text
    finally:
        stop(server)
    members = shell("dailyplay member list --org 1", env, tmp_path)
    assert members.returncode == 0, members.stderr
    assert "user_2xyz" in members.stdout


@pytest.mark.slow
def test_the_curl_examples_work_against_a_demo(tmp_path: Path) -> None:
    """Every shell example that calls the API (the README's tour, docs/api.md, docs/operations.md)
    runs as written against `dailyplay demo`, with the variables the docs name, and every answer
    it prints is a success."""
    require("curl", shutil.which("curl") is not None, "apt-get install curl (.ci/run does)")
    with running_demo(tmp_path, game=False) as (_process, info):
        env = shell_env(**info["env"], DAILYPLAY_CONFIG=str(tmp_path / "demo" / "config.toml"))
        admin = {"authorization": f"Bearer {info['env']['DP_JWT']}"}
        ran = 0
        for path in (ROOT / "README.md", ROOT / "docs" / "api.md", ROOT / "docs" / "operations.md"):
            for block in code_blocks(path):
                if "curl " not in block:
                    continue
                token = httpx.post(
                    f"{info['url']}{API}?action=create-session",
                    json={"game_id": 42},
                    headers={"x-api-key": info["api_key"]},
                ).json()["data"]["token"]
                key_id = httpx.post(
                    f"{info['url']}{API}", json={"org_id": 1, "name": "docs"}, headers=admin
                ).json()["data"]["id"]
                # Each answer on a line of its own, as a terminal shows them one after another.
                newline_after_curl = 'curl() { command curl "$@"; echo; }\n'
                result = shell(
                    newline_after_curl + block, {**env, "TOKEN": token, "KEY_ID": str(key_id)}
                )
                assert result.returncode == 0, (path.name, block, result.stderr)
                answers = [
                    json.loads(line)
                    for line in result.stdout.splitlines()
                    if line.startswith('{"success"')
                ]
                calls = len(re.findall(r"^\s*(?:\w+=\$\()?curl ", block, flags=re.M))
                assert len(answers) >= calls - block.count("TOKEN=$(curl"), (
                    path.name,
                    result.stdout,
                )
                assert all(a["success"] for a in answers), (path.name, block, result.stdout)
                ran += 1
        assert ran >= 5


def test_a_database_newer_than_the_program_is_refused_as_the_upgrade_notes_say(
    tmp_path: Path,
) -> None:
    env = {"DAILYPLAY_DATABASE_PATH": str(tmp_path / "new.db")}
    assert run_cli("init-db", env=env).returncode == 0
    conn = sqlite3.connect(tmp_path / "new.db")
    conn.execute("PRAGMA user_version = 999")
    conn.close()
    refused = run_cli("init-db", env=env)
    assert refused.returncode != 0
    assert "newer than this dailyplay" in refused.stderr
    assert "newer than this dailyplay" in read(ROOT / "docs" / "operations.md")
    served = run_cli("serve", "--port", str(free_port()), env=env)
    assert served.returncode != 0 and "newer than this dailyplay" in served.stderr


def test_every_test_the_docs_cite_exists() -> None:
    """docs/reliability.md backs each guarantee with named tests: each of them is a test."""
    cited = 0
    for path in DOCS:
        for file, name in re.findall(r"(test_[a-z_]+\.py)::(test_\w+)", read(path)):
            source = ROOT / "tests" / file
            assert source.exists(), f"{path.name} cites {file}"
            assert re.search(rf"^(async )?def {name}\(", read(source), flags=re.M), (
                f"{path.name} cites {file}::{name}, which does not exist"
            )
            cited += 1
    assert cited >= 20
