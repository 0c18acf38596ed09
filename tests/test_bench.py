"""The benchmark runs (a smoke run; its figures are not judged here, see docs/performance.md)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def run_bench(*options: str) -> subprocess.CompletedProcess[str]:
    """`python -m bench` with options, as a user runs it; it must succeed."""
    require("wrk", shutil.which("wrk") is not None, "apt-get install wrk (.ci/run does)")
    result = subprocess.run(
        [sys.executable, "-m", "bench", *options],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


def test_the_benchmark_smoke_run_measures_every_workload(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    result = run_bench("--smoke", "--out", str(out))
    results = json.loads(out.read_text())
    run = results["workers"]["1"]
    for mode in ("bare-get", "bare-post"):
        assert run["bare"][mode]["rps"] > 0
    for workload in ("create", "validate", "consume", "mixed"):
        measured = run["dailyplay"][workload]
        assert measured["rps"] > 0 and measured["non_2xx"] == 0, (workload, measured)
        assert measured["socket_errors"] == 0, (workload, measured)
    assert run["rss_kb_after"] > 0
    # 2 workers as well, each run's req/s also as a multiple of its 1-worker run's.
    two = results["workers"]["2"]
    for side, mode in [("bare", "bare-get"), ("dailyplay", "validate")]:
        assert two[side][mode]["non_2xx"] == 0 and two[side][mode]["rps"] > 0
        multiple = two[side][mode]["rps"] / run[side][mode]["rps"]
        assert results["scaling"]["2"][mode] == pytest.approx(multiple, abs=0.006)
    assert "2 workers / 1 worker, req/s:" in result.stdout
    assert f"validate {results['scaling']['2']['validate']:.2f}x" in result.stdout
    assert results["table_sizes"]["0"]["validate"]["rps"] > 0
    assert "x bare" in result.stdout
    assert results["warm_up_s"] == 1 and "warm-up run" in result.stdout
    # The default configuration against request lines off and metrics off, side by side.
    variants = results["variants"]["summary"]
    for workload in ("create", "validate", "consume"):
        row = variants[workload]
        assert set(row) == {"default", "lines-off", "metrics-off"}
        for name, measured in row.items():
            assert measured["rps_median"] > 0 and measured["non_2xx"] == 0, (workload, name)
        expected = row["default"]["rps_median"] / row["lines-off"]["rps_median"]
        assert row["lines-off"]["default_x"] == pytest.approx(expected, abs=0.001)
    assert "lines-off req/s" in result.stdout and "metrics-off req/s" in result.stdout
    # Every process it started is gone: nothing listens on the ports it used.
    assert (
        "dailyplay-bench-"
        not in subprocess.run(
            ["ps", "-eo", "args"], capture_output=True, text=True, check=True
        ).stdout
    )


def test_the_memory_soak_samples_the_server_as_it_runs(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    result = run_bench(
        "--soak", "6", "--soak-interval", "1", "--soak-tokens", "5000", "--out", str(out)
    )
    soak = json.loads(out.read_text())["soak"]
    assert soak["load"]["rps"] > 0 and soak["load"]["socket_errors"] == 0
    assert len(soak["samples"]) >= 4
    assert all(sample["RssAnon"] > 0 for sample in soak["samples"])
    assert soak["wal_mb_max"] > 0  # the -wal file is sampled beside the memory
    assert "heap (RssAnon)" in result.stdout


def limiter_json(*options: str) -> dict:
    """`python -m bench.limiter --json` with options; what it printed."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.limiter", *options, "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return dict(json.loads(result.stdout))


def test_the_rate_limiter_benchmark_compares_storages(redis_server) -> None:
    found = limiter_json(
        "--keys", "1", "100", "--hits", "400", "--redis-url", redis_server.url
    )  # fmt: skip
    for storage in ("limits MemoryStorage", "dailyplay LocalCounters"):
        assert set(found["us_per_hit"][storage]) == {"1", "100"}
    redis = found["redis"]
    assert redis["hits"] == 400 and redis["latency_us"] > 0 and redis["hits_per_second"] > 0


def test_the_rate_limiter_benchmark_counts_redis_commands_on_its_own_server() -> None:
    """On a throwaway Redis it can read: one script run (one round trip) per request."""
    from bench.redis import binary

    require("redis-server", binary() is not None, "apt-get install redis-server (.ci/run does)")
    found = limiter_json("--keys", "10", "--hits", "300", "--redis")
    commands = found["redis"]["redis_commands_per_hit"]
    assert commands["evalsha"] == 1.0
    assert commands["incrby"] == 2.0  # the minute and the day; the lockout only read
    assert "eval" not in commands and "script|load" not in commands


def test_the_limits_comparison_runs_on_a_throwaway_redis(tmp_path: Path) -> None:
    out = tmp_path / "limits.json"
    result = run_bench(
        "--limits", "--duration", "1", "--workers", "1", "--rounds", "1",
        "--tokens-per-workload", "20000", "--out", str(out),
    )  # fmt: skip
    limits = json.loads(out.read_text())["limits"]
    for workload in ("create", "validate", "consume", "mixed"):
        row = limits["summary"]["1"][workload]
        for storage in ("local", "redis"):
            assert row[storage]["rps_median"] > 0 and row[storage]["non_2xx"] == 0, row
        expected = row["redis"]["rps_median"] / row["local"]["rps_median"]
        assert row["redis_x"] == pytest.approx(expected, abs=0.006)
    assert "Redis x in-process" in result.stdout


