"""Settings: config.toml documents every key with its default; env overrides; clear errors."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

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
    ],
)
def test_bad_settings_are_named(tmp_path: Path, text: str, env: dict, fragment: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    with pytest.raises(config.ConfigError, match=None) as info:
        config.load(cfg, env=env)
    assert fragment in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="not found"):
        config.load(tmp_path / "absent.toml", env={})
