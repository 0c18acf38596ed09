"""The /api/org-api-keys endpoint: dispatch on method and `action`, parse, call, envelope."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson
from starlette.requests import Request
from starlette.responses import Response

from . import idempotency, inputs, sessions
from .audit import audit_entry
from .auth import JwtVerifier, Principal, require_org_role
from .clock import HOUR_MS, iso_from_ms, ms_from_iso, now_ms
from .config import Settings
from .deadlines import Deadlines
from .errors import ApiError
from .keys import (
    ApiKeyVerifier,
    KeyStates,
    api_key_data,
    generate_api_key,
    hash_api_key,
    is_well_formed,
    key_changes,
    key_insert_values,
    key_prefix,
    new_key_fields,
)
from .logs import note
from .metrics import Metrics
from .operations import ACTIONS, operation_name
from .ratelimit import (
    LOCKOUT,
    FailedAuthLimiter,
    KeyRateLimiter,
    Lockout,
    PublicRateLimiter,
    WindowState,
    rate_limit_headers,
)
from .responses import JsonResponse, json_bytes, raw_json
from .storage import Store
from .storage.errors import ClaimLost, KeyChanged, QueryTooLong
from .storage.types import (
    CLAIMED,
    IN_FLIGHT,
    KEY_SETTINGS,
    MISMATCH,
    MUTABLE_KEY_COLUMNS,
    NO_USAGE,
    SESSION_STATUSES,
    Actor,
    Claim,
    Completion,
    IdempotencyRequest,
    KeyState,
    ListedSession,
    NewSession,
    SessionQuery,
)
from .tokens import new_session_token

log = logging.getLogger("dailyplay.api")

MAX_EXTERNAL_REF = 255
MAX_PLAYER_UUID = 255


@dataclass
class Services:
    """Everything a request handler needs, opened in the app's lifespan."""

    settings: Settings
    db: Store
    key_verifier: ApiKeyVerifier
    key_states: KeyStates
    jwt: JwtVerifier
    key_limiter: KeyRateLimiter
    public_limiter: PublicRateLimiter
    auth_failures: FailedAuthLimiter
    trusted_proxies: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
    metrics: Metrics
    deadlines: Deadlines


async def read_body(services: Services, request: Request) -> dict[str, Any]:
    """The JSON object body, within this server's size and time limits."""
    limits = services.settings.limits
    return await inputs.read_json_object(
        request, limits.max_body_bytes, services.deadlines, limits.body_timeout_seconds
    )


def ok(data: Any, headers: dict[str, str] | None = None) -> JsonResponse:
    return JsonResponse({"success": True, "data": data}, headers=headers)


# --- who is calling -----------------------------------------------------------------------------


def client_ip(
    request: Request, trusted: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> str:
    """The caller's address; X-Forwarded-For is believed only from trusted proxies."""
    client = request.scope.get("client")  # (host, port); request.client builds a tuple
    peer = client[0] if client else "unknown"
    if not trusted:
        return peer

    def is_trusted(address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in trusted)

    if not is_trusted(peer):
        return peer
    hops = [
        hop.strip()
        for header in request.headers.getlist("x-forwarded-for")
        for hop in header.split(",")
    ]
    # The rightmost address not added by one of our own proxies is the client.
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return peer
        if not is_trusted(hop):
            return hop
    return peer


async def authenticate_bearer(services: Services, request: Request) -> Principal:
    if not services.jwt.configured:
        return await services.jwt.verify("")  # raises the "not configured" 401
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401,
            "missing bearer token: send Authorization: Bearer <Clerk session JWT>",
            headers={"WWW-Authenticate": "Bearer"},
            kind="bearer_missing",
        )
    try:
        principal = await services.jwt.verify(token.strip())
    except ApiError as exc:
        if exc.status == 401:
            exc.headers.setdefault("WWW-Authenticate", 'Bearer error="invalid_token"')
            exc.kind = exc.kind or "bearer_invalid"
        raise
    note(request.scope, user_id=principal.user_id)
    await services.auth_failures.confirm(request.scope.get(LOCKOUT), now_ms())
    return principal


