"""The ceiling: a bare Starlette app with one JSON route, served by the same uvicorn settings."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


async def endpoint(request: Request) -> JSONResponse:
    if request.method == "POST":
        body = await request.json()
        return JSONResponse({"success": True, "data": body})
    return JSONResponse({"success": True, "data": {"valid": True}})


app = Starlette(routes=[Route("/bare", endpoint, methods=["GET", "POST"])])
