"""Bearer JWTs checked against a remote JWKS: caching, rotation, and endpoints that misbehave.

The endpoint is a real local HTTP server that answers well, slowly, hugely, wrongly or never,
as each test asks. The rule under test: a fetch never lasts past auth.jwks_timeout_seconds, a
request that needs the new set gets 503 + Retry-After when the fetch fails, and a request whose
key is already cached is answered at once, whatever a fetch in flight is doing.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from conftest import (
    API,
    SigningKey,
    World,
    add_org,
    assert_error,
    claims_for,
    running_app,
    serve,
)

import dailyplay.jwks

HUGE_BYTES = 50 * 1024 * 1024
TIMEOUT = 2  # auth.jwks_timeout_seconds in these tests


class JwksServer:
    """A local JWKS endpoint whose answer each test controls, on a raw socket so that it can
    misbehave at any point of an HTTP answer.

    mode: "normal" (status and body, after `delay`), "trickle" (headers, then the body a byte a
    second for 20 s), "no_headers" (reads the request, never answers), "no_answer" (accepts the
    connection, never reads), "huge" (a 50 MB body without a length), "huge_declared" (a 50 MB
    body with its Content-Length).
    """

    def __init__(self) -> None:
        self.body: bytes = b'{"keys": []}'
        self.status = 200
        self.delay = 0.0
        self.mode = "normal"
        self.requests = 0
        self.bytes_sent = 0
        self.fetching = threading.Event()  # set when a connection comes in
        self._closing = threading.Event()
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                outer.requests += 1
                outer.fetching.set()
                # OSError: the client gave up, which is what the size and time bounds are for
                with contextlib.suppress(OSError):
                    outer._answer(self.request)

        self.tcp = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.tcp.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.tcp.server_address[1]}/.well-known/jwks.json"
        self.thread = threading.Thread(target=self.tcp.serve_forever, daemon=True)
        self.thread.start()

    def publish(self, *keys: SigningKey) -> None:
        entries = []
        for key in keys:
            jwk = json.loads(
                jwt.algorithms.get_default_algorithms()[key.algorithm].to_jwk(
                    key.private.public_key()
                )
            )
            entries.append({**jwk, "kid": key.kid, "use": "sig", "alg": key.algorithm})
        self.body = json.dumps({"keys": entries}).encode()

    def _send(self, sock: socket.socket, data: bytes) -> None:
        sock.sendall(data)
        self.bytes_sent += len(data)

    def _answer(self, sock: socket.socket) -> None:
        mode = self.mode
        if mode == "no_answer":
            self._closing.wait(60)
            return
        sock.settimeout(10)
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = sock.recv(4096)
            if not chunk:
                return
            request += chunk
        if mode == "no_headers" or self._closing.wait(self.delay):
            self._closing.wait(60)
            return
        head = (
            f"HTTP/1.1 {self.status} X\r\ncontent-type: application/json\r\nconnection: close\r\n"
        )
        if mode in ("huge", "huge_declared"):
            length = f"content-length: {HUGE_BYTES}\r\n" if mode == "huge_declared" else ""
            self._send(sock, f"{head}{length}\r\n".encode())
            filler = b" " * 65536
            while self.bytes_sent < HUGE_BYTES and not self._closing.is_set():
                self._send(sock, filler)
            return
        self._send(sock, f"{head}content-length: {len(self.body)}\r\n\r\n".encode())
        if mode == "trickle":  # 20 bytes in 20 s, then the connection closes mid-body
            for i in range(20):
                self._send(sock, self.body[i : i + 1])
                if self._closing.wait(1):
                    return
            return
        self._send(sock, self.body)

    def close(self) -> None:
        self._closing.set()
        self.tcp.shutdown()
        self.tcp.server_close()


@pytest.fixture
def jwks() -> Iterator[JwksServer]:
    server = JwksServer()
    yield server
    server.close()


def jwks_settings(make_settings, jwks: JwksServer, **auth: Any) -> Any:
    return make_settings(
        auth={"jwt_public_key": "", "jwks_url": jwks.url, "jwks_timeout_seconds": TIMEOUT, **auth}
    )


@pytest.fixture
def jwks_world(make_settings, jwks: JwksServer, rsa_key: SigningKey) -> Iterator[World]:
    settings = jwks_settings(make_settings, jwks)
    with running_app(settings) as client:
        yield World(client, settings, add_org(settings, members={"u": "admin"}), "u", "u", rsa_key)


@pytest.fixture
def refetch_at_once(monkeypatch) -> None:
    """Let an unknown kid refetch at once instead of once per MIN_REFRESH_SECONDS."""
    monkeypatch.setattr(dailyplay.jwks, "MIN_REFRESH_SECONDS", 0.0)


def list_keys(world: World, token: str) -> httpx.Response:
    return world.client.get(
        f"{API}?org_id={world.org_id}", headers={"authorization": f"Bearer {token}"}
    )


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# --- a well-behaved endpoint --------------------------------------------------------------------


def test_jwks_verifies_and_caches(
    jwks_world: World, jwks: JwksServer, rsa_key: SigningKey, ec_key: SigningKey
) -> None:
    jwks.publish(rsa_key, ec_key)
    for signer in (rsa_key, ec_key, rsa_key):
        assert list_keys(jwks_world, signer.sign(claims_for("u"))).status_code == 200
    assert jwks.requests == 1


def test_jwks_key_rotation_is_picked_up_without_restart(
    jwks_world: World, jwks: JwksServer, rsa_key: SigningKey, other_rsa_key: SigningKey, monkeypatch
) -> None:
    jwks.publish(rsa_key)
    assert list_keys(jwks_world, rsa_key.sign(claims_for("u"))).status_code == 200
    jwks.publish(rsa_key, other_rsa_key)
    # An unknown kid refetches at most once per MIN_REFRESH_SECONDS...
    assert_error(
        list_keys(jwks_world, other_rsa_key.sign(claims_for("u"))), 401, "unknown signing key"
    )
    assert jwks.requests == 1
    # ...and once that interval has passed, the rotated key is fetched and accepted.
    monkeypatch.setattr(dailyplay.jwks, "MIN_REFRESH_SECONDS", 0.0)
    assert list_keys(jwks_world, other_rsa_key.sign(claims_for("u"))).status_code == 200
    assert jwks.requests == 2


def test_forged_kids_do_not_amplify_jwks_requests(
    jwks_world: World, jwks: JwksServer, rsa_key: SigningKey
) -> None:
    jwks.publish(rsa_key)
    assert list_keys(jwks_world, rsa_key.sign(claims_for("u"))).status_code == 200
    for i in range(20):
        token = rsa_key.sign(claims_for("u"), headers={"kid": f"made-up-{i}"})
        assert_error(list_keys(jwks_world, token), 401, "unknown signing key")
    assert jwks.requests <= 2


def test_hs256_jwk_is_never_used(jwks_world: World, jwks: JwksServer) -> None:
    import hashlib
    import hmac

    secret = b"shared-secret"
    jwks.body = json.dumps(
        {"keys": [{"kty": "oct", "k": b64(secret), "kid": "h", "alg": "HS256"}]}
    ).encode()
    signing_input = (
        f"{b64(json.dumps({'alg': 'HS256', 'kid': 'h'}).encode())}."
        f"{b64(json.dumps(claims_for('u')).encode())}"
    )
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    assert_error(list_keys(jwks_world, f"{signing_input}.{b64(signature)}"), 401)


def test_waiters_for_a_new_key_share_one_fetch(
    jwks_world: World,
    jwks: JwksServer,
    rsa_key: SigningKey,
    other_rsa_key: SigningKey,
    refetch_at_once: None,
) -> None:
    jwks.publish(rsa_key)
    assert list_keys(jwks_world, rsa_key.sign(claims_for("u"))).status_code == 200
    jwks.publish(rsa_key, other_rsa_key)
    jwks.delay = 1.0
    token = other_rsa_key.sign(claims_for("u"))
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: list_keys(jwks_world, token), range(6)))
    assert [a.status_code for a in answers] == [200] * 6
    assert jwks.requests == 2  # the first fetch, and one more shared by all six


def test_an_old_set_is_refreshed_while_its_keys_keep_answering(
    make_settings,
    jwks: JwksServer,
    rsa_key: SigningKey,
    other_rsa_key: SigningKey,
    refetch_at_once: None,
) -> None:
    """Past auth.jwks_cache_seconds, a known key is still answered at once, one refresh runs
    in the background, and what it brings (here: the old key withdrawn) then applies."""
    jwks.publish(rsa_key)
    settings = jwks_settings(make_settings, jwks, jwks_cache_seconds=1)
    with running_app(settings) as client:
        org = add_org(settings, members={"u": "admin"})
        world = World(client, settings, org, "u", "u", rsa_key)
        old, new = rsa_key.sign(claims_for("u")), other_rsa_key.sign(claims_for("u"))
        assert list_keys(world, old).status_code == 200
        time.sleep(1.1)
        jwks.publish(other_rsa_key)
        jwks.delay = 1.5
        jwks.fetching.clear()
        took = []
        for _ in range(3):
            started = time.monotonic()
            assert list_keys(world, old).status_code == 200
            took.append(time.monotonic() - started)
        assert max(took) < 0.5, took
        assert jwks.fetching.wait(1)
        assert jwks.requests == 2  # one refresh, however many requests saw the old set
        # The new kid waits for that refresh rather than starting another.
        assert list_keys(world, new).status_code == 200
        assert jwks.requests == 2
        assert_error(list_keys(world, old), 401, "unknown signing key")


# --- endpoints that misbehave -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "status", "fragment", "at_least", "at_most"),
    [
        # the whole fetch is bounded, not each read: a byte a second never completes it
        ("trickle", 503, f"no complete answer within {TIMEOUT} s", TIMEOUT - 0.2, TIMEOUT + 1),
        ("no_headers", 503, "no complete answer", TIMEOUT - 0.2, TIMEOUT + 1),
        ("no_answer", 503, "no complete answer", TIMEOUT - 0.2, TIMEOUT + 1),
        # the body is bounded too: the fetch stops reading past 1 MiB
        ("huge", 503, "larger than 1024 KiB", 1.0, TIMEOUT),
        ("huge_declared", 503, "larger than 1024 KiB", 1.0, TIMEOUT),
        ("http_500", 503, "answered HTTP 500", 1.0, TIMEOUT),
        ("garbage", 503, "invalid key set (not JSON)", 1.0, TIMEOUT),
        ("not_a_key_set", 503, "invalid key set (no 'keys' list)", 1.0, TIMEOUT),
        ("no_usable_keys", 503, "invalid key set (no usable keys)", 1.0, TIMEOUT),
        # a kid that appears later: the waiting request gets it once the fetch is done
        ("rotation", 200, "", 1.0, TIMEOUT),
    ],
)
def test_a_misbehaving_endpoint_fails_only_the_requests_that_need_it(
    jwks_world: World,
    jwks: JwksServer,
    rsa_key: SigningKey,
    other_rsa_key: SigningKey,
    refetch_at_once: None,
    mode: str,
    status: int,
    fragment: str,
    at_least: float,
    at_most: float,
) -> None:
    jwks.publish(rsa_key)
    cached, new = rsa_key.sign(claims_for("u")), other_rsa_key.sign(claims_for("u"))
    assert list_keys(jwks_world, cached).status_code == 200
    jwks.fetching.clear()
    # What the endpoint does from now on; those that answer at all wait 1 s first, so that the
    # fetch is still in flight when the cached-key request is sent.
    jwks.delay = 1.0
    if mode in ("trickle", "no_headers", "no_answer", "huge", "huge_declared"):
        jwks.mode = mode
    elif mode == "http_500":
        jwks.status = 500
    elif mode == "garbage":
        jwks.body = b"<html>oops</html>"
    elif mode == "not_a_key_set":
        jwks.body = b"[1, 2]"
    elif mode == "no_usable_keys":
        jwks.body = b'{"keys": [{"kty": "RSA", "kid": "x", "n": "?", "e": "AQAB"}, 7]}'
    else:
        jwks.publish(rsa_key, other_rsa_key)
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        waiting = pool.submit(list_keys, jwks_world, new)
        assert jwks.fetching.wait(2), "the new kid did not start a fetch"
        sent = time.monotonic()
        meanwhile = list_keys(jwks_world, cached)
        meanwhile_took = time.monotonic() - sent
        still_fetching = not waiting.done()
        answer = waiting.result(timeout=30)
        took = time.monotonic() - started
    assert meanwhile.status_code == 200
    assert meanwhile_took < 0.5, f"the cached-key request waited {meanwhile_took:.1f} s"
    assert still_fetching, "the fetch ended before the cached-key request was answered"
    assert at_least <= took <= at_most, took
    if status == 200:
        assert answer.status_code == 200, answer.text
    else:
        assert_error(answer, status, fragment)
        assert 1 <= int(answer.headers["retry-after"]) <= 10
        # the failed fetch keeps the cached keys in use
        assert list_keys(jwks_world, cached).status_code == 200
    if mode.startswith("huge"):
        assert jwks.bytes_sent < HUGE_BYTES // 5, jwks.bytes_sent


@pytest.mark.parametrize(
    ("setup", "fragment"),
    [
        ("garbage", "invalid key set"),
        ("no_keys", "invalid key set"),
        ("http_500", "answered HTTP 500"),
        ("trickle", "no complete answer"),
        ("down", "cannot reach the JWKS endpoint"),
    ],
)
def test_with_no_set_yet_a_failing_endpoint_fails_closed(
    jwks_world: World, jwks: JwksServer, rsa_key: SigningKey, setup: str, fragment: str
) -> None:
    jwks.publish(rsa_key)
    if setup == "garbage":
        jwks.body = b"<html>oops</html>"
    elif setup == "no_keys":
        jwks.body = b'{"keys": []}'
    elif setup == "http_500":
        jwks.status = 500
    elif setup == "trickle":
        jwks.mode = "trickle"
    else:
        jwks.close()
    token = rsa_key.sign(claims_for("u"))
    started = time.monotonic()
    response = list_keys(jwks_world, token)
    assert time.monotonic() - started < TIMEOUT + 1
    assert_error(response, 503, fragment)
    assert 1 <= int(response.headers["retry-after"]) <= 10
    # Until the next fetch may start, the same answer comes at once, without asking again.
    requests = jwks.requests
    started = time.monotonic()
    again = list_keys(jwks_world, token)
    assert time.monotonic() - started < 0.5
    assert_error(again, 503, fragment)
    assert jwks.requests == requests


@pytest.mark.slow
def test_a_trickling_endpoint_is_cut_off_in_a_real_server(
    make_settings, jwks: JwksServer, rsa_key: SigningKey, tmp_path: Path
) -> None:
    """`dailyplay serve`: a bearer request whose key needs a fetch from an endpoint that sends
    its headers and then a byte a second is answered 503 within the timeout, and the log says
    why without the endpoint's path."""
    jwks.publish(rsa_key)
    jwks.mode = "trickle"
    settings = jwks_settings(make_settings, jwks)
    org = add_org(settings, members={"u": "admin"})
    with serve(settings, tmp_path) as server:
        started = time.monotonic()
        response = httpx.get(
            f"{server.url}{API}?org_id={org}",
            headers={"authorization": f"Bearer {rsa_key.sign(claims_for('u'))}"},
            timeout=30,
        )
        took = time.monotonic() - started
        assert_error(response, 503, f"no complete answer within {TIMEOUT} s")
        assert response.headers["retry-after"]
        assert TIMEOUT - 0.2 <= took <= TIMEOUT + 1, took
        log = server.log()
    assert f"JWKS fetch from http://127.0.0.1:{jwks.tcp.server_address[1]} failed" in log
    assert "jwks.json" not in log