@dataclass(frozen=True)
class KeyContext:
    """A key admitted for this request: the reading of its row it was admitted on, and the
    request's count against its limits."""

    state: KeyState
    rate: WindowState
    remembered: bool  # admitted on a reading kept from an earlier request, not a fresh one

    @property
    def key_id(self) -> int:
        return self.state.key_id

    @property
    def org_id(self) -> int:
        return self.state.org_id


async def authenticate_api_key(services: Services, request: Request, now: int) -> KeyContext:
    """The x-api-key's row, checked (401/403) and counted against its limits (429)."""
    key_hash, state, remembered = await _identify_key(services, request, now)
    return await _count_key(services, request, key_hash, state, now, remembered)


async def _identify_key(
    services: Services, request: Request, now: int
) -> tuple[str, KeyState, bool]:
    """The x-api-key's row, checked (401/403) and not yet counted: (the key's hash, the reading
    of its row it passed on, whether that reading was remembered from an earlier request).

    A remembered reading is used when it admits the request; the admission is confirmed when
    the token is inserted (KeyChanged otherwise). Anything it would refuse is decided again on
    the current row, so that old state never refuses.
    """
    raw = inputs.header(request.scope, b"x-api-key")
    if not raw:
        raise ApiError(
            401, "missing API key: send it in the x-api-key header", kind="api_key_missing"
        )
    if not is_well_formed(raw):
        raise ApiError(
            401,
            "malformed API key: expected dpk_ followed by 40 lowercase hex digits",
            kind="api_key_malformed",
        )
    note(request.scope, key_prefix=key_prefix(raw))
    verified = await services.key_verifier.verify(raw)
    if verified is None:
        raise ApiError(401, "invalid API key", kind="api_key_invalid")
    remembered = services.key_states.get(verified.key_id)
    if remembered is not None:
        try:
            return verified.key_hash, _check_key(request, verified.key_hash, remembered, now), True
        except ApiError:
            pass  # perhaps out of date: decide on the current row
    state = await _read_key_state(services, verified.key_id)
    return verified.key_hash, _check_key(request, verified.key_hash, state, now), False


async def _count_key(
    services: Services,
    request: Request,
    key_hash: str,
    state: KeyState,
    now: int,
    remembered: bool,
) -> KeyContext:
    """The request counted against the limits of the key _identify_key admitted (429 past
    them); a refusal on a remembered reading is decided again on the current row."""
    lockout = request.scope.get(LOCKOUT)
    if remembered:
        try:
            return await _admit(services, request, key_hash, state, now, True, lockout)
        except ApiError:
            pass  # perhaps out of date: decide on the current row
        return await _admit(
            services,
            request,
            key_hash,
            await _read_key_state(services, state.key_id),
            now,
            False,
            lockout,
        )
    return await _admit(services, request, key_hash, state, now, False, lockout)


async def _read_key_state(services: Services, key_id: int) -> KeyState | None:
    state = await services.db.get_api_key_for_request(key_id)
    services.key_states.remember(key_id, state)
    return state


def _check_key(request: Request, key_hash: str, state: KeyState | None, now: int) -> KeyState:
    """401/403 unless the key (of this hash) may create session tokens now."""
    if state is None or state.key_hash != key_hash:
        raise ApiError(401, "invalid API key", kind="api_key_invalid")
    note(request.scope, key_id=state.key_id, org_id=state.org_id)
    if not state.is_active:
        raise ApiError(401, "API key has been revoked", kind="api_key_revoked")
    if state.expires_at is not None and state.expires_at <= now:
        raise ApiError(401, "API key has expired", kind="api_key_expired")
    if state.tier != "business":
        raise ApiError(
            403,
            "session tokens need the Business tier; this API key's organization is not on it",
            kind="org_not_business",
        )
    return state


async def _admit(
    services: Services,
    request: Request,
    key_hash: str,
    state: KeyState | None,
    now: int,
    remembered: bool,
    lockout: Lockout | None = None,
) -> KeyContext:
    state = _check_key(request, key_hash, state, now)
    rate = await services.key_limiter.hit(
        state.key_id, state.rate_limit_per_minute, state.rate_limit_per_day, now, lockout
    )
    services.key_limiter.note_used(state.key_id, now)
    return KeyContext(state, rate, remembered)


