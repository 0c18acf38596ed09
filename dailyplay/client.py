"""A typed Python client for the DailyPlay API, sync and async, on httpx.

    from dailyplay.client import DailyPlayClient, TokenConsumed

    with DailyPlayClient("https://play.example.com", api_key="dpk_...") as dp:
        session = dp.create_session(game_id=42, external_ref="user-12345")
        ...
        try:
            dp.consume_session(session.token, player_uuid="p-1")
        except TokenConsumed:
            ...

Errors arrive as exceptions of their meaning (TokenConsumed, TokenExpired, TokenRevoked,
TokenNotFound, RateLimited, Unauthorized, Forbidden, ...), all DailyPlayError. A request is
retried, with exponential backoff and jitter, only where that cannot do anything twice: reads on
connection failures, timeouts, 502/503/504; create-session on connection failures, timeouts,
any 5xx and 409 (a retry still in flight), always with the Idempotency-Key of its first attempt,
so that the server makes one token however many attempts reach it; other writes only when the
server cannot have acted on them (the connection was never made, or a 503, which the server
answers before acting or after rolling back). consume-session is never retried: call it again
yourself after checking with validate_session. A 429 is not retried; RateLimited says when to
try again.
"""

from __future__ import annotations

import asyncio
import enum
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar, cast

try:
    import httpx
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "dailyplay.client needs httpx: pip install 'dailyplay[client]' (or httpx)"
    ) from exc

from . import __version__

__all__ = [
    "ApiKey",
    "AsyncDailyPlayClient",
    "AuditEntry",
    "AuditPage",
    "BadRequest",
    "ConsumedSession",
    "DailyPlayClient",
    "DailyPlayConnectionError",
    "DailyPlayError",
    "DailyPlayTimeout",
    "DeletedApiKey",
    "Forbidden",
    "IdempotencyKeyInUse",
    "IdempotencyKeyReused",
    "NotFound",
    "RateLimit",
    "RateLimited",
    "ServerError",
    "ServiceUnavailable",
    "SessionPage",
    "SessionToken",
    "StoredSession",
    "TokenConsumed",
    "TokenExpired",
    "TokenGone",
    "TokenNotFound",
    "TokenRevoked",
    "Unauthorized",
    "Usage",
    "Validation",
]

API_PATH = "/api/org-api-keys"
USER_AGENT = f"dailyplay-client/{__version__}"
DEFAULT_TIMEOUT = 10.0
DEFAULT_RETRIES = 2
# Longest wait between attempts, whatever Retry-After says (a longer one is raised instead).
MAX_RETRY_DELAY = 10.0

T = TypeVar("T")


# --- errors ---------------------------------------------------------------------------------------


class DailyPlayError(Exception):
    """Any failure of a call: `status` (None when no answer came), the server's `message`, and
    the `request_id` to look for in the server's log."""

    def __init__(self, message: str, status: int | None = None, request_id: str | None = None):
        super().__init__(message if status is None else f"{status}: {message}")
        self.message = message
        self.status = status
        self.request_id = request_id


class DailyPlayConnectionError(DailyPlayError):
    """The server could not be reached, or the connection broke before an answer."""


class DailyPlayTimeout(DailyPlayConnectionError):
    """No answer within the client's timeout."""


class BadRequest(DailyPlayError):
    """400, 405, 408, 413, 415 or 431: the request itself is wrong; the message says how."""


class Unauthorized(DailyPlayError):
    """401: the API key or bearer token is missing, malformed, unknown, revoked or expired."""


class Forbidden(DailyPlayError):
    """403: authenticated, but not allowed (role, tier, or the key's game/stream allow-list)."""


class NotFound(DailyPlayError):
    """404: no such API key in that organization (or no such route)."""


class TokenNotFound(NotFound):
    """404 on a session operation: no such token."""


class TokenGone(DailyPlayError):
    """The token exists but can no longer be played."""


class TokenConsumed(TokenGone):
    """The token was already consumed."""


class TokenExpired(TokenGone):
    """The token's expires_at has passed."""


class TokenRevoked(TokenGone):
    """The token was revoked (its API key was revoked or deleted)."""


@dataclass(frozen=True)
class RateLimit:
    """X-RateLimit-* of an answer: the tightest of the key's windows."""

    limit: int
    remaining: int
    reset: datetime


