"""The Store contract (dailyplay/storage/base.py), tested through the interface alone: what any
engine must do, whatever it is. Every test runs on each engine (both_engines, tests/conftest.py),
on a fresh, empty database."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from dailyplay import config
from dailyplay.keys import new_api_key
from dailyplay.storage import Store, store_for
from dailyplay.storage.errors import Duplicate, KeyChanged
from dailyplay.storage.types import Actor, NewSession

T = TypeVar("T")
NOW = 1_800_000_000_000
HOUR = 3_600_000
ADMIN = Actor("user_admin", "203.0.113.9")


pytestmark = pytest.mark.both_engines


def run(settings: config.Settings, scenario: Callable[[Store], Awaitable[T]]) -> T:
    async def main() -> T:
        store = store_for(settings.database)
        await store.open()
        try:
            return await scenario(store)
        finally:
            await store.close()

    return asyncio.run(main())


async def business_key(store: Store, per_minute: int = 60) -> tuple[int, int]:
    """(org id, key id) of a new Business org with one key."""
    org = await store.create_org("Acme", "business", None, NOW, ADMIN)
    _raw, values = new_api_key(org.id, "CRM", NOW, per_minute=per_minute, per_day=1000)
    key = await store.insert_api_key(values, ADMIN)
    return org.id, key.id


def new_session(org_id: int, key_id: int, expires_at: int = NOW + HOUR) -> NewSession:
    return NewSession(
        uuid.uuid4().bytes, org_id, key_id, 42, None, "ref", '{"a":1}', NOW, expires_at
    )


def test_a_token_is_consumed_by_exactly_one_of_many_concurrent_callers(
    settings: config.Settings,
) -> None:
    async def scenario(store: Store) -> tuple[list[Any], Any]:
        org_id, key_id = await business_key(store)
        session = new_session(org_id, key_id)
        await store.insert_session(session)
        asks = [store.consume_session(session.token, f"p{i}", NOW + 1) for i in range(40)]
        results = await asyncio.gather(*asks)
        return results, await store.get_session(session.token)

    results, after = run(settings, scenario)
    won = [r for r in results if r is not None]
    assert len(won) == 1
    assert won[0].status == "consumed" and won[0].consumed_at == NOW + 1
    assert (won[0].game_id, won[0].external_ref, won[0].metadata) == (42, "ref", '{"a":1}')
    assert after.status == "consumed"


def test_many_tokens_asked_for_at_once_each_get_their_own_answer(
    settings: config.Settings,
) -> None:
    """Calls made together (which an engine may send to the database together): every token is
    created on its key's state, read back as itself, and consumed by exactly one of its askers;
    a token admitted on an old state of its key is refused alone."""

    async def scenario(store: Store) -> tuple[list[Any], ...]:
        org_id, key_id = await business_key(store)
        state = await store.get_api_key_for_request(key_id)
        assert state is not None
        old = dataclasses.replace(state, rate_limit_per_day=state.rate_limit_per_day + 1)
        sessions = [new_session(org_id, key_id) for _ in range(30)]
        created = await asyncio.gather(
            *(store.insert_session(s, old if i == 7 else state) for i, s in enumerate(sessions)),
            return_exceptions=True,
        )
        unknown = uuid.uuid4().bytes
        read = await asyncio.gather(
            *(store.get_session(s.token) for s in sessions), store.get_session(unknown)
        )
        consumed = await asyncio.gather(
            *(
                store.consume_session(s.token, f"p{i}-{n}", NOW + 1 + n)
                for n in range(3)
                for i, s in enumerate(sessions)
            )
        )
        return created, read, consumed, sessions

    created, read, consumed, sessions = run(settings, scenario)
    assert isinstance(created[7], KeyChanged)
    assert all(outcome is None for i, outcome in enumerate(created) if i != 7), created
    assert read[7] is None and read[-1] is None
    for i, session in enumerate(read[:-1]):
        if i != 7:
            assert session is not None and session.status == "active"
            assert session.created_at == sessions[i].created_at
    for i in range(30):
        wins = [consumed[n * 30 + i] for n in range(3) if consumed[n * 30 + i] is not None]
        assert len(wins) == (0 if i == 7 else 1), (i, wins)
        if wins:
            assert wins[0].status == "consumed" and wins[0].consumed_at == NOW + 1
            assert wins[0].id == read[i].id


def test_an_expired_or_unknown_token_is_not_consumed(settings: config.Settings) -> None:
    async def scenario(store: Store) -> list[Any]:
        org_id, key_id = await business_key(store)
        expired = new_session(org_id, key_id, expires_at=NOW)
        await store.insert_session(expired)
        return [
            await store.consume_session(expired.token, None, NOW),
            await store.consume_session(uuid.uuid4().bytes, None, NOW),
            (await store.get_session(expired.token)).status,
        ]

    assert run(settings, scenario) == [None, None, "active"]  # stored status; it reads as expired


def test_a_token_admitted_on_an_old_reading_of_its_key_is_not_stored(
    settings: config.Settings,
) -> None:
    async def scenario(store: Store) -> tuple[Any, Any, Any]:
        org_id, key_id = await business_key(store)
        state = await store.get_api_key_for_request(key_id)
        assert state is not None and state.tier == "business" and state.is_active
        current = new_session(org_id, key_id)
        await store.insert_session(current, state)
        stale = new_session(org_id, key_id)
        old = dataclasses.replace(state, rate_limit_per_minute=state.rate_limit_per_minute + 1)
        with pytest.raises(KeyChanged):
            await store.insert_session(stale, old)
        return (
            await store.get_session(current.token),
            await store.get_session(stale.token),
            await store.key_usage(org_id, NOW),
        )

    stored, refused, usage = run(settings, scenario)
    assert stored is not None and refused is None
    assert next(iter(usage.values()))["sessions_created_24h"] == 1


def test_deactivating_or_deleting_a_key_revokes_its_live_tokens_in_the_same_change(
    settings: config.Settings,
) -> None:
    async def scenario(store: Store) -> dict[str, Any]:
        org_id, key_id = await business_key(store)
        live = [new_session(org_id, key_id) for _ in range(3)]
        finished = new_session(org_id, key_id, expires_at=NOW - 1)
        for session in [*live, finished]:
            await store.insert_session(session)
        other = await store.create_org("Other", "business", None, NOW, ADMIN)
        found: dict[str, Any] = {
            "other org": await store.update_api_key(other.id, key_id, {"is_active": 0}, NOW, ADMIN),
            "revoke": await store.update_api_key(org_id, key_id, {"is_active": 0}, NOW, ADMIN),
            "statuses": [(await store.get_session(s.token)).status for s in live],
            "expired stays": (await store.get_session(finished.token)).status,
            "delete other org": await store.delete_api_key(other.id, key_id, NOW, ADMIN),
            "delete": await store.delete_api_key(org_id, key_id, NOW, ADMIN),
            "keys after": await store.list_api_keys(org_id),
            "trail": [e.action for e in await store.list_audit(org_id, 10, None)],
        }
        return found

    found = run(settings, scenario)
    assert found["other org"] == (None, 0) and found["delete other org"] is None
    key, revoked = found["revoke"]
    assert key is not None and key.is_active is False and revoked == 3
    assert found["statuses"] == ["revoked"] * 3 and found["expired stays"] == "active"
    assert found["delete"] == 0 and found["keys after"] == []
    assert found["trail"] == ["api_key.delete", "api_key.revoke", "api_key.create", "org.create"]


def test_organizations_and_members(settings: config.Settings) -> None:
    async def scenario(store: Store) -> dict[str, Any]:
        org = await store.create_org("Acme", "free", "org_1", NOW, ADMIN)
        with pytest.raises(Duplicate):
            await store.create_org("Copy", "free", "org_1", NOW, ADMIN)
        return {
            "found": await store.find_org_by_external_id("org_1"),
            "tier": await store.set_org_tier(org.id, "business", NOW, ADMIN),
            "no org": await store.set_org_tier(999, "business", NOW, ADMIN),
            "member": await store.upsert_member(org.id, "u1", "admin", NOW, ADMIN),
            "no org member": await store.upsert_member(999, "u1", "admin", NOW, ADMIN),
            "role": await store.get_member_role(org.id, "u1"),
            "listed": await store.list_orgs(),
            "removed": await store.delete_member(org.id, "u1", NOW, ADMIN),
            "removed again": await store.delete_member(org.id, "u1", NOW, ADMIN),
            "members": await store.list_members(org.id),
            "trail": [e.action for e in await store.list_audit(org.id, 10, None)],
        }

    found = run(settings, scenario)
    assert found["found"].name == "Acme" and found["tier"].tier == "business"
    assert found["no org"] is None and found["no org member"] is None
    assert found["member"].role == "admin" and found["role"] == "admin"
    [listing] = found["listed"]  # the duplicate stored nothing
    assert (listing.org.external_id, listing.members, listing.api_keys) == ("org_1", 1, 0)
    assert found["removed"] is True and found["removed again"] is False
    assert found["members"] == []
    assert found["trail"] == ["member.remove", "member.add", "org.tier_change", "org.create"]


def test_the_audit_trail_pages_newest_first(settings: config.Settings) -> None:
    async def scenario(store: Store) -> list[list[int]]:
        org = await store.create_org("Acme", "free", None, NOW, ADMIN)
        for i in range(5):
            await store.upsert_member(org.id, f"u{i}", "member", NOW, ADMIN)
        pages, before = [], None
        while True:
            page = await store.list_audit(org.id, 2, before)
            if not page:
                return pages
            pages.append([entry.id for entry in page])
            before = page[-1].id

    pages = run(settings, scenario)
    ids = [i for page in pages for i in page]
    assert [len(page) for page in pages] == [2, 2, 2]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == 6


def test_finished_tokens_are_counted_and_purged_and_live_ones_kept(
    settings: config.Settings,
) -> None:
    async def scenario(store: Store) -> tuple[int, int, int, list[bool]]:
        org_id, key_id = await business_key(store)
        old = [new_session(org_id, key_id, expires_at=NOW - 10 * HOUR) for _ in range(5)]
        live = [new_session(org_id, key_id, expires_at=NOW + HOUR) for _ in range(2)]
        for session in [*old, *live]:
            await store.insert_session(session)
        counted = await store.count_finished_sessions(NOW - HOUR)
        purged = await store.purge_finished_sessions(NOW - HOUR, batch=2)
        again = await store.purge_finished_sessions(NOW - HOUR, batch=2)
        left = [await store.get_session(s.token) is not None for s in [*old, *live]]
        return counted, purged, again, left

    counted, purged, again, left = run(settings, scenario)
    assert (counted, purged, again) == (5, 5, 0)
    assert left == [False] * 5 + [True] * 2


def test_rate_counters_add_up_across_flushes(settings: config.Settings) -> None:
    async def scenario(store: Store) -> tuple[dict[Any, int], dict[str, int], Any]:
        _org_id, key_id = await business_key(store)
        minute, day = NOW // 60_000, NOW // 86_400_000
        await store.record_key_usage({key_id: NOW}, {(key_id, "minute", minute): 3})
        totals = await store.record_key_usage(
            {key_id: NOW + 5}, {(key_id, "minute", minute): 2, (key_id, "day", day): 7}
        )
        stored = await store.get_rate_counters(key_id, minute, day)
        [key] = await store.list_api_keys(_org_id)
        return totals, stored, key.last_used_at

    totals, stored, last_used = run(settings, scenario)
    assert stored == {"minute": 5, "day": 7}
    assert set(totals.values()) == {5, 7}
    assert last_used == NOW + 5
