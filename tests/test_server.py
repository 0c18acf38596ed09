"""End to end through a real `dailyplay serve` process, as users run it."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jwt
import pytest
from conftest import (
    API,
    SigningKey,
    add_org,
    claims_for,
    free_port,
    require,
    run_cli,
    running_demo,
    serve,
    sql,
    write_config,
)

from dailyplay.storage import sqlite as db

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def _consume_all(url: str, tokens: list[str], start_at: float, threads: int, queue) -> None:
    """One OS process: `threads` threads, each consuming every token in its own random order."""
    time.sleep(max(0.0, start_at - time.time()))

    def consume_every_token(seed: int) -> list[tuple[str, int, str]]:
        # Two orders only, so that several clients reach each token at the same moment.
        order = list(tokens)
        random.Random(seed % 2).shuffle(order)
        with httpx.Client(timeout=30) as client:
            results = []
            for token in order:
                response = client.post(f"{url}{API}?action=consume-session", json={"token": token})
                results.append((token, response.status_code, response.text))
            return results

    with ThreadPoolExecutor(threads) as pool:
        seeds = list(range(threads))
        queue.put([row for rows in pool.map(consume_every_token, seeds) for row in rows])


def race_to_consume(
    urls: list[str], tokens: list[str], processes: int, threads: int, timeout: float = 120
) -> list[tuple[str, int, str]]:
    """`processes` spawned OS processes (taking the urls in turn) of `threads` clients each,
    all starting at one instant, each client consuming every token; every answer (each
    process's within timeout seconds)."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    start_at = time.time() + 2.0
    procs = [
        ctx.Process(
            target=_consume_all, args=(urls[n % len(urls)], tokens, start_at, threads, queue)
        )
        for n in range(processes)
    ]
    for proc in procs:
        proc.start()
    results = [row for _ in procs for row in queue.get(timeout=timeout)]
    for proc in procs:
        proc.join(timeout=30)
    return results


def assert_each_consumed_once(results: list[tuple[str, int, str]], tokens: list[str]) -> None:
    """Of every client's attempts, exactly one 200 per token and 410 for all the others."""
    wins = Counter(token for token, status, _ in results if status == 200)
    statuses = Counter(status for _, status, _ in results)
    assert set(statuses) <= {200, 410}, [r for r in results if r[1] not in (200, 410)][:3]
    assert all(wins[token] == 1 for token in tokens), "a token was consumed twice or never"
    assert statuses[200] == len(tokens)


@pytest.fixture
def admin_headers(settings, rsa_key: SigningKey) -> tuple[int, dict[str, str]]:
    org = add_org(settings, members={"admin": "admin"})
    return org, {"authorization": f"Bearer {rsa_key.sign(claims_for('admin', lifetime=600))}"}


def json_lines(log: str) -> list[dict]:
    """A server's JSON log lines (not the indented "listening" banner, whose first line is a
    bare "{")."""
    return [json.loads(line) for line in log.splitlines() if line.startswith('{"')]


def test_full_flow_through_a_server_and_secrets_stay_out_of_its_log(
    settings, tmp_path, admin_headers
) -> None:
    org, headers = admin_headers
    with serve(settings, tmp_path) as server, httpx.Client(base_url=server.url) as http:
        created = http.post(API, json={"org_id": org, "name": "CRM"}, headers=headers)
        assert created.status_code == 200, created.text
        key = created.json()["data"]["key"]
        session = http.post(
            f"{API}?action=create-session", json={"game_id": 42}, headers={"x-api-key": key}
        )
        assert session.status_code == 200
        token = session.json()["data"]["token"]
        assert (
            http.get(f"{API}?action=validate-session&token={token}").json()["data"]["valid"] is True
        )
        consumed = http.post(f"{API}?action=consume-session", json={"token": token})
        assert consumed.status_code == 200 and consumed.json()["data"]["org_id"] == org
        again = http.post(f"{API}?action=consume-session", json={"token": token})
        assert again.status_code == 410 and again.json()["success"] is False

        # Chunked upload larger than the limit is refused without being read whole.
        def chunks():
            for _ in range(64):
                yield b"x" * 4096

        big = http.post(
            f"{API}?action=consume-session",
            content=chunks(),
            headers={"content-type": "application/json"},
        )
        assert big.status_code == 413 and big.json()["success"] is False
        missing = http.get("/nowhere")
        assert missing.status_code == 404 and missing.json() == {
            "success": False,
            "error": "not found",
        }
    log = server.log()
    lines = json_lines(log)
    requests = [line for line in lines if line["logger"] == "dailyplay.access"]
    assert any(
        line["operation"] == "validate-session" and line["status"] == 200 for line in requests
    )
    assert all(re.fullmatch(r"[0-9a-f]{32}", line["request_id"]) for line in requests)
    assert any("Started server process" in line.get("message", "") for line in lines)
    assert token not in log and key not in log and key[8:] not in log
    assert "Traceback" not in log


@pytest.mark.parametrize("workers", [2, 4])
def test_each_token_is_consumed_exactly_once_across_processes(
    settings, tmp_path, admin_headers, workers
) -> None:
    org, headers = admin_headers
    settings = settings.replace("limits", public_per_minute=0)
    tokens_wanted, processes, threads = 1000, 4, 2
    with (
        serve(settings, tmp_path, workers=workers) as server,
        httpx.Client(base_url=server.url, timeout=30) as http,
    ):
        key = http.post(
            API,
            json={
                "org_id": org,
                "name": "load",
                "rate_limit_per_minute": 100000,
                "rate_limit_per_day": 100000,
            },
            headers=headers,
        ).json()["data"]["key"]

        def create(_: int) -> str:
            response = http.post(
                f"{API}?action=create-session", json={"game_id": 1}, headers={"x-api-key": key}
            )
            assert response.status_code == 200, response.text
            return str(response.json()["data"]["token"])

        with ThreadPoolExecutor(4) as pool:
            tokens = list(pool.map(create, range(tokens_wanted)))
        results = race_to_consume([server.url], tokens, processes, threads)
    assert len(results) == tokens_wanted * processes * threads
    assert_each_consumed_once(results, tokens)
    assert not any("locked" in text for _, _, text in results)
    assert sql(settings, "SELECT count(*) FROM sessions WHERE status = 'consumed'") == [
        (tokens_wanted,)
    ]


def test_demo_starts_on_a_fresh_directory_and_its_curl_lines_work(tmp_path) -> None:
    require("curl", shutil.which("curl") is not None, "apt-get install curl (.ci/run does)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAILYPLAY_")}
    with running_demo(tmp_path) as (process, info):
        outputs = {}
        script = "set -e\n" + "\n".join(
            f"echo '=== {name}'\n{line}\necho" for name, line in info["curl"].items()
        )
        result = subprocess.run(
            ["bash", "-c", script],
            env={**env, **info["env"]},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        current = None
        for line in result.stdout.splitlines():
            if line.startswith("=== "):
                current = line[4:]
            elif line.strip() and current:
                outputs[current] = line
        assert set(outputs) == set(info["curl"])
        for name, output in outputs.items():
            if name == "create_session_into_TOKEN":
                assert len(output.strip()) == 36
                continue
            if name == "create_api_key_into_KEY_ID":
                assert int(output) != info["api_key_id"]
                continue
            assert json.loads(output)["success"] is True, (name, output)
        # Pasted in order, the lines revoked and deleted the key they made, not the demo's.
        still = httpx.post(
            f"{info['url']}{API}?action=create-session",
            json={"game_id": 42},
            headers={"x-api-key": info["api_key"]},
        )
        assert still.status_code == 200, still.text
    assert process.returncode in (0, -15)
    guide = (tmp_path / "demo.log").read_text()
    assert "export DP_KEY=" in guide and "-m dailyplay demo --dir" in guide


def test_the_demo_game_says_what_to_do_when_its_key_stops_working(tmp_path) -> None:
    with running_demo(tmp_path) as (_process, info):
        revoked = httpx.patch(
            f"{info['url']}{API}",
            json={"id": info["api_key_id"], "org_id": info["org_id"], "is_active": False},
            headers={"authorization": f"Bearer {info['bearer_token']}"},
        )
        assert revoked.status_code == 200, revoked.text
        page = httpx.get(info["play_url"], follow_redirects=False)
    assert page.status_code == 502
    assert "HTTP 401" in page.text and "no longer works" in page.text
    assert "start it again" in page.text and "dailyplay demo" in page.text


@pytest.mark.parametrize("taken", ["--port", "--game-port"])
def test_the_demo_checks_both_ports_before_it_makes_anything(tmp_path, taken: str) -> None:
    port, game_port = free_port(), free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port if taken == "--port" else game_port))
        holder.listen()
        result = run_cli(
            "demo", "--dir", str(tmp_path / "demo"), "--port", str(port),
            "--game-port", str(game_port), cwd=tmp_path,
        )  # fmt: skip
    assert result.returncode == 1
    assert f"pick another port with {taken}" in result.stderr
    assert result.stdout == "" and "dpk_" not in result.stderr
    assert not (tmp_path / "demo").exists()


