"""Prometheus metrics: what the service counts, and the text exposition at GET /metrics.

With several worker processes each keeps its numbers in memory-mapped files in one directory
(prometheus-client's multiprocess mode, chosen by PROMETHEUS_MULTIPROC_DIR before the library is
first imported; `dailyplay serve` sets it), and a scrape answered by any worker sums them all.
Without that variable (one process, tests) the numbers live in this process only.

On the request path nothing touches prometheus-client: counts and observations are tallied in
plain dicts and added to its values by `flush()` (every FLUSH_SECONDS, before every exposition
this process renders, and at shutdown). In multiprocess mode each value update takes a lock,
calls getpid() and writes the memory-mapped file: done per request, that was about a tenth of a
validate request's time. A scrape answered by one worker therefore sees the others' numbers as
of their last flush, at most about a second old.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from bisect import bisect_left
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, values
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

from .background import running
from .operations import operation_name

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST

# The `operation` label: the API's operations (operations.operation_name), the other routes, and
# "other" for anything else, so that no caller can make new label values (series) up.
ROUTES = {
    "/": "index",
    "/healthz": "healthz",
    "/readyz": "readyz",
    "/metrics": "metrics",
    "/openapi.json": "openapi",
    "/docs": "docs",
    "/sdk/dailyplay.js": "sdk",
}
API_PATH = "/api/org-api-keys"

# ApiError.kind -> which counter counts it.
AUTH_FAILURES = frozenset(
    {
        "api_key_missing",
        "api_key_malformed",
        "api_key_invalid",
        "api_key_revoked",
        "api_key_expired",
        "org_not_business",
        "bearer_missing",
        "bearer_invalid",
        "bearer_expired",
        "bearer_not_configured",
        "not_member",
        "not_admin",
    }
)
RATE_LIMITS = frozenset({"key_per_minute", "key_per_day", "client_ip", "failed_auth"})
SESSION_REJECTIONS = frozenset({"not_found", "consumed", "expired", "revoked", "not_allowed"})

log = logging.getLogger("dailyplay.metrics")

# Most time between a count on the request path and its arrival in prometheus-client's values.
FLUSH_SECONDS = 1.0

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
GROUP_SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500)


def operation_label(method: str, path: str, action: str | None) -> str:
    """The bounded `operation` label of a request (action: the query's `action`, if any)."""
    if path == API_PATH:
        return operation_name(method, action)
    return ROUTES.get(path, "other")


class Metrics:
    """The service's counters and histograms, and their exposition."""

    def __init__(self) -> None:
        directory = os.environ.get(MULTIPROCESS_ENV)
        self.registry = CollectorRegistry()
        owner: CollectorRegistry | None = self.registry
        if directory:
            if values.ValueClass is values.MutexValue:
                raise RuntimeError(
                    f"{MULTIPROCESS_ENV} was set after prometheus_client was imported; "
                    "metrics of other worker processes would be missing"
                )
            # prometheus-client leaves this constructor unannotated
            MultiProcessCollector(self.registry, path=directory)  # type: ignore[no-untyped-call]
            owner = None  # values go to the shared files; the collector reads them all
        self.multiprocess = bool(directory)

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labels, registry=owner)

        def histogram(name: str, doc: str, labels: tuple[str, ...], buckets: Any) -> Histogram:
            return Histogram(name, doc, labels, registry=owner, buckets=buckets)

        self.requests = counter(
            "dailyplay_http_requests", "HTTP requests answered", ("operation", "status")
        )
        self.request_seconds = histogram(
            "dailyplay_http_request_duration_seconds",
            "Time from a request's arrival to its last response byte",
            ("operation",),
            LATENCY_BUCKETS,
        )
        self.sessions_created = counter("dailyplay_sessions_created", "Session tokens created")
        self.sessions_validated = counter(
            "dailyplay_sessions_validated", "Validations that found an active (playable) token"
        )
        self.sessions_consumed = counter("dailyplay_sessions_consumed", "Session tokens consumed")
        self.idempotent_replays = counter(
            "dailyplay_idempotent_replays",
            "create-session answers replayed to a retry with the same Idempotency-Key",
        )
        self.sessions_rejected = counter(
            "dailyplay_sessions_rejected",
            "Create, validate or consume requests refused for the token's sake, by reason",
            ("operation", "reason"),
        )
        self.auth_failures = counter(
            "dailyplay_auth_failures", "Failed authentications and authorizations", ("kind",)
        )
        self.rate_limited = counter(
            "dailyplay_rate_limited", "Requests refused with 429, by limit", ("limit",)
        )
        self.commit_seconds = histogram(
            "dailyplay_db_commit_duration_seconds",
            "Group commits: time from taking the write lock to COMMIT returning",
            (),
            LATENCY_BUCKETS,
        )
        self.commit_writes = histogram(
            "dailyplay_db_commit_writes",
            "Writes (requests) sharing one group commit",
            (),
            GROUP_SIZE_BUCKETS,
        )
        self.busy_retries = counter(
            "dailyplay_db_busy_retries",
            "Group commits that found another worker writing and waited for it",
        )
        self.busy_errors = counter(
            "dailyplay_db_busy_errors",
            "Requests answered 503 because the database stayed locked past its timeout",
        )
        self.log_lines_dropped = counter(
            "dailyplay_log_lines_dropped",
            "Request log lines dropped because stderr did not take them in time",
        )
        self.limits_storage_errors = counter(
            "dailyplay_limits_storage_errors",
            "Rate-limit counts that Redis failed or was too slow to answer (counted in the "
            "process instead)",
        )
        # Label children are looked up once per label value, not per request.
        self._per_request: dict[tuple[str, int], tuple[Any, Any]] = {}
        self._errors: dict[tuple[str, str], Any] = {}
        for tallied in (self.commit_seconds, self.commit_writes):
            if not all(hasattr(tallied, a) for a in ("_upper_bounds", "_sum", "_buckets")):
                raise RuntimeError(
                    "this prometheus-client's Histogram keeps its values differently; "
                    "dailyplay.metrics.Metrics.flush needs updating for it"
                )
        # Not yet flushed: counter child -> count; histogram child -> [sum, count per bucket].
        self._counts: dict[Any, int] = {}
        self._observations: dict[Any, list[float]] = {}

    # --- tallies, flushed into prometheus-client ----------------------------------------------

    def _inc(self, child: Any) -> None:
        counts = self._counts
        counts[child] = counts.get(child, 0) + 1

    def _observe(self, child: Any, value: float) -> None:
        tally = self._observations.get(child)
        if tally is None:
            tally = self._observations[child] = [0.0] * (len(child._upper_bounds) + 1)
        tally[0] += value
        # prometheus-client's own rule: the first bucket whose upper bound is >= the value.
        tally[1 + bisect_left(child._upper_bounds, value)] += 1

    def flush(self) -> None:
        """Add everything tallied since the last flush to prometheus-client's values."""
        counts, self._counts = self._counts, {}
        observations, self._observations = self._observations, {}
        for child, count in counts.items():
            child.inc(count)
        for child, tally in observations.items():
            # The histogram's own values: its sum and its (non-cumulative) bucket counters.
            child._sum.inc(tally[0])
            for bucket, in_bucket in zip(child._buckets, tally[1:], strict=True):
                if in_bucket:
                    bucket.inc(in_bucket)

    def session_created(self) -> None:
        self._inc(self.sessions_created)

    def session_consumed(self) -> None:
        self._inc(self.sessions_consumed)

    def idempotent_replay(self) -> None:
        self._inc(self.idempotent_replays)

    def limits_storage_error(self) -> None:
        self._inc(self.limits_storage_errors)

    def log_line_dropped(self) -> None:
        self._inc(self.log_lines_dropped)

    def observe_request(
        self, method: str, path: str, action: str | None, status: int, seconds: float
    ) -> None:
        """One answered request (action: its query's `action`, if any)."""
        operation = operation_label(method, path, action)
        children = self._per_request.get((operation, status))
        if children is None:
            children = (
                self.requests.labels(operation, str(status)),
                self.request_seconds.labels(operation),
            )
            self._per_request[(operation, status)] = children
        self._inc(children[0])
        self._observe(children[1], seconds)

    def observe_error(self, operation: str, kind: str | None) -> None:
        """Count an ApiError by its kind (errors without a counted kind are left out)."""
        if kind is None:
            return
        child = self._errors.get((operation, kind))
        if child is None:
            if kind in AUTH_FAILURES:
                child = self.auth_failures.labels(kind)
            elif kind in RATE_LIMITS:
                child = self.rate_limited.labels(kind)
            elif kind in SESSION_REJECTIONS:
                child = self.sessions_rejected.labels(operation, kind)
            else:
                raise ValueError(f"unknown error kind {kind!r}")
            self._errors[(operation, kind)] = child
        self._inc(child)

    def observe_validation(self, status: str) -> None:
        """A validate-session answer: active counts as validated, the rest as rejected."""
        if status == "active":
            self._inc(self.sessions_validated)
        else:
            self.observe_error("validate-session", status)

    def observe_commit(self, seconds: float, writes: int, waited: bool) -> None:
        self._observe(self.commit_seconds, seconds)
        self._observe(self.commit_writes, writes)
        if waited:
            self._inc(self.busy_retries)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric (all workers' in multiprocess mode)."""
        self.flush()
        return generate_latest(self.registry)


@contextlib.asynccontextmanager
async def flushing(metrics: Metrics, interval: float = FLUSH_SECONDS) -> AsyncIterator[None]:
    """Flush the metrics every `interval` seconds in the background, and once more at the end."""

    async def run() -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                metrics.flush()
            except Exception:
                log.exception("adding up the metrics failed")

    try:
        async with running(run()):
            yield
    finally:
        metrics.flush()