async def _readmit(services: Services, request: Request, key: KeyContext, now: int) -> KeyContext:
    """The key decided again on its current row (401/403 if it may no longer create tokens).
    The request stays counted once against its limits, unless they have changed: then it is
    counted under the new ones too (429 past them), as a request arriving now would be."""
    old = key.state
    state = await _read_key_state(services, key.key_id)
    if state is not None and (state.rate_limit_per_minute, state.rate_limit_per_day) != (
        old.rate_limit_per_minute,
        old.rate_limit_per_day,
    ):
        return await _admit(services, request, old.key_hash, state, now, False)
    return KeyContext(_check_key(request, old.key_hash, state, now), key.rate, False)


# --- sessions -----------------------------------------------------------------------------------


class SessionFields(NamedTuple):
    game_id: int | None
    stream_id: int | None
    external_ref: str | None
    metadata: str | None
    expires_in_minutes: int


def _session_fields(services: Services, body: dict[str, Any]) -> SessionFields:
    inputs.check_fields(
        body, ("game_id", "stream_id", "external_ref", "metadata", "expires_in_minutes")
    )
    game_id = inputs.optional_positive_int(body, "game_id")
    stream_id = inputs.optional_positive_int(body, "stream_id")
    if game_id is None and stream_id is None:
        raise ApiError(400, "at least one of 'game_id' and 'stream_id' is required")
    external_ref = inputs.text(body.get("external_ref"), "external_ref", MAX_EXTERNAL_REF)
    metadata = inputs.metadata_json(
        body.get("metadata"), "metadata", services.settings.limits.max_metadata_bytes
    )
    lifetime = services.settings.sessions
    minutes = body.get("expires_in_minutes")
    minutes = (
        lifetime.default_expires_minutes
        if minutes is None
        else inputs.positive_int(minutes, "expires_in_minutes", lifetime.max_expires_minutes)
    )
    return SessionFields(game_id, stream_id, external_ref, metadata, minutes)


# Readings of a key's row one create may go through when the key keeps changing meanwhile.
KEY_READINGS = 3


async def _insert_session(
    services: Services,
    request: Request,
    key: KeyContext,
    fields: SessionFields,
    now: int,
    expires_at: int,
    claim: tuple[IdempotencyRequest, str] | None = None,
) -> tuple[bytes, KeyContext]:
    """Store a new token for the key, as the key's row is when it is stored (with the answer
    to the request's idempotency claim, if any, in the same transaction); returns the answer's
    body and the key as it was admitted then."""
    for _reading in range(KEY_READINGS):
        try:
            sessions.check_allowed(fields.game_id, key.state.allowed_game_ids, "game")
            sessions.check_allowed(fields.stream_id, key.state.allowed_stream_ids, "stream")
            token = new_session_token(now)
            body = json_bytes(
                {
                    "success": True,
                    "data": {
                        "token": str(token),
                        "game_id": fields.game_id,
                        "stream_id": fields.stream_id,
                        "expires_at": iso_from_ms(expires_at),
                        "external_ref": fields.external_ref,
                    },
                }
            )
            completion = None
            if claim is not None:
                ask, holder = claim
                completion = Completion(ask.api_key_id, ask.key, holder, 200, body)
            await services.db.insert_session(
                NewSession(
                    token.bytes,
                    key.org_id,
                    key.key_id,
                    fields.game_id,
                    fields.stream_id,
                    fields.external_ref,
                    fields.metadata,
                    now,
                    expires_at,
                ),
                key.state,
                completion,
            )
            return body, key
        except ApiError:
            if not key.remembered:
                raise
        except KeyChanged:
            pass
        except ClaimLost:
            raise idempotency.taken_over() from None
        key = await _readmit(services, request, key, now)
    raise ApiError(
        503,
        "the API key was being changed while the session was created; try again",
        headers={"Retry-After": "1"},
    )


async def _read_create_body(
    services: Services, request: Request, key: KeyContext, now: int
) -> dict[str, Any]:
    try:
        return await read_body(services, request)
    except ApiError:
        if key.remembered:
            await _readmit(services, request, key, now)  # a changed key answers first
        raise


