"""The `dailyplay` command: serve, init-db, purge, backup, org, member, audit, demo. Each
prints JSON on stdout."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import getpass
import json
import logging
import logging.config
import os
import shlex
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from . import __version__, config
from .audit import audit_entry
from .clock import iso_from_ms, now_ms
from .counters import redis_storage
from .storage import Store, store_for
from .storage import sqlite as db
from .storage.errors import Duplicate, SchemaError, StorageError
from .storage.types import (
    NO_USAGE,
    Actor,
    ApiKey,
    AuditEntry,
    Member,
    Org,
    OrgListing,
)

T = TypeVar("T")

EXIT_FAILED = 1
EXIT_USAGE = 2


class CliError(Exception):
    """An error to report on stderr with a non-zero exit status."""

    def __init__(self, message: str, status: int = EXIT_FAILED):
        super().__init__(message)
        self.status = status


def emit(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False), flush=True)


def _settings(args: argparse.Namespace, warn: bool = True) -> config.Settings:
    """The settings (--config, else $DAILYPLAY_CONFIG, else defaults, plus the environment);
    with warn, a line on stderr for each DAILYPLAY_* variable that is no setting."""
    try:
        settings = config.load(args.config)
    except config.ConfigError as exc:
        raise CliError(f"configuration error: {exc}", EXIT_USAGE) from None
    if warn:
        for warning in config.unknown_variables():
            print(f"warning: {warning}", file=sys.stderr)
    return settings


def _with_store(settings: config.Settings, work: Callable[[Store], Awaitable[T]]) -> T:
    """work(the store the settings describe), open (the schema created or migrated first),
    closed afterwards; a store that cannot open or refuses is a CliError."""

    async def run() -> T:
        store = store_for(settings.database)
        try:
            await store.open()
        except (SchemaError, StorageError) as exc:
            raise CliError(f"cannot open database {settings.database.display}: {exc}") from None
        try:
            return await work(store)
        except StorageError as exc:
            raise CliError(f"the database refused: {exc}") from None
        finally:
            await store.close()

    return asyncio.run(run())


async def _need_org(store: Store, org_id: int) -> Org:
    org = await store.get_org(org_id)
    if org is None:
        raise CliError(f"organization {org_id} not found")
    return org


def _org_data(org: Org, **more: int) -> dict[str, Any]:
    return {
        "id": org.id,
        "name": org.name,
        "tier": org.tier,
        "external_id": org.external_id,
        "created_at": iso_from_ms(org.created_at),
        **more,
    }


def _member_data(member: Member) -> dict[str, Any]:
    return {
        "org_id": member.org_id,
        "user_id": member.user_id,
        "role": member.role,
        "created_at": iso_from_ms(member.created_at),
    }


def _label(value: str) -> str:
    """A name or id given on the command line: 1 to 255 characters, not blank."""
    if not value.strip() or len(value) > 255:
        raise argparse.ArgumentTypeError("must be 1 to 255 characters, not blank")
    return value


def _org_id(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 2**63 - 1:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return int(value)


# --- commands -----------------------------------------------------------------------------------


def cmd_purge(args: argparse.Namespace) -> None:
    from .retention import cutoff_ms

    settings = _settings(args)
    days = (
        settings.sessions.retention_days if args.older_than_days is None else args.older_than_days
    )
    if days <= 0:
        raise CliError(
            "sessions.retention_days is 0 (keep forever); give --older-than-days N to purge",
            EXIT_USAGE,
        )
    cutoff = cutoff_ms(now_ms(), days)

    async def work(store: Store) -> int:
        if args.dry_run:
            return await store.count_finished_sessions(cutoff)
        return await store.purge_finished_sessions(cutoff)

    count = _with_store(settings, work)
    emit(
        {
            "older_than_days": days,
            "finished_before": iso_from_ms(cutoff),
            "would_delete" if args.dry_run else "deleted": count,
        }
    )


def _pg_dump_target(settings: config.Settings) -> str:
    """The database's url as pg_dump takes it, without a password (pg_dump reads PGPASSWORD
    or ~/.pgpass)."""
    return shlex.quote(settings.database.display)


def cmd_backup(args: argparse.Namespace) -> None:
    """A consistent copy of the (possibly live) database through SQLite's online backup API."""
    settings = _settings(args)
    if settings.database.engine != "sqlite":
        example = f"pg_dump --format=custom --file=dailyplay.dump {_pg_dump_target(settings)}"
        raise CliError(
            f"dailyplay backup copies a SQLite file; on PostgreSQL use pg_dump ({example})",
            EXIT_USAGE,
        )
    dest = Path(args.dest)
    if dest.exists() and not args.force:
        raise CliError(f"{dest} exists; choose a new file or pass --force", EXIT_USAGE)
    if not dest.parent.is_dir():
        raise CliError(f"directory does not exist: {dest.parent}", EXIT_USAGE)
    try:
        report = db.backup_file(settings.database, dest)
    except (SchemaError, StorageError, db.BackupFailed) as exc:
        raise CliError(f"backup failed: {exc}") from None
    emit(
        {
            "backup": str(dest.resolve()),
            "bytes": dest.stat().st_size,
            **report,
        }
    )


