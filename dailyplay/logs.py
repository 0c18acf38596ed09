"""Logging: one structured line per request, in JSON (default) or as text for a terminal.

Every request gets an id: the caller's X-Request-ID when it is a sensible token (1-128 of
A-Z a-z 0-9 . _ : -), else a new one; it is returned in the X-Request-ID response header and
logged with the request. A line never carries a raw API key, session token or bearer JWT: the
query string is not logged at all, only the operation its `action` names, and an API key
appears as its public 8-character prefix.

Request lines do not go through the `logging` module's handlers: a request leaves its line's
fields in memory, and a thread encodes and writes them to stderr in batches (RequestLines).
Other lines (start and stop, warnings, errors) go through `logging` as usual.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import random
import re
import select
import stat
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .clock import iso_from_ms
from .inputs import first_value, header, request_query

access_log = logging.getLogger("dailyplay.access")

REQUEST_ID_HEADER = b"x-request-id"
_GOOD_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# What handlers may add to a request's line (see note()); the rest the layer knows itself.
REQUEST_FIELDS = ("org_id", "key_id", "key_prefix", "user_id")
# The fields of a request line, in order.
ACCESS_FIELDS = (
    "request_id",
    "method",
    "path",
    "operation",
    "status",
    "latency_ms",
    "org_id",
    "key_id",
    "key_prefix",
    "user_id",
    "client_ip",
)


_TOKEN_PARAM = re.compile(r"((?:^|[?&])token=)[^&\s\"]*", re.IGNORECASE)
_KEY = re.compile(r"dpk_[0-9a-fA-F]{4}[0-9a-fA-F]*")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def _cut_key(match: re.Match[str]) -> str:
    return match.group(0)[:8] + "[redacted]"


def redact(text: str) -> str:
    """text without session tokens (token=... and bare UUIDs) or the secret part of API keys."""
    text = _TOKEN_PARAM.sub(r"\1[redacted]", text)
    text = _UUID.sub("[redacted]", text)
    return _KEY.sub(_cut_key, text)


def _logged_path(path: str) -> str:
    """The request path, redacted when it might hold a secret (checked cheaply first)."""
    if "dpk_" in path or path.count("-") >= 4 or "token=" in path.lower():
        return redact(path)
    return path


def _logged_request_id(request_id: str) -> str:
    # Request ids are often UUIDs, which stay; only a key pasted in by mistake is cut.
    return _KEY.sub(_cut_key, request_id) if "dpk_" in request_id else request_id


class OneLineFilter(logging.Filter):
    """A library's warnings with an exception (asyncpg's pool retrying its connections while
    the database is down, say) as one line each: what it says, then the exception's kind and
    message, without the traceback, which is the library's own and says nothing more."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            record.msg = f"{record.getMessage()}: {type(exc).__name__}: {exc}"
            record.args = None
            record.exc_info = record.exc_text = None
        return True


class RedactSecretsFilter(logging.Filter):
    """Redacts tokens and keys from log lines (uvicorn's errors may quote a request line);
    request lines, built from redacted fields, do not pass through logging."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact(arg) if isinstance(arg, str) else arg for arg in record.args)
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        return True


def note(scope: Scope, **fields: Any) -> None:
    """Add fields (REQUEST_FIELDS) to this request's log line."""
    scope.setdefault("state", {}).setdefault("log", {}).update(fields)


_ACTION = re.compile(r"[a-z-]{1,40}")


_valid_actions: set[str] = set()  # action texts already matched against _ACTION (a few)


def _operation(items: list[tuple[str, str]]) -> str | None:
    """The query's (inputs.query_items) first `action`, "(invalid)" if it is no action name."""
    action = first_value(items, "action")
    if action is None or action in _valid_actions:
        return action
    if _ACTION.fullmatch(action):
        if len(_valid_actions) < 64:  # any client may send any name: keep the set bounded
            _valid_actions.add(action)
        return action
    return "(invalid)"


def new_request_id() -> str:
    """32 hex digits, as uuid4().hex. An id names a request in logs and is no secret, so the
    random module's generator (seeded from the OS in each process, and again after a fork) is
    enough: no getrandom() system call per request."""
    return f"{random.getrandbits(128):032x}"