async def _create(
    services: Services,
    request: Request,
    key: KeyContext,
    body: dict[str, Any],
    now: int,
    claim: tuple[IdempotencyRequest, str] | None = None,
) -> tuple[bytes, KeyContext]:
    """A token made from the request body for the admitted key (_insert_session)."""
    try:
        fields = _session_fields(services, body)
    except ApiError:
        if key.remembered:
            await _readmit(services, request, key, now)  # a changed key answers first
        raise
    expires_at = now + fields.expires_in_minutes * 60_000
    return await _insert_session(services, request, key, fields, now, expires_at, claim)


async def create_session(services: Services, request: Request, params: dict[str, str]) -> Response:
    now = now_ms()
    idempotency_key = idempotency.header_key(request.scope)
    if idempotency_key is not None:
        return await _create_session_once(services, request, now, idempotency_key)
    key = await authenticate_api_key(services, request, now)
    try:
        body = await _read_create_body(services, request, key, now)
        created, key = await _create(services, request, key, body, now)
    except ApiError as exc:
        # The request was counted: its answer says how much of the window is left.
        exc.headers = {**rate_limit_headers(key.rate), **exc.headers}
        raise
    services.metrics.session_created()
    return JsonResponse(orjson.Fragment(created), headers=rate_limit_headers(key.rate))


async def _create_session_once(
    services: Services, request: Request, now: int, idempotency_key: str
) -> Response:
    """create-session with an Idempotency-Key: the first request with the key (for this API
    key) makes the token, and its answer is stored with it; a retry gets that answer again,
    without counting against the key's limits."""
    key_hash, state, remembered = await _identify_key(services, request, now)
    try:
        body = await read_body(services, request)
    except ApiError as exc:  # nothing to claim the key for: answered as without it
        key = await _count_key(services, request, key_hash, state, now, remembered)
        exc.headers = {**rate_limit_headers(key.rate), **exc.headers}
        if key.remembered:
            await _readmit(services, request, key, now)
        raise
    ask = IdempotencyRequest(
        state.key_id,
        idempotency_key,
        idempotency.fingerprint(request.method, "create-session", body),
    )
    settings = services.settings
    try:
        claim = await services.db.claim_idempotency_key(
            ask,
            now,
            now + idempotency.lock_ms(settings),
            now - settings.sessions.idempotency_hours * HOUR_MS,
        )
    except KeyChanged:  # the API key was deleted meanwhile
        raise ApiError(401, "invalid API key", kind="api_key_invalid") from None
    if claim.outcome != CLAIMED:
        return await _answer_claimed_key(services, request, now, key_hash, state, remembered, claim)
    assert claim.claim is not None
    holder = claim.claim
    try:
        key = await _count_key(services, request, key_hash, state, now, remembered)
    except BaseException:
        await _release(services, ask, holder)
        raise
    try:
        created, key = await _create(services, request, key, body, now, (ask, holder))
    except ApiError as exc:
        if idempotency.kept(exc):
            await _keep_refusal(services, ask, holder, exc)
        else:
            await _release(services, ask, holder)
        exc.headers = {**rate_limit_headers(key.rate), **exc.headers}
        raise
    except BaseException:
        await _release(services, ask, holder)
        raise
    services.metrics.session_created()
    return JsonResponse(orjson.Fragment(created), headers=rate_limit_headers(key.rate))


async def _answer_claimed_key(
    services: Services,
    request: Request,
    now: int,
    key_hash: str,
    state: KeyState,
    remembered: bool,
    claim: Claim,
) -> Response:
    """The answer when another request holds or held the key: its stored answer replayed
    (decided on the key's current row: a key revoked since gets 401), 409 while it runs, 422
    when it was another request. None of these counts against the key's limits."""
    await services.auth_failures.confirm(request.scope.get(LOCKOUT), now)
    if claim.outcome == IN_FLIGHT:
        raise idempotency.in_flight()
    if claim.outcome == MISMATCH:
        raise idempotency.mismatch()
    if remembered:
        _check_key(request, key_hash, await _read_key_state(services, state.key_id), now)
    assert claim.status is not None and claim.body is not None
    services.metrics.idempotent_replay()
    return idempotency.replayed(claim.status, claim.body)