class _RetryAfter(DailyPlayError):
    """An error whose answer said how long to wait before trying again (`retry_after`, in
    seconds; None when it did not say)."""

    def __init__(
        self,
        message: str,
        status: int | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(message, status, request_id)
        self.retry_after = retry_after


class RateLimited(_RetryAfter):
    """429: a limit is used up; `retry_after` is the number of seconds to wait."""

    def __init__(
        self,
        message: str,
        status: int | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
        rate_limit: RateLimit | None = None,
    ):
        super().__init__(message, status, request_id, retry_after)
        self.rate_limit = rate_limit


class IdempotencyKeyInUse(_RetryAfter):
    """409: an earlier attempt with this Idempotency-Key is still being processed (create_session
    retries this itself); `retry_after` is the number of seconds to wait."""


class IdempotencyKeyReused(BadRequest):
    """422: this Idempotency-Key was used with a different request; use a new key."""


class ServerError(DailyPlayError):
    """5xx: the server failed."""


class ServiceUnavailable(_RetryAfter, ServerError):
    """503: at capacity, database busy, or not ready; `retry_after` seconds if it said."""


_GONE = {"consumed": TokenConsumed, "revoked": TokenRevoked, "expired": TokenExpired}


def _gone(status: str) -> type[TokenGone]:
    return _GONE.get(status, TokenGone)


# --- results --------------------------------------------------------------------------------------


def _time(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


@dataclass(frozen=True)
class SessionToken:
    """A new one-time token (create_session); put `token` in the game URL."""

    token: str
    game_id: int | None
    stream_id: int | None
    expires_at: datetime
    external_ref: str | None
    rate_limit: RateLimit | None = None
    # The server's stored answer to an earlier attempt with the same Idempotency-Key (the
    # same token; rate_limit is then None: a replay is not counted).
    replayed: bool = False


@dataclass(frozen=True)
class Validation:
    """What validate_session found: `valid` (active and unexpired) and the token's details."""

    token: str
    valid: bool
    status: str  # active, consumed, expired or revoked
    game_id: int | None
    stream_id: int | None
    expires_at: datetime
    external_ref: str | None
    metadata: Any

    def raise_if_invalid(self) -> Validation:
        """Raise TokenConsumed, TokenExpired or TokenRevoked unless the token is playable."""
        if not self.valid:
            raise _gone(self.status)(f"session token is {self.status}")
        return self


@dataclass(frozen=True)
class ConsumedSession:
    """A token just consumed: it will never be accepted again."""

    session_id: int
    org_id: int
    game_id: int | None
    stream_id: int | None
    external_ref: str | None
    metadata: Any


@dataclass(frozen=True)
class Usage:
    sessions_created_24h: int
    sessions_consumed_24h: int
    sessions_created_30d: int
    sessions_consumed_30d: int


@dataclass(frozen=True)
class ApiKey:
    """An API key as the API shows it; `key` (the secret) only from create_api_key."""

    id: int
    org_id: int
    name: str
    description: str | None
    key_prefix: str
    is_active: bool
    allowed_game_ids: list[int] | None
    allowed_stream_ids: list[int] | None
    rate_limit_per_minute: int
    rate_limit_per_day: int
    expires_at: datetime | None
    created_at: datetime
    updated_at: datetime
    last_used_at: datetime | None
    usage: Usage | None = None  # in listings
    key: str | None = field(default=None, repr=False)  # from create_api_key only
    revoked_sessions: int | None = None  # from update_api_key

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> ApiKey:
        usage = data.get("usage")
        return cls(
            id=data["id"],
            org_id=data["org_id"],
            name=data["name"],
            description=data.get("description"),
            key_prefix=data["key_prefix"],
            is_active=data["is_active"],
            allowed_game_ids=data.get("allowed_game_ids"),
            allowed_stream_ids=data.get("allowed_stream_ids"),
            rate_limit_per_minute=data["rate_limit_per_minute"],
            rate_limit_per_day=data["rate_limit_per_day"],
            expires_at=_time(data.get("expires_at")),
            created_at=datetime.fromisoformat(data["created_at"]),
            updated_at=datetime.fromisoformat(data["updated_at"]),
            last_used_at=_time(data.get("last_used_at")),
            usage=None if usage is None else Usage(**usage),
            key=data.get("key"),
            revoked_sessions=data.get("revoked_sessions"),
        )


@dataclass(frozen=True)
class DeletedApiKey:
    id: int
    revoked_sessions: int


@dataclass(frozen=True)
class StoredSession:
    """A token of the key's organization as revoke_session and list_sessions show it."""

    token: str
    status: str  # active, consumed, expired or revoked
    game_id: int | None
    stream_id: int | None
    external_ref: str | None
    metadata: Any
    created_at: datetime
    expires_at: datetime
    consumed_at: datetime | None
    revoked_at: datetime | None
    player_uuid: str | None
    api_key_id: int | None

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> StoredSession:
        times = ("created_at", "expires_at", "consumed_at", "revoked_at")
        return cls(**{**data, **{name: _time(data[name]) for name in times}})


@dataclass(frozen=True)
class SessionPage:
    """Newest first; pass `next_cursor` as cursor, with the same filters, for the next page
    (None: no more)."""

    sessions: list[StoredSession]
    next_cursor: str | None


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: datetime
    org_id: int
    actor: str
    action: str
    api_key_id: int | None
    client_ip: str | None
    changes: dict[str, Any] | None


@dataclass(frozen=True)
class AuditPage:
    """Newest first; pass `next_before_id` as before_id for the next page (None: no more)."""

    entries: list[AuditEntry]
    next_before_id: int | None


# --- one call, described once for both clients ----------------------------------------------------


class Retry(enum.Enum):
    READ = "read"  # safe to repeat: on connection failures, timeouts, 502/503/504
    IDEMPOTENT = "idempotent"  # sent with an Idempotency-Key: as READ, and on any 5xx and 409
    UNSENT = "unsent"  # a write: only when the server cannot have acted on it
    NEVER = "never"  # consume-session


@dataclass(frozen=True)
class _Call(Generic[T]):
    method: str
    params: dict[str, Any]
    body: dict[str, Any] | None
    credential: str | None  # "key", "bearer" or None
    retry: Retry
    parse: Callable[[Any, httpx.Response], T]
    token_operation: bool = False  # 404 -> TokenNotFound, 410 -> the token's state
    headers: Mapping[str, str] = field(default_factory=dict)  # sent on every attempt


def _without_none(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _rate_limit(response: httpx.Response) -> RateLimit | None:
    headers = response.headers
    try:
        return RateLimit(
            int(headers["x-ratelimit-limit"]),
            int(headers["x-ratelimit-remaining"]),
            datetime.fromtimestamp(int(headers["x-ratelimit-reset"]), tz=UTC),
        )
    except (KeyError, ValueError):
        return None


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers["retry-after"]))
    except (KeyError, ValueError):
        return None


def _error(response: httpx.Response, call: _Call[Any], request_id: str) -> DailyPlayError:
    """The exception for a non-2xx answer."""
    status = response.status_code
    try:
        message = str(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        message = response.text[:200] or response.reason_phrase
    request_id = response.headers.get("x-request-id", request_id)
    if status == 401:
        return Unauthorized(message, status, request_id)
    if status == 403:
        return Forbidden(message, status, request_id)
    if status == 404:
        return (TokenNotFound if call.token_operation else NotFound)(message, status, request_id)
    if status == 410 and call.token_operation:
        lowered = message.lower()
        state = next((s for s in ("consumed", "revoked", "expired") if s in lowered), "")
        return _gone(state)(message, status, request_id)
    if status == 409 and call.retry is Retry.IDEMPOTENT:
        return IdempotencyKeyInUse(message, status, request_id, _retry_after(response))
    if status == 422 and call.retry is Retry.IDEMPOTENT:
        return IdempotencyKeyReused(message, status, request_id)
    if status == 429:
        return RateLimited(
            message, status, request_id, _retry_after(response), _rate_limit(response)
        )
    if status == 503:
        return ServiceUnavailable(message, status, request_id, _retry_after(response))
    if status >= 500:
        return ServerError(message, status, request_id)
    return BadRequest(message, status, request_id)


def _data(response: httpx.Response, call: _Call[T], request_id: str) -> T:
    try:
        body = response.json()
        data = body["data"]
    except (ValueError, KeyError, TypeError):
        raise ServerError(
            "the answer is not the API's JSON envelope", response.status_code, request_id
        ) from None
    return call.parse(data, response)


class _Calls:
    """Every operation as a _Call; the clients only send them."""

    @staticmethod
    def create_session(
        game_id: int | None,
        stream_id: int | None,
        external_ref: str | None,
        metadata: Mapping[str, Any] | None,
        expires_in_minutes: int | None,
        idempotency_key: str | None,
    ) -> _Call[SessionToken]:
        body = _without_none(
            {
                "game_id": game_id,
                "stream_id": stream_id,
                "external_ref": external_ref,
                "metadata": None if metadata is None else dict(metadata),
                "expires_in_minutes": expires_in_minutes,
            }
        )

        def parse(data: Any, response: httpx.Response) -> SessionToken:
            return SessionToken(
                token=data["token"],
                game_id=data.get("game_id"),
                stream_id=data.get("stream_id"),
                expires_at=datetime.fromisoformat(data["expires_at"]),
                external_ref=data.get("external_ref"),
                rate_limit=_rate_limit(response),
                replayed=response.headers.get("idempotent-replayed") == "true",
            )

        key = str(uuid.uuid4()) if idempotency_key is None else idempotency_key
        return _Call(
            "POST",
            {"action": "create-session"},
            body,
            "key",
            Retry.IDEMPOTENT,
            parse,
            True,
            {"Idempotency-Key": key},
        )

    @staticmethod
    def validate_session(token: str) -> _Call[Validation]:
        def parse(data: Any, response: httpx.Response) -> Validation:
            return Validation(
                token=token,
                valid=data["valid"],
                status=data["status"],
                game_id=data.get("game_id"),
                stream_id=data.get("stream_id"),
                expires_at=datetime.fromisoformat(data["expires_at"]),
                external_ref=data.get("external_ref"),
                metadata=data.get("metadata"),
            )

        params = {"action": "validate-session", "token": token}
        return _Call("GET", params, None, None, Retry.READ, parse, True)

    @staticmethod
    def consume_session(token: str, player_uuid: str | None) -> _Call[ConsumedSession]:
        def parse(data: Any, response: httpx.Response) -> ConsumedSession:
            return ConsumedSession(
                session_id=data["session_id"],
                org_id=data["org_id"],
                game_id=data.get("game_id"),
                stream_id=data.get("stream_id"),
                external_ref=data.get("external_ref"),
                metadata=data.get("metadata"),
            )

        body = _without_none({"token": token, "player_uuid": player_uuid})
        return _Call("POST", {"action": "consume-session"}, body, None, Retry.NEVER, parse, True)

    @staticmethod
    def revoke_session(token: str, reason: str | None) -> _Call[StoredSession]:
        def parse(data: Any, response: httpx.Response) -> StoredSession:
            return StoredSession.from_data(data)

        body = _without_none({"token": token, "reason": reason})
        # Revoking twice answers as once: safe to repeat.
        return _Call("POST", {"action": "revoke-session"}, body, "key", Retry.READ, parse, True)

    @staticmethod
    def list_sessions(filters: Mapping[str, Any]) -> _Call[SessionPage]:
        def parse(data: Any, response: httpx.Response) -> SessionPage:
            found = [StoredSession.from_data(item) for item in data["sessions"]]
            return SessionPage(found, data["next_cursor"])

        params = {"action": "list-sessions"}
        for name, value in _without_none(filters).items():
            params[name] = value.isoformat() if isinstance(value, datetime) else value
        return _Call("GET", params, None, "key", Retry.READ, parse)

    @staticmethod
    def list_api_keys(org_id: int) -> _Call[list[ApiKey]]:
        def parse(data: Any, response: httpx.Response) -> list[ApiKey]:
            return [ApiKey.from_data(item) for item in data]

        return _Call("GET", {"org_id": org_id}, None, "bearer", Retry.READ, parse)

    @staticmethod
    def create_api_key(org_id: int, name: str, fields: Mapping[str, Any]) -> _Call[ApiKey]:
        body = {"org_id": org_id, "name": name, **_without_none(fields)}
        if isinstance(body.get("expires_at"), datetime):
            body["expires_at"] = body["expires_at"].isoformat()
        return _Call(
            "POST", {}, body, "bearer", Retry.UNSENT, lambda data, _: ApiKey.from_data(data)
        )

    @staticmethod
    def update_api_key(org_id: int, key_id: int, changes: Mapping[str, Any]) -> _Call[ApiKey]:
        body = {"id": key_id, "org_id": org_id, **changes}
        if isinstance(body.get("expires_at"), datetime):
            body["expires_at"] = body["expires_at"].isoformat()
        return _Call(
            "PATCH", {}, body, "bearer", Retry.UNSENT, lambda data, _: ApiKey.from_data(data)
        )

    @staticmethod
    def delete_api_key(org_id: int, key_id: int) -> _Call[DeletedApiKey]:
        def parse(data: Any, response: httpx.Response) -> DeletedApiKey:
            return DeletedApiKey(id=data["id"], revoked_sessions=data["revoked_sessions"])

        params = {"id": key_id, "org_id": org_id}
        return _Call("DELETE", params, None, "bearer", Retry.UNSENT, parse)

    @staticmethod
    def audit_log(org_id: int, limit: int | None, before_id: int | None) -> _Call[AuditPage]:
        def parse(data: Any, response: httpx.Response) -> AuditPage:
            entries = [
                AuditEntry(**{**entry, "at": datetime.fromisoformat(entry["at"])})
                for entry in data["entries"]
            ]
            return AuditPage(entries, data["next_before_id"])

        params = _without_none(
            {"action": "audit-log", "org_id": org_id, "limit": limit, "before_id": before_id}
        )
        return _Call("GET", params, None, "bearer", Retry.READ, parse)


# --- retries --------------------------------------------------------------------------------------

RETRIED_STATUSES = {502, 503, 504}
IDEMPOTENT_RETRIED_STATUSES = {409, *range(500, 600)}


def _delay_after_status(
    call: _Call[Any], response: httpx.Response, attempt: int, retries: int, backoff: float
) -> float | None:
    """Seconds to wait before repeating a call that got this answer; None: do not repeat."""
    if attempt >= retries or call.retry is Retry.NEVER:
        return None
    status = response.status_code
    # 503 comes before any work (capacity) or after a rollback (database busy): nothing done.
    # With an Idempotency-Key the server answers a repeat with what the first attempt did, if
    # it did anything, and 409 while that attempt is still running.
    repeatable = RETRIED_STATUSES
    if call.retry is Retry.IDEMPOTENT:
        repeatable = IDEMPOTENT_RETRIED_STATUSES
    if status == 503 or (status in repeatable and call.retry is not Retry.UNSENT):
        delay = _retry_after(response)
        delay = _backoff(attempt, backoff) if delay is None else delay
        return delay if delay <= MAX_RETRY_DELAY else None
    return None


def _delay_after_failure(
    call: _Call[Any], exc: httpx.TransportError, attempt: int, retries: int, backoff: float
) -> float | None:
    if attempt >= retries or call.retry is Retry.NEVER:
        return None
    # Not connected: the request never left, so even a write is safe to send again.
    unsent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
    if unsent or call.retry in (Retry.READ, Retry.IDEMPOTENT):
        return _backoff(attempt, backoff)
    return None


def _backoff(attempt: int, base: float) -> float:
    """Exponential backoff with full jitter: 0..base*2^attempt seconds."""
    return random.uniform(0, base * (2**attempt))  # noqa: S311 - jitter, not a secret


def _transport_error(exc: httpx.TransportError, request_id: str) -> DailyPlayError:
    if isinstance(exc, httpx.TimeoutException):
        return DailyPlayTimeout(f"no answer in time ({type(exc).__name__})", None, request_id)
    return DailyPlayConnectionError(f"{type(exc).__name__}: {exc}", None, request_id)


# --- the clients ----------------------------------------------------------------------------------

Bearer = str | Callable[[], str] | None


class _Base:
    """`api_key` for sessions, `bearer_token` (a Clerk session JWT, or a function returning a
    fresh one) for key management."""

    _http_class: type[httpx.Client] | type[httpx.AsyncClient]

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        bearer_token: Bearer = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        backoff: float = 0.2,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
    ):
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.bearer_token = bearer_token
        self.retries = retries
        self.backoff = backoff
        make_http: Any = self._http_class  # transport's type depends on which class it is
        self._http: Any = make_http(
            base_url=self.base_url,
            timeout=timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout),
            transport=transport,
            headers={"user-agent": USER_AGENT},
        )

    def _headers(self, call: _Call[Any], request_id: str) -> dict[str, str]:
        headers = {"x-request-id": request_id, **call.headers}
        if call.credential == "key":
            if not self.api_key:
                raise Unauthorized("this client has no api_key; create-session needs one")
            headers["x-api-key"] = self.api_key
        elif call.credential == "bearer":
            token = self.bearer_token() if callable(self.bearer_token) else self.bearer_token
            if not token:
                raise Unauthorized("this client has no bearer_token; key management needs one")
            headers["authorization"] = f"Bearer {token}"
        return headers

    def _settle(
        self,
        call: _Call[T],
        outcome: httpx.Response | httpx.TransportError,
        attempt: int,
        request_id: str,
    ) -> tuple[bool, Any]:
        """After one attempt: (True, result) when done, (False, seconds) to wait and send again;
        raises the call's exception when it should not be repeated."""
        if isinstance(outcome, httpx.TransportError):
            delay = _delay_after_failure(call, outcome, attempt, self.retries, self.backoff)
            if delay is None:
                raise _transport_error(outcome, request_id) from outcome
            return False, delay
        if outcome.is_success:
            return True, _data(outcome, call, request_id)
        delay = _delay_after_status(call, outcome, attempt, self.retries, self.backoff)
        if delay is None:
            raise _error(outcome, call, request_id)
        return False, delay

    def _request(self, call: _Call[Any], request_id: str) -> dict[str, Any]:
        return {
            "method": call.method,
            "url": API_PATH,
            "params": call.params,
            "json": call.body,
            "headers": self._headers(call, request_id),
        }


