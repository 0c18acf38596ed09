"""JSON responses, encoded with orjson.

Every answer of the API is a small JSON envelope, and encoding it is on every request's path:
orjson does it in a fraction of the time `json.dumps` takes, with the same compact UTF-8
output Starlette's JSONResponse writes. Text that is already JSON (a session's stored
metadata) goes in as it is, as a `raw_json` fragment, instead of being parsed and encoded again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import orjson
from starlette.responses import Response


def raw_json(text: str) -> orjson.Fragment:
    """Already-serialized JSON text, written into a response unchanged."""
    return orjson.Fragment(text)


JSON_CONTENT_TYPE = (b"content-type", b"application/json")


class JsonResponse(Response):
    media_type = "application/json"

    def __init__(
        self, content: Any, status_code: int = 200, headers: Mapping[str, str] | None = None
    ) -> None:
        # Most answers (every validate-session's) carry no headers of their own. For those the
        # header list is built directly: Starlette's init_headers gives the same two headers in
        # the same order, after checks that cannot apply to a JSON body (a text/ media type's
        # charset, the statuses without a body), on every answer.
        self.status_code = status_code
        self.background = None
        self.body = body = self.render(content)
        if headers or status_code < 200 or status_code in (204, 304):
            self.init_headers(headers)
        else:
            self.raw_headers = [(b"content-length", str(len(body)).encode()), JSON_CONTENT_TYPE]

    def render(self, content: Any) -> bytes:
        return json_bytes(content)


def json_bytes(content: Any) -> bytes:
    """content as the bytes of a JsonResponse's body."""
    try:
        return orjson.dumps(content)
    except orjson.JSONEncodeError:
        # What orjson declines (an integer past 64 bits, a non-string key) json can still
        # write, exactly as Starlette's JSONResponse would.
        return json.dumps(
            content, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")
        ).encode("utf-8")