async def _keep_refusal(
    services: Services, ask: IdempotencyRequest, holder: str, exc: ApiError
) -> None:
    """Store a refusal the request caused as the key's answer (else give the key up)."""
    completion = Completion(
        ask.api_key_id, ask.key, holder, exc.status, idempotency.error_body(exc)
    )
    try:
        await services.db.complete_idempotency_key(completion)
    except Exception as error:
        log.warning("storing an idempotency key's answer failed: %s", error)
        await _release(services, ask, holder)


async def _release(services: Services, ask: IdempotencyRequest, holder: str) -> None:
    """Give the claim up, so that a retry with the key is tried afresh. When even that fails
    (the database is out of reach), the claim lapses at its lock's end."""
    try:
        await services.db.release_idempotency_key(ask.api_key_id, ask.key, holder)
    except Exception as error:
        log.warning("releasing an idempotency key failed: %s", error)


def _metadata(text: str | None) -> Any:
    """Stored metadata (compact JSON written by inputs.metadata_json), as it was stored."""
    return None if text is None else raw_json(text)


async def validate_session(
    services: Services, request: Request, params: dict[str, str]
) -> Response:
    now = now_ms()
    await services.public_limiter.hit(client_ip(request, services.trusted_proxies), now)
    if "token" not in params:
        raise ApiError(400, "query parameter 'token' is required")
    token = inputs.session_token(params["token"])
    row = await services.db.get_session(token)
    if row is None:
        raise ApiError(404, "session token not found", kind="not_found")
    note(request.scope, org_id=row.org_id)
    status = sessions.status(row, now)
    services.metrics.observe_validation(status)
    return ok(
        {
            "valid": status == "active",
            "status": status,
            "game_id": row.game_id,
            "stream_id": row.stream_id,
            "expires_at": iso_from_ms(row.expires_at),
            "external_ref": row.external_ref,
            "metadata": _metadata(row.metadata),
        }
    )


async def consume_session(services: Services, request: Request, params: dict[str, str]) -> Response:
    now = now_ms()
    await services.public_limiter.hit(client_ip(request, services.trusted_proxies), now)
    body = await read_body(services, request)
    inputs.check_fields(body, ("token", "player_uuid"), required=("token",))
    token = inputs.session_token(body["token"])
    player_uuid = inputs.text(body.get("player_uuid"), "player_uuid", MAX_PLAYER_UUID)
    row = await services.db.consume_session(token, player_uuid, now)
    if row is None:
        current = await services.db.get_session(token)
        if current is None:
            raise ApiError(404, "session token not found", kind="not_found")
        note(request.scope, org_id=current.org_id)
        status = sessions.status(current, now)
        # An active row here expired between the two statements: report it as expired.
        status = status if status in sessions.GONE_MESSAGES else "expired"
        raise ApiError(410, sessions.GONE_MESSAGES[status], kind=status)
    note(request.scope, org_id=row.org_id)
    services.metrics.session_consumed()
    return ok(
        {
            "session_id": row.id,
            "org_id": row.org_id,
            "stream_id": row.stream_id,
            "game_id": row.game_id,
            "external_ref": row.external_ref,
            "metadata": _metadata(row.metadata),
        }
    )


# --- an organization's tokens, for the key's holder --------------------------------------------

MAX_REVOKE_REASON = 500
SESSION_PAGE_DEFAULT = 50
SESSION_PAGE_MAX = 500
CURSOR_PREFIX = "s1."


def session_item(row: ListedSession, now: int) -> dict[str, Any]:
    """A stored token as list-sessions and revoke-session show it."""
    return {
        "token": str(uuid.UUID(bytes=row.token)),
        "status": sessions.status(row, now),
        "game_id": row.game_id,
        "stream_id": row.stream_id,
        "external_ref": row.external_ref,
        "metadata": _metadata(row.metadata),
        "created_at": iso_from_ms(row.created_at),
        "expires_at": iso_from_ms(row.expires_at),
        "consumed_at": iso_from_ms(row.consumed_at),
        "revoked_at": iso_from_ms(row.revoked_at),
        "player_uuid": row.player_uuid,
        "api_key_id": row.api_key_id,
    }


