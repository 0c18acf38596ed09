"""create_app(settings) -> Starlette: routes, middleware, error handlers and the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
from collections.abc import AsyncIterator
from importlib import resources

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from . import __version__, config
from .api import Services, client_ip, handle_org_api_keys
from .auth import JwtVerifier
from .background import running
from .clock import now_ms
from .counters import counters_for
from .deadlines import Deadlines
from .errors import ApiError
from .keys import ApiKeyVerifier, KeyStates
from .logs import RequestLines, RequestLogMiddleware
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics
from .metrics import flushing as flushing_metrics
from .openapi import document_for, render_reference
from .ratelimit import FailedAuthLimiter, KeyRateLimiter, PublicRateLimiter, flushing
from .responses import JsonResponse
from .retention import run_retention
from .storage import SCHEMA_VERSION, Store, store_for
from .storage.errors import StorageBusy, StorageError, StorageFull

log = logging.getLogger("dailyplay")

RATE_LIMIT_HEADERS = [
    "Retry-After",
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
]


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> JsonResponse:
    """The JSON error envelope used for every non-2xx answer."""
    return JsonResponse({"success": False, "error": message}, status_code=status, headers=headers)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.message, exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    messages = {404: "not found", 405: "method not allowed"}
    message = messages.get(exc.status_code, str(exc.detail))
    return error_response(exc.status_code, message, dict(exc.headers or {}))


# How long a client is asked to wait when the disk is full: freeing space takes an operator.
FULL_RETRY_AFTER_SECONDS = 60


# How long a client is asked to wait when the database cannot be reached or written.
UNAVAILABLE_RETRY_AFTER_SECONDS = 5


async def _database_error(request: Request, exc: Exception) -> Response:
    # Another process held the write lock past database.busy_timeout_ms: the client may retry.
    if isinstance(exc, StorageBusy):
        log.warning("database busy on %s %s: %s", request.method, request.url.path, exc)
        request.app.state.services.metrics.busy_errors.inc()
        return error_response(
            503, "the database is busy; try again shortly", headers={"Retry-After": "1"}
        )
    services = request.app.state.services
    # The disk (or the file system's quota) is full: nothing can be written until an operator
    # frees space. Reads go on. Not a fault in this program: one line, no traceback.
    # (The storage has noted it, for /readyz.)
    if isinstance(exc, StorageFull):
        log.error(
            "database or disk is full: %s %s refused; free space on the disk of %s",
            request.method, request.url.path, services.settings.database.display,
        )  # fmt: skip
        return error_response(
            503,
            "the server's storage is full, so nothing can be stored; try again later",
            headers={"Retry-After": str(FULL_RETRY_AFTER_SECONDS)},
        )
    # Read-only, an I/O error, a database server out of reach: nothing was stored; one line.
    log.error("database unavailable: %s %s refused: %s", request.method, request.url.path, exc)
    return error_response(
        503,
        "the database is unavailable, so nothing was done; try again shortly",
        headers={"Retry-After": str(UNAVAILABLE_RETRY_AFTER_SECONDS)},
    )


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal server error")


class JsonCORSMiddleware(CORSMiddleware):
    """Starlette's CORS, with a refused preflight answered in the API's JSON error shape."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code >= 400:
            message = bytes(response.body).decode("utf-8", "replace") or "CORS preflight refused"
            headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
            headers.pop("content-type", None)
            return error_response(response.status_code, message, headers)
        return response


class Capacity:
    """How many requests this worker may have in progress, and how many it has."""

    def __init__(self, limit: int):
        self.limit = limit
        self.active = 0


class ConcurrencyLimit:
    """At most `capacity.limit` requests in progress in this worker; past it, an immediate
    JSON 503. Every layer of this kind given the same Capacity counts against it.

    Under overload a quick refusal with Retry-After is better than queueing work until
    clients time out and memory grows with the queue.
    """

    def __init__(self, app: ASGIApp, capacity: Capacity):
        self.app = app
        self.capacity = capacity

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        capacity = self.capacity
        # Liveness is answered even at capacity: a busy process is not a dead one.
        if capacity.active >= capacity.limit and scope["path"] != "/healthz":
            response = error_response(
                503, "the server is at capacity; try again shortly", {"Retry-After": "1"}
            )
            await response(scope, receive, send)
            return
        capacity.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            capacity.active -= 1


# The exception handlers of every route; anything else is an unhandled error (500).
ERROR_HANDLERS = {
    ApiError: _api_error,
    HTTPException: _http_error,
    StorageError: _database_error,
}


async def error_answer(request: Request, exc: Exception) -> Response:
    """The answer for what a handler raised, as Starlette's exception handling would pick it
    (the handler of the nearest class in the exception's MRO)."""
    for cls in type(exc).__mro__:
        handler = ERROR_HANDLERS.get(cls)
        if handler is not None:
            return await handler(request, exc)
    return await _server_error(request, exc)


