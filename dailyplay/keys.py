"""API keys: generation, argon2id hashing, and verification with a bounded digest cache.

A raw key is `dpk_` + 40 lowercase hex characters (160 random bits). Only its argon2id hash and
its first 8 characters (`key_prefix`, for people and for finding candidate rows) are stored.
Verifying costs one argon2 hash the first time a process sees a key; after that a SHA-256 digest
of the raw key maps to the key id in memory.

What a key may do (active, expiry, allow-lists, limits, its org's tier) is its row, remembered
between requests in `KeyStates`. Revocation, deletion, expiry and every other change still take
effect at once in every worker: a token is inserted only if the key's row is unchanged inside
the inserting transaction (`storage.errors.KeyChanged` otherwise), and a request refused on a
remembered reading is decided again on a fresh one before the refusal is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from . import inputs
from .clock import MAX_MS, iso_from_ms, ms_from_iso
from .errors import ApiError
from .storage import Store
from .storage.types import MUTABLE_KEY_COLUMNS, ApiKey, KeyState, NewApiKey

KEY_PATTERN = re.compile(r"dpk_[0-9a-f]{40}")
PREFIX_LENGTH = 8

# argon2-cffi's defaults are RFC 9106's low-memory profile (argon2id, t=3, m=64 MiB, p=4).
_hasher = PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """Verified against when no stored key has the prefix, so that an unknown prefix costs the
    same argon2 time as a wrong secret and the two cannot be told apart by timing."""
    return _hasher.hash("dpk_" + "0" * 40)


def generate_api_key() -> str:
    """A new raw key: `dpk_` + 40 lowercase hex characters."""
    return "dpk_" + secrets.token_hex(20)


def key_prefix(raw_key: str) -> str:
    return raw_key[:PREFIX_LENGTH]


def hash_api_key(raw_key: str) -> str:
    """The argon2id hash stored for a key."""
    return _hasher.hash(raw_key)


MAX_NAME = 255
MAX_DESCRIPTION = 1000
MAX_RATE_PER_MINUTE = 1_000_000
MAX_RATE_PER_DAY = 1_000_000_000
DEFAULT_RATE_PER_MINUTE = 60
DEFAULT_RATE_PER_DAY = 10_000


# --- key rules, for the API and the CLI alike (ApiError 400 names the field at fault) -----------


def future_time(value: Any, name: str, now: int) -> int | None:
    """An RFC 3339 time in the future (or None) as milliseconds."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ApiError(400, f"'{name}' must be an ISO 8601 date-time string or null")
    try:
        moment = ms_from_iso(value)
    except ValueError:
        raise ApiError(
            400,
            f"'{name}' must be an RFC 3339 date-time with an offset, e.g. 2027-01-01T00:00:00Z",
        ) from None
    if moment <= now:
        raise ApiError(400, f"'{name}' must be in the future")
    # An offset can carry 9999-12-31T23:59:59-23:59 into year 10000, which the API cannot
    # write back in its four-digit form; at most a day is lost there.
    return min(moment, MAX_MS)


def id_list_json(value: Any, name: str) -> str | None:
    """An allow-list (positive integers, or None for all) as its stored JSON text."""
    ids = inputs.id_list(value, name)
    return None if ids is None else json.dumps(ids)


def new_key_fields(body: dict[str, Any], now: int) -> dict[str, Any]:
    """A new key's settings from a create request's fields, as stored (defaults applied)."""
    per_minute = body.get("rate_limit_per_minute", DEFAULT_RATE_PER_MINUTE)
    per_day = body.get("rate_limit_per_day", DEFAULT_RATE_PER_DAY)
    return {
        "name": inputs.text(body.get("name"), "name", MAX_NAME, required=True),
        "description": inputs.text(body.get("description"), "description", MAX_DESCRIPTION),
        "allowed_game_ids": id_list_json(body.get("allowed_game_ids"), "allowed_game_ids"),
        "allowed_stream_ids": id_list_json(body.get("allowed_stream_ids"), "allowed_stream_ids"),
        "rate_limit_per_minute": inputs.positive_int(
            per_minute, "rate_limit_per_minute", MAX_RATE_PER_MINUTE
        ),
        "rate_limit_per_day": inputs.positive_int(per_day, "rate_limit_per_day", MAX_RATE_PER_DAY),
        "expires_at": future_time(body.get("expires_at"), "expires_at", now),
    }


