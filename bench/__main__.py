"""DailyPlay benchmark: `python -m bench` (see docs/development.md, "Benchmark").

Runs wrk against a bare Starlette app (the ceiling) and against `dailyplay serve`, side by side,
with 1 and 2 workers, then against databases already holding many tokens. Prints a table and
writes a JSON file. Every process it starts is stopped before it returns.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from dailyplay import config
from dailyplay.clock import now_ms
from dailyplay.demo import write_config
from dailyplay.keys import new_api_key
from dailyplay.storage import Store, with_store
from dailyplay.storage import sqlite as db
from dailyplay.storage.types import CLI

HERE = Path(__file__).resolve().parent
WORKLOADS = ("create", "validate", "consume", "mixed")
BARE_FOR = {"create": "bare-post", "validate": "bare-get", "consume": "bare-post"}
SEED_BATCH = 100_000


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str

    def memory_kb(self) -> dict[str, int]:
        """VmRSS, RssAnon (the heap) and RssFile (mapped files: the database through mmap) of
        the server and its worker processes, in KiB."""
        totals = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
        pids = [self.process.pid]
        with contextlib.suppress(OSError, ValueError):
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
            pids += [int(p) for p in children.read_text().split()]
        for pid in pids:
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    name, _, value = line.partition(":")
                    if name in totals:
                        totals[name] += int(value.split()[0])
        return totals


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pinned_to(cpu: int | None) -> Callable[[], None] | None:
    """A preexec_fn that keeps a process (and what it starts) on one CPU; None: anywhere."""
    if cpu is None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def pinning_available() -> bool:
    return hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2


@contextlib.contextmanager
def running(
    command: list[str], port: int, probe: str, log: Path, cpu: int | None = None
) -> Iterator[Server]:
    """Start a server process in its own group; always stop the whole group.

    Dirty pages are written out first: seeding a database leaves hundreds of MB for the kernel
    to write back, and measured during that writeback a group commit's fsync is slower (create
    2,427-2,565 req/s against 2,594-3,143 after a sync, alternating runs with 800 MB dirty).
    """
    os.sync()
    with log.open("ab") as out:
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=pinned_to(cpu),
        )
    server = Server(process, f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise SystemExit(f"bench: server exited early; see {log}")
            try:
                httpx.get(server.url + probe, timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"bench: server did not start; see {log}") from None
                time.sleep(0.1)
        yield server
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)


def run_wrk(
    url: str,
    mode: str,
    args: argparse.Namespace,
    key: str = "",
    tokens: Path | None = None,
    seconds: int | None = None,
    cpu: int | None = None,
) -> dict[str, Any]:
    seconds = args.duration if seconds is None else seconds
    env = {
        **os.environ,
        "BENCH_MODE": mode,
        "BENCH_KEY": key,
        "BENCH_THREADS": str(args.threads),
    }
    if tokens is not None:
        env["BENCH_TOKENS"] = str(tokens)
    command = [
        "wrk",
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "-s",
        str(HERE / "workload.lua"),
        url,
    ]
    result = subprocess.run(
        command,
        env=env,
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
        preexec_fn=pinned_to(cpu),
    )
    match = re.search(r"BENCH-RESULT (\{.*\})", result.stdout)
    if result.returncode != 0 or match is None:
        raise SystemExit(f"bench: wrk failed for {mode}:\n{result.stdout}\n{result.stderr}")
    raw = json.loads(match.group(1))
    return {
        "rps": round(raw["requests"] / (raw["duration_us"] / 1e6), 1),
        "p50_ms": round(raw["p50_us"] / 1000, 2),
        "p99_ms": round(raw["p99_us"] / 1000, 2),
        "requests": raw["requests"],
        "non_2xx": raw["non_2xx"],
        "socket_errors": raw["socket_errors"],
    }


# A server's first requests pay once for what a running service has long since paid: the API
# key's argon2 verification (once per key in each worker), its rate-limit windows read from the
# database, cold caches. Each server gets this many seconds of load, not counted, first.
WARM_UP_SECONDS = 2


def warm_up(
    url: str, mode: str, args: argparse.Namespace, key: str = "", cpu: int | None = None
) -> None:
    run_wrk(url, mode, args, key, seconds=min(WARM_UP_SECONDS, args.duration), cpu=cpu)


# --- a DailyPlay instance to measure ---------------------------------------------------------


@dataclass
class Instance:
    settings: config.Settings
    config_path: Path
    key: str
    org_id: int
    key_id: int


def prepare_instance(
    directory: Path,
    workers: int,
    overrides: dict[str, dict[str, Any]] | None = None,
    database_url: str = "",
) -> Instance:
    """A database with one Business org and one key without practical limits, and a config
    for it: the defaults users run (request lines and metrics on), but for the per-IP limits,
    which would refuse a benchmark's one address; overrides: {section: {setting: value}}.
    The database is a SQLite file in directory, or the (empty) PostgreSQL database_url."""
    directory.mkdir(parents=True, exist_ok=True)
    settings = config.Settings()
    settings = settings.replace("database", path=str(directory / "bench.db"), url=database_url)
    settings = settings.replace("server", workers=workers)
    settings = settings.replace("limits", public_per_minute=0, failed_auth_per_minute=0)
    settings = settings.replace("sessions", default_expires_minutes=24 * 60)
    for section, values in (overrides or {}).items():
        settings = settings.replace(section, **values)

    async def create(store: Store) -> tuple[str, int, int]:
        now = now_ms()
        org = await store.create_org("Bench Games", "business", None, now, CLI)
        raw_key, values = new_api_key(
            org.id, "bench", now, per_minute=1_000_000, per_day=1_000_000_000
        )
        key = await store.insert_api_key(values, CLI)
        return raw_key, org.id, key.id

    raw_key, org_id, key_id = asyncio.run(with_store(settings.database, create))
    path = directory / "bench.toml"
    write_config(settings, path)
    return Instance(settings, path, raw_key, org_id, key_id)


SESSION_COLUMNS = (
    "token", "org_id", "api_key_id", "game_id", "stream_id", "external_ref", "metadata",
    "created_at", "expires_at",
)  # fmt: skip


def seed_tokens(
    instance: Instance,
    count: int,
    tokens_file: Path | None,
    ref_of: Callable[[int], str] | None = None,
) -> None:
    """Insert `count` fresh active tokens straight into the database (one transaction per
    100,000; COPY on PostgreSQL); write their text forms to tokens_file when given. The n-th
    token's external_ref is ref_of(n) ("seed" without it)."""
    out = tokens_file.open("w") if tokens_file else None
    now = now_ms()
    seeded = [0]

    def rows(batch: list[uuid.UUID]) -> list[tuple[Any, ...]]:
        first = seeded[0]
        seeded[0] += len(batch)
        return [
            (t.bytes, instance.org_id, instance.key_id, 42, None,
             "seed" if ref_of is None else ref_of(first + n), None, now, now + 86_400_000)
            for n, t in enumerate(batch)
        ]  # fmt: skip

    if instance.settings.database.engine == "postgresql":
        import asyncpg

        async def copy() -> None:
            conn = await asyncpg.connect(instance.settings.database.url)
            try:
                done = 0
                while done < count:
                    batch = [uuid.uuid4() for _ in range(min(SEED_BATCH, count - done))]
                    await conn.copy_records_to_table(
                        "sessions", records=rows(batch), columns=SESSION_COLUMNS
                    )
                    if out:
                        out.writelines(f"{t}\n" for t in batch)
                    done += len(batch)
                await conn.execute("ANALYZE sessions")
            finally:
                await conn.close()

        try:
            asyncio.run(copy())
        finally:
            if out:
                out.close()
        return
    conn = db.connect(instance.settings.database)
    try:
        done = 0
        while done < count:
            batch = [uuid.uuid4() for _ in range(min(SEED_BATCH, count - done))]
            with db.transaction(conn):
                db.insert_sessions(conn, rows(batch))
            if out:
                out.writelines(f"{t}\n" for t in batch)
            done += len(batch)
    finally:
        conn.close()
        if out:
            out.close()


