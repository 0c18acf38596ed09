"""The one error type the API raises, and the one JSON shape every error response has."""

from __future__ import annotations

from collections.abc import Mapping


class ApiError(Exception):
    """An error a client caused (or a 5xx we chose), answered as {"success": false, "error": ...}."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})