def _whole_number(low: int, high: int, what: str = "") -> Callable[[str], int]:
    """An argparse type: a whole number (of `what`) from low to high."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number{what}") from None
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"must be {low}..{high}")
        return number

    return parse


_audit_limit = _whole_number(1, 100_000)
_days = _whole_number(1, 36_500, " of days")


def cmd_init_db(args: argparse.Namespace) -> None:
    async def work(store: Store) -> dict[str, Any]:
        return await store.describe()

    emit(_with_store(_settings(args), work))


def cmd_org_create(args: argparse.Namespace) -> None:
    async def work(store: Store) -> Org:
        return await store.create_org(
            args.name, args.tier, args.external_id, now_ms(), _cli_actor()
        )

    try:
        emit(_org_data(_with_store(_settings(args), work)))
    except Duplicate as exc:
        raise CliError(str(exc)) from None


def cmd_org_list(args: argparse.Namespace) -> None:
    async def work(store: Store) -> list[OrgListing]:
        return await store.list_orgs()

    listed = _with_store(_settings(args), work)
    emit([_org_data(o.org, members=o.members, api_keys=o.api_keys) for o in listed])


def cmd_org_set_tier(args: argparse.Namespace) -> None:
    async def work(store: Store) -> Org | None:
        return await store.set_org_tier(args.org, args.tier, now_ms(), _cli_actor())

    org = _with_store(_settings(args), work)
    if org is None:
        raise CliError(f"organization {args.org} not found")
    emit(_org_data(org))


def cmd_member_add(args: argparse.Namespace) -> None:
    async def work(store: Store) -> Member | None:
        return await store.upsert_member(args.org, args.user, args.role, now_ms(), _cli_actor())

    member = _with_store(_settings(args), work)
    if member is None:
        raise CliError(f"organization {args.org} not found")
    emit(_member_data(member))


def cmd_member_remove(args: argparse.Namespace) -> None:
    async def work(store: Store) -> bool:
        return await store.delete_member(args.org, args.user, now_ms(), _cli_actor())

    if not _with_store(_settings(args), work):
        raise CliError(f"{args.user!r} is not a member of organization {args.org}")
    emit({"org_id": args.org, "user_id": args.user, "removed": True})


def cmd_audit(args: argparse.Namespace) -> None:
    async def work(store: Store) -> list[AuditEntry]:
        await _need_org(store, args.org)
        return await store.list_audit(args.org, args.limit, None)

    emit([audit_entry(entry) for entry in _with_store(_settings(args), work)])


def _cli_actor() -> Actor:
    """Who the audit trail names for a change made here: cli:<the OS user>."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a bare container)
        user = str(os.getuid())
    return Actor(f"cli:{user}")


def _key_rule(check: Callable[[], Any]) -> Any:
    """Run one of the API's key rules; its 400 becomes a usage error with the same message."""
    from .errors import ApiError

    try:
        return check()
    except ApiError as exc:
        raise CliError(exc.message, EXIT_USAGE) from None


