"""The storage seam: the operations the service needs from a database, in its own types.

An engine implements `Store` (`storage.sqlite.Database` does). Its arguments and results are
the types of `storage.types`, never a driver's rows; its failures are the exceptions of
`storage.errors` (StorageBusy, StorageFull, StorageUnavailable, KeyChanged), never a driver's,
for every condition a caller handles. Times are milliseconds since the epoch, tokens their 16
bytes.

Every write is durable when its coroutine returns: a caller answers only after that.
"""

from __future__ import annotations

from typing import Any, Protocol

from .types import (
    Actor,
    ApiKey,
    AuditEntry,
    Claim,
    Completion,
    IdempotencyRequest,
    KeyState,
    ListedSession,
    Member,
    NewApiKey,
    NewSession,
    Org,
    OrgListing,
    Session,
    SessionQuery,
)


class Store(Protocol):
    # --- life ---------------------------------------------------------------------------------

    async def open(self) -> None:
        """Migrate the schema to this program's version, then get ready to serve."""

    async def close(self) -> None:
        """Finish queued writes, then release every connection and thread."""

    # --- health -------------------------------------------------------------------------------

    async def schema_version(self) -> int:
        """The database's schema version as it is now."""

    async def describe(self) -> dict[str, Any]:
        """What `dailyplay init-db` reports: where the database is, its schema version, and
        facts of the engine's own."""

    def seconds_since_full(self) -> float | None:
        """Seconds since a write was last refused for want of space; None if none was."""

    async def probe_write(self, now: int) -> None:
        """A write that touches the disk like any other (for /readyz)."""

    # --- organizations and keys ---------------------------------------------------------------

    async def get_org(self, org_id: int) -> Org | None: ...

    async def list_orgs(self) -> list[OrgListing]: ...

    async def find_org_by_external_id(self, external_id: str) -> Org | None: ...

    async def create_org(
        self, name: str, tier: str, external_id: str | None, now: int, by: Actor
    ) -> Org:
        """A new organization with its audit entry; Duplicate when its external id is taken."""

    async def set_org_tier(self, org_id: int, tier: str, now: int, by: Actor) -> Org | None:
        """The org with its new tier (audited when it changed); None when there is no such org."""

    async def upsert_member(
        self, org_id: int, user_id: str, role: str, now: int, by: Actor
    ) -> Member | None:
        """Add a member or change their role (audited); None when there is no such org."""

    async def delete_member(self, org_id: int, user_id: str, now: int, by: Actor) -> bool:
        """Remove a member (audited); False when they were not one."""

    async def list_members(self, org_id: int) -> list[Member]:
        """The org's members by user id."""

    async def get_member_role(self, org_id: int, user_id: str) -> str | None:
        """'admin' or 'member' when org_members lists the user for the org; else None."""

    async def list_api_keys(self, org_id: int) -> list[ApiKey]:
        """The org's keys, oldest first."""

    async def key_usage(self, org_id: int, now: int) -> dict[int, dict[str, int]]:
        """Per key of the org: tokens created and consumed in the last 24 hours and 30 days."""

    async def insert_api_key(self, values: NewApiKey, by: Actor) -> ApiKey:
        """Store a key and its audit entry, in one transaction."""

    async def update_api_key(
        self, org_id: int, key_id: int, changes: dict[str, Any], now: int, by: Actor
    ) -> tuple[ApiKey | None, int]:
        """Apply changes (stored forms, keys.key_changes) to a key of the org with its audit
        entry; deactivating it revokes its live tokens in the same transaction. Returns the key
        (None when the org has no such key) and how many tokens were revoked."""

    async def delete_api_key(self, org_id: int, key_id: int, now: int, by: Actor) -> int | None:
        """Revoke a key's live tokens and delete it, with its audit entry, in one transaction;
        the tokens revoked, or None when the org has no such key."""

    async def find_api_key_hashes(self, key_prefix: str) -> list[tuple[int, str]]:
        """(id, argon2 hash) of every key whose first 8 characters are key_prefix."""

    async def get_api_key_for_request(self, key_id: int) -> KeyState | None:
        """What decides whether the key may create a token now, read now."""

    async def revoke_session(
        self, org_id: int, token: bytes, now: int, by: Actor, reason: str | None
    ) -> tuple[str, ListedSession | None]:
        """Revoke the org's token if it is active, with its audit entry, in one transaction:
        (its state before: active, consumed, expired or revoked; the token as it is now), or
        ("not_found", None) when the org has no such token (another org's included)."""
        ...

    async def list_sessions(self, org_id: int, query: SessionQuery) -> list[ListedSession]:
        """The org's tokens the query asks for, newest (highest id) first, at most its limit."""
        ...

    async def list_audit(self, org_id: int, limit: int, before_id: int | None) -> list[AuditEntry]:
        """The org's audit entries, newest first, with ids below before_id when given."""

    # --- rate limits and usage ----------------------------------------------------------------

    async def record_key_usage(
        self, last_used: dict[int, int], counter_deltas: dict[tuple[int, str, int], int]
    ) -> dict[tuple[int, str, int], int]:
        """Store keys' last use and add this process's rate-limit counts ((key, 'minute' or
        'day', window) -> hits); returns the new totals of those counters."""

    async def prune_rate_counters(self, minute_before: int, day_before: int) -> None:
        """Forget counters of windows that are over, and usage older than listings show."""

    async def get_rate_counters(self, key_id: int, minute: int, day: int) -> dict[str, int]:
        """Stored hits of a key in the given minute and day, as {'minute': n, 'day': n}."""

    # --- sessions -----------------------------------------------------------------------------

    async def insert_session(
        self,
        session: NewSession,
        admitted_on: KeyState | None = None,
        completion: Completion | None = None,
    ) -> None:
        """Store a token. With admitted_on, only if its key is still in exactly that state
        inside the transaction; else KeyChanged and nothing is stored. With completion, the
        idempotency key's answer is stored in the same transaction, only while the claim is
        still the caller's; else ClaimLost and nothing is stored."""

    async def get_session(self, token: bytes) -> Session | None:
        """The token as it is now; every write committed before the call is seen."""

    async def consume_session(
        self, token: bytes, player_uuid: str | None, now: int
    ) -> Session | None:
        """Mark an active token that has not expired by `now` consumed, atomically: of any
        number of concurrent callers, in any process, exactly one gets the session; the others
        (and every later caller) get None."""

    # --- Idempotency-Key ----------------------------------------------------------------------

    async def claim_idempotency_key(
        self, request: IdempotencyRequest, now: int, locked_until: int, stale_before: int
    ) -> Claim:
        """Claim the key for the request until locked_until, atomically (of concurrent claims,
        in any process, one wins), or say what holds it: the answer stored by an earlier
        request with the key (REPLAY), that request still running (IN_FLIGHT), or another
        request that used the key (MISMATCH). A row created before stale_before counts as
        absent; a pending one past its lock is taken over."""

    async def complete_idempotency_key(self, completion: Completion) -> bool:
        """Store a claim's answer that created nothing (a refusal the request caused); False
        when the claim is no longer the caller's."""

    async def release_idempotency_key(self, api_key_id: int, key: str, claim: str) -> None:
        """Give a pending claim up (the request failed for a reason a retry may not meet)."""

    async def purge_idempotency_keys(self, cutoff: int, batch: int = ...) -> int:
        """Delete idempotency keys created before cutoff, in bounded transactions; how many."""

    async def count_finished_sessions(self, cutoff: int) -> int:
        """How many tokens finished before cutoff (what a purge would delete)."""

    async def purge_finished_sessions(self, cutoff: int, batch: int = ...) -> int:
        """Delete tokens that finished (expired, consumed, revoked) before cutoff, in bounded
        transactions; returns how many."""
