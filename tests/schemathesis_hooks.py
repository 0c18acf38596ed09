"""schemathesis hooks for DailyPlay (loaded through tests/schemathesis.toml)."""

from __future__ import annotations

from typing import Any

import schemathesis

from dailyplay.clock import iso_from_ms, ms_from_iso, now_ms

DAY_MS = 86_400_000


@schemathesis.hook
def before_call(ctx: Any, case: Any, kwargs: dict[str, Any]) -> None:
    """Keeps generated key expiry times in the future in positive cases.

    "expires_at must be in the future" is a rule of the product (tested by hand in
    test_api_keys.py) that JSON Schema cannot state. A valid past time in a *positive* case is
    moved a day past now; negative cases are sent as generated. before_call is the one hook
    every phase runs (link-built stateful steps skip the generation hooks), and schemathesis
    re-derives the case's metadata from the edited body.
    """
    meta, body = case.meta, case.body
    if meta is None or not meta.generation.mode.is_positive or not isinstance(body, dict):
        return
    value = body.get("expires_at")
    if not isinstance(value, str):
        return
    try:
        past = ms_from_iso(value) <= now_ms()
    except ValueError:
        return
    if past:
        case.body = {**body, "expires_at": iso_from_ms(now_ms() + DAY_MS)}