def cmd_key_create(args: argparse.Namespace) -> None:
    from .keys import (
        api_key_data,
        generate_api_key,
        hash_api_key,
        key_insert_values,
        new_key_fields,
    )

    body: dict[str, Any] = {"name": args.name, "description": args.description}
    if args.game is not None:
        body["allowed_game_ids"] = args.game
    if args.stream is not None:
        body["allowed_stream_ids"] = args.stream
    if args.per_minute is not None:
        body["rate_limit_per_minute"] = args.per_minute
    if args.per_day is not None:
        body["rate_limit_per_day"] = args.per_day
    if args.expires is not None:
        body["expires_at"] = args.expires
    now = now_ms()
    fields = _key_rule(lambda: new_key_fields(body, now))
    raw_key = generate_api_key()
    values = key_insert_values(args.org, fields, raw_key, hash_api_key(raw_key), now)

    async def work(store: Store) -> ApiKey:
        org = await _need_org(store, args.org)
        if org.tier != "business":
            raise CliError(
                f"organization {args.org} is not on the Business tier, which API keys need"
                f" (dailyplay org set-tier --org {args.org} --tier business)"
            )
        return await store.insert_api_key(values, _cli_actor())

    emit({**api_key_data(_with_store(_settings(args), work)), "key": raw_key})


def cmd_key_list(args: argparse.Namespace) -> None:
    from .keys import api_key_data

    async def work(store: Store) -> list[ApiKey]:
        await _need_org(store, args.org)
        return await store.list_api_keys(args.org)

    emit([api_key_data(key) for key in _with_store(_settings(args), work)])


def cmd_key_revoke(args: argparse.Namespace) -> None:
    from .keys import api_key_data

    async def work(store: Store) -> tuple[ApiKey | None, int]:
        return await store.update_api_key(
            args.org, args.id, {"is_active": 0}, now_ms(), _cli_actor()
        )

    key, revoked = _with_store(_settings(args), work)
    if key is None:
        raise CliError(f"API key {args.id} not found in organization {args.org}")
    emit({**api_key_data(key), "revoked_sessions": revoked})


def cmd_key_delete(args: argparse.Namespace) -> None:
    async def work(store: Store) -> int | None:
        return await store.delete_api_key(args.org, args.id, now_ms(), _cli_actor())

    revoked = _with_store(_settings(args), work)
    if revoked is None:
        raise CliError(f"API key {args.id} not found in organization {args.org}")
    emit({"id": args.id, "deleted": True, "revoked_sessions": revoked})


def cmd_stats(args: argparse.Namespace) -> None:
    async def work(store: Store) -> tuple[dict[int, dict[str, int]], list[ApiKey]]:
        await _need_org(store, args.org)
        return await store.key_usage(args.org, now_ms()), await store.list_api_keys(args.org)

    usage, keys = _with_store(_settings(args), work)
    emit(
        [
            {
                "id": key.id,
                "name": key.name,
                "key_prefix": key.key_prefix,
                "is_active": key.is_active,
                "last_used_at": iso_from_ms(key.last_used_at),
                **usage.get(key.id, NO_USAGE),
            }
            for key in keys
        ]
    )


def cmd_member_list(args: argparse.Namespace) -> None:
    async def work(store: Store) -> list[Member]:
        await _need_org(store, args.org)
        return await store.list_members(args.org)

    emit([_member_data(member) for member in _with_store(_settings(args), work)])


async def _opened(store: Store) -> None:
    """Nothing more: opening the store created or migrated it."""


def uvicorn_log_config(level: str, log_format: str = "json") -> dict[str, Any]:
    """Logging for the server: uvicorn's and ours in one format (json or text) on stderr; our
    request lines (dailyplay.access) replace uvicorn's access log."""
    from uvicorn.config import LOGGING_CONFIG

    log_config = copy.deepcopy(LOGGING_CONFIG)
    log_config["formatters"] = {"chosen": {"()": f"dailyplay.logs.{log_format.title()}Formatter"}}
    log_config.setdefault("filters", {})["redact_secrets"] = {
        "()": "dailyplay.logs.RedactSecretsFilter"
    }
    for handler in log_config["handlers"].values():
        handler["formatter"] = "chosen"
        handler.setdefault("filters", []).append("redact_secrets")
        # stdout carries the commands' JSON; logs go to stderr.
        handler["stream"] = "ext://sys.stderr"
    log_config["loggers"]["dailyplay"] = {
        "handlers": ["default"],
        "level": level.upper(),
        "propagate": False,
    }
    # The PostgreSQL driver's own warnings (its pool reconnecting), in the same format, one line
    # each (a handler of their own: a logger's filters do not see its children's records).
    log_config["filters"]["one_line"] = {"()": "dailyplay.logs.OneLineFilter"}
    driver = copy.deepcopy(log_config["handlers"]["default"])
    driver["filters"] = ["one_line", *driver["filters"]]
    log_config["handlers"]["driver"] = driver
    log_config["loggers"]["asyncpg"] = {
        "handlers": ["driver"],
        "level": "WARNING",
        "propagate": False,
    }
    return log_config