# Request lines wait in memory at most this long (plus the time stderr takes to accept them).
FLUSH_SECONDS = 0.1
# ... or until this much is waiting.
FLUSH_BYTES = 64 * 1024
# Lines kept while stderr does not take them (a stuck pipe); past this, new lines are dropped
# and counted instead of holding up requests.
MAX_BUFFERED_BYTES = 1024 * 1024
# A write of at most PIPE_BUF bytes to a pipe is never split by another process's write, so
# several workers sharing one stderr pipe never tear each other's lines.
PIPE_CHUNK = select.PIPE_BUF
FILE_CHUNK = 64 * 1024


def encode_line(line: dict[str, Any], log_format: str) -> bytes:
    """A request's line (time, level, logger and ACCESS_FIELDS, in that order), newline
    included: its JSON object, or `time INFO    GET /path operation status ms extras` for a
    terminal."""
    if log_format == "text":
        extras = " ".join(
            f"{k}={line[k]}"
            for k in (*REQUEST_FIELDS, "client_ip", "request_id")
            if line[k] is not None
        )
        return (
            f"{line['time']} INFO    {line['method']} {line['path']} {line['operation'] or '-'}"
            f" {line['status']} {line['latency_ms']}ms {extras}\n"
        ).encode(errors="backslashreplace")
    return orjson.dumps(line, default=str, option=orjson.OPT_APPEND_NEWLINE)


def _warning_line(message: str, log_format: str) -> bytes:
    when = iso_from_ms(time.time_ns() // 1_000_000)
    if log_format == "text":
        return f"{when} WARNING {message}\n".encode()
    line = {"time": when, "level": "warning", "logger": access_log.name, "message": message}
    return orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE)


# What a request leaves for its line: (time_ns, request_id, method, path, operation, status,
# seconds, noted fields or None, client_ip). The thread turns it into the line (entry_line).
Entry = tuple[int, str, str, str, str | None, int, float, dict[str, Any] | None, str | None]
# Memory an entry holds besides its request id and path (a tuple, a float, small ints).
ENTRY_OVERHEAD = 200


