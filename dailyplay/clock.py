"""Time as integer milliseconds since the epoch (UTC), and its ISO 8601 text forms."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def now_ms() -> int:
    """The current time in whole milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000


def iso_from_ms(ms: int | None) -> str | None:
    """`2026-02-17T12:00:00.000Z` for a millisecond timestamp (None stays None)."""
    if ms is None:
        return None
    moment = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def ms_from_iso(text: str) -> int:
    """Milliseconds for an RFC 3339 date-time with an explicit offset; ValueError otherwise."""
    if not isinstance(text, str) or len(text) > 64 or "T" not in text.upper():
        raise ValueError("not an ISO 8601 date-time")
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError("an ISO 8601 date-time needs a timezone (e.g. Z or +00:00)")
    return (moment - _EPOCH) // _MS