def _new_request_id() -> str:
    return os.urandom(16).hex()


class DailyPlayClient(_Base):
    """Blocking client (see _Base for its arguments); use as a context manager or call close()."""

    _http_class = httpx.Client

    def __enter__(self) -> DailyPlayClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: _Call[T]) -> T:
        request_id = _new_request_id()
        attempt = 0
        while True:
            try:
                outcome: httpx.Response | httpx.TransportError = self._http.request(
                    **self._request(call, request_id)
                )
            except httpx.TransportError as exc:
                outcome = exc
            done, value = self._settle(call, outcome, attempt, request_id)
            if done:
                return cast(T, value)
            attempt += 1
            time.sleep(value)

    def create_session(
        self,
        game_id: int | None = None,
        stream_id: int | None = None,
        *,
        external_ref: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        expires_in_minutes: int | None = None,
        idempotency_key: str | None = None,
    ) -> SessionToken:
        """A new one-time token for a game and/or stream (needs api_key). Sent with an
        Idempotency-Key (a new UUID unless given: pass your own, such as an order id, to make
        a create you repeat later, from another process, return the same token); attempts
        after a lost answer reuse it, so at most one token is made."""
        return self._send(
            _Calls.create_session(
                game_id, stream_id, external_ref, metadata, expires_in_minutes, idempotency_key
            )
        )

    def validate_session(self, token: str) -> Validation:
        """The token's state; `.raise_if_invalid()` turns a spent token into its exception."""
        return self._send(_Calls.validate_session(token))

    def consume_session(self, token: str, player_uuid: str | None = None) -> ConsumedSession:
        """Use the token up (once only; never retried by this client)."""
        return self._send(_Calls.consume_session(token, player_uuid))

    def revoke_session(self, token: str, reason: str | None = None) -> StoredSession:
        """Take an unplayed token of the key's organization back (TokenConsumed or
        TokenExpired when it is too late; TokenNotFound for another organization's)."""
        return self._send(_Calls.revoke_session(token, reason))

    def list_sessions(self, **filters: Any) -> SessionPage:
        """filters: external_ref, status, game_id, stream_id, created_after, created_before
        (datetime or RFC 3339 text), limit, cursor (a page's next_cursor)."""
        return self._send(_Calls.list_sessions(filters))

    def iter_sessions(self, **filters: Any) -> Iterator[StoredSession]:
        """Every token list_sessions' filters find, newest first, fetched a page at a time
        (`limit` sets the page size)."""
        cursor = filters.pop("cursor", None)
        while True:
            page = self.list_sessions(**filters, cursor=cursor)
            yield from page.sessions
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def list_api_keys(self, org_id: int) -> list[ApiKey]:
        return self._send(_Calls.list_api_keys(org_id))

    def create_api_key(self, org_id: int, name: str, **fields: Any) -> ApiKey:
        """fields: description, allowed_game_ids, allowed_stream_ids, rate_limit_per_minute,
        rate_limit_per_day, expires_at (datetime or ISO text). The result's `key` is the secret."""
        return self._send(_Calls.create_api_key(org_id, name, fields))

    def update_api_key(self, org_id: int, key_id: int, **changes: Any) -> ApiKey:
        """changes: name, description, is_active, allowed_*_ids, rate_limit_*, expires_at."""
        return self._send(_Calls.update_api_key(org_id, key_id, changes))

    def revoke_api_key(self, org_id: int, key_id: int) -> ApiKey:
        """Deactivate the key; its outstanding tokens are revoked (see revoked_sessions)."""
        return self.update_api_key(org_id, key_id, is_active=False)

    def delete_api_key(self, org_id: int, key_id: int) -> DeletedApiKey:
        return self._send(_Calls.delete_api_key(org_id, key_id))

    def audit_log(
        self, org_id: int, *, limit: int | None = None, before_id: int | None = None
    ) -> AuditPage:
        return self._send(_Calls.audit_log(org_id, limit, before_id))


