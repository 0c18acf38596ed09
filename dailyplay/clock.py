"""Time as integer milliseconds since the epoch (UTC), and its ISO 8601 text forms."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def now_ms() -> int:
    """The current time in whole milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000


_TWO_DIGITS = [f"{n:02d}" for n in range(100)]
_THREE_DIGITS = [f"{n:03d}" for n in range(1000)]
_dates: dict[int, str] = {}  # day since the epoch -> "YYYY-MM-DDT"


def iso_from_ms(ms: int | None) -> str | None:
    """`2026-02-17T12:00:00.000Z` for a millisecond timestamp (None stays None)."""
    if ms is None:
        return None
    # Integer arithmetic throughout: no float rounding near a second's end. Answers name a few
    # distinct days (today, expiry days), so each day's date text is formatted once.
    day, in_day = divmod(ms, DAY_MS)
    date = _dates.get(day)
    if date is None:
        moment = _EPOCH + timedelta(days=day)
        date = f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T"
        if len(_dates) >= 4096:
            _dates.clear()
        _dates[day] = date
    seconds, millis = divmod(in_day, 1000)
    minutes, second = divmod(seconds, 60)
    hour, minute = divmod(minutes, 60)
    return (
        f"{date}{_TWO_DIGITS[hour]}:{_TWO_DIGITS[minute]}:{_TWO_DIGITS[second]}"
        f".{_THREE_DIGITS[millis]}Z"
    )


# RFC 3339 section 5.6 date-time, ASCII digits only; "t", "z" may be lowercase (section 5.6 note).
_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?"
    r"(?:[Zz]|([+-])([0-9]{2}):([0-9]{2}))"
)
# The last instant the API writes back (its times have four-digit years).
MAX_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
_DAYS_IN_MONTH = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _is_leap(year: int) -> bool:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 in the proleptic Gregorian calendar (any year, including 0)."""
    year -= month <= 2
    era = year // 400
    year_of_era = year - era * 400
    day_of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146_097 + day_of_era - 719_468


def ms_from_iso(text: str) -> int:
    """Milliseconds for an RFC 3339 date-time (explicit offset required); ValueError otherwise.

    Accepts exactly what JSON Schema's `date-time` format accepts, including years 0000-9999,
    lowercase t/z and a leap second (23:59:60 UTC, counted as the next second's start).
    """
    match = _RFC3339.fullmatch(text) if isinstance(text, str) and len(text) <= 64 else None
    if match is None:
        raise ValueError("not an RFC 3339 date-time such as 2027-01-01T00:00:00Z")
    year, month, day, hour, minute, second = (int(match.group(n)) for n in range(1, 7))
    fraction, sign, offset_hours, offset_minutes = match.group(7, 8, 9, 10)
    offset = 0
    if sign is not None:
        if int(offset_hours) > 23 or int(offset_minutes) > 59:
            raise ValueError("the UTC offset is out of range")
        offset = (int(offset_hours) * 60 + int(offset_minutes)) * (1 if sign == "+" else -1)
    if not 1 <= month <= 12:
        raise ValueError("the month is out of range")
    days_in_month = _DAYS_IN_MONTH[month - 1] + (month == 2 and _is_leap(year))
    if not 1 <= day <= days_in_month or hour > 23 or minute > 59 or second > 60:
        raise ValueError("the date or time is out of range")
    if second == 60 and (hour * 60 + minute - offset) % 1440 != 23 * 60 + 59:
        raise ValueError("a leap second is only valid at 23:59:60 UTC")
    milliseconds = int((fraction or "0")[:3].ljust(3, "0"))
    minutes = (_days_from_civil(year, month, day) * 24 + hour) * 60 + minute - offset
    return (minutes * 60 + second) * 1000 + milliseconds
