"""Settings: every key declared once (type, default, help), read from TOML and DAILYPLAY_* env."""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import os
import tomllib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_EXPIRES_MINUTES = 525_600  # one year: the contract's upper bound for expires_in_minutes


class ConfigError(ValueError):
    """A setting is missing, unknown, of the wrong type or out of range."""


def _setting(default: Any, help: str) -> Any:
    # Lists need a factory; everything else is immutable.
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ServerSettings:
    host: str = _setting("127.0.0.1", "address to listen on")
    port: int = _setting(8787, "TCP port to listen on")
    workers: int = _setting(1, "uvicorn worker processes sharing the one database file")
    trusted_proxies: list[str] = _setting(
        [], "proxy addresses/CIDRs whose X-Forwarded-For is believed (empty: none)"
    )
    log_level: str = _setting("info", "critical, error, warning, info or debug")
    log_format: str = _setting("json", "json (one object per line) or text (for a terminal)")
    max_concurrent_requests: int = _setting(
        256, "requests one worker handles at once; more get 503 with Retry-After"
    )


@dataclass(frozen=True)
class DatabaseSettings:
    url: str = _setting(
        "", "empty: SQLite at database.path; sqlite:///FILE or postgresql://USER@HOST:PORT/DB"
    )
    path: str = _setting("dailyplay.db", "SQLite file (WAL mode); relative paths start at the cwd")
    synchronous: str = _setting(
        "FULL", "FULL survives power loss; NORMAL is faster but may lose the last commits"
    )
    busy_timeout_ms: int = _setting(5000, "how long a write waits for another process's lock")
    pool_min: int = _setting(2, "PostgreSQL: connections each worker process keeps open")
    pool_max: int = _setting(10, "PostgreSQL: most connections each worker process opens")
    statement_timeout_ms: int = _setting(
        5000, "PostgreSQL: longest a statement (or a wait for a connection) may take"
    )

    @property
    def engine(self) -> str:
        """'sqlite' or 'postgresql', by the scheme of url (SQLite when url is empty)."""
        return database_engine(self.url)

    @property
    def display(self) -> str:
        """Where the database is, for messages: the SQLite file's absolute path, or the url
        without its password and options (which may hold one)."""
        if self.engine == "sqlite":
            return str(Path(self.path).resolve())
        return uri_display(self.url)


@dataclass(frozen=True)
class AuthSettings:
    jwks_url: str = _setting("", "Clerk JWKS URL (https://<your-app>/.well-known/jwks.json)")
    jwt_public_key: str = _setting("", "PEM public key file, instead of jwks_url")
    issuer: str = _setting("", "required `iss` claim (empty: not checked)")
    audience: str = _setting("", "required `aud` claim (empty: tokens carrying `aud` are refused)")
    authorized_parties: list[str] = _setting([], "allowed `azp` values (empty: not checked)")
    leeway_seconds: int = _setting(5, "clock skew tolerated on exp/nbf/iat")
    jwks_cache_seconds: int = _setting(
        300, "age at which a fetched JWKS is refreshed (in the background)"
    )
    jwks_timeout_seconds: int = _setting(
        5, "deadline for a whole JWKS fetch: connect, headers, body"
    )


@dataclass(frozen=True)
class SessionSettings:
    default_expires_minutes: int = _setting(
        1440, "token lifetime when expires_in_minutes is absent"
    )
    max_expires_minutes: int = _setting(MAX_EXPIRES_MINUTES, "largest expires_in_minutes accepted")
    retention_days: int = _setting(
        30, "finished (consumed, expired, revoked) tokens are deleted this long after (0: never)"
    )
    idempotency_hours: int = _setting(
        24, "how long create-session's answer to an Idempotency-Key is kept for its retries"
    )


@dataclass(frozen=True)
class LimitSettings:
    public_per_minute: int = _setting(
        600, "validate/consume requests per client IP per minute (0: unlimited)"
    )
    failed_auth_per_minute: int = _setting(
        30, "failed authentications per client IP per minute before 429 (0: unlimited)"
    )
    max_body_bytes: int = _setting(65_536, "largest request body; larger gets 413")
    body_timeout_seconds: int = _setting(
        10, "time allowed to send a request body; slower clients get 408"
    )
    max_metadata_bytes: int = _setting(8_192, "largest serialized session metadata")
    storage_uri: str = _setting(
        "",
        "empty: counted in each process; redis://HOST:6379/0 (rediss://, redis+sentinel://, "
        "redis+cluster://): every limit counted exactly across all processes and hosts",
    )
    storage_timeout_ms: int = _setting(
        250, "longest a rate-limit count waits for Redis before counting in this process"
    )

    @property
    def storage_display(self) -> str:
        """limits.storage_uri without its password and query, for messages."""
        return uri_display(self.storage_uri) if self.storage_uri else "this process"