def key_insert_values(
    org_id: int, fields: dict[str, Any], raw_key: str, key_hash: str, now: int
) -> NewApiKey:
    """The key new_key_fields describe, to store."""
    return NewApiKey(
        org_id,
        fields["name"],
        fields["description"],
        key_prefix(raw_key),
        key_hash,
        fields["allowed_game_ids"],
        fields["allowed_stream_ids"],
        fields["rate_limit_per_minute"],
        fields["rate_limit_per_day"],
        fields["expires_at"],
        now,
        now,
    )


def key_changes(body: dict[str, Any], now: int) -> dict[str, Any]:
    """The stored changes an update request's fields ask for; 400 when it asks for none."""
    changes: dict[str, Any] = {}
    if "is_active" in body:
        changes["is_active"] = int(inputs.boolean(body["is_active"], "is_active"))
    if "name" in body:
        changes["name"] = inputs.text(body["name"], "name", MAX_NAME, required=True)
    if "description" in body:
        changes["description"] = inputs.text(body["description"], "description", MAX_DESCRIPTION)
    for name in ("allowed_game_ids", "allowed_stream_ids"):
        if name in body:
            changes[name] = id_list_json(body[name], name)
    if "rate_limit_per_minute" in body:
        changes["rate_limit_per_minute"] = inputs.positive_int(
            body["rate_limit_per_minute"], "rate_limit_per_minute", MAX_RATE_PER_MINUTE
        )
    if "rate_limit_per_day" in body:
        changes["rate_limit_per_day"] = inputs.positive_int(
            body["rate_limit_per_day"], "rate_limit_per_day", MAX_RATE_PER_DAY
        )
    if "expires_at" in body:
        changes["expires_at"] = future_time(body["expires_at"], "expires_at", now)
    if not changes:
        raise ApiError(
            400, "nothing to update: send at least one of " + ", ".join(sorted(MUTABLE_KEY_COLUMNS))
        )
    return changes


def api_key_data(key: ApiKey) -> dict[str, Any]:
    """A key as the API and the CLI show it: never its hash, never the raw key."""
    return {
        "id": key.id,
        "org_id": key.org_id,
        "name": key.name,
        "description": key.description,
        "key_prefix": key.key_prefix,
        "is_active": key.is_active,
        "allowed_game_ids": key.allowed_game_ids,
        "allowed_stream_ids": key.allowed_stream_ids,
        "rate_limit_per_minute": key.rate_limit_per_minute,
        "rate_limit_per_day": key.rate_limit_per_day,
        "expires_at": iso_from_ms(key.expires_at),
        "created_at": iso_from_ms(key.created_at),
        "updated_at": iso_from_ms(key.updated_at),
        "last_used_at": iso_from_ms(key.last_used_at),
    }


def new_api_key(
    org_id: int,
    name: str,
    now: int,
    *,
    description: str | None = None,
    per_minute: int,
    per_day: int,
) -> tuple[str, NewApiKey]:
    """A new key for org_id with no allow-lists and no expiry (the demo's, the benchmark's, test
    set-up's): the raw key, shown nowhere else, and what to store."""
    raw_key = generate_api_key()
    values = NewApiKey(
        org_id, name, description, key_prefix(raw_key), hash_api_key(raw_key),
        None, None, per_minute, per_day, None, now, now,
    )  # fmt: skip
    return raw_key, values


def is_well_formed(raw_key: str) -> bool:
    return KEY_PATTERN.fullmatch(raw_key) is not None