def run_server(settings: config.Settings, config_path: str | None, announce: bool = True) -> None:
    """Run uvicorn with settings passed to every worker through the environment."""

    from .auth import JwtVerifier

    try:
        JwtVerifier(settings.auth)  # a bad key file is reported here, not in each worker
    except config.ConfigError as exc:
        raise CliError(f"configuration error: {exc}", EXIT_USAGE) from None
    # Said once, by the command, in the log's own format (the workers load settings too).
    logging.config.dictConfig(
        uvicorn_log_config(settings.server.log_level, settings.server.log_format)
    )
    startup = logging.getLogger("dailyplay")
    for warning in config.unknown_variables():
        startup.warning(warning)
    if not (settings.auth.jwks_url or settings.auth.jwt_public_key):
        startup.warning(
            "no bearer authentication is configured (auth.jwks_url or auth.jwt_public_key):"
            " key management through the API answers 401 to every request"
        )
    if config_path:
        os.environ["DAILYPLAY_CONFIG"] = str(Path(config_path).resolve())
    for section, values in config.as_dict(settings).items():
        for key, value in values.items():
            name = f"DAILYPLAY_{section.upper()}_{key.upper()}"
            os.environ[name] = json.dumps(value) if isinstance(value, list) else str(value)
    server = settings.server
    with exit_cleanly_on_sigterm(), metrics_files() as metrics_directory:
        # Bound before anything is announced: a taken port is an error, not a "listening"
        # (and before the database is made: a server that cannot start leaves no file).
        _check_limits_storage(settings)
        sockets = listen(server.host, server.port, server.workers)
        listener = None
        try:
            _with_store(settings, _opened)  # create or migrate once, before workers start
            listener = start_metrics_listener(settings.metrics, metrics_directory)
            if announce:
                emit(
                    {
                        "listening": f"http://{server.host}:{server.port}",
                        "workers": server.workers,
                        "database": settings.database.display,
                        "rate_limits": f"counted in {settings.limits.storage_display}",
                        "metrics": metrics_url(settings),
                        "pid": os.getpid(),
                    }
                )
            serve_with_uvicorn(
                "dailyplay.app:app_from_environment",
                host=server.host,
                port=server.port,
                workers=server.workers,
                log_level=server.log_level,
                log_format=server.log_format,
                sockets=sockets,
            )
        finally:
            if listener is not None:
                listener.shutdown()
                listener.server_close()
            for sock in sockets:
                sock.close()


def _check_limits_storage(settings: config.Settings) -> None:
    """A limits.storage_uri this installation cannot use stops serve before any worker starts
    (no connection is made: Redis may come up later, and the workers cope until it does)."""
    if settings.limits.storage_uri:
        try:
            redis_storage(settings.limits.storage_uri, settings.limits.storage_timeout_ms / 1000)
        except ValueError as exc:
            raise CliError(str(exc)) from None


def listen(host: str, port: int, workers: int) -> list[socket.socket]:
    """The API's listening sockets (dailyplay.workers.listening_sockets), or a CliError."""
    from .workers import listening_sockets

    try:
        return listening_sockets(host, port, workers)
    except OSError as exc:
        raise CliError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def exit_cleanly_on_sigterm() -> Iterator[None]:
    """SIGTERM ends the command with status 0, after its `finally` blocks and context managers.

    uvicorn catches SIGTERM, shuts down gracefully, then raises the signal again under the
    handler that was in place before it started. Under the default handler that killed the
    process there, so with one worker the metrics directory was never removed and the exit
    status said "killed by SIGTERM"; with several workers the command already exited 0."""

    def stop(signum: int, frame: Any) -> NoReturn:
        raise SystemExit(0)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# prometheus-client's multiprocess switch; named here, as importing dailyplay.metrics (and so
# prometheus_client) before it is set would leave this process out of multiprocess mode.
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


