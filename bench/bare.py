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


def create() -> Starlette:
    """uvicorn factory, so the ceiling is served exactly as `dailyplay serve` serves."""
    return app


if __name__ == "__main__":
    import argparse

    from dailyplay.cli import serve_with_uvicorn

    parser = argparse.ArgumentParser(prog="python -m bench.bare")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    serve_with_uvicorn(
        "bench.bare:create", host="127.0.0.1", port=args.port, workers=args.workers,
        log_level="warning",
    )  # fmt: skip