async def _current_key(services: Services, request: Request, now: int) -> KeyContext:
    """The x-api-key authenticated and counted against its limits, on its current row: these
    operations act on the organization's tokens, so a key revoked a moment ago in another
    process must not pass on a reading remembered here."""
    key = await authenticate_api_key(services, request, now)
    if key.remembered:
        key = await _readmit(services, request, key, now)
    return key


async def revoke_session(services: Services, request: Request, params: dict[str, str]) -> Response:
    """An active token of the key's organization revoked (a refund takes its play back)."""
    now = now_ms()
    key = await _current_key(services, request, now)
    try:
        body = await read_body(services, request)
        inputs.check_fields(body, ("token", "reason"), required=("token",))
        token = inputs.session_token(body["token"])
        reason = inputs.text(body.get("reason"), "reason", MAX_REVOKE_REASON)
        actor = Actor(f"api_key:{key.key_id}", client_ip(request, services.trusted_proxies))
        state, row = await services.db.revoke_session(key.org_id, token, now, actor, reason)
        if row is None:
            raise ApiError(404, "session token not found", kind="not_found")
        if state in ("consumed", "expired"):
            raise ApiError(410, sessions.GONE_MESSAGES[state], kind=state)
    except ApiError as exc:
        exc.headers = {**rate_limit_headers(key.rate), **exc.headers}
        raise
    return ok(session_item(row, now), headers=rate_limit_headers(key.rate))


def _cursor(session_id: int) -> str:
    return f"{CURSOR_PREFIX}{session_id}"


# A cursor: the prefix, then the id of the last token of the page before (18 digits at most).
_CURSOR = re.compile(re.escape(CURSOR_PREFIX) + r"[1-9][0-9]{0,17}")


def _before_id(cursor: str) -> int:
    """The id a cursor given by list-sessions points below; 400 for anything else."""
    if not _CURSOR.fullmatch(cursor):
        raise ApiError(400, "cursor is not one that list-sessions gave (use next_cursor as is)")
    return int(cursor[len(CURSOR_PREFIX) :])


def _query_time(params: dict[str, str], name: str) -> int | None:
    if name not in params:
        return None
    try:
        return ms_from_iso(params[name])
    except ValueError as exc:
        raise ApiError(400, f"query parameter '{name}': {exc}") from None


def _session_query(params: dict[str, str], now: int) -> SessionQuery:
    status = params.get("status")
    if status is not None and status not in SESSION_STATUSES:
        raise ApiError(
            400, "query parameter 'status' must be one of " + ", ".join(SESSION_STATUSES)
        )
    external_ref = params.get("external_ref")
    if external_ref is not None:
        external_ref = inputs.text(external_ref, "external_ref", MAX_EXTERNAL_REF)
    limit = SESSION_PAGE_DEFAULT
    if "limit" in params:
        limit = inputs.query_positive_int(params, "limit", SESSION_PAGE_MAX)
    return SessionQuery(
        now=now,
        limit=limit,
        external_ref=external_ref,
        status=status,
        game_id=inputs.query_positive_int(params, "game_id") if "game_id" in params else None,
        stream_id=(
            inputs.query_positive_int(params, "stream_id") if "stream_id" in params else None
        ),
        created_after=_query_time(params, "created_after"),
        created_before=_query_time(params, "created_before"),
        before_id=_before_id(params["cursor"]) if "cursor" in params else None,
    )


async def list_sessions(services: Services, request: Request, params: dict[str, str]) -> Response:
    """The key's organization's tokens, newest first, a page at a time."""
    now = now_ms()
    key = await _current_key(services, request, now)
    try:
        query = _session_query(params, now)
        try:
            found = await services.db.list_sessions(
                key.org_id, dataclasses.replace(query, limit=query.limit + 1)
            )
        except QueryTooLong:
            raise ApiError(
                503,
                "listing these tokens took too long; narrow it with external_ref, or with "
                "created_after and created_before",
                headers={"Retry-After": "1"},
            ) from None
    except ApiError as exc:
        exc.headers = {**rate_limit_headers(key.rate), **exc.headers}
        raise
    page = found[: query.limit]
    more = len(found) > query.limit
    return ok(
        {
            "sessions": [session_item(row, now) for row in page],
            "next_cursor": _cursor(page[-1].id) if more else None,
        },
        headers=rate_limit_headers(key.rate),
    )


