"""JSON responses, encoded with orjson.

Every answer of the API is a small JSON envelope, and encoding it is on every request's path:
orjson does it in a fraction of the time `json.dumps` takes, with the same compact UTF-8
output Starlette's JSONResponse writes. Text that is already JSON (a session's stored
metadata) goes in as it is, as a `raw_json` fragment, instead of being parsed and encoded again.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
from starlette.responses import Response


def raw_json(text: str) -> orjson.Fragment:
    """Already-serialized JSON text, written into a response unchanged."""
    return orjson.Fragment(text)


class JsonResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        try:
            return orjson.dumps(content)
        except orjson.JSONEncodeError:
            # What orjson declines (an integer past 64 bits, a non-string key) json can still
            # write, exactly as Starlette's JSONResponse would.
            return json.dumps(
                content, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")
            ).encode("utf-8")