@dataclass(frozen=True)
class CorsSettings:
    allow_origins: list[str] = _setting(
        [], "origins allowed to call the API from a browser ('*' for any; empty: none)"
    )


@dataclass(frozen=True)
class MetricsSettings:
    enabled: bool = _setting(True, "serve Prometheus metrics (false: no /metrics anywhere)")
    port: int = _setting(0, "0: GET /metrics on the API's port; else a listener of its own")
    host: str = _setting("127.0.0.1", "address of that listener (when port is not 0)")


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    sessions: SessionSettings = field(default_factory=SessionSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    cors: CorsSettings = field(default_factory=CorsSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)

    def replace(self, section: str, **values: Any) -> Settings:
        """A copy with some keys of one section changed (validated like loaded values)."""
        raw = as_dict(self)
        raw[section].update(values)
        return _build(raw, source="override")


_SECTION_TYPES = {
    "server": ServerSettings,
    "database": DatabaseSettings,
    "auth": AuthSettings,
    "sessions": SessionSettings,
    "limits": LimitSettings,
    "cors": CorsSettings,
    "metrics": MetricsSettings,
}


def settings_table() -> list[tuple[str, str, Any, str]]:
    """Every setting as (section, key, default, help), in declaration order."""
    rows = []
    for section, cls in _SECTION_TYPES.items():
        defaults = cls()
        for f in dataclasses.fields(cls):
            rows.append((section, f.name, getattr(defaults, f.name), f.metadata["help"]))
    return rows


def as_dict(settings: Settings) -> dict[str, dict[str, Any]]:
    return {name: dataclasses.asdict(getattr(settings, name)) for name in _SECTION_TYPES}


def _coerce(
    section: str, key: str, value: Any, annotation: str, source: str, from_text: bool = False
) -> Any:
    """value as the setting's type. from_text: value is text to read (an environment
    variable); otherwise it must have the type already, as TOML gives it ("9000" is no port)."""
    where = f"{section}.{key} (from {source})"
    if not from_text and annotation != "str" and isinstance(value, str):
        wanted = {"int": "an integer", "bool": "true or false", "list[str]": "a list of strings"}
        raise ConfigError(f"{where} must be {wanted[annotation]}, not the string {value!r}")
    if annotation == "int":
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise ConfigError(f"{where} must be an integer, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if annotation == "bool":
        if isinstance(value, str):
            words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
            if value.strip().lower() not in words:
                raise ConfigError(f"{where} must be true or false, got {value!r}")
            value = words[value.strip().lower()]
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if annotation == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if annotation == "list[str]":
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = json.loads(text)
                except ValueError:
                    raise ConfigError(f"{where} is not a valid JSON list: {value!r}") from None
            else:
                value = [part.strip() for part in text.split(",") if part.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} must be a list of strings, got {value!r}")
        return list(value)
    raise AssertionError(f"unhandled setting type {annotation}")  # pragma: no cover


# limits.storage_uri schemes users write -> the scheme of limits' async storage for them.
SCHEMES = {
    "redis": "async+redis",
    "rediss": "async+rediss",
    "redis+unix": "async+redis+unix",
    "unix": "async+redis+unix",
    "redis+sentinel": "async+redis+sentinel",
    "redis+cluster": "async+redis+cluster",
    "valkey": "async+valkey",
    "valkeys": "async+valkeys",
    "valkey+sentinel": "async+valkey+sentinel",
    "valkey+cluster": "async+valkey+cluster",
}


def library_uri(uri: str) -> str:
    """limits.storage_uri as limits' async storage wants it: redis://h:6379/0 becomes
    async+redis://h:6379/0 (and so on for rediss, redis+unix, sentinel and cluster). ValueError
    for a scheme that is not Redis's; the message does not repeat the uri (it may hold a
    password)."""
    scheme, separator, rest = uri.partition("://")
    scheme = scheme.lower()
    if separator and scheme.startswith("async+") and scheme in SCHEMES.values():
        return f"{scheme}://{rest}"
    if not separator or scheme not in SCHEMES:
        shown = scheme if separator and scheme.replace("+", "").isalnum() else "?"
        raise ValueError(
            f"limits.storage_uri has an unknown scheme ({shown}); use redis://HOST:6379/0, "
            "rediss:// (TLS), redis+unix:///PATH, redis+sentinel://HOST:26379/SERVICE or "
            "redis+cluster://HOST:6379"
        )
    return f"{SCHEMES[scheme]}://{rest}"


def uri_display(uri: str) -> str:
    """The uri without its password and query (which may hold one), for messages."""
    parts = urllib.parse.urlsplit(uri)
    netloc = parts.netloc.rpartition("@")[2]
    if parts.username:
        netloc = f"{parts.username}@{netloc}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


# database.url schemes, by engine (the names SQLAlchemy and libpq accept).
_URL_SCHEMES = {"sqlite": "sqlite", "postgresql": "postgresql", "postgres": "postgresql"}


def database_engine(url: str) -> str:
    """The engine a database.url names: 'sqlite' for an empty url or sqlite:///FILE,
    'postgresql' for postgresql:// (or postgres://). ConfigError for any other; the message
    never repeats the url, which may carry a password."""
    if not url:
        return "sqlite"
    scheme, separator, _rest = url.partition("://")
    engine = _URL_SCHEMES.get(scheme.lower()) if separator else None
    if engine is None:
        shown = scheme.lower() if separator and scheme.isalnum() else "?"
        raise ConfigError(
            f"database.url has an unknown scheme ({shown}); use sqlite:///FILE or "
            "postgresql://USER@HOST:PORT/DATABASE"
        )
    return engine


def _sqlite_path(url: str) -> str:
    """The file a sqlite:// url names, as SQLAlchemy reads it: sqlite:///data/x.db is relative
    to the working directory, sqlite:////var/lib/x.db absolute."""
    rest = url.partition("://")[2]
    if not rest.startswith("/") or len(rest) < 2 or "?" in rest:
        raise ConfigError(
            "database.url for SQLite must be sqlite:///FILE (relative) or sqlite:////FILE "
            "(absolute), without a host or options"
        )
    return rest[1:]


def _build(raw: Mapping[str, Mapping[str, Any]], source: str) -> Settings:
    sections = {}
    for section, cls in _SECTION_TYPES.items():
        values = dict(raw.get(section, {}))
        known = {f.name: f for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise ConfigError(f"unknown setting {section}.{key} (from {source})")
        coerced = {
            key: _coerce(section, key, value, str(known[key].type), source)
            for key, value in values.items()
        }
        sections[section] = cls(**coerced)
    database = sections["database"]
    try:
        if database.engine == "sqlite" and database.url:
            # The url names the SQLite file: it wins over database.path.
            sections["database"] = dataclasses.replace(database, path=_sqlite_path(database.url))
    except ConfigError as exc:
        raise ConfigError(f"{exc} (from {source})") from None
    settings = Settings(**sections)
    try:
        _check_ranges(settings)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (from {source})") from None
    return settings


def _check_ranges(s: Settings) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    need(1 <= s.server.port <= 65535, "server.port must be between 1 and 65535")
    need(1 <= s.server.workers <= 64, "server.workers must be between 1 and 64")
    need(0 <= s.metrics.port <= 65535, "metrics.port must be between 0 and 65535")
    need(
        s.metrics.port == 0 or s.metrics.port != s.server.port,
        "metrics.port must differ from server.port (0 serves /metrics on the API's port)",
    )
    need(
        s.server.log_level in {"critical", "error", "warning", "info", "debug"},
        "server.log_level must be one of critical, error, warning, info, debug",
    )
    need(s.server.log_format in {"json", "text"}, "server.log_format must be json or text")
    for proxy in s.server.trusted_proxies:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise ConfigError(
                f"server.trusted_proxies: {proxy!r} is not an IP address or CIDR"
            ) from None
    need(bool(s.database.path), "database.path must not be empty")
    need(
        s.database.synchronous.upper() in {"FULL", "NORMAL", "EXTRA"},
        "database.synchronous must be FULL, EXTRA or NORMAL",
    )
    need(0 <= s.database.busy_timeout_ms <= 600_000, "database.busy_timeout_ms must be 0..600000")
    need(1 <= s.database.pool_min <= 1000, "database.pool_min must be 1..1000")
    need(
        s.database.pool_min <= s.database.pool_max <= 1000,
        "database.pool_max must be between database.pool_min and 1000",
    )
    need(
        100 <= s.database.statement_timeout_ms <= 600_000,
        "database.statement_timeout_ms must be 100..600000",
    )
    need(
        not (s.auth.jwks_url and s.auth.jwt_public_key),
        "set only one of auth.jwks_url and auth.jwt_public_key",
    )
    need(
        not s.auth.jwks_url or s.auth.jwks_url.startswith(("https://", "http://")),
        "auth.jwks_url must be an http(s) URL",
    )
    need(0 <= s.auth.leeway_seconds <= 300, "auth.leeway_seconds must be 0..300")
    need(1 <= s.auth.jwks_cache_seconds <= 86_400, "auth.jwks_cache_seconds must be 1..86400")
    need(1 <= s.auth.jwks_timeout_seconds <= 60, "auth.jwks_timeout_seconds must be 1..60")
    need(
        1 <= s.sessions.max_expires_minutes <= MAX_EXPIRES_MINUTES,
        f"sessions.max_expires_minutes must be 1..{MAX_EXPIRES_MINUTES}",
    )
    need(
        1 <= s.sessions.default_expires_minutes <= s.sessions.max_expires_minutes,
        "sessions.default_expires_minutes must be between 1 and sessions.max_expires_minutes",
    )
    need(0 <= s.sessions.retention_days <= 36_500, "sessions.retention_days must be 0..36500")
    need(1 <= s.sessions.idempotency_hours <= 720, "sessions.idempotency_hours must be 1..720")
    need(s.limits.public_per_minute >= 0, "limits.public_per_minute must be >= 0")
    need(s.limits.failed_auth_per_minute >= 0, "limits.failed_auth_per_minute must be >= 0")
    need(
        10 <= s.limits.storage_timeout_ms <= 10_000,
        "limits.storage_timeout_ms must be 10..10000",
    )
    if s.limits.storage_uri:
        try:
            library_uri(s.limits.storage_uri)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    need(1 <= s.limits.body_timeout_seconds <= 300, "limits.body_timeout_seconds must be 1..300")
    need(
        1 <= s.server.max_concurrent_requests <= 100_000,
        "server.max_concurrent_requests must be 1..100000",
    )
    need(
        1024 <= s.limits.max_body_bytes <= 16 * 1024 * 1024,
        "limits.max_body_bytes must be 1024..16777216",
    )
    need(
        2 <= s.limits.max_metadata_bytes < s.limits.max_body_bytes,
        "limits.max_metadata_bytes must be at least 2 and below limits.max_body_bytes",
    )


def load(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Settings from TOML (path, else $DAILYPLAY_CONFIG, else defaults) plus env overrides."""
    env = os.environ if env is None else env
    raw: dict[str, dict[str, Any]] = {name: {} for name in _SECTION_TYPES}
    source = "defaults"
    path = path or env.get("DAILYPLAY_CONFIG") or None
    if path:
        file = Path(path)
        try:
            with file.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {file}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {file} is not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"cannot read config file {file}: {exc.strerror}") from None
        for section, values in data.items():
            if section not in _SECTION_TYPES:
                raise ConfigError(f"unknown section [{section}] in {file}")
            if not isinstance(values, dict):
                raise ConfigError(f"[{section}] in {file} must be a table")
            raw[section].update(values)
        source = str(file)
    _build(raw, source)  # report file errors against the file before env overrides
    for section, cls in _SECTION_TYPES.items():
        for f in dataclasses.fields(cls):
            name = f"DAILYPLAY_{section.upper()}_{f.name.upper()}"
            if name in env:
                raw[section][f.name] = _coerce(
                    section, f.name, env[name], str(f.type), name, from_text=True
                )
    return _build(raw, "environment" if source == "defaults" else f"{source} + environment")


# DAILYPLAY_* variables that are not settings: the config file's path, and the test suite's own.
OTHER_VARIABLES = ("DAILYPLAY_CONFIG",)
TEST_VARIABLE_PREFIX = "DAILYPLAY_TEST_"


def setting_variables() -> list[str]:
    """The environment variable of every setting."""
    return [f"DAILYPLAY_{s.upper()}_{k.upper()}" for s, k, _default, _help in settings_table()]


def unknown_variables(env: Mapping[str, str] | None = None) -> list[str]:
    """A warning for each DAILYPLAY_* variable that is no setting (a typo is otherwise
    silently ignored), naming the closest one. Warned about, not refused: platforms set such
    variables themselves (Kubernetes, for a service named dailyplay: DAILYPLAY_PORT, ...)."""
    env = os.environ if env is None else env
    known = setting_variables()
    warnings = []
    for name in sorted(env):
        if (
            not name.startswith("DAILYPLAY_")
            or name in known
            or name in OTHER_VARIABLES
            or name.startswith(TEST_VARIABLE_PREFIX)
        ):
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        hint = f" (did you mean {close[0]}?)" if close else ""
        warnings.append(f"{name} is not a setting and is ignored{hint}")
    return warnings
