"""The rules of a session token, apart from HTTP and storage: which games and streams a key may
mint tokens for, what state a stored token is in, and what a refused consumption says."""

from __future__ import annotations

from .errors import ApiError
from .storage.types import ListedSession, Session


def check_allowed(value: int | None, allowed: list[int] | None, what: str) -> None:
    """403 when the key has an allow-list for this kind of id and value is not on it."""
    if value is not None and allowed is not None and value not in allowed:
        raise ApiError(
            403, f"this API key may not create sessions for {what} {value}", kind="not_allowed"
        )


def status(session: Session | ListedSession, now: int) -> str:
    """active, consumed, expired or revoked: a token past its expiry reads as expired whatever
    its stored status says, unless it was consumed or revoked first."""
    if session.status == "active" and session.expires_at <= now:
        return "expired"
    return session.status


# The message of a 410 from consume-session, by the token's state.
GONE_MESSAGES = {
    "consumed": "session token has already been consumed",
    "expired": "session token has expired",
    "revoked": "session token has been revoked",
}
