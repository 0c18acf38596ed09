"""Logging: one structured line per request, in JSON (default) or as text for a terminal.

Every request gets an id: the caller's X-Request-ID when it is a sensible token (1-128 of
A-Z a-z 0-9 . _ : -), else a new one; it is returned in the X-Request-ID response header and
logged with the request. A line never carries a raw API key, session token or bearer JWT: the
query string is not logged at all, only the operation its `action` names, and an API key
appears as its public 8-character prefix.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from typing import Any

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


class RedactSecretsFilter(logging.Filter):
    """Redacts tokens and keys from other loggers' lines (uvicorn's errors may quote a request
    line); request lines are built from redacted fields already and pass untouched."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == access_log.name:
            return True
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


class RequestLogMiddleware:
    """Outermost layer: assigns the request id, echoes it, logs the request's line and hands
    its operation, status and latency to the metrics."""

    def __init__(self, app: ASGIApp, client_ip: Any = None, metrics: Any = None):
        self.app = app
        self.client_ip = client_ip  # (scope) -> str, trusting proxies as the API does
        self.metrics = metrics  # a metrics.Metrics, or None

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
            logged = access_log.isEnabledFor(logging.INFO)
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
        fields: dict[str, Any] = {
            "request_id": _logged_request_id(scope["state"]["request_id"]),
            "method": scope["method"],
            "path": _logged_path(scope["path"]),
            "operation": operation,
            "status": status,
            "latency_ms": round(seconds * 1000, 2),
        }
        noted = scope["state"].get("log", {})
        fields.update({k: noted[k] for k in REQUEST_FIELDS if k in noted})
        peer = scope.get("client")
        fields["client_ip"] = (
            self.client_ip(scope) if self.client_ip else (peer[0] if peer else None)
        )
        # makeRecord + handle: Logger.info would also walk the stack for the caller's file and
        # line, which no format here shows (a few microseconds per request).
        record = access_log.makeRecord(
            access_log.name, logging.INFO, __file__, 0, "%s %s %s %s",
            (fields["method"], fields["path"], fields["operation"] or "-", status), None,
            extra={"fields": fields},
        )  # fmt: skip
        access_log.handle(record)


def _utc(record: logging.LogRecord) -> str:
    return str(iso_from_ms(int(record.created) * 1000 + int(record.msecs)))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and a request's fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": _utc(record),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update({k: fields.get(k) for k in ACCESS_FIELDS})
        else:
            line["message"] = record.getMessage()
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """For a terminal: `time level message`, a request as `GET /path operation status ms`."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            extras = " ".join(
                f"{k}={fields[k]}"
                for k in ("org_id", "key_id", "key_prefix", "user_id", "client_ip", "request_id")
                if fields.get(k) is not None
            )
            message = (
                f"{fields['method']} {fields['path']} {fields['operation'] or '-'}"
                f" {fields['status']} {fields['latency_ms']}ms {extras}"
            )
        else:
            message = record.getMessage()
        text = f"{_utc(record)} {record.levelname:<7} {message}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text