def test_the_idempotency_comparison_sends_a_new_key_with_every_keyed_create(
    tmp_path: Path,
) -> None:
    out = tmp_path / "keyed.json"
    result = run_bench(
        "--idempotency", "--duration", "1", "--workers", "1", "--rounds", "2",
        "--out", str(out),
    )  # fmt: skip
    keyed = json.loads(out.read_text())["idempotency"]
    row = keyed["summary"]["1"]
    for mode in ("create", "create-keyed"):
        assert len(keyed["runs"]["1"][mode]) == 2
        assert row[mode]["rps_median"] > 0 and row[mode]["non_2xx"] == 0, row
    # Every keyed request sent a key of its own (a repeated one would be a replay, also 200).
    keyed_requests = sum(run["requests"] for run in keyed["runs"]["1"]["create-keyed"])
    assert keyed["stored_keys"]["1"] >= keyed_requests > 0
    expected = row["create-keyed"]["rps_median"] / row["create"]["rps_median"]
    assert row["keyed_x"] == pytest.approx(expected, abs=0.006)
    assert "keyed x plain" in result.stdout


def test_the_paired_runs_measure_each_ratio_against_a_bare_run_just_before(
    tmp_path: Path,
) -> None:
    out = tmp_path / "pairs.json"
    result = run_bench("--smoke", "--pairs", "2", "--out", str(out))
    pairs = json.loads(out.read_text())["pairs"]
    assert pairs["pairs"] == 2
    for workload in ("create", "validate", "consume"):
        runs = pairs["runs"][workload]
        assert len(runs) == 2
        for run in runs:
            assert run["bare"]["rps"] > 0 and run["dailyplay"]["rps"] > 0, (workload, run)
            assert run["dailyplay"]["non_2xx"] == 0 and run["dailyplay"]["socket_errors"] == 0
        row = pairs["summary"][workload]
        ratios = sorted(run["dailyplay"]["rps"] / run["bare"]["rps"] for run in runs)
        assert row["ratio_median"] == round(sum(ratios) / 2, 2)
        assert row["ratio_min"] == round(ratios[0], 2) and row["ratio_max"] == round(ratios[1], 2)
    assert "pairs of back-to-back runs" in result.stdout


def test_the_pairs_summary_is_the_median_pair_not_the_odd_one() -> None:
    from bench.__main__ import summarize_pairs

    def pair(bare: float, app: float) -> dict[str, dict[str, float]]:
        return {
            "bare": {"rps": bare, "p99_ms": 10.0},
            "dailyplay": {"rps": app, "p99_ms": 20.0, "non_2xx": 0},
        }

    # Four pairs at 0.60x and one where the bare run caught a slow moment (1.2x).
    runs = {"create": [pair(6000, 3600)] * 4 + [pair(3000, 3600)]}
    row = summarize_pairs(runs)["create"]
    assert row["ratio_median"] == 0.6
    assert (row["ratio_min"], row["ratio_max"]) == (0.6, 1.2)
    assert row["p99_ratio_median"] == 2.0


def test_the_soak_reports_a_steady_climb_that_one_sample_would_hide() -> None:
    from bench.__main__ import summarize_soak

    # 0.3 MiB every 30 s over the second half, with the first sample of that half as high as
    # the last: comparing the two would say 0.0 MB/min.
    samples = [{"t_s": t, "RssAnon": 100_000 + 10 * t, "RssFile": 1} for t in range(30, 601, 30)]
    samples[9]["RssAnon"] = samples[-1]["RssAnon"]  # t = 300 s
    grows = summarize_soak(600, {}, samples)["anon_mb_per_minute"]
    assert 0.45 <= grows <= 0.75, grows
    flat = [{"t_s": t, "RssAnon": 100_000, "RssFile": 1} for t in range(30, 601, 30)]
    flat[9]["RssAnon"] = 120_000  # one high sample, then back
    assert abs(summarize_soak(600, {}, flat)["anon_mb_per_minute"]) < 0.2


def test_the_engines_run_measures_every_workload_on_sqlite_and_postgresql(
    tmp_path: Path,
) -> None:
    from bench.postgres import binaries

    require("PostgreSQL", binaries() is not None, "apt-get install postgresql (.ci/run does)")
    before = _postgres_servers()
    out = tmp_path / "engines.json"
    result = run_bench(
        "--engines", "--duration", "1", "--workers", "1", "2", "--rounds", "1",
        "--tokens-per-workload", "20000", "--out", str(out),
    )  # fmt: skip
    engines = json.loads(out.read_text())["engines"]
    assert engines["rounds"] == 1
    for workers in ("1", "2"):
        for workload in ("create", "validate", "consume", "mixed"):
            row = engines["summary"][workers][workload]
            for engine in ("sqlite", "postgresql"):
                assert row[engine]["rps_median"] > 0, (workers, workload, engine)
                assert row[engine]["non_2xx"] == 0, (workers, workload, engine)
            expected = row["postgresql"]["rps_median"] / row["sqlite"]["rps_median"]
            assert row["postgresql_x"] == pytest.approx(expected, abs=0.006)
    assert "PostgreSQL x SQLite" in result.stdout
    # The throwaway PostgreSQL server it started is gone with the run (the tests' own may run).
    assert _postgres_servers() <= before


def _postgres_servers() -> set[str]:
    """The data directories of the throwaway PostgreSQL servers running now."""
    listing = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    return set(re.findall(r"-D (\S*dailyplay-pg-\S*)", listing.stdout))