def test_the_demo_runs_again_as_its_guide_says_and_mints_fresh_admin_tokens(tmp_path) -> None:
    with running_demo(tmp_path) as (_process, first):
        pass
    guide = [line.strip() for line in (tmp_path / "demo.log").read_text().splitlines()]
    rerun = guide[guide.index(
        "Stop with Ctrl-C. Run it again later (same database and game, a new API key) with:"
    ) + 1]  # fmt: skip
    token_line = guide[guide.index("A fresh bearer token (valid 24 h) for the demo's admin:") + 1]
    assert token_line == f"{rerun} --token"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAILYPLAY_")}
    env["PATH"] = "/usr/bin:/bin"  # nothing of the project's on PATH: the lines work as written

    # The fresh admin token, pasted as printed from another directory.
    fresh = subprocess.run(
        ["bash", "-c", token_line], cwd="/", env=env, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert fresh.returncode == 0, fresh.stderr
    claims = jwt.decode(
        json.loads(fresh.stdout)["bearer_token"],
        Path(first["config"]).with_name("jwt-public.pem").read_bytes(),
        algorithms=["RS256"],
    )
    assert claims["sub"] == "user_demo_admin" and claims["exp"] - time.time() > 23 * 3600
    assert run_cli("demo", "--dir", str(tmp_path / "nowhere"), "--token").returncode == 1

    # The re-run line serves the same organization again, with a new key that works.
    port, game_port = free_port(), free_port()
    process = subprocess.Popen(
        ["bash", "-c", f"exec {rerun} --port {port} --game-port {game_port}"], cwd="/",
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        text = ""
        again = None
        while again is None:
            line = process.stdout.readline().decode()
            assert line, "the demo exited before printing its summary"
            text += line
            with contextlib.suppress(ValueError):
                again = json.loads(text)
        assert again["org_id"] == first["org_id"] and again["api_key"] != first["api_key"]
        deadline = time.monotonic() + 30
        while True:
            try:
                made = httpx.post(
                    f"{again['url']}{API}?action=create-session",
                    json={"game_id": 42},
                    headers={"x-api-key": again["api_key"]},
                )
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the demo did not start serving"
                time.sleep(0.1)
        assert made.status_code == 200, made.text
    finally:
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=20)
        process.stdout.close()
    assert process.returncode == 0


def test_ctrl_c_stops_the_demo_with_exit_status_0(tmp_path) -> None:
    with running_demo(tmp_path) as (process, _info):
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=20) == 0
    log = (tmp_path / "demo.log").read_text()
    assert "dailyplay demo stopped" in log
    assert "dailyplay: error" not in log and "interrupted" not in log


