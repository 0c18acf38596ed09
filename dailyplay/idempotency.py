"""Idempotency-Key on create-session, apart from storage: the header, the request's
fingerprint, which refusals are kept, and the answers a claim gives.

A retry of a create whose answer was lost (a timeout, a dropped connection, a restart) sends
the same key: it gets the first request's answer again, byte for byte, and no second token is
made or counted (draft-ietf-httpapi-idempotency-key-header; as Stripe does). The claim, its
answer and the token are stored by the Store (claim_idempotency_key, insert_session's
completion), so that this holds across workers, hosts and a crash between commit and reply.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import orjson
from starlette.types import Scope

from .config import Settings
from .errors import ApiError
from .responses import JsonResponse, json_bytes

HEADER = b"idempotency-key"
REPLAYED = "Idempotent-Replayed"
MAX_KEY = 255
# 1 to 255 visible ASCII characters (RFC 5234 VCHAR), as Stripe and most clients send them
# (a UUID, or the draft's quoted string form, which is then the key as sent).
_KEY = re.compile(r"[\x21-\x7e]{1,255}")
# How long a client is asked to wait while the first request with its key is still running.
IN_FLIGHT_RETRY_AFTER = "1"
# A claim's lock outlasts any wait of the request for the database, with a margin.
LOCK_MARGIN_MS = 5_000


def header_key(scope: Scope) -> str | None:
    """The request's Idempotency-Key (None without one); 400 unless it is one well-formed key."""
    values = [value for name, value in scope["headers"] if name == HEADER]
    if not values:
        return None
    if len(values) > 1:
        raise ApiError(400, "send one Idempotency-Key header, not several")
    text: str = values[0].decode("latin-1")
    if not _KEY.fullmatch(text):
        raise ApiError(
            400,
            f"Idempotency-Key must be 1 to {MAX_KEY} visible ASCII characters"
            " (no spaces or control characters); a UUID is a good key",
        )
    return text


def fingerprint(method: str, action: str, body: dict[str, Any]) -> bytes:
    """SHA-256 of the method, the action and the body as canonical JSON (keys sorted, no
    spaces): a retry that sends the same object in another layout is the same request."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{method}\n{action}\n{canonical}".encode()).digest()


def lock_ms(settings: Settings) -> int:
    """How long a claim holds its key before another request may take it over (its holder has
    died): past the longest the holder can wait for the database, twice over."""
    database = settings.database
    return 2 * max(database.busy_timeout_ms, database.statement_timeout_ms) + LOCK_MARGIN_MS


def kept(exc: ApiError) -> bool:
    """Whether a refusal is stored as the key's answer: those the request itself caused (an
    invalid field, a game the key may not mint for), which a retry would get again. Any other
    (429, 401 after a key change, a 5xx or 503) leaves the key free, so that a retry is tried."""
    return exc.status == 400 or exc.kind == "not_allowed"


def error_body(exc: ApiError) -> bytes:
    """The body the API answers exc with (app.error_response's)."""
    return json_bytes({"success": False, "error": exc.message})


def replayed(status: int, body: bytes) -> JsonResponse:
    """A stored answer, as it was first sent, marked as a replay."""
    return JsonResponse(orjson.Fragment(body), status, headers={REPLAYED: "true"})


def in_flight() -> ApiError:
    return ApiError(
        409,
        "a request with this Idempotency-Key is still being processed; retry shortly to get "
        "its answer",
        headers={"Retry-After": IN_FLIGHT_RETRY_AFTER},
    )


def mismatch() -> ApiError:
    return ApiError(
        422,
        "this Idempotency-Key was used with a different request (method, action or body); "
        "use a new key for a new request",
    )


def taken_over() -> ApiError:
    return ApiError(
        409,
        "this request outlived its hold on the Idempotency-Key and another request with the key "
        "took it over; nothing was stored by this one: retry to get that one's answer",
        headers={"Retry-After": IN_FLIGHT_RETRY_AFTER},
    )
