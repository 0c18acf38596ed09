"""Real `dailyplay serve` processes under kill -9, SIGTERM, write bursts, overload and hostile
connections. Figures these tests measure are quoted in docs/reliability.md."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from conftest import API, SigningKey, add_org, claims_for, serve, sql

from dailyplay import config

pytestmark = pytest.mark.slow


@pytest.fixture
def quiet_settings(settings: config.Settings) -> config.Settings:
    """No per-address limits: these tests send a lot from one address on purpose."""
    return settings.replace("limits", public_per_minute=0, failed_auth_per_minute=0)


def make_key(url: str, org: int, signing: SigningKey, **fields: object) -> str:
    body = {"org_id": org, "name": "load", "rate_limit_per_minute": 1_000_000, **fields}
    headers = {"authorization": f"Bearer {signing.sign(claims_for('admin', lifetime=3600))}"}
    response = httpx.post(f"{url}{API}", json=body, headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    return str(response.json()["data"]["key"])


# --- durability under kill -9 -------------------------------------------------------------------


@dataclass
class Ledger:
    """What clients were told: only answers they got count as promises."""

    created: dict[str, tuple[str, dict]] = field(default_factory=dict)  # token -> (ref, meta)
    consumed: set[str] = field(default_factory=set)
    rejected_refs: set[str] = field(default_factory=set)
    lost_answers: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _load(url_holder: list[str], key: str, ledger: Ledger, stop: threading.Event, n: int) -> None:
    counter = itertools.count()
    mine: list[str] = []
    with httpx.Client(timeout=5) as http:
        while not stop.is_set():
            i = next(counter)
            url = url_holder[0]
            ref = f"c-{n}-{i}"
            try:
                if i % 3 == 2 and mine:
                    token = mine.pop(0)
                    response = http.post(
                        f"{url}{API}?action=consume-session", json={"token": token}
                    )
                    if response.status_code == 200:
                        with ledger.lock:
                            ledger.consumed.add(token)
                elif i % 7 == 6:
                    # Refused (the key may only create sessions for game 1): must leave no trace.
                    response = http.post(
                        f"{url}{API}?action=create-session",
                        json={"game_id": 2, "external_ref": ref},
                        headers={"x-api-key": key},
                    )
                    assert response.status_code == 403, response.text
                    with ledger.lock:
                        ledger.rejected_refs.add(ref)
                else:
                    meta = {"n": n, "i": i}
                    response = http.post(
                        f"{url}{API}?action=create-session",
                        json={"game_id": 1, "external_ref": ref, "metadata": meta},
                        headers={"x-api-key": key},
                    )
                    if response.status_code == 200:
                        token = response.json()["data"]["token"]
                        mine.append(token)
                        with ledger.lock:
                            ledger.created[token] = (ref, meta)
                    else:
                        assert response.status_code == 503, response.text
            except httpx.TransportError:
                with ledger.lock:
                    ledger.lost_answers += 1  # killed mid-request: no promise was made
                time.sleep(0.05)


def test_every_answered_write_survives_kill_9(
    quiet_settings: config.Settings, tmp_path: Path, rsa_key: SigningKey
) -> None:
    settings = quiet_settings
    org = add_org(settings, members={"admin": "admin"})
    kills = 4
    ledger, stop = Ledger(), threading.Event()
    with serve(settings, tmp_path, workers=2) as server:
        key = make_key(server.url, org, rsa_key, allowed_game_ids=[1])
        url_holder = [server.url]
        threads = [
            threading.Thread(target=_load, args=(url_holder, key, ledger, stop, n), daemon=True)
            for n in range(6)
        ]
        for thread in threads:
            thread.start()
        time.sleep(1.5)
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=10)
    for _ in range(kills - 1):
        with serve(settings, tmp_path, workers=2) as server:
            url_holder[0] = server.url
            time.sleep(1.5)
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait(timeout=10)
    with serve(settings, tmp_path, workers=2) as server:
        url_holder[0] = server.url
        time.sleep(1.0)
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    rows = {
        str(uuid.UUID(bytes=token)): (status, ref, meta)
        for token, status, ref, meta in sql(
            settings, "SELECT token, status, external_ref, metadata FROM sessions"
        )
    }
    assert len(ledger.created) > 200 and len(ledger.consumed) > 50, (
        len(ledger.created),
        len(ledger.consumed),
    )
    for token, (ref, meta) in ledger.created.items():
        assert token in rows, f"a created token was lost: {token}"
        status, stored_ref, stored_meta = rows[token]
        assert (stored_ref, json.loads(stored_meta)) == (ref, meta)
        assert status in ("active", "consumed")
    for token in ledger.consumed:
        assert rows[token][0] == "consumed", f"a consumed token came back: {token}"
    stored_refs = {ref for _, ref, _ in rows.values()}
    assert not (ledger.rejected_refs & stored_refs), "a refused create was stored"
    assert ledger.rejected_refs
    print(
        f"kill -9 x{kills}: {len(ledger.created)} creates and {len(ledger.consumed)} consumes "
        f"answered 200 and all kept; {len(ledger.rejected_refs)} refused creates left no row; "
        f"{ledger.lost_answers} requests got no answer (server killed or restarting)"
    )


# --- graceful shutdown --------------------------------------------------------------------------


def test_sigterm_finishes_the_request_in_flight_then_closes_the_database(
    quiet_settings: config.Settings, tmp_path: Path, rsa_key: SigningKey
) -> None:
    settings = quiet_settings
    org = add_org(settings, members={"admin": "admin"})
    db_path = Path(settings.database.path)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    with serve(settings, tmp_path, env={"TMPDIR": str(scratch)}) as server:
        assert len(list(scratch.glob("dailyplay-metrics-*"))) == 1
        key = make_key(server.url, org, rsa_key)
        host, port = server.url.removeprefix("http://").split(":")
        body = json.dumps({"game_id": 7, "external_ref": "in-flight"}).encode()
        conn = socket.create_connection((host, int(port)), timeout=10)
        conn.sendall(
            f"POST {API}?action=create-session HTTP/1.1\r\nHost: x\r\nx-api-key: {key}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n".encode()
            + body[:5]
        )
        time.sleep(0.3)  # the request is in progress, waiting for the rest of its body
        os.killpg(server.process.pid, signal.SIGTERM)
        time.sleep(0.5)
        # No new connections are accepted...
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{server.url}/openapi.json", timeout=2)
        # ...but the one in flight is finished and answered.
        conn.sendall(body[5:])
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            answer += chunk
        conn.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
        token = json.loads(answer.split(b"\r\n\r\n", 1)[1])["data"]["token"]
        # A requested stop is a success, and the command cleans up after itself.
        assert server.process.wait(timeout=15) == 0
        log = server.log()
        assert "Application shutdown complete" in log and "Traceback" not in log
        assert list(scratch.iterdir()) == []
    # Closed cleanly: the WAL was checkpointed into the main file and removed.
    wal = db_path.with_name(db_path.name + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    with serve(settings, tmp_path) as server:
        check = httpx.get(f"{server.url}{API}?action=validate-session&token={token}", timeout=10)
        assert check.json()["data"]["status"] == "active"
        assert check.json()["data"]["external_ref"] == "in-flight"


def _alive(pid: int) -> bool:
    """Running (a zombie that nobody has reaped yet counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def test_workers_stop_when_their_supervisor_is_killed(
    quiet_settings: config.Settings, tmp_path: Path
) -> None:
    """uvicorn's workers outlived a supervisor killed with SIGKILL (the OOM killer, `kill -9`
    on its PID) and went on serving the port, with the configuration they started with. They
    now get SIGTERM when it dies and shut down as on a normal stop."""
    with serve(quiet_settings, tmp_path, workers=2) as server:
        pid = server.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        workers = [
            int(child)
            for child in children
            if "spawn_main" in Path(f"/proc/{child}/cmdline").read_text()
        ]
        assert len(workers) == 2, children
        try:
            os.kill(pid, signal.SIGKILL)  # the supervisor only, not its process group
            server.process.wait(timeout=10)
            deadline = time.monotonic() + 20
            while any(_alive(worker) for worker in workers):
                assert time.monotonic() < deadline, [w for w in workers if _alive(w)]
                time.sleep(0.1)
            with pytest.raises(httpx.TransportError):
                httpx.get(f"{server.url}/healthz", timeout=2)
            assert server.log().count("Application shutdown complete") == 2
        finally:
            for worker in workers:
                if _alive(worker):
                    os.kill(worker, signal.SIGKILL)


# --- contention ---------------------------------------------------------------------------------


def _write_burst(url: str, key: str, count: int, threads: int, start_at: float, queue) -> None:
    time.sleep(max(0.0, start_at - time.time()))

    def create_then_consume(_: int) -> list[int]:
        statuses = []
        with httpx.Client(timeout=30) as http:
            for _ in range(count):
                created = http.post(
                    f"{url}{API}?action=create-session",
                    json={"game_id": 1},
                    headers={"x-api-key": key},
                )
                statuses.append(created.status_code)
                if created.status_code == 200:
                    token = created.json()["data"]["token"]
                    consumed = http.post(
                        f"{url}{API}?action=consume-session", json={"token": token}
                    )
                    statuses.append(consumed.status_code)
        return statuses

    with ThreadPoolExecutor(threads) as pool:
        queue.put([s for rows in pool.map(create_then_consume, range(threads)) for s in rows])


def test_a_write_burst_from_several_workers_never_surfaces_busy(
    quiet_settings: config.Settings, tmp_path: Path, rsa_key: SigningKey
) -> None:
    settings = quiet_settings
    org = add_org(settings, members={"admin": "admin"})
    processes, threads, each = 4, 4, 50
    with serve(settings, tmp_path, workers=4) as server:
        key = make_key(server.url, org, rsa_key)
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        start_at = time.time() + 2.0
        procs = [
            ctx.Process(target=_write_burst, args=(server.url, key, each, threads, start_at, queue))
            for _ in range(processes)
        ]
        for proc in procs:
            proc.start()
        statuses = Counter(s for _ in procs for s in queue.get(timeout=300))
        for proc in procs:
            proc.join(timeout=30)
        log = server.log()
    writes = processes * threads * each * 2
    assert statuses == Counter({200: writes}), statuses
    assert "locked" not in log and "busy" not in log
    assert sql(settings, "SELECT count(*) FROM sessions WHERE status = 'consumed'") == [
        (writes // 2,)
    ]
    print(f"write burst: {writes} writes from {processes * threads} clients, 4 workers: all 200")


# --- overload -----------------------------------------------------------------------------------


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _hammer(url: str, key: str, seconds: float, threads: int, queue) -> None:
    deadline = time.monotonic() + seconds

    def client(n: int) -> tuple[Counter, int]:
        statuses: Counter = Counter()
        failures = 0
        with httpx.Client(timeout=5) as http:
            while time.monotonic() < deadline:
                try:
                    if n % 2:
                        response = http.get(
                            f"{url}{API}?action=validate-session&token={uuid.uuid4()}"
                        )
                    else:
                        response = http.post(
                            f"{url}{API}?action=create-session",
                            json={"game_id": 1},
                            headers={"x-api-key": key},
                        )
                    statuses[response.status_code] += 1
                except httpx.TransportError:
                    failures += 1
        return statuses, failures

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(client, range(threads)))
    total: Counter = Counter()
    for statuses, _ in results:
        total.update(statuses)
    queue.put((dict(total), sum(failures for _, failures in results)))


def test_overload_is_answered_with_503_not_timeouts_and_recovers(
    settings: config.Settings, tmp_path: Path, rsa_key: SigningKey
) -> None:
    settings = settings.replace("limits", failed_auth_per_minute=0, public_per_minute=0)
    settings = settings.replace("server", max_concurrent_requests=8)
    org = add_org(settings, members={"admin": "admin"})
    processes, threads, seconds = 4, 16, 6.0
    with serve(settings, tmp_path) as server:
        key = make_key(server.url, org, rsa_key)
        pid = server.process.pid  # one worker: uvicorn serves in this very process
        rss_before = _rss_kb(pid)
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        procs = [
            ctx.Process(target=_hammer, args=(server.url, key, seconds, threads, queue))
            for _ in range(processes)
        ]
        for proc in procs:
            proc.start()
        results = [queue.get(timeout=120) for _ in procs]
        for proc in procs:
            proc.join(timeout=30)
        rss_after = _rss_kb(pid)
        started = time.monotonic()
        recovered = httpx.get(f"{server.url}{API}?action=validate-session&token={uuid.uuid4()}")
        recovery = time.monotonic() - started
        assert server.process.poll() is None
    statuses: Counter = Counter()
    for counts, _ in results:
        statuses.update({int(k): v for k, v in counts.items()})
    failures = sum(f for _, f in results)
    assert failures == 0, (failures, statuses)  # no timeouts, no dropped connections
    assert set(statuses) <= {200, 404, 503}, statuses
    assert statuses[503] > 0 and statuses[200] > 0 and statuses[404] > 0, statuses
    assert recovered.status_code == 404 and recovery < 1.0
    assert rss_after - rss_before < 100_000, (rss_before, rss_after)
    print(
        f"overload: {processes * threads} clients for {seconds:g}s against 1 worker capped at 8 "
        f"in progress: {dict(statuses)}; RSS {rss_before} -> {rss_after} kB; "
        f"first request after: {recovery * 1000:.0f} ms"
    )


# --- hostile connections ------------------------------------------------------------------------


def _raw(host: str, port: int, request: bytes) -> bytes:
    with socket.create_connection((host, port), timeout=10) as conn:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


def test_hostile_requests_on_the_wire_get_a_4xx_and_store_nothing(
    quiet_settings: config.Settings, tmp_path: Path, rsa_key: SigningKey
) -> None:
    settings = quiet_settings
    org = add_org(settings, members={"admin": "admin"})
    with serve(settings, tmp_path) as server:
        key = make_key(server.url, org, rsa_key)
        host, port = server.url.removeprefix("http://").split(":")
        body = b'{"game_id": 1}'

        def create(path: str, extra: bytes = b"") -> bytes:
            return _raw(
                host,
                int(port),
                f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nx-api-key: {key}\r\n"
                f"content-type: application/json\r\ncontent-length: {len(body)}\r\n".encode()
                + extra
                + b"\r\n"
                + body,
            )

        # Path tricks reach nothing but the JSON 404.
        for path in (
            f"{API}/?action=create-session",
            f"/{API}?action=create-session",
            f"/api/../{API}?action=create-session",
            "/api/org-api-keys%2F?action=create-session",
            "/API/org-api-keys?action=create-session",
            "/api/org-api-keys;x?action=create-session",
            "/api/org-api-keys%00?action=create-session",
        ):
            answer = create(path)
            assert answer.startswith(b"HTTP/1.1 404"), (path, answer[:200])
            assert b'"success":false' in answer
        # Control characters in header values, a header name with a space and a smuggling
        # attempt (two lengths) are refused by the HTTP parser before the app sees them.
        for extra in (
            b"x-note: a\x00b\r\n",
            b"x-note: a\rb\r\n",
            b"x note: a\r\n",
            b"content-length: 3\r\n",
        ):
            answer = create(API + "?action=create-session", extra)
            assert answer.startswith(b"HTTP/1.1 400"), (extra, answer[:200])
        # Nothing the client sends comes back as a response header.
        answer = _raw(
            host,
            int(port),
            f"POST {API}?action=create-session HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            "content-type: application/json\r\ncontent-length: 27\r\n\r\n"
            '{"x\\r\\nSet-Cookie: a=b": 1}'.encode(),
        )
        head = answer.split(b"\r\n\r\n", 1)[0].lower()
        assert answer.startswith(b"HTTP/1.1 401") and b"set-cookie" not in head
        assert sql(settings, "SELECT count(*) FROM sessions") == [(0,)]

        # Connections that trickle their headers do not hold up anyone else.
        slow = []
        for _ in range(50):
            conn = socket.create_connection((host, int(port)), timeout=10)
            conn.sendall(f"GET {API}?action=validate-session&token=".encode())
            slow.append(conn)
        try:
            started = time.monotonic()
            for _ in range(20):
                response = httpx.get(
                    f"{server.url}{API}?action=validate-session&token={uuid.uuid4()}", timeout=5
                )
                assert response.status_code == 404
            assert time.monotonic() - started < 5
        finally:
            for conn in slow:
                conn.close()
        assert server.process.poll() is None


def _workers(parent: int) -> set[int]:
    """The uvicorn worker processes of a `dailyplay serve` parent (not multiprocessing's
    resource tracker)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return {
        int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    }


def test_a_killed_worker_is_replaced_on_its_own_listening_socket(
    settings: config.Settings, tmp_path: Path
) -> None:
    """Each worker has a listening socket of its own: when one dies its replacement must take
    that socket over, or the connections the kernel hands to it would never be answered."""
    with serve(settings, tmp_path, workers=2) as server:
        before = _workers(server.process.pid)
        assert len(before) == 2
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:
            current = _workers(server.process.pid)
            if len(current) == 2 and victim not in current:
                break
            assert time.monotonic() < deadline, "the dead worker was not replaced"
            time.sleep(0.1)
        # Many new connections, spread by the kernel over both sockets: all must be answered.
        host, port = server.url.removeprefix("http://").split(":")
        for _ in range(40):
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                answer = b""
                while chunk := sock.recv(4096):
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
