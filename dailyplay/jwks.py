"""A remote JWKS: fetched under one deadline, cached, and refreshed without making anyone wait.

Requests whose `kid` is in the cached set never wait for a fetch. At most one fetch runs at a
time per process; every request that needs the new set shares it. A cached set past its age is
refreshed in the background while its keys stay in use, and a failed fetch keeps the cached keys.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import time
from typing import Any

import httpx
import jwt
import orjson

log = logging.getLogger("dailyplay.auth")

# A key set is a few kilobytes; anything past this is refused before it can fill memory.
MAX_JWKS_BYTES = 1 << 20
# Fetches start at most this often, whatever asks for them (an unknown `kid`, an old set, a
# failed fetch): tokens with made-up kids cannot turn the service into a JWKS request amplifier.
MIN_REFRESH_SECONDS = 10.0


class JwksUnavailable(Exception):
    """No key set to answer from: why (no URL or secret in it), and when to try again."""

    def __init__(self, reason: str, retry_after: int):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class _FetchFailed(Exception):
    """One fetch's failure, in words fit for a client and a log line."""


class RemoteKeySet:
    """The signing keys published at a JWKS URL, for one process's event loop."""

    def __init__(self, url: str, timeout_seconds: float, cache_seconds: float):
        self.url = url
        self.timeout_seconds = timeout_seconds
        self.cache_seconds = cache_seconds
        self._keys: dict[str, jwt.PyJWK] | None = None
        self._fetched_at = -math.inf
        self._started_at = -math.inf
        self._last_error = ""
        self._fetch: asyncio.Task[str | None] | None = None
        # Built once: loading the trust store takes milliseconds that a request should not pay.
        self._ssl = ssl.create_default_context()

    async def signing_key(self, kid: str) -> jwt.PyJWK | None:
        """The key for kid, or None if the current set has none; JwksUnavailable if no set can
        be had within the deadline."""
        now = time.monotonic()
        keys = self._keys
        if keys is not None and kid in keys:
            if now - self._fetched_at >= self.cache_seconds:
                self._start_fetch(now)  # in the background: this request does not wait
            return keys[kid]
        fetch = self._start_fetch(now)
        if fetch is None:
            if keys is not None:
                return None  # an unknown kid, and the set was fetched moments ago
            raise JwksUnavailable(self._last_error, self._retry_after(now))
        error = await asyncio.shield(fetch)
        if error is not None:
            raise JwksUnavailable(error, self._retry_after(time.monotonic()))
        return self._keys.get(kid) if self._keys is not None else None

    async def aclose(self) -> None:
        """Stop a fetch in flight (at shutdown)."""
        fetch = self._fetch
        if fetch is not None:
            fetch.cancel()
            await asyncio.gather(fetch, return_exceptions=True)

    def _retry_after(self, now: float) -> int:
        return max(1, math.ceil(self._started_at + MIN_REFRESH_SECONDS - now))

    def _start_fetch(self, now: float) -> asyncio.Task[str | None] | None:
        """The fetch in flight, or a new one if the last started long enough ago; else None."""
        if self._fetch is None and now - self._started_at >= MIN_REFRESH_SECONDS:
            self._started_at = now
            self._fetch = asyncio.get_running_loop().create_task(self._refresh())
        return self._fetch

    async def _refresh(self) -> str | None:
        """Fetch and install a new set; None, or why it failed (the cached keys then stay)."""
        try:
            try:
                async with asyncio.timeout(self.timeout_seconds):
                    body = await self._download()
            except TimeoutError:
                raise _FetchFailed(
                    f"the JWKS endpoint gave no complete answer within {self.timeout_seconds:g} s"
                ) from None
            except httpx.HTTPError:
                raise _FetchFailed("cannot reach the JWKS endpoint") from None
            self._keys = parse_key_set(body)
            self._fetched_at = time.monotonic()
            return None
        except _FetchFailed as exc:
            self._last_error = str(exc)
            kept = "; the cached keys stay in use" if self._keys is not None else ""
            log.warning("JWKS fetch from %s failed: %s%s", _origin(self.url), exc, kept)
            return self._last_error
        except Exception:
            self._last_error = "the JWKS could not be fetched (see the server's log)"
            log.exception("JWKS fetch from %s failed", _origin(self.url))
            return self._last_error
        finally:
            self._fetch = None

    async def _download(self) -> bytes:
        async with (
            httpx.AsyncClient(
                verify=self._ssl,
                timeout=self.timeout_seconds,
                follow_redirects=True,
                max_redirects=3,
            ) as client,
            client.stream(
                "GET",
                self.url,
                headers={"accept": "application/json", "accept-encoding": "identity"},
            ) as response,
        ):
            if response.status_code != 200:
                raise _FetchFailed(f"the JWKS endpoint answered HTTP {response.status_code}")
            if response.headers.get("content-encoding", "identity").lower() != "identity":
                raise _FetchFailed("the JWKS endpoint answered with a content-encoding")
            too_large = _FetchFailed(
                f"the JWKS endpoint's answer is larger than {MAX_JWKS_BYTES // 1024} KiB"
            )
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > MAX_JWKS_BYTES:
                raise too_large
            body = bytearray()
            async for chunk in response.aiter_raw():
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise too_large
            return bytes(body)


def parse_key_set(body: bytes) -> dict[str, jwt.PyJWK]:
    """The signing keys of a JWKS document by kid; _FetchFailed if it has none usable.

    Entries without a kid, for another use than signatures, or of an unsupported type are
    skipped; the first entry of a kid wins.
    """
    try:
        document: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise _FetchFailed("the JWKS endpoint returned an invalid key set (not JSON)") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise _FetchFailed("the JWKS endpoint returned an invalid key set (no 'keys' list)")
    keys: dict[str, jwt.PyJWK] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        kid = entry.get("kid")
        if not isinstance(kid, str) or not kid or kid in keys or entry.get("use", "sig") != "sig":
            continue
        try:
            keys[kid] = jwt.PyJWK(entry)
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            continue
    if not keys:
        raise _FetchFailed("the JWKS endpoint returned an invalid key set (no usable keys)")
    return keys


def _origin(url: str) -> str:
    """scheme://host[:port] of url: enough to find the endpoint, nothing of its path or query."""
    parsed = httpx.URL(url)
    port = f":{parsed.port}" if parsed.port else ""
    return f"{parsed.scheme}://{parsed.host}{port}"