def _verify_candidates(raw_key: str, candidates: list[tuple[int, str]]) -> tuple[int, str] | None:
    """Runs in a worker thread: the (id, hash) whose argon2 hash matches raw_key, if any."""
    if not candidates:
        with contextlib.suppress(VerificationError):
            _hasher.verify(_dummy_hash(), raw_key)
        return None
    for key_id, stored_hash in candidates:
        try:
            if _hasher.verify(stored_hash, raw_key):
                return key_id, stored_hash
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            continue
    return None


_FAILED = object()


class KeyVerificationError(RuntimeError):
    """A verification this request was waiting on failed (e.g. the database was unavailable)."""


@dataclass(frozen=True)
class VerifiedKey:
    key_id: int
    key_hash: str


class _BoundedCache:
    """A small LRU map with optional entry lifetime."""

    def __init__(self, max_entries: int, ttl_seconds: float | None = None):
        self._entries: OrderedDict[Hashable, tuple[float, object]] = OrderedDict()
        self._max = max_entries
        self._ttl = ttl_seconds

    def get(self, key: Hashable) -> object | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        stored_at, value = entry
        if self._ttl is not None and time.monotonic() - stored_at > self._ttl:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    def put(self, key: Hashable, value: object) -> None:
        self._entries[key] = (time.monotonic(), value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def discard(self, key: Hashable) -> None:
        self._entries.pop(key, None)


class KeyStates:
    """The last reading of each key's row in this process, by key id (bounded, LRU)."""

    def __init__(self, max_entries: int = 10_000):
        self._states = _BoundedCache(max_entries)

    def get(self, key_id: int) -> KeyState | None:
        state = self._states.get(key_id)
        return state if isinstance(state, KeyState) else None

    def remember(self, key_id: int, state: KeyState | None) -> None:
        if state is None:
            self._states.discard(key_id)
        else:
            self._states.put(key_id, state)


class ApiKeyVerifier:
    """Maps raw keys to key ids, paying for argon2 at most once per key per process."""

    def __init__(self, db: Store, max_entries: int = 10_000, negative_ttl_seconds: float = 600):
        self._db = db
        self._known = _BoundedCache(max_entries)
        # Keys that failed verification; a raw key is random, so it cannot become valid later
        # except with negligible probability, and the TTL bounds even that.
        self._rejected = _BoundedCache(max_entries, ttl_seconds=negative_ttl_seconds)
        self._pending: dict[bytes, asyncio.Future[object]] = {}
        self.argon2_verifications = 0  # how many times this process ran argon2 (for tests/bench)

    async def verify(self, raw_key: str) -> VerifiedKey | None:
        """The key's id and stored hash if raw_key is a key we issued, else None."""
        if not is_well_formed(raw_key):
            return None
        digest = hashlib.sha256(raw_key.encode("ascii")).digest()
        known = self._known.get(digest)
        if isinstance(known, VerifiedKey):
            return known
        if self._rejected.get(digest) is not None:
            return None
        pending = self._pending.get(digest)
        if pending is not None:
            # Concurrent first requests with the same key share one argon2 verification.
            outcome = await asyncio.shield(pending)
            if outcome is _FAILED:
                raise KeyVerificationError("API key verification failed; try again")
            return outcome  # type: ignore[return-value]
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._pending[digest] = future
        try:
            result = await self._verify_uncached(raw_key)
        except BaseException:
            future.set_result(_FAILED)
            raise
        finally:
            self._pending.pop(digest, None)
        if result is None:
            self._rejected.put(digest, True)
        else:
            self._known.put(digest, result)
        future.set_result(result)
        return result

    async def _verify_uncached(self, raw_key: str) -> VerifiedKey | None:
        candidates = await self._db.find_api_key_hashes(key_prefix(raw_key))
        self.argon2_verifications += max(1, len(candidates))
        match = await asyncio.to_thread(_verify_candidates, raw_key, candidates)
        return None if match is None else VerifiedKey(*match)
