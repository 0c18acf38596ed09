"""Retention: finished session tokens (consumed, expired, revoked) are deleted a configured
number of days after they finished, by a background task in every server process and by
`dailyplay purge`, both through Store.purge_finished_sessions: in small batches, one short
transaction each. The same task deletes create-session's stored Idempotency-Key answers
sessions.idempotency_hours after they were made."""

from __future__ import annotations

import asyncio
import logging

from .background import log_failed_pass
from .clock import DAY_MS, HOUR_MS, now_ms
from .storage import Store

log = logging.getLogger("dailyplay.retention")

# The server's first pass waits a minute after start-up, then one runs every 10 minutes.
FIRST_PASS_SECONDS = 60.0
PASS_INTERVAL_SECONDS = 600.0


def cutoff_ms(now_ms: int, days: int) -> int:
    """Tokens that finished before this instant are old enough to delete."""
    return now_ms - days * DAY_MS


async def run_retention(
    database: Store,
    days: int,
    idempotency_hours: int = 24,
    *,
    first_pass: float = FIRST_PASS_SECONDS,
    interval: float = PASS_INTERVAL_SECONDS,
) -> None:
    """Purge every `interval` seconds until cancelled (tokens only when days is not 0)."""
    delay = first_pass
    while True:
        await asyncio.sleep(delay)
        delay = interval
        if days > 0:
            await _purge_tokens(database, days)
        try:
            await database.purge_idempotency_keys(now_ms() - idempotency_hours * HOUR_MS)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log_failed_pass(log, "deleting old idempotency keys", exc)


async def _purge_tokens(database: Store, days: int) -> None:
    try:
        deleted = await database.purge_finished_sessions(cutoff_ms(now_ms(), days))
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log_failed_pass(log, "deleting finished session tokens", exc)
        return
    if deleted:
        log.info("retention: deleted %d session tokens finished over %d days ago", deleted, days)