class AsyncDailyPlayClient(_Base):
    """The same client for asyncio: every method is a coroutine."""

    _http_class = httpx.AsyncClient

    async def __aenter__(self) -> AsyncDailyPlayClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: _Call[T]) -> T:
        request_id = _new_request_id()
        attempt = 0
        while True:
            try:
                outcome: httpx.Response | httpx.TransportError = await self._http.request(
                    **self._request(call, request_id)
                )
            except httpx.TransportError as exc:
                outcome = exc
            done, value = self._settle(call, outcome, attempt, request_id)
            if done:
                return cast(T, value)
            attempt += 1
            await asyncio.sleep(value)

    async def create_session(
        self,
        game_id: int | None = None,
        stream_id: int | None = None,
        *,
        external_ref: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        expires_in_minutes: int | None = None,
        idempotency_key: str | None = None,
    ) -> SessionToken:
        return await self._send(
            _Calls.create_session(
                game_id, stream_id, external_ref, metadata, expires_in_minutes, idempotency_key
            )
        )

    async def validate_session(self, token: str) -> Validation:
        return await self._send(_Calls.validate_session(token))

    async def consume_session(self, token: str, player_uuid: str | None = None) -> ConsumedSession:
        return await self._send(_Calls.consume_session(token, player_uuid))

    async def revoke_session(self, token: str, reason: str | None = None) -> StoredSession:
        return await self._send(_Calls.revoke_session(token, reason))

    async def list_sessions(self, **filters: Any) -> SessionPage:
        return await self._send(_Calls.list_sessions(filters))

    async def iter_sessions(self, **filters: Any) -> AsyncIterator[StoredSession]:
        cursor = filters.pop("cursor", None)
        while True:
            page = await self.list_sessions(**filters, cursor=cursor)
            for session in page.sessions:
                yield session
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def list_api_keys(self, org_id: int) -> list[ApiKey]:
        return await self._send(_Calls.list_api_keys(org_id))

    async def create_api_key(self, org_id: int, name: str, **fields: Any) -> ApiKey:
        return await self._send(_Calls.create_api_key(org_id, name, fields))

    async def update_api_key(self, org_id: int, key_id: int, **changes: Any) -> ApiKey:
        return await self._send(_Calls.update_api_key(org_id, key_id, changes))

    async def revoke_api_key(self, org_id: int, key_id: int) -> ApiKey:
        return await self.update_api_key(org_id, key_id, is_active=False)

    async def delete_api_key(self, org_id: int, key_id: int) -> DeletedApiKey:
        return await self._send(_Calls.delete_api_key(org_id, key_id))

    async def audit_log(
        self, org_id: int, *, limit: int | None = None, before_id: int | None = None
    ) -> AuditPage:
        return await self._send(_Calls.audit_log(org_id, limit, before_id))