def entry_line(entry: Entry, log_format: str) -> bytes:
    """The line of an entry (see encode_line), its secrets redacted."""
    when, request_id, method, path, operation, status, seconds, noted, client = entry
    noted = noted or {}
    return encode_line(
        {
            "time": iso_from_ms(when // 1_000_000),
            "level": "info",
            "logger": access_log.name,
            "request_id": _logged_request_id(request_id),
            "method": method,
            "path": _logged_path(path),
            "operation": operation,
            "status": status,
            "latency_ms": round(seconds * 1000, 2),
            **{field: noted.get(field) for field in REQUEST_FIELDS},
            "client_ip": client,
        },
        log_format,
    )


def _entry_size(entry: Entry) -> int:
    return len(entry[1]) + len(entry[3]) + ENTRY_OVERHEAD


class RequestLines:
    """Request lines on their way to stderr: add() keeps what a request leaves for its line in
    memory (the request path pays for a tuple and a deque append), and a thread turns those
    into lines and writes them every FLUSH_SECONDS, at FLUSH_BYTES, and at close().

    What can be lost: on kill -9 (or a crash), the lines of the last FLUSH_SECONDS; on a clean
    stop, nothing. A stderr that takes nothing (a stuck pipe) never holds up a request: past
    MAX_BUFFERED_BYTES new lines are dropped, counted (on_drop; the metric
    dailyplay_log_lines_dropped_total), and reported in one warning line once stderr takes
    lines again.
    """

    def __init__(
        self,
        log_format: str,
        fd: int = 2,
        on_drop: Callable[[], None] | None = None,
    ):
        self.log_format = log_format
        self.fd = fd
        self.on_drop = on_drop
        self.dropped = 0  # lines dropped since the start
        self._reported = 0  # of those, already reported in a warning line
        # add() appends on the event loop's thread and flush() takes from the other end; each
        # byte count is changed by one side only, so the request path takes no lock.
        self._entries: collections.deque[Entry] = collections.deque()
        self._added = 0  # bytes queued since the start (add)
        self._written = 0  # bytes written since the start (flush)
        self._write_lock = threading.Lock()  # one flush at a time keeps lines in order
        self._wake = threading.Event()
        self._closing = False
        self._write_failed = False
        self._thread: threading.Thread | None = None
        try:
            self._chunk = PIPE_CHUNK if stat.S_ISFIFO(os.fstat(fd).st_mode) else FILE_CHUNK
        except OSError:
            self._chunk = PIPE_CHUNK

    def add(self, entry: Entry) -> None:
        """Queue one request's line."""
        size = _entry_size(entry)
        waiting = self._added - self._written + size
        if waiting > MAX_BUFFERED_BYTES:
            self.dropped += 1
            if self.on_drop is not None:
                self.on_drop()
            return
        self._entries.append(entry)
        self._added += size
        if waiting >= FLUSH_BYTES and not self._wake.is_set():
            self._wake.set()

    def start(self) -> None:
        """Start the writing thread (in the process that serves, after any fork)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="dailyplay-request-lines", daemon=True
            )
            self._thread.start()

    def flush(self) -> None:
        """Write every line gathered so far (blocks while stderr does)."""
        with self._write_lock:
            entries = self._entries
            chunk = bytearray()
            taken = 0
            while entries:
                entry = entries.popleft()
                line = entry_line(entry, self.log_format)
                if chunk and len(chunk) + len(line) > self._chunk:
                    # Counted as written before the write, so that a failed write cannot leave
                    # the bound believing its bytes are still waiting.
                    self._written += taken
                    self._write_all(chunk)  # also lets the event loop's thread run meanwhile
                    chunk, taken = bytearray(), 0
                chunk += line
                taken += _entry_size(entry)
            if chunk:
                self._written += taken
                self._write_all(chunk)
            if self.dropped != self._reported:
                count, self._reported = self.dropped - self._reported, self.dropped
                message = f"{count} request lines were dropped: stderr did not take them in time"
                self._write_all(bytearray(_warning_line(message, self.log_format)))

    def close(self, timeout: float = 5.0) -> None:
        """Write what is left and stop the thread; gives up after timeout if stderr is stuck."""
        self._closing = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        else:
            self.flush()

    def _run(self) -> None:
        while not self._closing:
            self._wake.wait(FLUSH_SECONDS)
            self._wake.clear()
            self._flush_logging_errors()
        self._flush_logging_errors()

    def _flush_logging_errors(self) -> None:
        try:
            self.flush()
        except OSError as exc:
            # stderr closed or broken: the lines of that batch are lost. Said once through
            # logging, which may reach a handler that still works.
            if not self._write_failed:
                self._write_failed = True
                logging.getLogger("dailyplay").warning("request lines not written: %s", exc)

    def _write_all(self, data: bytearray) -> None:
        view = memoryview(data)
        while view:
            try:
                written = os.write(self.fd, view)
            except BlockingIOError:  # a non-blocking stderr that is full: wait until writable
                select.select([], [self.fd], [], FLUSH_SECONDS)
                continue
            view = view[written:]


class RequestLogMiddleware:
    """Outermost layer: assigns the request id, echoes it, writes the request's line and hands
    its operation, status and latency to the metrics."""

    def __init__(
        self,
        app: ASGIApp,
        client_ip: Any = None,
        metrics: Any = None,
        lines: RequestLines | None = None,
    ):
        self.app = app
        self.client_ip = client_ip  # (scope) -> str, trusting proxies as the API does
        self.metrics = metrics  # a metrics.Metrics, or None
        self.lines = lines  # where request lines go; None: nowhere

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        given = header(scope, REQUEST_ID_HEADER) or ""
        request_id = given if given and _GOOD_REQUEST_ID.fullmatch(given) else new_request_id()
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", ()))  # the app never sets this header
                headers.append((REQUEST_ID_HEADER, request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            logged = self.lines is not None and access_log.isEnabledFor(logging.INFO)
            if logged or self.metrics is not None:
                seconds = time.perf_counter() - started
                operation = _operation(request_query(scope))
                if self.metrics is not None:
                    self.metrics.observe_request(
                        scope["method"], scope["path"], operation, status, seconds
                    )
                if logged:
                    self._log(scope, status, operation, seconds)

    def _log(self, scope: Scope, status: int, operation: str | None, seconds: float) -> None:
        assert self.lines is not None
        peer = scope.get("client")
        state = scope["state"]
        self.lines.add(
            (
                time.time_ns(),
                state["request_id"],
                scope["method"],
                scope["path"],
                operation,
                status,
                seconds,
                state.get("log"),
                self.client_ip(scope) if self.client_ip else (peer[0] if peer else None),
            )
        )


def _utc(record: logging.LogRecord) -> str:
    return str(iso_from_ms(int(record.created) * 1000 + int(record.msecs)))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": _utc(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """For a terminal: `time level message`."""

    def format(self, record: logging.LogRecord) -> str:
        text = f"{_utc(record)} {record.levelname:<7} {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text