@contextlib.contextmanager
def metrics_files() -> Iterator[str]:
    """A fresh directory for the workers' metric files, named in PROMETHEUS_MULTIPROC_DIR for
    the workers (set before any of them imports prometheus_client); removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="dailyplay-metrics-") as directory:
        os.environ[MULTIPROCESS_ENV] = directory
        try:
            yield directory
        finally:
            os.environ.pop(MULTIPROCESS_ENV, None)


def start_metrics_listener(settings: config.MetricsSettings, directory: str) -> Any:
    """With metrics.port set: serve every worker's metrics there, from this process."""
    if not settings.enabled or settings.port == 0:
        return None
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    # prometheus-client leaves this constructor unannotated
    MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    try:
        server, _thread = start_http_server(settings.port, settings.host, registry=registry)
    except OSError as exc:
        raise CliError(
            f"cannot listen for metrics on {settings.host}:{settings.port}: {exc.strerror}"
        ) from None
    return server


def metrics_url(settings: config.Settings) -> str | None:
    metrics = settings.metrics
    if not metrics.enabled:
        return None
    if metrics.port == 0:
        return f"http://{settings.server.host}:{settings.server.port}/metrics"
    return f"http://{metrics.host}:{metrics.port}/metrics"


def serve_with_uvicorn(
    app: str,
    *,
    host: str,
    port: int,
    workers: int,
    log_level: str,
    log_format: str = "json",
    sockets: list[socket.socket] | None = None,
) -> None:
    """Serve an app factory with uvicorn on sockets from `listen` (bound here when not given):
    several workers each accept on a socket of their own (SO_REUSEPORT, dailyplay.workers), or
    share one where the platform lacks it."""
    import uvicorn

    if sockets is None:
        sockets = listen(host, port, workers)
    uvicorn_config = uvicorn.Config(
        app,
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_config=uvicorn_log_config(log_level, log_format),
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=10,
        # Named rather than left to "auto", so that the tested stack is the one that runs:
        # uvicorn's httptools protocol (C; twice h11's req/s here) with h11's 16 KiB bound on a
        # request's head (dailyplay.protocol); the asyncio loop, as uvloop gained nothing for
        # this app where some other package brings it (docs/performance.md).
        http="dailyplay.protocol:HttpProtocol",
        loop="asyncio",
        server_header=False,
        proxy_headers=False,
    )
    if workers == 1:
        uvicorn.Server(uvicorn_config).run(sockets=sockets)
        return
    from .workers import SpreadMultiprocess

    if len(sockets) == workers:
        SpreadMultiprocess(uvicorn_config, sockets).run()
        return
    from uvicorn.supervisors import Multiprocess

    Multiprocess(uvicorn_config, sockets=sockets).run()


def _with_server_overrides(settings: config.Settings, args: argparse.Namespace) -> config.Settings:
    overrides = {
        key: getattr(args, key)
        for key in ("host", "port", "workers", "log_format")
        if getattr(args, key, None) is not None
    }
    if not overrides:
        return settings
    try:
        return settings.replace("server", **overrides)
    except config.ConfigError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


def cmd_serve(args: argparse.Namespace) -> None:
    settings = _with_server_overrides(_settings(args, warn=False), args)
    run_server(settings, args.config or os.environ.get("DAILYPLAY_CONFIG"))


def _port_is_free(host: str, port: int, option: str) -> None:
    """CliError unless host:port can be listened on now; option names the flag to change."""
    try:
        listen(host, port, 1)[0].close()
    except CliError as exc:
        raise CliError(f"{exc}; pick another port with {option}") from None


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import TOKEN_HOURS, fresh_bearer, prepare_demo

    if args.token:
        try:
            token = fresh_bearer(Path(args.dir))
        except FileNotFoundError:
            raise CliError(
                f"no demo in {args.dir}: run `dailyplay demo --dir {args.dir}` first"
            ) from None
        emit({"bearer_token": token, "bearer_expires_in_hours": TOKEN_HOURS})
        return

    base = _settings(args, warn=args.no_serve) if args.config else None
    game_port = args.game_port if args.game_port is not None else args.port + 1
    if not 0 <= game_port <= 65535 or game_port == args.port:
        raise CliError(
            "--game-port must be 1..65535 and not the API's port (0: no game)", EXIT_USAGE
        )
    if not args.no_serve:
        # Both ports are checked before any file is made or any credential printed.
        _port_is_free(args.host, args.port, "--port")
        if game_port:
            _port_is_free(args.host, game_port, "--game-port (0: no game)")
    try:
        settings, info, guide = prepare_demo(
            Path(args.dir), args.host, args.port, base, game_port or None
        )
    except config.ConfigError as exc:
        raise CliError(f"configuration error: {exc}", EXIT_USAGE) from None
    except (OSError, SchemaError, StorageError) as exc:
        raise CliError(f"cannot prepare the demo in {args.dir}: {exc}") from None
    if args.no_serve:
        emit(info)
        print(guide, file=sys.stderr, flush=True)
        return
    game = None
    if game_port:
        from .demo import start_game_server

        try:
            game = start_game_server(args.host, game_port, info["url"], info["api_key"])
        except OSError as exc:
            raise CliError(
                f"cannot serve the demo game on {args.host}:{game_port}: {exc.strerror}; "
                "pick another port with --game-port (0: no game)"
            ) from None
    emit(info)
    print(guide, file=sys.stderr, flush=True)
    try:
        run_server(settings, info["config"], announce=False)
    except KeyboardInterrupt:  # the guide says to stop it with Ctrl-C: a normal end
        print("dailyplay demo stopped", file=sys.stderr, flush=True)
    finally:
        if game is not None:
            game.shutdown()
            game.server_close()


