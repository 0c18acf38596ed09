"""dailyplay.client against a real `dailyplay serve`, and its retry rules against real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import SigningKey, add_org, claims_for, free_port, serve, sql

from dailyplay import config
from dailyplay.client import (
    AsyncDailyPlayClient,
    BadRequest,
    DailyPlayClient,
    DailyPlayConnectionError,
    DailyPlayTimeout,
    Forbidden,
    IdempotencyKeyInUse,
    IdempotencyKeyReused,
    NotFound,
    RateLimited,
    ServerError,
    ServiceUnavailable,
    TokenConsumed,
    TokenExpired,
    TokenNotFound,
    TokenRevoked,
    Unauthorized,
)

pytestmark = pytest.mark.slow


class Live:
    def __init__(self, url: str, settings: config.Settings, org_id: int, signing: SigningKey):
        self.url, self.settings, self.org_id, self.signing = url, settings, org_id, signing

    def bearer(self, user: str = "admin") -> str:
        return self.signing.sign(claims_for(user, lifetime=600))

    def admin(self, **kwargs) -> DailyPlayClient:
        return DailyPlayClient(self.url, bearer_token=self.bearer, **kwargs)

    def new_key(self, **fields) -> str:
        with self.admin() as admin:
            key = admin.create_api_key(self.org_id, "client test", **fields).key
        assert key is not None
        return key


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, rsa_key: SigningKey) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("client")
    pem = tmp / "jwt.pem"
    pem.write_bytes(rsa_key.public_pem)
    settings = (
        config.Settings()
        .replace("database", path=str(tmp / "dailyplay.db"))
        .replace("auth", jwt_public_key=str(pem))
    )
    org = add_org(settings, members={"admin": "admin", "member": "member"})
    with serve(settings, tmp) as server:
        yield Live(server.url, settings, org, rsa_key)


def test_sessions_end_to_end_with_their_exceptions(live: Live) -> None:
    key = live.new_key(allowed_game_ids=[42])
    with DailyPlayClient(live.url, api_key=key) as dp:
        session = dp.create_session(42, external_ref="user-1", metadata={"campaign": "c"})
        assert session.game_id == 42 and session.external_ref == "user-1"
        assert session.expires_at > datetime.now(UTC) + timedelta(hours=23)
        assert session.rate_limit is not None and session.rate_limit.limit == 60
        checked = dp.validate_session(session.token)
        assert checked.valid and checked.status == "active"
        assert checked.metadata == {"campaign": "c"}
        assert checked.raise_if_invalid() is checked
        consumed = dp.consume_session(session.token, player_uuid="p-1")
        assert consumed.org_id == live.org_id and consumed.external_ref == "user-1"
        with pytest.raises(TokenConsumed) as again:
            dp.consume_session(session.token)
        assert again.value.status == 410 and again.value.request_id
        after = dp.validate_session(session.token)
        assert (after.valid, after.status) == (False, "consumed")
        with pytest.raises(TokenConsumed):
            after.raise_if_invalid()
        with pytest.raises(TokenNotFound):
            dp.consume_session(str(uuid.uuid4()))
        with pytest.raises(TokenNotFound):
            dp.validate_session(str(uuid.uuid4()))
        with pytest.raises(BadRequest, match="token"):
            dp.validate_session("not-a-token")
        with pytest.raises(Forbidden, match="game 7"):
            dp.create_session(7)
        with pytest.raises(BadRequest, match="game_id"):
            dp.create_session()

        expiring = dp.create_session(42).token
        sql(
            live.settings,
            "UPDATE sessions SET expires_at = 1 WHERE token = ?",
            (uuid.UUID(expiring).bytes,),
        )
        with pytest.raises(TokenExpired):
            dp.consume_session(expiring)
        with pytest.raises(TokenExpired):
            dp.validate_session(expiring).raise_if_invalid()


def test_key_management_and_audit_through_the_client(live: Live) -> None:
    with live.admin() as admin:
        created = admin.create_api_key(
            live.org_id,
            "CRM",
            description="from the client",
            rate_limit_per_minute=5,
            expires_at=datetime.now(UTC) + timedelta(days=30),
        )
        assert created.key and created.key.startswith("dpk_") and created.is_active
        assert created.key not in repr(created)
        with DailyPlayClient(live.url, api_key=created.key) as dp:
            outstanding = dp.create_session(1).token
        listed = {key.id: key for key in admin.list_api_keys(live.org_id)}
        assert listed[created.id].key is None
        assert listed[created.id].usage is not None
        assert listed[created.id].usage.sessions_created_24h == 1
        renamed = admin.update_api_key(live.org_id, created.id, name="CRM 2")
        assert renamed.name == "CRM 2" and renamed.revoked_sessions == 0
        revoked = admin.revoke_api_key(live.org_id, created.id)
        assert revoked.is_active is False and revoked.revoked_sessions == 1
        with DailyPlayClient(live.url, api_key=created.key) as dp:
            with pytest.raises(TokenRevoked):
                dp.consume_session(outstanding)
            with pytest.raises(Unauthorized, match="revoked"):
                dp.create_session(1)
        page = admin.audit_log(live.org_id, limit=2)
        assert [entry.action for entry in page.entries] == ["api_key.revoke", "api_key.update"]
        assert page.entries[0].changes == {"is_active": {"from": True, "to": False}}
        assert page.next_before_id == page.entries[-1].id
        older = admin.audit_log(live.org_id, limit=200, before_id=page.next_before_id)
        assert older.entries[0].action == "api_key.create" and older.next_before_id is None
        deleted = admin.delete_api_key(live.org_id, created.id)
        assert deleted.id == created.id
        with pytest.raises(NotFound) as gone:
            admin.delete_api_key(live.org_id, created.id)
        assert not isinstance(gone.value, TokenNotFound)
    with DailyPlayClient(live.url, bearer_token=live.bearer("member")) as member:
        assert member.list_api_keys(live.org_id)
        with pytest.raises(Forbidden, match="admin"):
            member.create_api_key(live.org_id, "nope")
    stranger = DailyPlayClient(live.url, bearer_token="not-a-jwt")
    with stranger, pytest.raises(Unauthorized, match="bearer"):
        stranger.list_api_keys(live.org_id)
    with DailyPlayClient(live.url) as nobody, pytest.raises(Unauthorized, match="bearer_token"):
        nobody.list_api_keys(live.org_id)


@pytest.mark.usefixtures("fresh_minute")
def test_rate_limited_says_when_to_come_back(live: Live) -> None:
    key = live.new_key(rate_limit_per_minute=1)
    with DailyPlayClient(live.url, api_key=key) as dp:
        dp.create_session(1)
        started = time.monotonic()
        with pytest.raises(RateLimited) as limited:
            dp.create_session(1)
    assert time.monotonic() - started < 1  # raised, not waited out
    assert limited.value.retry_after is not None and 1 <= limited.value.retry_after <= 60
    assert limited.value.rate_limit is not None and limited.value.rate_limit.remaining == 0
    wrong = DailyPlayClient(live.url, api_key="dpk_" + "0" * 40)
    with wrong, pytest.raises(Unauthorized, match="invalid API key"):
        wrong.create_session(1)


def test_revoking_and_listing_an_organizations_tokens(live: Live) -> None:
    key = live.new_key()
    with DailyPlayClient(live.url, api_key=key) as dp:
        played = dp.create_session(19, external_ref="order-5").token
        refunded = dp.create_session(19, external_ref="order-5").token
        dp.consume_session(played, player_uuid="p-9")
        revoked = dp.revoke_session(refunded, reason="refund")
        assert revoked.token == refunded and revoked.status == "revoked"
        assert revoked.revoked_at is not None and revoked.created_at < datetime.now(UTC)
        with pytest.raises(TokenRevoked):
            dp.consume_session(refunded)
        with pytest.raises(TokenConsumed):
            dp.revoke_session(played)
        with pytest.raises(TokenNotFound):
            dp.revoke_session(str(uuid.uuid4()))
        page = dp.list_sessions(external_ref="order-5", limit=1)
        assert [s.token for s in page.sessions] == [refunded] and page.next_cursor
        rest = dp.list_sessions(external_ref="order-5", limit=1, cursor=page.next_cursor)
        assert [(s.token, s.status, s.player_uuid) for s in rest.sessions] == [
            (played, "consumed", "p-9")
        ]
        assert rest.next_cursor is None
        since = datetime.now(UTC) - timedelta(hours=1)
        found = dp.list_sessions(created_after=since, status="consumed", game_id=19)
        assert [s.token for s in found.sessions] == [played]
        with pytest.raises(BadRequest, match="status"):
            dp.list_sessions(status="played")


def test_a_repeated_create_with_the_same_key_returns_the_same_token(live: Live) -> None:
    key = live.new_key()
    with DailyPlayClient(live.url, api_key=key) as dp:
        first = dp.create_session(8, external_ref="order-77", idempotency_key="order-77")
        again = dp.create_session(8, external_ref="order-77", idempotency_key="order-77")
        assert again.token == first.token and again.replayed and not first.replayed
        assert first.rate_limit is not None and again.rate_limit is None
        with pytest.raises(IdempotencyKeyReused, match="different request") as mismatch:
            dp.create_session(9, external_ref="order-77", idempotency_key="order-77")
        assert mismatch.value.status == 422
        others = [dp.create_session(8, external_ref="order-78").token for _ in range(3)]
        assert len(set(others)) == 3  # a key of its own for each call
        found = [s.token for s in dp.iter_sessions(external_ref="order-78", limit=2)]
        assert found == others[::-1]


def test_the_async_client_does_the_same(live: Live) -> None:
    key = live.new_key()

    async def scenario() -> None:
        async with AsyncDailyPlayClient(live.url, api_key=key) as dp:
            tokens = [
                s.token for s in await asyncio.gather(*(dp.create_session(5) for _ in range(5)))
            ]
            assert len(set(tokens)) == 5
            results = await asyncio.gather(
                *(dp.consume_session(tokens[0]) for _ in range(4)), return_exceptions=True
            )
            assert sum(not isinstance(r, Exception) for r in results) == 1
            assert sum(isinstance(r, TokenConsumed) for r in results) == 3
            assert (await dp.validate_session(tokens[1])).valid
            assert (await dp.revoke_session(tokens[1])).status == "revoked"
            listed = await dp.list_sessions(status="revoked", game_id=5)
            assert [s.token for s in listed.sessions] == [tokens[1]]
            walked = [s.token async for s in dp.iter_sessions(game_id=5, limit=2)]
            assert sorted(walked) == sorted(tokens)
            once = await dp.create_session(5, idempotency_key="async-once")
            assert (await dp.create_session(5, idempotency_key="async-once")).token == once.token
        async with AsyncDailyPlayClient(live.url, bearer_token=live.bearer) as admin:
            keys = await admin.list_api_keys(live.org_id)
            assert any(k.key_prefix == key[:8] for k in keys)
            with pytest.raises(NotFound):
                await admin.update_api_key(live.org_id, 999_999, name="x")

    asyncio.run(scenario())


# --- retries, against small real HTTP servers ---------------------------------------------------


class Scripted(http.server.ThreadingHTTPServer):
    """Answers each request with the next (status, headers, delay) of a script; counts them."""

    daemon_threads = True

    def __init__(self, script: list[tuple[int, dict[str, str], float]]):
        super().__init__(("127.0.0.1", 0), ScriptedHandler)
        self.script = script
        self.seen: list[str] = []
        self.request_ids: list[str] = []
        self.idempotency_keys: list[str | None] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class ScriptedHandler(http.server.BaseHTTPRequestHandler):
    server: Scripted

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        index = len(self.server.seen)
        self.server.seen.append(f"{self.command} {self.path}")
        self.server.request_ids.append(self.headers.get("x-request-id", ""))
        self.server.idempotency_keys.append(self.headers.get("idempotency-key"))
        status, headers, delay = self.server.script[min(index, len(self.server.script) - 1)]
        time.sleep(delay)
        if status == 200:
            data = {
                "valid": True,
                "status": "active",
                "game_id": 1,
                "stream_id": None,
                "expires_at": "2030-01-01T00:00:00.000Z",
                "external_ref": None,
                "metadata": None,
            }
            body = json.dumps({"success": True, "data": data}).encode()
        else:
            body = json.dumps({"success": False, "error": f"scripted {status}"}).encode()
        self.send_response(status)
        for name, value in {"content-type": "application/json", **headers}.items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def scripted(*script: tuple[int, dict[str, str], float]) -> Iterator[Scripted]:
    server = Scripted(list(script))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


TOKEN = str(uuid.uuid4())
BUSY = (503, {"retry-after": "0"}, 0.0)


def client_for(server: Scripted, **kwargs) -> DailyPlayClient:
    return DailyPlayClient(server.url, api_key="dpk_" + "1" * 40, backoff=0.01, **kwargs)


def attempts(
    script: tuple[int, dict[str, str], float],
    call: Callable[[DailyPlayClient], object],
    raises: type[Exception],
    **client: Any,
) -> tuple[int, Exception]:
    """How many requests a failing call made against a server answering `script` every time,
    and what it raised."""
    with scripted(script) as server, client_for(server, **client) as dp:
        with pytest.raises(raises) as failure:
            call(dp)
        return len(server.seen), failure.value


def validate(dp: DailyPlayClient) -> object:
    return dp.validate_session(TOKEN)


def consume(dp: DailyPlayClient) -> object:
    return dp.consume_session(TOKEN)


def create(dp: DailyPlayClient) -> object:
    return dp.create_session(1)


SLOW = (200, {}, 1.0)


def test_reads_are_retried_until_they_get_through() -> None:
    with scripted(BUSY, (502, {}, 0.0), (200, {}, 0.0)) as server, client_for(server) as dp:
        assert dp.validate_session(TOKEN).valid
    assert len(server.seen) == 3
    assert len(set(server.request_ids)) == 1  # one id for the call, across its attempts


def test_retries_stop_at_the_limit() -> None:
    seen, busy = attempts(BUSY, validate, ServiceUnavailable, retries=3)
    assert seen == 4
    assert isinstance(busy, ServiceUnavailable) and busy.retry_after == 0


def test_consume_is_never_retried() -> None:
    assert attempts(BUSY, consume, ServiceUnavailable)[0] == 1
    assert attempts(SLOW, consume, DailyPlayTimeout, timeout=0.2)[0] == 1


def create_key(dp: DailyPlayClient) -> object:
    return dp.create_api_key(1, "x")


def test_writes_are_retried_only_when_nothing_was_done() -> None:
    # 503 is answered before any work or after a rollback: a write may go again.
    assert attempts(BUSY, create_key, ServiceUnavailable, bearer_token="jwt")[0] == 3
    # A 502 from a proxy, or a timeout, may come after the write was done: not repeated.
    assert attempts((502, {}, 0.0), create_key, ServerError, bearer_token="jwt")[0] == 1
    assert attempts(SLOW, create_key, DailyPlayTimeout, timeout=0.2, bearer_token="jwt")[0] == 1


@pytest.mark.parametrize(
    "script, raises",
    [
        ((502, {}, 0.0), ServerError),
        ((500, {}, 0.0), ServerError),
        ((409, {"retry-after": "0"}, 0.0), IdempotencyKeyInUse),
        (SLOW, DailyPlayTimeout),
    ],
    ids=["502", "500", "409-in-flight", "timeout"],
)
def test_a_create_is_retried_with_the_same_idempotency_key(
    script: tuple[int, dict[str, str], float], raises: type[Exception]
) -> None:
    with (
        scripted(script) as server,
        client_for(server, timeout=0.2) as dp,
        pytest.raises(raises),
    ):
        dp.create_session(1)
    assert len(server.seen) == 3
    [key] = set(server.idempotency_keys)
    assert key is not None and uuid.UUID(key)  # generated: a new UUID per call
    with (
        scripted(script) as server,
        client_for(server, timeout=0.2) as dp,
        pytest.raises(raises),
    ):
        dp.create_session(1, idempotency_key="order-77")
    assert server.idempotency_keys == ["order-77"] * 3


def test_each_create_call_has_a_key_of_its_own() -> None:
    with scripted(BUSY) as server, client_for(server, retries=0) as dp:
        for _ in range(2):
            with pytest.raises(ServiceUnavailable):
                dp.create_session(1)
    first, second = server.idempotency_keys
    assert first and second and first != second


def test_a_read_that_times_out_is_tried_again_then_reported() -> None:
    started = time.monotonic()
    seen, late = attempts(SLOW, validate, DailyPlayTimeout, timeout=0.2)
    assert seen == 3 and time.monotonic() - started < 3
    assert isinstance(late, DailyPlayTimeout) and late.status is None and late.request_id


def test_a_long_retry_after_is_raised_not_slept() -> None:
    seen, busy = attempts((503, {"retry-after": "120"}, 0.0), validate, ServiceUnavailable)
    assert seen == 1 and isinstance(busy, ServiceUnavailable) and busy.retry_after == 120


def test_an_unreachable_server_is_a_connection_error(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    with DailyPlayClient(f"http://127.0.0.1:{port}", api_key="dpk_" + "1" * 40, backoff=0.01) as dp:
        with pytest.raises(DailyPlayConnectionError) as refused:
            dp.create_session(1)
        assert not isinstance(refused.value, DailyPlayTimeout)
        with pytest.raises(DailyPlayConnectionError):
            dp.consume_session(TOKEN)


def test_the_async_client_follows_the_same_rules() -> None:
    async def scenario(url: str) -> None:
        async with AsyncDailyPlayClient(url, backoff=0.01) as dp:
            with pytest.raises(ServiceUnavailable):
                await dp.consume_session(TOKEN)
            with pytest.raises(ServiceUnavailable):
                await dp.validate_session(TOKEN)

    with scripted(BUSY) as server:
        asyncio.run(scenario(server.url))
    assert len(server.seen) == 1 + 3