# --- API keys -----------------------------------------------------------------------------------


async def list_api_keys(services: Services, request: Request, params: dict[str, str]) -> Response:
    principal = await authenticate_bearer(services, request)
    org_id = inputs.query_positive_int(params, "org_id")
    note(request.scope, org_id=org_id)
    await require_org_role(services.db, principal, org_id, need_admin=False)
    keys = await services.db.list_api_keys(org_id)
    usage = await services.db.key_usage(org_id, now_ms())
    return ok([{**api_key_data(key), "usage": usage.get(key.id, NO_USAGE)} for key in keys])


CREATE_KEY_FIELDS = ("org_id", *KEY_SETTINGS)


async def create_api_key(services: Services, request: Request, params: dict[str, str]) -> Response:
    principal = await authenticate_bearer(services, request)
    body = await read_body(services, request)
    inputs.check_fields(body, CREATE_KEY_FIELDS, required=("org_id", "name"))
    org_id = inputs.positive_int(body["org_id"], "org_id")
    note(request.scope, org_id=org_id)
    await require_org_role(services.db, principal, org_id, need_admin=True)
    org = await services.db.get_org(org_id)
    if org is None or org.tier != "business":
        raise ApiError(
            403,
            f"organization {org_id} is not on the Business tier, which API keys need",
            kind="org_not_business",
        )
    now = now_ms()
    fields = new_key_fields(body, now)
    raw_key = generate_api_key()
    key_hash = await _hash_in_thread(raw_key)
    key = await services.db.insert_api_key(
        key_insert_values(org_id, fields, raw_key, key_hash, now),
        _actor(services, request, principal),
    )
    return ok({**api_key_data(key), "key": raw_key})


def _actor(services: Services, request: Request, principal: Principal) -> Actor:
    return Actor(principal.user_id, client_ip(request, services.trusted_proxies))


async def _hash_in_thread(raw_key: str) -> str:
    return await asyncio.to_thread(hash_api_key, raw_key)


async def update_api_key(services: Services, request: Request, params: dict[str, str]) -> Response:
    principal = await authenticate_bearer(services, request)
    body = await read_body(services, request)
    mutable = sorted(MUTABLE_KEY_COLUMNS)
    inputs.check_fields(body, ("id", "org_id", *mutable), required=("id", "org_id"))
    key_id = inputs.positive_int(body["id"], "id")
    org_id = inputs.positive_int(body["org_id"], "org_id")
    note(request.scope, org_id=org_id)
    await require_org_role(services.db, principal, org_id, need_admin=True)
    now = now_ms()
    changes = key_changes(body, now)
    key, revoked = await services.db.update_api_key(
        org_id, key_id, changes, now, _actor(services, request, principal)
    )
    if key is None:
        raise ApiError(404, f"API key {key_id} not found in organization {org_id}")
    return ok({**api_key_data(key), "revoked_sessions": revoked})


async def delete_api_key(services: Services, request: Request, params: dict[str, str]) -> Response:
    principal = await authenticate_bearer(services, request)
    key_id = inputs.query_positive_int(params, "id")
    org_id = inputs.query_positive_int(params, "org_id")
    note(request.scope, org_id=org_id)
    await require_org_role(services.db, principal, org_id, need_admin=True)
    revoked = await services.db.delete_api_key(
        org_id, key_id, now_ms(), _actor(services, request, principal)
    )
    if revoked is None:
        raise ApiError(404, f"API key {key_id} not found in organization {org_id}")
    return ok({"id": key_id, "deleted": True, "revoked_sessions": revoked})


AUDIT_PAGE_DEFAULT = 50
AUDIT_PAGE_MAX = 200