def test_the_wheel_ships_the_schema_and_runs_from_any_directory(tmp_path) -> None:
    dist = tmp_path / "dist"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(dist),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(dist.glob("dailyplay-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {
        "dailyplay/schema.sql",
        "dailyplay/config.toml",
        "dailyplay/openapi.json",
        "dailyplay/sdk/dailyplay.js",
        "dailyplay/demo_game/index.html",
        "dailyplay/demo_game/game.js",
        "dailyplay/demo_game/game.css",
    }
    assert shipped <= set(names)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAILYPLAY_")}
    env["PYTHONPATH"] = str(wheel)  # the wheel alone, not the source tree
    result = subprocess.run(
        [sys.executable, "-c", "import dailyplay, sys; print(dailyplay.__file__)"],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        env=env,
        check=True,
    )
    assert str(wheel) in result.stdout
    result = subprocess.run(
        [sys.executable, "-m", "dailyplay", "init-db"],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        env={**env, "DAILYPLAY_DATABASE_PATH": "here.db"},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["schema_version"] == db.SCHEMA_VERSION
    # The served OpenAPI document is read from inside the wheel too.
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from dailyplay import openapi; print(len(openapi.shipped_document()['paths']))",
        ],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == len(
        json.loads((ROOT / "dailyplay" / "openapi.json").read_text())["paths"]
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_a_second_server_on_a_taken_port_stops_with_a_clear_error(
    make_settings, tmp_path, workers: int
) -> None:
    """A second `dailyplay serve` on a port already served (another database, say) must fail,
    not share it. With several workers every socket had SO_REUSEPORT, so a second server of the
    same user bound the same port and took half of the connections; with one, the command
    printed "listening" and only then did uvicorn fail to bind."""
    first = make_settings()
    with serve(first, tmp_path, workers=workers) as server:
        port = int(server.url.rsplit(":", 1)[1])
        second = first.replace("database", path=str(tmp_path / "other.db")).replace(
            "server", port=port, workers=workers
        )
        started = time.monotonic()
        result = run_cli("serve", "--config", str(write_config(second, tmp_path / "second.toml")))
        assert result.returncode == 1, result.stdout + result.stderr
        assert time.monotonic() - started < 30
        assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr
        assert result.stdout == ""  # nothing announced
        assert "Traceback" not in result.stderr
        # Every connection still reaches the first server (new connections, each its own).
        for _ in range(20):
            with httpx.Client() as client:
                answer = client.get(f"{server.url}{API}?action=validate-session", timeout=5)
                assert answer.status_code == 400
        assert not (tmp_path / "other.db").exists()


def test_a_client_that_hangs_up_mid_body_is_logged_as_499_not_as_a_server_error(
    settings, tmp_path, admin_headers
) -> None:
    """A client that closes its connection before its body has arrived (a phone losing signal)
    is no error of the server's: no ERROR line with a traceback, no 500 in the metrics, nothing
    stored; its request line says 499, as nginx would."""
    org, headers = admin_headers
    with serve(settings, tmp_path) as server:
        created = httpx.post(
            f"{server.url}{API}", json={"org_id": org, "name": "k"}, headers=headers
        )
        key = created.json()["data"]["key"]
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        partial = {
            "create-session": f"x-api-key: {key}\r\n".encode() + b'Content-Length: 40\r\n\r\n{"ga',
            "consume-session": b'Content-Length: 60\r\n\r\n{"token": "',
        }
        for action, rest in partial.items():
            with socket.create_connection((host, int(port))) as conn:
                conn.sendall(
                    f"POST {API}?action={action} HTTP/1.1\r\nHost: {host}\r\n".encode()
                    + b"Content-Type: application/json\r\n"
                    + rest
                )
                time.sleep(0.3)  # the request has reached the app, which waits for the body
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            hung_up = [line for line in json_lines(server.log()) if line.get("status") == 499]
            if len(hung_up) == 2:
                break
            time.sleep(0.1)
        assert sorted(line["operation"] for line in hung_up) == [
            "consume-session",
            "create-session",
        ]
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'status="500"' not in metrics
        assert 'status="499"' in metrics
    log = server.log()
    assert "Traceback" not in log
    assert [line for line in json_lines(log) if line.get("level") == "error"] == []
    assert sql(settings, "SELECT count(*) FROM sessions") == [(0,)]


def _exchange(address: tuple[str, int], head: bytes, rest: bytes = b"") -> bytes:
    """Send a request (its head in 1 KB writes, then rest) on a new connection; everything the
    server sent before it closed the connection or went quiet."""
    received = b""
    with socket.create_connection(address, timeout=10) as conn:
        try:
            for start in range(0, len(head), 1024):
                conn.sendall(head[start : start + 1024])
            conn.sendall(rest)
        except OSError:  # the server refused and closed while we were still sending
            pass
        with contextlib.suppress(OSError):
            while chunk := conn.recv(65536):
                received += chunk
                if b"connection: close" not in received.lower() and received.endswith(b"}"):
                    break
    return received


def test_a_request_head_over_16_kib_is_refused_with_431_and_the_server_goes_on(
    settings, tmp_path
) -> None:
    """httptools buffers headers of any size; the server keeps h11's bound of 16 KiB for the
    request line and headers, whether they arrive at once or never end, and answers 431 in the
    API's error shape. A head within the bound is served, also when a large body arrives in
    the same read."""
    with serve(settings, tmp_path) as server:
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        address = (host, int(port))
        line = b"X-Fill: " + b"a" * 1000 + b"\r\n"

        def head(fill_lines: int, first: bytes = b"GET /healthz HTTP/1.1\r\n") -> bytes:
            return first + b"Host: x\r\n" + line * fill_lines

        within = _exchange(address, head(15) + b"\r\n")
        assert within.startswith(b"HTTP/1.1 200 "), within[:200]
        for refused in (
            _exchange(address, head(17) + b"\r\n"),  # over the bound, complete
            _exchange(address, head(20_000)),  # 20 MB of headers that never end
            _exchange(address, b"GET /healthz?" + b"a" * 40_000),  # a request line that never ends
        ):
            assert refused.startswith(b"HTTP/1.1 431 "), refused[:200]
            assert b"connection: close" in refused.lower()
            assert re.search(rb"\r\nx-request-id: [0-9a-f]{32}\r\n", refused), refused[:300]
            _head, _, body = refused.partition(b"\r\n\r\n")
            assert json.loads(body) == {
                "success": False,
                "error": "the request line and headers are over 16 KiB",
            }
        # 8 KB of headers and a 60 KB body in one write: the head is within the bound.
        body = json.dumps({"token": "x" * 60_000}).encode()
        first = f"POST {API}?action=consume-session HTTP/1.1\r\n".encode()
        big_body = _exchange(
            address,
            head(8, first) + b"Content-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode(),
            body,
        )  # fmt: skip
        assert big_body.startswith(b"HTTP/1.1 400 "), big_body[:200]
        assert b"token" in big_body
        assert httpx.get(f"{server.url}/healthz").status_code == 200
    lines = json_lines(server.log())
    refusals = [entry for entry in lines if "its head is over" in entry.get("message", "")]
    assert len(refusals) == 3 and all(entry["level"] == "warning" for entry in refusals)
    assert [entry for entry in lines if entry.get("level") == "error"] == []


def _worker_pids(server) -> set[str]:
    """The process ids of the workers that started, as uvicorn logs them."""
    return {
        line.split("[")[1].split("]")[0]
        for line in server.log().splitlines()
        if "Started server process" in line
    }


def test_revocation_takes_effect_at_once_in_every_worker(settings, tmp_path, admin_headers) -> None:
    org, headers = admin_headers
    with serve(settings, tmp_path, workers=2) as server:
        created = httpx.post(
            f"{server.url}{API}", json={"org_id": org, "name": "CRM"}, headers=headers
        )
        key, key_id = created.json()["data"]["key"], created.json()["data"]["id"]

        def create_sessions(count: int) -> Counter:
            # A fresh connection per request, so both workers get some of them.
            return Counter(
                httpx.post(
                    f"{server.url}{API}?action=create-session",
                    json={"game_id": 1},
                    headers={"x-api-key": key},
                ).status_code
                for _ in range(count)
            )

        assert create_sessions(20) == Counter({200: 20})  # both workers now cache the key
        revoke = httpx.patch(
            f"{server.url}{API}",
            json={"id": key_id, "org_id": org, "is_active": False},
            headers=headers,
        )
        assert revoke.status_code == 200
        assert create_sessions(20) == Counter({401: 20})
    assert len(_worker_pids(server)) == 2


def test_a_consumed_token_reads_as_consumed_at_once_in_every_worker(
    settings, tmp_path, admin_headers
) -> None:
    """Each worker's reads share one transaction per turn of its event loop; none of them may
    answer from a snapshot older than the request. A token validated (active), then consumed
    by whichever worker, reads as consumed in the very next request to either."""
    org, headers = admin_headers
    with serve(settings, tmp_path, workers=2) as server:
        created = httpx.post(
            f"{server.url}{API}", json={"org_id": org, "name": "CRM"}, headers=headers
        )
        key = created.json()["data"]["key"]

        def status(token: str) -> str:
            # A fresh connection per request, so both workers answer some of them.
            answer = httpx.get(f"{server.url}{API}?action=validate-session&token={token}")
            assert answer.status_code == 200, answer.text
            return str(answer.json()["data"]["status"])

        seen: list[tuple[str, ...]] = []
        for _ in range(30):
            token = httpx.post(
                f"{server.url}{API}?action=create-session",
                json={"game_id": 1},
                headers={"x-api-key": key},
            ).json()["data"]["token"]
            before = (status(token), status(token))
            consumed = httpx.post(
                f"{server.url}{API}?action=consume-session", json={"token": token}
            )
            assert consumed.status_code == 200, consumed.text
            seen.append((*before, *(status(token) for _ in range(4))))
    assert seen == [("active", "active", *["consumed"] * 4)] * 30
    assert len(_worker_pids(server)) == 2


def test_the_readme_schemathesis_line_passes_against_a_live_server(
    settings, tmp_path, admin_headers
) -> None:
    """docs/development.md's `schemathesis run` line, verbatim, against a `dailyplay serve`."""
    readme = (ROOT / "docs" / "development.md").read_text()
    [line] = [row for row in readme.splitlines() if "schemathesis --config-file" in row]
    org, headers = admin_headers
    # As docs/development.md advises for a staging copy: no per-address limits, so that the
    # thousands of requests (many with bad credentials) reach the operations instead of 429s.
    settings = settings.replace("limits", public_per_minute=0, failed_auth_per_minute=0)
    with serve(settings, tmp_path) as server:
        created = httpx.post(
            f"{server.url}{API}",
            json={"org_id": org, "name": "fuzzing", "rate_limit_per_minute": 1_000_000},
            headers=headers,
        )
        assert created.status_code == 200, created.text
        command = line.replace("http://127.0.0.1:8787", server.url).replace(
            ".venv/bin/schemathesis", str(Path(sys.executable).parent / "schemathesis")
        )
        # A fixed seed keeps CI repeatable; DAILYPLAY_TEST_FUZZ_SEED picks another, as in-process.
        command += f" --seed {os.environ.get('DAILYPLAY_TEST_FUZZ_SEED') or 20261128}"
        env = {
            **os.environ,
            "DP_KEY": created.json()["data"]["key"],
            "DP_JWT": headers["authorization"].removeprefix("Bearer "),
            "NO_COLOR": "1",
        }
        result = subprocess.run(
            ["bash", "-c", command],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert server.process.poll() is None
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    for phase in ("Examples", "Coverage", "Fuzzing", "Stateful"):
        assert f"✅ {phase}" in output, output[-4000:]
    assert "❌" not in output, output[-4000:]
    counts = re.search(r"(\d+) generated, (\d+) passed", output)
    assert counts and counts[1] == counts[2] and int(counts[1]) > 500, output[-4000:]