# --- parser -------------------------------------------------------------------------------------


class _HelpFormatter(argparse.HelpFormatter):
    """Adds each option's default to its help, where it has one worth saying."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" not in text
            and action.option_strings
            and default not in (None, False, argparse.SUPPRESS)
        ):
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="TOML settings file (default: $DAILYPLAY_CONFIG, else built-in defaults)",
    )
    parser = argparse.ArgumentParser(
        prog="dailyplay",
        description="Self-hosted DailyPlay session-token service.",
        parents=[common],
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dailyplay {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(group: Any, name: str, summary: str) -> argparse.ArgumentParser:
        """A subcommand whose one-line summary is both its line in the list and its help's
        description."""
        made: argparse.ArgumentParser = group.add_parser(
            name,
            parents=[common],
            help=summary,
            description=summary,
            formatter_class=_HelpFormatter,
        )
        return made

    org_help = "organization id (see `dailyplay org list`)"

    serve = command(commands, "serve", "run the HTTP API")
    serve.add_argument("--host", help="address to listen on (default: server.host)")
    serve.add_argument("--port", type=int, help="port to listen on (default: server.port)")
    serve.add_argument("--workers", type=int, help="worker processes (default: server.workers)")
    serve.add_argument(
        "--log-format",
        choices=["json", "text"],
        help="log lines as JSON or text (default: server.log_format)",
    )
    serve.set_defaults(func=cmd_serve)

    init = command(commands, "init-db", "create or migrate the database")
    init.set_defaults(func=cmd_init_db)

    purge_cmd = command(commands, "purge", "delete finished session tokens past retention")
    purge_cmd.add_argument(
        "--older-than-days", type=_days, help="age in days (default: sessions.retention_days)"
    )
    purge_cmd.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    purge_cmd.set_defaults(func=cmd_purge)

    backup = command(commands, "backup", "copy the database, live or not, to a new file")
    backup.add_argument("dest", help="the backup file to write")
    backup.add_argument("--force", action="store_true", help="replace dest if it exists")
    backup.set_defaults(func=cmd_backup)

    org = command(commands, "org", "manage organizations")
    org_commands = org.add_subparsers(dest="org_command", metavar="ACTION", required=True)
    create = command(org_commands, "create", "create an organization")
    create.add_argument("--name", required=True, type=_label, help="its name (1-255 characters)")
    create.add_argument(
        "--tier",
        choices=["free", "business"],
        default="free",
        help="its plan; only business may create API keys",
    )
    create.add_argument("--external-id", help="Clerk organization id (org_...)", type=_label)
    create.set_defaults(func=cmd_org_create)
    org_list = command(org_commands, "list", "list organizations")
    org_list.set_defaults(func=cmd_org_list)
    tier = command(org_commands, "set-tier", "change an organization's tier")
    tier.add_argument("--org", required=True, type=_org_id, help=org_help)
    tier.add_argument("--tier", required=True, choices=["free", "business"], help="the new plan")
    tier.set_defaults(func=cmd_org_set_tier)

    member = command(commands, "member", "manage organization members")
    member_commands = member.add_subparsers(dest="member_command", metavar="ACTION", required=True)
    add = command(member_commands, "add", "add or change a member")
    add.add_argument("--org", required=True, type=_org_id, help=org_help)
    add.add_argument("--user", required=True, type=_label, help="Clerk user id (JWT sub)")
    add.add_argument(
        "--role",
        choices=["admin", "member"],
        default="member",
        help="admin manages keys; member may list them",
    )
    add.set_defaults(func=cmd_member_add)
    remove = command(member_commands, "remove", "remove a member")
    remove.add_argument("--org", required=True, type=_org_id, help=org_help)
    remove.add_argument("--user", required=True, type=_label, help="Clerk user id (JWT sub)")
    remove.set_defaults(func=cmd_member_remove)
    members = command(member_commands, "list", "list an organization's members")
    members.add_argument("--org", required=True, type=_org_id, help=org_help)
    members.set_defaults(func=cmd_member_list)

    key = command(commands, "key", "manage an organization's API keys, without Clerk")
    key_commands = key.add_subparsers(dest="key_command", metavar="ACTION", required=True)
    key_create = command(key_commands, "create", "create an API key; prints the raw key once")
    key_create.add_argument("--org", required=True, type=_org_id, help=org_help)
    key_create.add_argument("--name", required=True, help="its name (1-255 characters)")
    key_create.add_argument("--description", help="what it is for (at most 1000 characters)")
    key_create.add_argument(
        "--game",
        type=int,
        action="append",
        metavar="ID",
        help="a game id it may create tokens for; repeat for several (default: every game)",
    )
    key_create.add_argument(
        "--stream",
        type=int,
        action="append",
        metavar="ID",
        help="a stream id it may create tokens for; repeat for several (default: every stream)",
    )
    key_create.add_argument(
        "--per-minute", type=int, help="tokens it may create per minute (default: 60)"
    )
    key_create.add_argument(
        "--per-day", type=int, help="tokens it may create per UTC day (default: 10000)"
    )
    key_create.add_argument(
        "--expires", metavar="TIME", help="RFC 3339 time it stops working (default: never)"
    )
    key_create.set_defaults(func=cmd_key_create)
    key_list = command(key_commands, "list", "list an organization's API keys (never the keys)")
    key_list.add_argument("--org", required=True, type=_org_id, help=org_help)
    key_list.set_defaults(func=cmd_key_list)
    key_revoke = command(
        key_commands, "revoke", "deactivate an API key and revoke its live session tokens"
    )
    key_revoke.add_argument("--org", required=True, type=_org_id, help=org_help)
    key_revoke.add_argument("--id", required=True, type=_org_id, help="the key's id")
    key_revoke.set_defaults(func=cmd_key_revoke)
    key_delete = command(
        key_commands, "delete", "delete an API key after revoking its live session tokens"
    )
    key_delete.add_argument("--org", required=True, type=_org_id, help=org_help)
    key_delete.add_argument("--id", required=True, type=_org_id, help="the key's id")
    key_delete.set_defaults(func=cmd_key_delete)

    audit = command(commands, "audit", "an organization's audit trail, newest first")
    audit.add_argument("--org", required=True, type=_org_id, help=org_help)
    audit.add_argument("--limit", type=_audit_limit, default=100, help="entries to show")
    audit.set_defaults(func=cmd_audit)

    stats = command(commands, "stats", "per API key: last use, tokens created and consumed lately")
    stats.add_argument("--org", required=True, type=_org_id, help=org_help)
    stats.set_defaults(func=cmd_stats)

    demo = command(commands, "demo", "start a ready-to-try instance with a key and a token")
    demo.add_argument("--dir", default="dailyplay-demo", help="where the demo keeps its files")
    demo.add_argument("--host", default="127.0.0.1", help="address the API listens on")
    demo.add_argument("--port", type=int, default=8787, help="port of the API")
    demo.add_argument(
        "--game-port",
        type=int,
        help="port of the demo game page, another origin than the API (default: --port + 1; "
        "0: no game)",
    )
    demo.add_argument("--no-serve", action="store_true", help="prepare and print, do not serve")
    demo.add_argument(
        "--token",
        action="store_true",
        help="print a fresh 24-hour bearer token for the admin of the demo in --dir, and exit",
    )
    demo.set_defaults(func=cmd_demo)
    return parser


def fail(message: str, status: int) -> NoReturn:
    print(f"dailyplay: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `dailyplay` console script."""
    args = build_parser().parse_args(argv)
    if not hasattr(args, "config"):
        args.config = None
    started = time.monotonic()
    try:
        args.func(args)
    except CliError as exc:
        fail(str(exc), exc.status)
    except KeyboardInterrupt:
        fail(f"interrupted after {time.monotonic() - started:.1f}s", 130)