class OrgApiKeysEndpoint:
    """The API's one route as a plain ASGI endpoint, so that every method reaches the
    dispatcher, which answers 405 with the Allow header of the chosen action (Starlette's would
    list one set for the path). What the dispatcher raises is answered here, with the same
    handlers as every other route."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            response = await handle_org_api_keys(request)
        except Exception as exc:
            response = await error_answer(request, exc)
        await response(scope, receive, send)


API_PATH = "/api/org-api-keys"


class DailyPlayApp(Starlette):
    """Starlette, with the API's route reached directly.

    Every game launch goes through API_PATH, so it skips Starlette's error middleware, its
    exception middleware and the router, which only pass the request on (3.7 % of
    validate-session's instructions, and six coroutine frames fewer to resume at each await):
    OrgApiKeysEndpoint answers what the dispatcher raises itself. The request-id and log,
    concurrency and CORS layers wrap it as they wrap every other route: same classes, same
    settings, one shared Capacity. Any other path, and the lifespan, go through the whole
    Starlette stack.
    """

    api: ASGIApp | None = None
    # This process's request lines on their way to stderr (see dailyplay.logs.RequestLines).
    request_lines: RequestLines | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.api is not None
            and scope["type"] == "http"
            and scope["path"] == API_PATH
            and not scope.get("root_path")
        ):
            scope["app"] = self
            await self.api(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


# The reference page runs no scripts and loads nothing from elsewhere.
DOCS_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
}


def document_routes(settings: config.Settings) -> list[Route]:
    """GET / (where to go from here), and GET /openapi.json and GET /docs, both rendered once
    from the shipped document."""
    doc = document_for(settings)
    document = JsonResponse(doc).body
    page = render_reference(doc)
    metrics_here = settings.metrics.enabled and settings.metrics.port == 0
    index = JsonResponse(
        {
            "success": True,
            "data": {
                "service": "dailyplay",
                "version": __version__,
                "links": {
                    "docs": "/docs",
                    "openapi": "/openapi.json",
                    "api": API_PATH,
                    "healthz": "/healthz",
                    "readyz": "/readyz",
                    "metrics": "/metrics" if metrics_here else None,
                    "sdk": "/sdk/dailyplay.js",
                },
            },
        }
    ).body

    async def index_page(request: Request) -> Response:
        return Response(index, media_type="application/json")

    async def openapi_document(request: Request) -> Response:
        return Response(document, media_type="application/json")

    async def reference_page(request: Request) -> Response:
        return HTMLResponse(page, headers=DOCS_HEADERS)

    return [
        Route("/", index_page, methods=["GET"]),
        Route("/openapi.json", openapi_document, methods=["GET"]),
        Route("/docs", reference_page, methods=["GET"]),
    ]


# Longest a readiness check waits for its write before answering 503.
READY_TIMEOUT_SECONDS = 5.0


def health_routes() -> list[Route]:
    """GET /healthz (the process answers) and GET /readyz (the database takes reads and writes
    and has this program's schema)."""

    async def healthz(request: Request) -> Response:
        return JsonResponse({"success": True, "data": {"status": "ok"}})

    async def readyz(request: Request) -> Response:
        db: Store = request.app.state.services.db
        try:
            async with asyncio.timeout(READY_TIMEOUT_SECONDS):
                version = await db.schema_version()
        except TimeoutError:
            return _not_ready(f"a database read took longer than {READY_TIMEOUT_SECONDS:g} s")
        except StorageError as exc:
            return _not_ready(f"database cannot be read: {exc}")
        if version != SCHEMA_VERSION:
            return _not_ready(
                f"database schema version is {version}, this program needs {SCHEMA_VERSION}"
            )
        try:
            async with asyncio.timeout(READY_TIMEOUT_SECONDS):
                await db.probe_write(now_ms())
        except TimeoutError:
            return _not_ready(f"a database write took longer than {READY_TIMEOUT_SECONDS:g} s")
        except StorageError as exc:
            return _not_ready(f"database cannot be written: {exc}")
        # The probe rewrites a row in place, which a full disk still allows: a write refused
        # for want of space a moment ago says more.
        since_full = db.seconds_since_full()
        if since_full is not None and since_full < FULL_RETRY_AFTER_SECONDS:
            return _not_ready(
                f"the disk is full: a write was refused for want of space {since_full:.0f} s ago"
            )
        return JsonResponse(
            {"success": True, "data": {"status": "ready", "schema_version": version}}
        )

    return [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
    ]


SDK_HEADERS = {
    "Cache-Control": "public, max-age=3600",
    "X-Content-Type-Options": "nosniff",
    # Game pages on other origins load it with a plain <script> tag.
    "Cross-Origin-Resource-Policy": "cross-origin",
}


def sdk_routes() -> list[Route]:
    """GET /sdk/dailyplay.js: the browser SDK for game pages (shipped in the package)."""
    script = resources.files("dailyplay").joinpath("sdk/dailyplay.js").read_bytes()

    async def browser_sdk(request: Request) -> Response:
        return Response(script, media_type="text/javascript", headers=SDK_HEADERS)

    return [Route("/sdk/dailyplay.js", browser_sdk, methods=["GET"])]


def metrics_routes(metrics: Metrics) -> list[Route]:
    """GET /metrics: the Prometheus text exposition (of every worker, with several)."""

    async def exposition(request: Request) -> Response:
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    return [Route("/metrics", exposition, methods=["GET"])]


def _not_ready(reason: str) -> Response:
    log.warning("not ready: %s", reason)
    return error_response(503, f"not ready: {reason}", {"Retry-After": "5"})


def create_app(settings: config.Settings | None = None) -> DailyPlayApp:
    """The ASGI application for one process; resources open in its lifespan."""
    settings = settings or config.load()
    jwt_verifier = JwtVerifier(settings.auth)  # fails fast on a bad key file
    trusted = [ipaddress.ip_network(p, strict=False) for p in settings.server.trusted_proxies]
    metrics = Metrics()
    # With metrics off nothing reads them: skip the per-request and per-commit observations.
    observed = metrics if settings.metrics.enabled else None
    lines = RequestLines(
        settings.server.log_format, on_drop=observed.log_line_dropped if observed else None
    )
    try:
        counters = counters_for(
            settings.limits.storage_uri,
            settings.limits.storage_timeout_ms,
            observed.limits_storage_error if observed else None,
        )
    except ValueError as exc:
        raise config.ConfigError(str(exc)) from None

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        db = store_for(settings.database, observed.observe_commit if observed else None)
        await db.open()
        key_limiter = KeyRateLimiter(db, counters)
        app.state.services = Services(
            settings=settings,
            db=db,
            key_verifier=ApiKeyVerifier(db),
            key_states=KeyStates(),
            jwt=jwt_verifier,
            key_limiter=key_limiter,
            public_limiter=PublicRateLimiter(settings.limits.public_per_minute, counters),
            auth_failures=FailedAuthLimiter(settings.limits.failed_auth_per_minute, counters),
            trusted_proxies=trusted,
            metrics=metrics,
            deadlines=Deadlines(),
        )
        # Everything made so far lives as long as the process: keep it out of the collector's
        # full passes, which otherwise walk it every few seconds under load (tens of ms each).
        gc.freeze()
        lines.start()
        try:
            async with (
                running(
                    run_retention(
                        db, settings.sessions.retention_days, settings.sessions.idempotency_hours
                    )
                ),
                flushing(key_limiter),
                flushing_metrics(metrics),
                running(counters.watch()),
            ):
                yield
        finally:
            await counters.close()
            app.state.services.deadlines.close()
            await jwt_verifier.aclose()
            await db.close()
            lines.close()

    def logged_client_ip(scope: Scope) -> str:
        return client_ip(Request(scope), trusted)

    middleware = [
        Middleware(RequestLogMiddleware, client_ip=logged_client_ip, metrics=observed, lines=lines),
        Middleware(ConcurrencyLimit, capacity=Capacity(settings.server.max_concurrent_requests)),
    ]
    if settings.cors.allow_origins:
        middleware.append(
            Middleware(
                JsonCORSMiddleware,
                allow_origins=settings.cors.allow_origins,
                allow_methods=["GET", "POST", "PATCH", "DELETE"],
                allow_headers=["authorization", "content-type", "x-api-key", "x-request-id"],
                expose_headers=[*RATE_LIMIT_HEADERS, "X-Request-ID"],
                max_age=600,
            )
        )
    endpoint = OrgApiKeysEndpoint()
    routes = [
        Route(API_PATH, endpoint),
        *document_routes(settings),
        *health_routes(),
        *sdk_routes(),
    ]
    if settings.metrics.enabled and settings.metrics.port == 0:
        routes += metrics_routes(metrics)
    app = DailyPlayApp(
        routes=routes,
        middleware=middleware,
        exception_handlers={**ERROR_HANDLERS, Exception: _server_error},
        lifespan=lifespan,
    )
    app.router.redirect_slashes = False
    # The same layers, innermost last, around the endpoint alone.
    api: ASGIApp = endpoint
    for layer in reversed(middleware):
        api = layer.cls(api, *layer.args, **layer.kwargs)
    app.api = api
    app.request_lines = lines
    return app


def app_from_environment() -> Starlette:
    """uvicorn factory for `dailyplay serve`: settings from DAILYPLAY_CONFIG and DAILYPLAY_* env."""
    return create_app(config.load())
