"""The one error type the API raises, and the one JSON shape every error response has."""

from __future__ import annotations

from collections.abc import Mapping


class ApiError(Exception):
    """A client's error (or a chosen 5xx), answered as {"success": false, "error": message}."""

    def __init__(
        self,
        status: int,
        message: str,
        headers: Mapping[str, str] | None = None,
        *,
        kind: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})
        # What went wrong, for the metrics (one of metrics.AUTH_FAILURES, RATE_LIMITS or
        # SESSION_REJECTIONS); never shown to the client.
        self.kind = kind
