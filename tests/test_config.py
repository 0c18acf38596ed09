"""Settings: config.toml documents every key with its default; env overrides; clear errors."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from conftest import run_cli, serve

from dailyplay import config

ROOT = Path(__file__).resolve().parent.parent


def test_config_toml_documents_every_setting_with_its_default() -> None:
    documented = tomllib.loads((ROOT / "config.toml").read_text())
    table = config.settings_table()
    assert {(s, k) for s, k, _, _ in table} == {
        (section, key) for section, values in documented.items() for key in values
    }
    for section, key, default, _help in table:
        assert documented[section][key] == default, f"{section}.{key}"
    text = (ROOT / "config.toml").read_text()
    for section, key, _default, _help in table:
        line = next(line for line in text.splitlines() if line.startswith(f"{key} ="))
        assert "#" in line, f"{section}.{key} has no comment"


def test_defaults_without_a_file() -> None:
    settings = config.load(env={})
    assert settings.server.port == 8787 and settings.database.synchronous == "FULL"
    assert settings.sessions.default_expires_minutes == 1440


def test_file_then_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[server]\nport = 9000\n[cors]\nallow_origins = ["https://a.example"]\n')
    settings = config.load(
        cfg,
        env={
            "DAILYPLAY_SERVER_WORKERS": "3",
            "DAILYPLAY_AUTH_AUTHORIZED_PARTIES": "https://x, https://y",
        },
    )
    assert settings.server.port == 9000 and settings.server.workers == 3
    assert settings.cors.allow_origins == ["https://a.example"]
    assert settings.auth.authorized_parties == ["https://x", "https://y"]
    by_env = config.load(
        env={
            "DAILYPLAY_CONFIG": str(cfg),
            "DAILYPLAY_SERVER_PORT": "9100",
            "DAILYPLAY_CORS_ALLOW_ORIGINS": '["*"]',
        }
    )
    assert by_env.server.port == 9100 and by_env.cors.allow_origins == ["*"]
    assert by_env.metrics.enabled is True
    for text, enabled in (("false", False), ("0", False), ("TRUE", True), ("no", False)):
        assert config.load(env={"DAILYPLAY_METRICS_ENABLED": text}).metrics.enabled is enabled


@pytest.mark.parametrize(
    ("text", "env", "fragment"),
    [
        ("[server]\nport = 0\n", {}, "server.port"),
        ("[server]\nport = 'x'\n", {}, "server.port"),
        ("[server]\nprot = 1\n", {}, "unknown setting server.prot"),
        ("[nope]\n", {}, "unknown section [nope]"),
        ("[server\n", {}, "not valid TOML"),
        ("", {"DAILYPLAY_SERVER_PORT": "abc"}, "server.port"),
        ("", {"DAILYPLAY_SERVER_WORKERS": "0"}, "server.workers"),
        ("[metrics]\nenabled = 'maybe'\n", {}, "metrics.enabled"),
        ("[metrics]\nenabled = 1\n", {}, "metrics.enabled"),
        ("", {"DAILYPLAY_METRICS_ENABLED": "perhaps"}, "metrics.enabled"),
        ("[metrics]\nport = 8787\n", {}, "metrics.port must differ"),
        ("[metrics]\nport = 70000\n", {}, "metrics.port"),
        (
            "[sessions]\ndefault_expires_minutes = 100\nmax_expires_minutes = 50\n",
            {},
            "default_expires",
        ),
        ("[sessions]\nmax_expires_minutes = 525601\n", {}, "max_expires_minutes"),
        ("[database]\nsynchronous = 'OFF'\n", {}, "synchronous"),
        ("[auth]\njwks_url = 'https://x'\njwt_public_key = 'k.pem'\n", {}, "only one"),
        ("[auth]\njwks_url = 'ftp://x'\n", {}, "jwks_url"),
        ("[server]\ntrusted_proxies = ['not-an-ip']\n", {}, "trusted_proxies"),
        ("[limits]\nmax_metadata_bytes = 100000\n", {}, "max_metadata_bytes"),
        ("[server]\nworkers = true\n", {}, "server.workers"),
        # TOML has types: a string is no port, no switch and no list
        ("[server]\nport = '9000'\n", {}, "server.port (from"),
        ("[metrics]\nenabled = 'false'\n", {}, "metrics.enabled (from"),
        ("[cors]\nallow_origins = 'https://a.example'\n", {}, "must be a list of strings"),
    ],
)
def test_bad_settings_are_named(tmp_path: Path, text: str, env: dict, fragment: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    with pytest.raises(config.ConfigError, match=None) as info:
        config.load(cfg, env=env)
    assert fragment in str(info.value)
    # ...and where the bad value came from: the file, or the variable
    assert (next(iter(env)) if env else str(cfg)) in str(info.value) or (
        env and "environment" in str(info.value)
    ), str(info.value)


def test_misspelt_variables_are_warned_about_with_the_closest_setting(tmp_path: Path) -> None:
    result = run_cli(
        "init-db",
        env={
            "DAILYPLAY_DATABASE_PATH": str(tmp_path / "d.db"),
            "DAILYPLAY_SERVR_PORT": "9000",
            "DAILYPLAY_SERVER_PROT": "9000",
            "DAILYPLAY_CONFIG_FILE": "x.toml",
            "DAILYPLAY_TEST_ANYTHING": "1",  # the test suite's own prefix
        },
    )
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: DAILYPLAY_CONFIG_FILE is not a setting and is ignored",
        "warning: DAILYPLAY_SERVER_PROT is not a setting and is ignored"
        " (did you mean DAILYPLAY_SERVER_PORT?)",
        "warning: DAILYPLAY_SERVR_PORT is not a setting and is ignored"
        " (did you mean DAILYPLAY_SERVER_PORT?)",
    ]


@pytest.mark.slow
def test_serve_warns_once_about_unknown_variables_and_missing_bearer_auth(
    make_settings, tmp_path: Path
) -> None:
    settings = make_settings(auth={"jwt_public_key": ""})
    with serve(settings, tmp_path, env={"DAILYPLAY_SERVR_PORT": "1"}) as server:
        log = server.log()
    warnings = [
        json.loads(line)["message"]
        for line in log.splitlines()
        if line.startswith('{"time":') and '"level":"warning"' in line
    ]
    assert warnings == [
        "DAILYPLAY_SERVR_PORT is not a setting and is ignored"
        " (did you mean DAILYPLAY_SERVER_PORT?)",
        "no bearer authentication is configured (auth.jwks_url or auth.jwt_public_key):"
        " key management through the API answers 401 to every request",
    ]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="not found"):
        config.load(tmp_path / "absent.toml", env={})


def test_database_url_picks_the_engine_by_its_scheme(tmp_path: Path) -> None:
    assert config.load(env={}).database.engine == "sqlite"
    relative = config.load(env={"DAILYPLAY_DATABASE_URL": "sqlite:///data/dp.db"}).database
    assert (relative.engine, relative.path) == ("sqlite", "data/dp.db")
    absolute = config.load(env={"DAILYPLAY_DATABASE_URL": f"sqlite:///{tmp_path}/x.db"}).database
    assert absolute.path == f"{tmp_path}/x.db" and absolute.display == f"{tmp_path}/x.db"
    for scheme in ("postgresql", "postgres", "POSTGRESQL"):
        pg = config.load(
            env={"DAILYPLAY_DATABASE_URL": f"{scheme}://dp:s3cret@db.internal:5433/dp?sslmode=x"}
        ).database
        assert pg.engine == "postgresql"
        # Where it is, for messages and logs: never the password (nor options that may hold one).
        assert pg.display == f"{scheme.lower()}://dp@db.internal:5433/dp"
        assert "s3cret" not in pg.display


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("mysql://u:secret@h/db", "unknown scheme (mysql)"),
        ("dailyplay.db", "unknown scheme (?)"),
        ("sqlite://host/x.db", "sqlite:///FILE"),
        ("sqlite:///", "sqlite:///FILE"),
        ("sqlite:///x.db?mode=ro", "sqlite:///FILE"),
    ],
)
def test_a_database_url_that_names_no_engine_is_a_clear_error(url: str, fragment: str) -> None:
    with pytest.raises(config.ConfigError) as error:
        config.load(env={"DAILYPLAY_DATABASE_URL": url})
    assert fragment in str(error.value)
    assert "secret" not in str(error.value)


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"pool_min": 0}, "database.pool_min"),
        ({"pool_min": 5, "pool_max": 4}, "database.pool_max"),
        ({"statement_timeout_ms": 10}, "database.statement_timeout_ms"),
    ],
)
def test_pool_settings_are_checked(values: dict[str, int], fragment: str) -> None:
    with pytest.raises(config.ConfigError, match=fragment):
        config.Settings().replace("database", **values)
