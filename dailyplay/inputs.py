"""Strict request parsing: bounded JSON bodies, query parameters and typed fields.

Every function here raises ApiError with a 4xx status and a message naming the offending part;
nothing a client sends can get past them as anything but the declared type.
"""

from __future__ import annotations

import decimal
import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.types import Scope

from .deadlines import Deadlines
from .errors import ApiError

MAX_INT63 = 2**63 - 1
MAX_ID_LIST = 1000
MAX_METADATA_DEPTH = 32
# What "blank" means for required text. Kept to these four so that the OpenAPI pattern
# `[^ \t\r\n]` means the same in every regex dialect (their ideas of `\s` differ).
BLANK = " \t\r\n"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:20]} is too large")
    return value


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


# json.loads would build a new decoder for these options on every call.
_BODY_DECODER = json.JSONDecoder(
    object_pairs_hook=_no_duplicate_keys,
    parse_constant=_reject_constant,
    parse_float=_finite_float,
)


async def read_json_object(
    request: Request, max_bytes: int, deadlines: Deadlines, timeout_seconds: float = 10
) -> dict[str, Any]:
    """The request body as a JSON object; 413 past max_bytes (without reading it all), 408 when
    it has not all arrived within timeout_seconds (a slow client must not hold a request)."""
    content_type = header(request.scope, b"content-type") or ""
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(415, "request body must be JSON: send Content-Type: application/json")
    declared = header(request.scope, b"content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "invalid Content-Length header")
        if int(declared) > max_bytes:
            raise ApiError(413, f"request body is larger than the limit of {max_bytes} bytes")
    try:
        with deadlines.bound(timeout_seconds):
            raw = await _read_at_most(request, max_bytes)
    except TimeoutError:
        raise ApiError(
            408,
            f"request body not received within {timeout_seconds:g} seconds",
            headers={"Connection": "close"},
        ) from None
    if not raw.strip():
        raise ApiError(400, "request body is required: a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "request body is not valid UTF-8") from None
    try:
        if text.startswith("\ufeff"):  # as json.loads refuses it
            raise ValueError("Unexpected UTF-8 BOM")
        body = _BODY_DECODER.decode(text)
        # Lone surrogates (\ud800) parse but cannot be stored as UTF-8 text. Text that arrived
        # as UTF-8 has none of its own: only a \u escape can make one.
        if "\\u" in text:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply") from None
    except UnicodeEncodeError:
        raise ApiError(
            400, "request body contains an invalid \\u escape (lone surrogate)"
        ) from None
    except ValueError as exc:
        raise ApiError(400, f"request body is not valid JSON: {_short(exc)}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


# The status logged (as nginx does) for a request whose client hung up before its body had
# arrived; nothing is sent, since nobody is there to read it.
CLIENT_CLOSED = 499


async def _read_at_most(request: Request, max_bytes: int) -> bytes:
    """The body, straight from the ASGI messages: Request.stream() is an async generator,
    one more frame to resume for each chunk, and raises ClientDisconnect, which is no
    server error."""
    receive = request.receive
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect
            raise ApiError(CLIENT_CLOSED, "the client closed the connection before its body")
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > max_bytes:
                raise ApiError(413, f"request body is larger than the limit of {max_bytes} bytes")
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _short(exc: ValueError) -> str:
    message = str(exc)
    return message if len(message) <= 120 else message[:117] + "..."


def check_fields(
    body: Mapping[str, Any], allowed: Iterable[str], required: Iterable[str] = ()
) -> None:
    """400 for the first unknown field, then for the first missing required one."""
    allowed = set(allowed)
    for name in body:
        if name not in allowed:
            raise ApiError(400, f"unknown field '{_printable(name)}'")
    for name in required:
        if name not in body:
            raise ApiError(400, f"'{name}' is required")


def _printable(name: str) -> str:
    shown = name if len(name) <= 64 else name[:61] + "..."
    return shown.encode("unicode_escape").decode("ascii")


def query_items(query_string: bytes) -> list[tuple[str, str]]:
    """The query's (name, value) pairs in order, exactly as Starlette's request.query_params
    reads them (latin-1, parse_qsl with blank values kept).

    A query without escapes (`%`, `+`), which is every well-behaved client's, is split
    directly: parse_qsl would return the same pairs, several microseconds later.
    """
    # Tested on the text: `b"%" in data` first tries b"%" as an integer and raises inside.
    text = query_string.decode("latin-1")
    if "%" in text or "+" in text:
        return parse_qsl(text, keep_blank_values=True)
    items = []
    for part in text.split("&"):
        if part:
            name, _, value = part.partition("=")
            items.append((name, value))
    return items


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of a request header (name in lower case, as ASGI gives names), read
    from the scope as Starlette's Headers would, without building a Headers mapping."""
    for key, value in scope["headers"]:
        if key == name:
            text: str = value.decode("latin-1")
            return text
    return None


def request_query(scope: Scope) -> list[tuple[str, str]]:
    """query_items of this request's query string, split once per request (the dispatcher and
    the log line both read it)."""
    state = scope.setdefault("state", {})
    items: list[tuple[str, str]] | None = state.get("query_items")
    if items is None:
        items = state["query_items"] = query_items(scope.get("query_string", b""))
    return items


def first_value(items: list[tuple[str, str]], name: str) -> str | None:
    """The first value of a query parameter among query_items, or None."""
    for key, value in items:  # a loop: a generator expression costs more than the search
        if key == name:
            return value
    return None


def query_params(items: list[tuple[str, str]], allowed: Iterable[str]) -> dict[str, str]:
    """Query parameters (query_items) as a dict; 400 for a repeated or an unknown one."""
    params: dict[str, str] = {}
    for name, value in items:
        if name in params:
            raise ApiError(400, f"query parameter '{_printable(name)}' is given more than once")
        params[name] = value
    for name in params:
        if name not in allowed:
            raise ApiError(400, f"unknown query parameter '{_printable(name)}'")
    return params


def as_integer(value: Any) -> int | None:
    """A JSON number with no fractional part (42 or 42.0, as JSON Schema counts integers)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def positive_int(value: Any, name: str, maximum: int = MAX_INT63) -> int:
    """A JSON integer in 1..maximum (booleans and fractions are not integers)."""
    number = as_integer(value)
    if number is None or not 1 <= number <= maximum:
        raise ApiError(400, f"'{name}' must be an integer from 1 to {maximum}")
    return number


# A JSON number in a query string: what clients (and schemathesis) write for an integer.
_QUERY_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


def query_positive_int(params: Mapping[str, str], name: str, maximum: int = MAX_INT63) -> int:
    """A required query parameter holding a positive integer up to maximum (default: 63 bits).

    Written as a JSON number with no fractional part (42, 42.0, 4.2e1), the way JSON Schema's
    `integer` counts them.
    """
    text = params.get(name)
    if text is None or text == "":
        raise ApiError(400, f"query parameter '{name}' is required")
    number = None
    if len(text) <= 40 and _QUERY_NUMBER.fullmatch(text):
        value = decimal.Decimal(text)
        if value == value.to_integral_value() and 1 <= value <= maximum:
            number = int(value)
    if number is None:
        raise ApiError(400, f"query parameter '{name}' must be an integer from 1 to {maximum}")
    return number


def optional_positive_int(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    return None if value is None else positive_int(value, name)


def text(value: Any, name: str, max_length: int, *, required: bool = False) -> str | None:
    """A string of at most max_length characters; when required, present and not blank."""
    if value is None:
        if required:
            raise ApiError(400, f"'{name}' is required")
        return None
    if not isinstance(value, str):
        raise ApiError(400, f"'{name}' must be a string")
    if len(value) > max_length:
        raise ApiError(400, f"'{name}' must be at most {max_length} characters")
    if required and not value.strip(BLANK):
        raise ApiError(400, f"'{name}' must not be empty or only spaces, tabs and line breaks")
    return value


def boolean(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be true or false")
    return value


def id_list(value: Any, name: str) -> list[int] | None:
    """null (no restriction) or an array of positive integers, returned sorted and unique."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise ApiError(400, f"'{name}' must be an array of positive integers or null")
    if len(value) > MAX_ID_LIST:
        raise ApiError(400, f"'{name}' may hold at most {MAX_ID_LIST} ids")
    ids = [as_integer(item) for item in value]
    if any(item is None or not 1 <= item <= MAX_INT63 for item in ids):
        raise ApiError(400, f"'{name}' must be an array of positive integers or null")
    return sorted({item for item in ids if item is not None})


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a JSON value, stopping once it passes limit."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        current, level = stack.pop()
        if isinstance(current, dict | list):
            deepest = max(deepest, level)
            if deepest > limit:
                return deepest
            children = current.values() if isinstance(current, dict) else current
            stack.extend((child, level + 1) for child in children)
    return deepest


def metadata_json(value: Any, name: str, max_bytes: int) -> str | None:
    """A JSON object serialized compactly, at most max_bytes of UTF-8 and 32 levels deep."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ApiError(400, f"'{name}' must be a JSON object")
    if _depth(value, MAX_METADATA_DEPTH) > MAX_METADATA_DEPTH:
        raise ApiError(400, f"'{name}' is nested more than {MAX_METADATA_DEPTH} levels deep")
    serialized = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    size = len(serialized.encode("utf-8"))
    if size > max_bytes:
        raise ApiError(400, f"'{name}' is {size} bytes serialized; the limit is {max_bytes}")
    return serialized


_HEX = frozenset("0123456789abcdefABCDEF")
_UUID_EXAMPLE = "a UUID like 123e4567-e89b-42d3-a456-426614174000"


def session_token(value: Any, name: str = "token") -> bytes:
    """A session token (UUID text, any case, with hyphens) as its 16 bytes."""
    if value is None or value == "":
        raise ApiError(400, f"'{name}' is required")
    # 8-4-4-4-12 hex digits: the only text form accepted (not uuid.UUID's braces or urn:).
    if (
        not isinstance(value, str)
        or len(value) != 36
        or value[8] != "-"
        or value[13] != "-"
        or value[18] != "-"
        or value[23] != "-"
    ):
        raise ApiError(400, f"'{name}' must be {_UUID_EXAMPLE}")
    digits = value[:8] + value[9:13] + value[14:18] + value[19:23] + value[24:]
    if not _HEX.issuperset(digits):
        raise ApiError(400, f"'{name}' must be {_UUID_EXAMPLE}")
    return bytes.fromhex(digits)