def serve_on_free_port(instance: Instance) -> int:
    """Point the instance's configuration at a free port; returns the port."""
    port = free_port()
    instance.settings = instance.settings.replace("server", port=port)
    write_config(instance.settings, instance.config_path)
    return port


def serve_command(instance: Instance) -> list[str]:
    return [sys.executable, "-m", "dailyplay", "serve", "--config", str(instance.config_path)]


def bare_command(port: int, workers: int) -> list[str]:
    return [sys.executable, "-m", "bench.bare", "--port", str(port), "--workers", str(workers)]


def measure_workers(workers: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    log = work / "servers.log"
    results: dict[str, Any] = {"bare": {}, "dailyplay": {}}
    port = free_port()
    with running(bare_command(port, workers), port, "/bare", log) as bare:
        bare_url = bare.url
        warm_up(bare_url, "bare-post", args)
        for mode in ("bare-get", "bare-post"):
            results["bare"][mode] = run_wrk(bare_url, mode, args)
    instance = prepare_instance(work / f"workers-{workers}", workers)
    measured = measure_service(instance, args, work, f"{workers}")
    results["dailyplay"] = measured.pop("workloads")
    results.update(measured)
    for workload, bare_mode in BARE_FOR.items():
        measured = results["dailyplay"][workload]
        rps, p99 = ratios_to_bare(measured, results["bare"][bare_mode])
        measured["ratio_to_bare"] = round(rps, 2)
        measured["p99_ratio_to_bare"] = round(p99, 2)
    return results


def measure_service(
    instance: Instance, args: argparse.Namespace, work: Path, name: str
) -> dict[str, Any]:
    """Every workload against `dailyplay serve` on the instance (tokens seeded first for the
    ones that need them), after a warm-up; with the servers' memory afterwards."""
    log = work / "servers.log"
    token_files = {}
    for workload in ("validate", "consume", "mixed"):
        token_files[workload] = work / f"tokens-{name}-{workload}.txt"
        seed_tokens(instance, args.tokens_per_workload, token_files[workload])
    port = serve_on_free_port(instance)
    results: dict[str, Any] = {"workloads": {}}
    with running(serve_command(instance), port, "/openapi.json", log) as server:
        warm_up(server.url, "create", args, instance.key)
        for workload in WORKLOADS:
            results["workloads"][workload] = run_wrk(
                server.url, workload, args, instance.key, token_files.get(workload)
            )
        memory = server.memory_kb()
        results["rss_kb_after"] = memory["VmRSS"]
        results["rss_anon_kb_after"] = memory["RssAnon"]
        results["rss_file_kb_after"] = memory["RssFile"]
    return results


ENGINES = ("sqlite", "postgresql")
LIMIT_STORAGES = ("local", "redis")

# Per-address limits high enough never to refuse the benchmark's one address, but counted.
COUNTED_LIMITS = {"limits": {"public_per_minute": 10**9, "failed_auth_per_minute": 10**9}}


def alternated(
    args: argparse.Namespace, work: Path, prepare: dict[str, Callable[[Path, int], Instance]]
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Every workload against each kind of instance, for each worker count, in args.rounds
    alternated rounds (a fresh instance each time): {workers: {kind: [measured, ...]}}."""
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for workers in args.workers:
        by_kind: dict[str, list[dict[str, Any]]] = {kind: [] for kind in prepare}
        for round_ in range(max(args.rounds, 1)):
            order = list(prepare) if round_ % 2 == 0 else list(prepare)[::-1]
            for kind in order:
                name = f"{kind}-{workers}-{round_}"
                instance = prepare[kind](work / name, workers)
                by_kind[kind].append(measure_service(instance, args, work, name))
        runs[str(workers)] = by_kind
    return runs


def measure_engines(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Every workload on SQLite and on PostgreSQL, alternated (alternated()); medians, and
    PostgreSQL's req/s as a multiple of SQLite's. PostgreSQL is a throwaway server on this
    machine (bench/postgres.py) with PostgreSQL's default durability (fsync,
    synchronous_commit on), as SQLite keeps synchronous=FULL: both answer only after their
    commit is on disk."""
    from bench.postgres import ThrowawayPostgres

    server = ThrowawayPostgres(durable=True).start()
    try:
        server.setup_role()
        runs = alternated(
            args,
            work,
            {
                "sqlite": lambda where, workers: prepare_instance(where, workers),
                "postgresql": lambda where, workers: prepare_instance(
                    where, workers, database_url=server.create_database()
                ),
            },
        )
    finally:
        server.remove()
    return {"rounds": max(args.rounds, 1), "runs": runs, "summary": summarize_sides(runs)}


def measure_limit_storages(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Every workload with rate limits counted in each process and in Redis (a throwaway
    redis-server on this machine, bench/redis.py), alternated (alternated()); the per-address
    limits on (COUNTED_LIMITS), so that validate and consume count in Redis too."""
    from bench.redis import ThrowawayRedis

    server = ThrowawayRedis().start()
    try:
        runs = alternated(
            args,
            work,
            {
                "local": lambda where, workers: prepare_instance(where, workers, COUNTED_LIMITS),
                "redis": lambda where, workers: prepare_instance(
                    where,
                    workers,
                    {"limits": {**COUNTED_LIMITS["limits"], "storage_uri": server.url}},
                ),
            },
        )
    finally:
        server.remove()
    return {"rounds": max(args.rounds, 1), "runs": runs, "summary": summarize_sides(runs)}


KEYED_MODES = ("create", "create-keyed")


def measure_idempotency(
    args: argparse.Namespace, work: Path, database_url: Callable[[], str] | None = None
) -> dict[str, Any]:
    """create-session without and with an Idempotency-Key (a new one per request, as the
    Python client sends), in args.rounds alternated runs on one server per worker count;
    medians, and the keyed req/s as a multiple of the plain. On SQLite, or on the PostgreSQL
    databases database_url() makes (then the stored answers are not counted)."""
    log = work / "servers.log"
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    stored_keys: dict[str, int] = {}
    engine = "sqlite" if database_url is None else "postgresql"
    for workers in args.workers:
        instance = prepare_instance(
            work / f"keyed-{engine}-{workers}",
            workers,
            database_url="" if database_url is None else database_url(),
        )
        port = serve_on_free_port(instance)
        by_mode: dict[str, list[dict[str, Any]]] = {mode: [] for mode in KEYED_MODES}
        with running(serve_command(instance), port, "/openapi.json", log) as server:
            warm_up(server.url, "create-keyed", args, instance.key)
            for round_ in range(max(args.rounds, 1)):
                order = KEYED_MODES if round_ % 2 == 0 else KEYED_MODES[::-1]
                for mode in order:
                    by_mode[mode].append(run_wrk(server.url, mode, args, instance.key))
        runs[str(workers)] = by_mode
        if database_url is None:
            stored_keys[str(workers)] = _count_rows(instance, "idempotency_keys")
    summary: dict[str, Any] = {}
    for workers, by_mode in runs.items():
        row: dict[str, Any] = {}
        for mode, found in by_mode.items():
            row[mode] = {
                "rps_median": round(statistics.median(r["rps"] for r in found), 1),
                "p50_ms_median": round(statistics.median(r["p50_ms"] for r in found), 2),
                "p99_ms_median": round(statistics.median(r["p99_ms"] for r in found), 2),
                "non_2xx": sum(r["non_2xx"] + r["socket_errors"] for r in found),
            }
        row["keyed_x"] = round(
            row["create-keyed"]["rps_median"] / max(row["create"]["rps_median"], 1e-9), 2
        )
        summary[workers] = row
    return {
        "engine": engine,
        "rounds": max(args.rounds, 1),
        "runs": runs,
        "summary": summary,
        "stored_keys": stored_keys,  # answers stored, warm-up included: one per keyed request
    }


def _count_rows(instance: Instance, table: str) -> int:
    with contextlib.closing(sqlite3.connect(instance.settings.database.path)) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def measure_idempotency_on_postgresql(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """measure_idempotency on a throwaway PostgreSQL with its default durability."""
    from bench.postgres import ThrowawayPostgres

    server = ThrowawayPostgres(durable=True).start()
    try:
        server.setup_role()
        return measure_idempotency(args, work, server.create_database)
    finally:
        server.remove()


def print_idempotencies(entries: list[dict[str, Any]]) -> None:
    for entry in entries:
        print_idempotency(entry)


def print_idempotency(entry: dict[str, Any]) -> None:
    print(
        f"\ncreate-session without and with an Idempotency-Key ({entry['engine']}),"
        f" medians of {entry['rounds']}"
    )
    print(f"{'workers':>7}  {'mode':<13} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'non-2xx':>8}")
    for workers, row in entry["summary"].items():
        for mode in KEYED_MODES:
            m = row[mode]
            print(
                f"{workers:>7}  {mode:<13} {m['rps_median']:>8.0f} {m['p50_ms_median']:>7.2f}"
                f" {m['p99_ms_median']:>7.2f} {m['non_2xx']:>8}"
            )
        print(f"{workers:>7}  keyed x plain: {row['keyed_x']:.2f}")


def summarize_sides(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Per worker count and workload: each kind's median req/s and p99, and the second kind's
    req/s as a multiple of the first's (of the medians), as "<second>_x"."""
    summary: dict[str, Any] = {}
    for workers, by_kind in runs.items():
        first, second = list(by_kind)
        rows: dict[str, Any] = {}
        for workload in WORKLOADS:
            row: dict[str, Any] = {}
            for kind, measured in by_kind.items():
                found = [m["workloads"][workload] for m in measured]
                row[kind] = {
                    "rps_median": round(statistics.median(r["rps"] for r in found), 1),
                    "p99_ms_median": round(statistics.median(r["p99_ms"] for r in found), 2),
                    "p99_ms_max": max(r["p99_ms"] for r in found),
                    "non_2xx": sum(r["non_2xx"] + r["socket_errors"] for r in found),
                }
            row[f"{second}_x"] = round(
                row[second]["rps_median"] / max(row[first]["rps_median"], 1e-9), 2
            )
            rows[workload] = row
        summary[workers] = rows
    return summary


def print_sides(entry: dict[str, Any], title: str, labels: dict[str, str]) -> None:
    """The summary of alternated runs; labels: {kind: column title}, in the runs' order."""
    (first, first_label), (second, second_label) = labels.items()
    ratio = f"{second_label.split()[0]} x {first_label.split()[0]}"
    print(f"\n{title}, medians of {entry['rounds']} alternated round(s)")
    print(
        f"{'workers':>7}  {'workload':<9} {first_label + ' req/s':>18} {'p99 ms':>7}"
        f" {second_label + ' req/s':>18} {'p99 ms':>7} {ratio:>20}"
    )
    for workers, rows in entry["summary"].items():
        for workload, row in rows.items():
            one, two = row[first], row[second]
            print(
                f"{workers:>7}  {workload:<9} {one['rps_median']:>18.0f}"
                f" {one['p99_ms_median']:>7.2f} {two['rps_median']:>18.0f}"
                f" {two['p99_ms_median']:>7.2f} {row[f'{second}_x']:>20.2f}"
            )


def print_engines(entry: dict[str, Any]) -> None:
    print_sides(entry, "SQLite and PostgreSQL", {"sqlite": "SQLite", "postgresql": "PostgreSQL"})


def print_limit_storages(entry: dict[str, Any]) -> None:
    print_sides(
        entry,
        "Rate limits counted in each process and in Redis (SQLite)",
        {"local": "in-process", "redis": "Redis"},
    )


def ratios_to_bare(measured: dict[str, Any], ceiling: dict[str, Any]) -> tuple[float, float]:
    """(req/s, p99) of a dailyplay run as multiples of the bare run it is compared with."""
    return (
        measured["rps"] / ceiling["rps"],
        measured["p99_ms"] / max(ceiling["p99_ms"], 0.01),
    )


def scaling(workers: dict[str, Any]) -> dict[str, dict[str, float]]:
    """For each worker count other than 1: every run's req/s as a multiple of its 1-worker
    run's, the bare app's beside the service's (how much a second worker can give here)."""
    one = workers.get("1")
    if one is None:
        return {}
    return {
        count: {
            mode: round(entry[side][mode]["rps"] / max(one[side][mode]["rps"], 1e-9), 2)
            for side in ("bare", "dailyplay")
            for mode in entry[side]
        }
        for count, entry in workers.items()
        if count != "1"
    }


def measure_table_sizes(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """1 worker, validate/consume/create against databases already holding `size` tokens."""
    found: dict[str, Any] = {}
    log = work / "servers.log"
    for size in args.sizes:
        instance = prepare_instance(work / f"size-{size}", 1)
        seed_tokens(instance, size, None)
        db_path = Path(instance.settings.database.path)
        files = [db_path, db_path.with_name(db_path.name + "-wal")]
        bytes_used = sum(f.stat().st_size for f in files if f.exists())
        token_files = {}
        for workload in ("validate", "consume"):
            token_files[workload] = work / f"tokens-size-{size}-{workload}.txt"
            seed_tokens(instance, args.tokens_per_workload, token_files[workload])
        port = serve_on_free_port(instance)
        entry: dict[str, Any] = {
            "db_bytes": bytes_used,
            "db_bytes_per_million": round(bytes_used / size * 1_000_000) if size else None,
        }
        with running(serve_command(instance), port, "/openapi.json", log) as server:
            warm_up(server.url, "create", args, instance.key)
            for workload in ("create", "validate", "consume"):
                entry[workload] = run_wrk(
                    server.url, workload, args, instance.key, token_files.get(workload)
                )
        found[str(size)] = entry
    return found


def measure_pairs(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The 1-worker ratios to bare, each measured args.pairs times as a pair of back-to-back
    runs (bare, then dailyplay) with both servers up all along. A slow minute of the machine
    then slows both runs of a pair, and the median of the pairs' ratios leaves out the odd one."""
    log = work / "servers.log"
    instance = prepare_instance(work / "pairs", 1)
    token_files: dict[tuple[str, int], Path] = {}
    for workload in ("validate", "consume"):
        for pair in range(args.pairs):
            token_files[workload, pair] = work / f"tokens-pairs-{workload}-{pair}.txt"
            seed_tokens(instance, args.tokens_per_workload, token_files[workload, pair])
    port, bare_port = serve_on_free_port(instance), free_port()
    runs: dict[str, list[dict[str, Any]]] = {workload: [] for workload in BARE_FOR}
    with (
        running(bare_command(bare_port, 1), bare_port, "/bare", log) as bare,
        running(serve_command(instance), port, "/openapi.json", log) as server,
    ):
        warm_up(bare.url, "bare-post", args)
        warm_up(server.url, "create", args, instance.key)
        for pair in range(args.pairs):
            for workload, bare_mode in BARE_FOR.items():
                ceiling = run_wrk(bare.url, bare_mode, args)
                measured = run_wrk(
                    server.url, workload, args, instance.key, token_files.get((workload, pair))
                )
                runs[workload].append({"bare": ceiling, "dailyplay": measured})
    return {"pairs": args.pairs, "runs": runs, "summary": summarize_pairs(runs)}


def summarize_pairs(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per workload: the median, lowest and highest of the pairs' ratios (req/s and p99)."""
    summary: dict[str, Any] = {}
    for workload, pairs in runs.items():
        computed = [ratios_to_bare(pair["dailyplay"], pair["bare"]) for pair in pairs]
        ratios = [rps for rps, _ in computed]
        p99s = [p99 for _, p99 in computed]
        summary[workload] = {
            "ratio_median": round(statistics.median(ratios), 2),
            "ratio_min": round(min(ratios), 2),
            "ratio_max": round(max(ratios), 2),
            "p99_ratio_median": round(statistics.median(p99s), 2),
            "p99_ratio_max": round(max(p99s), 2),
            "non_2xx": sum(pair["dailyplay"]["non_2xx"] for pair in pairs),
        }
    return summary


def print_pairs(entry: dict[str, Any]) -> None:
    print(f"\nratios to bare, 1 worker: {entry['pairs']} pairs of back-to-back runs")
    print(
        f"{'workload':<9} {'median':>7} {'lowest':>7} {'highest':>8}"
        f" {'p99 x bare':>11} {'(worst)':>8}"
    )
    for workload, row in entry["summary"].items():
        print(
            f"{workload:<9} {row['ratio_median']:>7} {row['ratio_min']:>7} {row['ratio_max']:>8}"
            f" {row['p99_ratio_median']:>11} {row['p99_ratio_max']:>8}"
        )
    for workload, pairs in entry["runs"].items():
        shown = ", ".join(f"{p['bare']['rps']:.0f}/{p['dailyplay']['rps']:.0f}" for p in pairs)
        print(f"  {workload}: bare/dailyplay req/s {shown}")


# What the default configuration is compared with, each differing from it in one setting.
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "default": {},
    "lines-off": {"server": {"log_level": "warning"}},
    "metrics-off": {"metrics": {"enabled": False}},
}
SERVER_CPU, WRK_CPU = 0, 1


def measure_variants(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """create, validate and consume on the default configuration and on each VARIANTS entry,
    1 worker on one CPU and wrk on the other (where the machine lets us pin them), in
    args.rounds rounds that alternate the configurations (their order turning each round), so
    that a slow minute of the machine falls on all of them; medians per configuration."""
    log = work / "servers.log"
    pin = pinning_available()
    server_cpu, wrk_cpu = (SERVER_CPU, WRK_CPU) if pin else (None, None)
    names = list(VARIANTS)
    instances = {}
    tokens: dict[tuple[str, str, int], Path] = {}
    for name in names:
        instances[name] = prepare_instance(work / f"variant-{name}", 1, VARIANTS[name])
        for workload in ("validate", "consume"):
            for round_ in range(args.rounds):
                path = work / f"tokens-variant-{name}-{workload}-{round_}.txt"
                seed_tokens(instances[name], args.tokens_per_workload, path)
                tokens[name, workload, round_] = path
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        workload: {name: [] for name in names} for workload in BARE_FOR
    }
    with contextlib.ExitStack() as stack:
        servers = {}
        for name in names:
            port = serve_on_free_port(instances[name])
            servers[name] = stack.enter_context(
                running(serve_command(instances[name]), port, "/openapi.json", log, server_cpu)
            )
            warm_up(servers[name].url, "create", args, instances[name].key, wrk_cpu)
        for round_ in range(args.rounds):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            for workload in BARE_FOR:
                for name in order:
                    measured = run_wrk(
                        servers[name].url,
                        workload,
                        args,
                        instances[name].key,
                        tokens.get((name, workload, round_)),
                        cpu=wrk_cpu,
                    )
                    runs[workload][name].append(measured)
    summary: dict[str, Any] = {}
    for workload, by_name in runs.items():
        medians = {name: statistics.median(r["rps"] for r in by_name[name]) for name in names}
        summary[workload] = {
            name: {
                "rps_median": round(medians[name], 1),
                "p99_ms_median": round(statistics.median(r["p99_ms"] for r in by_name[name]), 2),
                # the default's req/s as a multiple of this configuration's
                "default_x": round(medians["default"] / max(medians[name], 1e-9), 3),
                "non_2xx": sum(r["non_2xx"] for r in by_name[name]),
            }
            for name in names
        }
    return {"rounds": args.rounds, "pinned": pin, "runs": runs, "summary": summary}


def print_variants(entry: dict[str, Any]) -> None:
    where = "1 worker on CPU 0, wrk on CPU 1" if entry["pinned"] else "1 worker, not pinned"
    print(
        f"\nthe default configuration against one setting changed ({where};"
        f" medians of {entry['rounds']} alternated rounds)"
    )
    names = [n for n in next(iter(entry["summary"].values())) if n != "default"]
    header = f"{'workload':<9} {'default req/s':>13} {'p99 ms':>7}"
    for name in names:
        header += f" {name + ' req/s':>18} {'default x':>10}"
    print(header)
    for workload, row in entry["summary"].items():
        line = (
            f"{workload:<9} {row['default']['rps_median']:>13.0f}"
            f" {row['default']['p99_ms_median']:>7.2f}"
        )
        for name in names:
            line += f" {row[name]['rps_median']:>18.0f} {row[name]['default_x']:>10.3f}"
        print(line)


def soak(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """1 worker under the mixed workload for args.soak seconds, memory sampled as it runs."""
    instance = prepare_instance(work / "soak", 1)
    tokens = work / "tokens-soak.txt"
    seed_tokens(instance, args.soak_tokens, tokens)
    port = serve_on_free_port(instance)
    samples: list[dict[str, Any]] = []
    stop = threading.Event()
    wal = Path(f"{instance.settings.database.path}-wal")
    with running(serve_command(instance), port, "/openapi.json", work / "servers.log") as server:

        def sample() -> None:
            started = time.monotonic()
            while not stop.wait(args.soak_interval):
                wal_kb = wal.stat().st_size // 1024 if wal.exists() else 0
                samples.append(
                    {
                        "t_s": round(time.monotonic() - started),
                        **server.memory_kb(),
                        "wal_kb": wal_kb,
                    }
                )

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            load = run_wrk(
                server.url, "mixed", argparse.Namespace(**{**vars(args), "duration": args.soak}),
                instance.key, tokens,
            )  # fmt: skip
        finally:
            stop.set()
            sampler.join()
    return summarize_soak(args.soak, load, samples)


def summarize_soak(
    seconds: int, load: dict[str, Any], samples: list[dict[str, Any]]
) -> dict[str, Any]:
    """Growth is judged on the second half of the run: the first fills SQLite's page caches
    (64 MiB per connection, by design) and Python's pools. It is a robust slope over every
    sample of that half, so a single high or low sample at either end cannot hide a steady
    climb or invent one."""
    settled = [s for s in samples if s["t_s"] >= seconds / 2] or samples
    return {
        "seconds": seconds,
        "load": load,
        "samples": samples,
        "anon_mb_settled": round(settled[0]["RssAnon"] / 1024, 1),
        "anon_mb_end": round(settled[-1]["RssAnon"] / 1024, 1),
        "anon_mb_max": round(max(s["RssAnon"] for s in samples) / 1024, 1),
        "anon_mb_per_minute": round(mb_per_minute([(s["t_s"], s["RssAnon"]) for s in settled]), 2),
        "file_mb_end": round(settled[-1]["RssFile"] / 1024, 1),
        # The -wal file: it must stop growing too (SQLite starts the log over).
        "wal_mb_max": round(max(s.get("wal_kb", 0) for s in samples) / 1024, 1),
        "wal_mb_end": round(settled[-1].get("wal_kb", 0) / 1024, 1),
    }


def mb_per_minute(points: list[tuple[float, float]]) -> float:
    """Slope of (seconds, KiB) points in MB per minute: the median of the slopes between every
    two points (Theil-Sen), which one odd sample cannot move; 0 for fewer than two times."""
    slopes = [
        (kb2 - kb1) / (t2 - t1)
        for i, (t1, kb1) in enumerate(points)
        for t2, kb2 in points[i + 1 :]
        if t2 != t1
    ]
    return statistics.median(slopes) * 60 / 1024 if slopes else 0.0


def print_soak(entry: dict[str, Any]) -> None:
    load = entry["load"]
    print(f"\nsoak: mixed 1:2:1, 1 worker, {entry['seconds']} s")
    print(
        f"  {load['rps']:.0f} req/s, p50 {load['p50_ms']:.2f} ms, p99 {load['p99_ms']:.2f} ms,"
        f" non-2xx {load['non_2xx']}"
    )
    print(
        f"  heap (RssAnon) {entry['anon_mb_settled']} MB at half time -> {entry['anon_mb_end']}"
        f" MB at the end (max {entry['anon_mb_max']}; {entry['anon_mb_per_minute']:+} MB/min"
        " over the second half);"
        f" database pages mapped (RssFile) {entry['file_mb_end']} MB"
    )
    print(f"  -wal file {entry['wal_mb_end']} MB at the end (max {entry['wal_mb_max']} MB)")


def print_table(results: dict[str, Any]) -> None:
    print(f"\nDailyPlay benchmark — {results['machine']}")
    print(
        f"wrk -t{results['threads']} -c{results['connections']} -d{results['duration_s']}s,"
        f" each server after a {results['warm_up_s']} s warm-up run\n"
    )
    header = f"{'workers':>7}  {'workload':<9} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7}"
    print(header + f" {'x bare':>7} {'non-2xx':>8}")
    for workers, entry in results["workers"].items():
        for mode, m in entry["bare"].items():
            print(
                f"{workers:>7}  {mode:<9} {m['rps']:>9.0f} {m['p50_ms']:>7.2f} {m['p99_ms']:>7.2f}"
                f" {'':>7} {m['non_2xx']:>8}"
            )
        for mode, m in entry["dailyplay"].items():
            ratio = m.get("ratio_to_bare", "")
            print(
                f"{workers:>7}  {mode:<9} {m['rps']:>9.0f} {m['p50_ms']:>7.2f} {m['p99_ms']:>7.2f}"
                f" {ratio!s:>7} {m['non_2xx']:>8}"
            )
        print(
            f"{'':>7}  RSS after: {entry['rss_kb_after'] / 1024:.1f} MB (heap"
            f" {entry['rss_anon_kb_after'] / 1024:.1f} MB, mapped database and code"
            f" {entry['rss_file_kb_after'] / 1024:.1f} MB)"
        )
    if results.get("variants"):
        print_variants(results["variants"])
    for count, multiples in results.get("scaling", {}).items():
        print(f"\n{count} workers / 1 worker, req/s:")
        print("  " + ", ".join(f"{mode} {multiple:.2f}x" for mode, multiple in multiples.items()))
    if results.get("table_sizes"):
        print("\ntokens already stored (1 worker): req/s create / validate / consume, DB size")
        for size, entry in results["table_sizes"].items():
            per_million = entry["db_bytes_per_million"]
            size_text = f"{per_million / 1e6:.0f} MB per million" if per_million else "-"
            print(
                f"{int(size):>9}: {entry['create']['rps']:>7.0f} / {entry['validate']['rps']:>7.0f}"
                f" / {entry['consume']['rps']:>7.0f}   {size_text}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="about 30 seconds, to check it runs")
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--sizes", type=int, nargs="*", default=[0, 1_000_000, 5_000_000],
        help="tokens already in the database for the table-size runs",
    )  # fmt: skip
    parser.add_argument("--tokens-per-workload", type=int, default=200_000)
    parser.add_argument("--out", type=Path, default=Path("bench-results.json"))
    parser.add_argument(
        "--soak", type=int, default=0, metavar="SECONDS",
        help="only the memory run: 1 worker under the mixed workload this long (e.g. 600)",
    )  # fmt: skip
    parser.add_argument(
        "--pairs", type=int, default=0, metavar="N",
        help="only the 1-worker ratios to bare: N back-to-back pairs of runs each, as medians",
    )  # fmt: skip
    parser.add_argument(
        "--rounds", type=int, default=3,
        help="alternated rounds of the default configuration against request lines off and"
        " metrics off (0: skip them)",
    )  # fmt: skip
    parser.add_argument(
        "--variants", action="store_true",
        help="only the default configuration against request lines off and metrics off",
    )  # fmt: skip
    parser.add_argument(
        "--engines", action="store_true",
        help="only the service on SQLite and on a throwaway PostgreSQL, side by side, in"
        " --rounds alternated rounds per worker count",
    )  # fmt: skip
    parser.add_argument(
        "--limits", action="store_true",
        help="only the service with rate limits counted in each process and in a throwaway"
        " Redis, side by side, in --rounds alternated rounds per worker count",
    )  # fmt: skip
    parser.add_argument(
        "--idempotency", action="store_true",
        help="only create-session without and with an Idempotency-Key, in --rounds alternated"
        " runs per worker count (with --engines, on a throwaway PostgreSQL too)",
    )  # fmt: skip
    parser.add_argument("--soak-interval", type=float, default=10, help="seconds between samples")
    parser.add_argument("--soak-tokens", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    if args.smoke:
        args.duration, args.workers, args.sizes = 1, [1, 2], [0]
        args.tokens_per_workload = 20_000
        args.rounds = 1
    if shutil.which("wrk") is None:
        print("bench: wrk is needed (Debian/Ubuntu: apt-get install wrk)", file=sys.stderr)
        return 2
    results: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "threads": args.threads,
        "connections": args.connections,
        "duration_s": args.duration,
        "warm_up_s": min(WARM_UP_SECONDS, args.duration),
        "workers": {},
    }
    with tempfile.TemporaryDirectory(prefix="dailyplay-bench-") as tmp:
        work = Path(tmp)
        if args.soak:
            results["soak"] = soak(args, work)
            return write_results(args.out, results, lambda: print_soak(results["soak"]))
        if args.pairs:
            results["pairs"] = measure_pairs(args, work)
            return write_results(args.out, results, lambda: print_pairs(results["pairs"]))
        if args.idempotency:
            # With --engines, on PostgreSQL too.
            entries = [measure_idempotency(args, work)]
            results["idempotency"] = entries[0]
            if args.engines:
                entries.append(measure_idempotency_on_postgresql(args, work))
                results["idempotency_postgresql"] = entries[1]
            return write_results(args.out, results, lambda: print_idempotencies(entries))
        if args.engines:
            results["engines"] = measure_engines(args, work)
            return write_results(args.out, results, lambda: print_engines(results["engines"]))
        if args.limits:
            results["limits"] = measure_limit_storages(args, work)
            return write_results(args.out, results, lambda: print_limit_storages(results["limits"]))
        if args.variants:
            results["variants"] = measure_variants(args, work)
            return write_results(args.out, results, lambda: print_variants(results["variants"]))
        for workers in args.workers:
            results["workers"][str(workers)] = measure_workers(workers, args, work)
        results["scaling"] = scaling(results["workers"])
        if args.sizes:
            results["table_sizes"] = measure_table_sizes(args, work)
        if args.rounds:
            results["variants"] = measure_variants(args, work)
    return write_results(args.out, results, lambda: print_table(results))


def write_results(out: Path, results: dict[str, Any], show: Callable[[], None]) -> int:
    """Write the JSON result file, show the results, say where they went; exit status 0."""
    out.write_text(json.dumps(results, indent=2) + "\n")
    show()
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