async def audit_log(services: Services, request: Request, params: dict[str, str]) -> Response:
    """An org's audit trail, newest first, a page at a time (admins only)."""
    principal = await authenticate_bearer(services, request)
    org_id = inputs.query_positive_int(params, "org_id")
    note(request.scope, org_id=org_id)
    await require_org_role(services.db, principal, org_id, need_admin=True)
    limit = AUDIT_PAGE_DEFAULT
    if "limit" in params:
        limit = inputs.query_positive_int(params, "limit", AUDIT_PAGE_MAX)
    before_id = inputs.query_positive_int(params, "before_id") if "before_id" in params else None
    found = await services.db.list_audit(org_id, limit + 1, before_id)
    entries = [audit_entry(entry) for entry in found[:limit]]
    next_before = entries[-1]["id"] if len(found) > limit else None
    return ok({"entries": entries, "next_before_id": next_before})


# --- dispatch -----------------------------------------------------------------------------------

Handler = Callable[[Services, Request, dict[str, str]], Awaitable[Response]]


@dataclass(frozen=True)
class Operation:
    handler: Handler
    query: tuple[str, ...]
    credential: bytes | None  # the header carrying this operation's credential, if any


# action -> method -> operation; None is the key-management family with no action.
OPERATIONS: dict[str | None, dict[str, Operation]] = {
    "create-session": {"POST": Operation(create_session, ("action",), b"x-api-key")},
    "validate-session": {"GET": Operation(validate_session, ("action", "token"), None)},
    "consume-session": {"POST": Operation(consume_session, ("action",), None)},
    "revoke-session": {"POST": Operation(revoke_session, ("action",), b"x-api-key")},
    "list-sessions": {
        "GET": Operation(
            list_sessions,
            (
                "action",
                "external_ref",
                "status",
                "game_id",
                "stream_id",
                "created_after",
                "created_before",
                "limit",
                "cursor",
            ),
            b"x-api-key",
        )
    },
    "audit-log": {
        "GET": Operation(audit_log, ("action", "org_id", "limit", "before_id"), b"authorization")
    },
    None: {
        "GET": Operation(list_api_keys, ("org_id",), b"authorization"),
        "POST": Operation(create_api_key, (), b"authorization"),
        "PATCH": Operation(update_api_key, (), b"authorization"),
        "DELETE": Operation(delete_api_key, ("id", "org_id"), b"authorization"),
    },
}


def select_operation(method: str, items: list[tuple[str, str]]) -> Operation:
    """The operation for this method and the query's action: 400 for an unknown action, 405
    for a method."""
    actions = [value for name, value in items if name == "action"]
    if len(actions) > 1:
        raise ApiError(400, "query parameter 'action' is given more than once")
    action = actions[0] if actions else None
    if action not in OPERATIONS:
        raise ApiError(
            400,
            f"unknown action '{inputs._printable(action or '')}'; expected one of "
            + ", ".join(ACTIONS),
        )
    by_method = OPERATIONS[action]
    operation = by_method.get(method)
    if operation is None:
        what = f"action '{action}'" if action else "/api/org-api-keys without an action"
        raise ApiError(
            405,
            f"method {method} is not allowed for {what}; use " + ", ".join(by_method),
            headers={"Allow": ", ".join(by_method)},
        )
    return operation


async def handle_org_api_keys(request: Request) -> Response:
    """The one public route: pick the operation, check the query, run it."""
    services: Services = request.app.state.services
    items = inputs.request_query(request.scope)
    try:
        return await _run_operation(services, request, items)
    except ApiError as exc:
        if exc.kind is not None:
            action = inputs.first_value(items, "action")
            services.metrics.observe_error(operation_name(request.method, action), exc.kind)
        raise


async def _run_operation(
    services: Services, request: Request, items: list[tuple[str, str]]
) -> Response:
    operation = select_operation(request.method, items)
    params = inputs.query_params(items, operation.query)
    # Only requests that present a credential are counted and locked out: one without any
    # cannot guess a secret, and keeps getting the 401 that says what is missing.
    if operation.credential is None or inputs.header(request.scope, operation.credential) is None:
        return await operation.handler(services, request, params)
    caller = client_ip(request, services.trusted_proxies)
    # The lockout is confirmed once the credential passes (authenticate_*).
    request.scope[LOCKOUT] = services.auth_failures.check(caller, now_ms())
    try:
        return await operation.handler(services, request, params)
    except ApiError as exc:
        if exc.status == 401:
            locked_out = await services.auth_failures.record_failure(caller, now_ms())
            if locked_out is not None:
                raise locked_out from None
        raise
