"""Where rate-limit counts live: in this process, or in Redis shared by every process and host.

Both are `limits` async storages (limits.aio.storage.Storage), so limits' fixed-window strategy
counts on either the same way. Both also have take(): one hit counted in several windows at
once, or in none of them when one is used up, with a lockout window checked on the way. On
Redis that is one Lua script, one round trip; limits has no call that counts several windows
at once, and counting them one by one would either take a round trip each or count a refused
request in the windows that still had room.

Windows are fixed and aligned to the clock: a window's number (minute or UTC day since the
epoch) is part of its counter's key, so every process and host counts the same window.

SharedCounters keeps a copy of every count Redis answered with. When Redis fails or is slower
than the timeout, requests are counted in that copy instead (limits then hold per process, not
across them), one warning is logged per interval, the metric counts the errors, and a
background probe switches back to Redis once it answers again.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ClassVar, TypeVar

from limits import RateLimitItem, RateLimitItemPerDay, RateLimitItemPerMinute
from limits.aio.storage import Storage

from .batch import Batcher
from .clock import DAY_MS, MINUTE_MS
from .config import library_uri, uri_display

log = logging.getLogger("dailyplay.ratelimit")

SPANS = {"minute": MINUTE_MS, "day": DAY_MS}

# Every key shares one hash tag, so that the take script's keys are on one node of a cluster.
KEY_PREFIX = "dailyplay:{limits}"

# Seconds between probes of an unreachable Redis, and between warnings while it stays so.
PROBE_SECONDS = 5.0
WARN_SECONDS = 60.0

T = TypeVar("T")

# A script run: ((sha, source), keys, args).
_ScriptCall = tuple[tuple[str, str], list[str], list[Any]]


class Window:
    """One clock-aligned fixed window of a span for a limit amount, for one subject."""

    __slots__ = ("amount", "item", "period", "reset_ms", "span", "storage_key")

    def __init__(
        self, span: str, amount: int, now_ms: int, subject: str = "", *, by_amount: bool = True
    ):
        """by_amount=False: the counter's key leaves the amount out, so that the count goes on
        when the amount changes (an API key's limits); limits' strategies put it in."""
        self.span = span
        length_ms = SPANS[span]
        self.period = now_ms // length_ms
        self.reset_ms = (self.period + 1) * length_ms
        self.item: RateLimitItem = (
            RateLimitItemPerMinute(amount) if span == "minute" else RateLimitItemPerDay(amount)
        )
        self.amount = amount
        # The counter's key in the storage, as limits' strategies name it.
        self.storage_key = (
            self.item.key_for(*self.identifiers(subject))
            if by_amount
            else f"{self.item.namespace}/{subject}/{self.period}/{span}"
        )

    def identifiers(self, subject: str) -> tuple[str, str]:
        return subject, str(self.period)

    def expiry_seconds(self, now_ms: int) -> float:
        return (self.reset_ms - now_ms) / 1000 + 1


class LocalCounts:
    """Plain counters in a dict, expired lazily; used from the event loop's thread only.

    limits' own MemoryStorage starts a timer thread about every 10 ms while it is being hit,
    and each run walks every key, so its cost per hit grows with the number of active keys
    (and the thread competes for the GIL). Here each counter's expiry goes on a heap when the
    counter is created; every call first drops the counters whose time has passed (amortised
    O(log n) per counter over its whole life, nothing per hit), so the cost of a hit does not
    depend on how many keys are active.
    """

    def __init__(self) -> None:
        self._counts: dict[str, list[float]] = {}  # key -> [count, expires_at (monotonic)]
        self._expiries: list[tuple[float, str]] = []

    def _expire(self, now: float) -> None:
        expiries, counts = self._expiries, self._counts
        while expiries and expiries[0][0] <= now:
            at, key = heapq.heappop(expiries)
            entry = counts.get(key)
            if entry is not None and entry[1] == at:
                del counts[key]

    def _entry(self, key: str, expiry: float, now: float) -> list[float]:
        entry = self._counts.get(key)
        if entry is None:
            entry = self._counts[key] = [0, now + expiry]
            heapq.heappush(self._expiries, (entry[1], key))
        return entry

    def incr(self, key: str, expiry: float, amount: int = 1) -> int:
        now = time.monotonic()
        self._expire(now)
        entry = self._entry(key, expiry, now)
        entry[0] += amount
        return int(entry[0])

    def raise_to(self, key: str, count: int, expiry: float) -> None:
        """The counter at least `count` (what a shared storage answered)."""
        now = time.monotonic()
        self._expire(now)
        entry = self._entry(key, expiry, now)
        if entry[0] < count:
            entry[0] = count

    def take(
        self, windows: Sequence[Window], now_ms: int, lockout: Window | None = None
    ) -> list[int] | Window:
        """One hit counted in every window, or in none of them when one is used up (the
        fixed-window rule of limits' strategy, as in test() then hit() for each window, with one
        expiry pass), refused too when `lockout` is used up: the counts after the hit, or the
        window that was used up."""
        now = time.monotonic()
        self._expire(now)
        counts = self._counts
        if lockout is not None:
            entry = counts.get(lockout.storage_key)
            if entry is not None and entry[0] >= lockout.amount:
                return lockout
        for window in windows:
            entry = counts.get(window.storage_key)
            if entry is not None and entry[0] >= window.amount:
                return window
        used = []
        for window in windows:
            entry = self._entry(window.storage_key, window.expiry_seconds(now_ms), now)
            entry[0] += 1
            used.append(int(entry[0]))
        return used

    def get(self, key: str) -> int:
        self._expire(time.monotonic())
        entry = self._counts.get(key)
        return 0 if entry is None else int(entry[0])

    def seconds_left(self, key: str) -> float:
        now = time.monotonic()
        self._expire(now)
        entry = self._counts.get(key)
        return 0.0 if entry is None else entry[1] - now

    def reset(self) -> int:
        cleared = len(self._counts)
        self._counts.clear()
        self._expiries.clear()
        return cleared

    def clear(self, key: str) -> None:
        self._counts.pop(key, None)


class LocalCounters(Storage):
    """The counts of this process only: nothing else to run (limits.storage_uri empty)."""

    # limits declares this as an instance variable, though it reads it from the class
    STORAGE_SCHEME: ClassVar[list[str]] = ["async+dailyplay-local"]  # type: ignore[misc]
    shared = False

    def __init__(self, uri: str | None = None, wrap_exceptions: bool = False, **options: str):
        self.counts = LocalCounts()
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)

    @property
    def base_exceptions(self) -> type[Exception]:
        return ValueError

    @property
    def state(self) -> str:
        return "local"

    def peek(self, key: str) -> int:
        """The count as this process knows it, without waiting for anything."""
        return self.counts.get(key)

    async def take(
        self, windows: Sequence[Window], now_ms: int, lockout: Window | None = None
    ) -> list[int] | Window:
        return self.counts.take(windows, now_ms, lockout)

    async def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        return self.counts.incr(key, expiry, amount)

    async def get(self, key: str) -> int:
        return self.counts.get(key)

    async def get_expiry(self, key: str) -> float:
        return time.time() + self.counts.seconds_left(key)

    async def check(self) -> bool:
        return True

    async def reset(self) -> int:
        return self.counts.reset()

    async def clear(self, key: str) -> None:
        self.counts.clear(key)

    async def watch(self) -> None:
        """Nothing to watch in this process."""

    async def close(self) -> None:
        """Nothing to close."""


# KEYS: the windows to count, then the lockout (if any). ARGV[1]: how many of KEYS to count;
# then, for each key, its limit and its expiry in whole seconds. Nothing is counted when any
# key is at its limit: the answer is {index of that key, its count}; otherwise every counted
# key gains one and the answer is {0, count of each key}.
TAKE_SCRIPT = """
local counted = tonumber(ARGV[1])
local counts = {}
for i, key in ipairs(KEYS) do
  local count = tonumber(redis.call('get', key) or '0')
  if count >= tonumber(ARGV[2 * i]) then
    return {i, count}
  end
  counts[i] = count
end
for i = 1, counted do
  local count = redis.call('incrby', KEYS[i], 1)
  if count == 1 then
    redis.call('expire', KEYS[i], ARGV[2 * i + 1])
  end
  counts[i] = count
end
return {0, unpack(counts)}
"""


def redis_storage(uri: str, timeout_seconds: float) -> Storage:
    """limits' async Redis storage for a limits.storage_uri, on redis-py's client, with every
    wait (connecting, each command) bounded by the timeout and no retries of its own."""
    from limits.errors import ConfigurationError
    from limits.storage import storage_from_string

    try:
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
    except ImportError:
        raise ValueError(
            "limits.storage_uri needs the redis package: pip install 'dailyplay[redis]'"
        ) from None
    options: dict[str, Any] = {
        "implementation": "redispy",
        "key_prefix": KEY_PREFIX,
        "socket_timeout": timeout_seconds,
        "socket_connect_timeout": timeout_seconds,
        "retry": Retry(NoBackoff(), 0),
    }
    try:
        storage = storage_from_string(library_uri(uri), **options)
    except ConfigurationError as exc:
        raise ValueError(f"limits.storage_uri cannot be used: {exc}") from None
    if not isinstance(storage, Storage):
        raise ValueError("limits.storage_uri does not name an async storage")
    return storage


class SharedCounters(Storage):
    """Counts in Redis (limits' async storage), shared by every process and host; counted in
    this process while Redis does not answer (see the module's docstring)."""

    STORAGE_SCHEME: ClassVar[list[str]] = ["async+dailyplay-shared"]  # type: ignore[misc]
    shared = True

    def __init__(
        self,
        uri: str,
        timeout_ms: int,
        on_error: Callable[[], None] | None = None,
        probe_seconds: float = PROBE_SECONDS,
    ):
        super().__init__(None)
        self._timeout = timeout_ms / 1000
        self._redis = redis_storage(uri, self._timeout)
        self._display = uri_display(uri)
        self._on_error = on_error
        self._probe_seconds = probe_seconds
        self.counts = LocalCounts()  # Redis's answers, and this process's counts while it fails
        bridge = self._redis.bridge  # type: ignore[attr-defined]
        self._client = bridge.get_connection()
        self._prefixed: Callable[[str], str] = bridge.prefixed_key
        # (sha, source) of the scripts: take's, and limits' own for incr.
        self._take_script = _script(TAKE_SCRIPT)
        self._incr_script = _script(bridge.SCRIPT_INCR_EXPIRE)
        self._calls: Batcher[_ScriptCall, Any] = Batcher(self._pipeline)
        from redis.exceptions import NoScriptError  # redis_storage() made sure it is there

        self._no_script: type[Exception] = NoScriptError
        self._down = False
        self._errors = 0  # since the last warning
        self._warned_at = 0.0

    @property
    def base_exceptions(self) -> type[Exception]:
        return ValueError  # every storage error is answered from this process's counts

    @property
    def state(self) -> str:
        return "local (shared storage unreachable)" if self._down else "shared"

    def peek(self, key: str) -> int:
        return self.counts.get(key)

    def _failed(self, exc: BaseException) -> None:
        if self._on_error is not None:
            self._on_error()
        self._errors += 1
        now = time.monotonic()
        if not self._down:
            self._down = True
            self._warned_at, self._errors = now, 0
            log.warning(
                "rate-limit storage %s failed (%s); counting in this process until it "
                "answers again (checked every %g s)",
                self._display,
                _describe(exc),
                self._probe_seconds,
            )
        elif now - self._warned_at >= WARN_SECONDS:
            log.warning(
                "rate-limit storage %s still failing (%s); %d errors in the last %.0f s",
                self._display,
                _describe(exc),
                self._errors,
                now - self._warned_at,
            )
            self._warned_at, self._errors = now, 0

    def _run(self, script: tuple[str, str], keys: list[str], args: list[Any]) -> Awaitable[Any]:
        """A script run on Redis, in the pipeline of this loop turn's runs."""
        return self._calls.submit((script, keys, args))

    async def _pipeline(self, calls: list[_ScriptCall]) -> list[Any]:
        """Every call's answer (or its own error), from one pipeline: one round trip. A script
        Redis does not know yet (a new or restarted server) is loaded, and its calls sent
        again."""
        answers = await self._send(calls)
        unknown = [n for n, answer in enumerate(answers) if isinstance(answer, self._no_script)]
        if unknown:
            for source in {calls[n][0][1] for n in unknown}:
                await self._client.script_load(source)
            again = await self._send([calls[n] for n in unknown])
            for n, answer in zip(unknown, again, strict=True):
                answers[n] = answer
        return answers

    async def _send(self, calls: list[_ScriptCall]) -> list[Any]:
        async with self._client.pipeline(transaction=False) as pipe:
            for (sha, _source), keys, args in calls:
                pipe.evalsha(sha, len(keys), *keys, *args)
            return list(await pipe.execute(raise_on_error=False))

    async def _shared(self, work: Callable[[], Awaitable[T]], fallback: Callable[[], T]) -> T:
        """work() on Redis within the timeout; fallback() when Redis is down or fails now."""
        if self._down:
            return fallback()
        try:
            async with asyncio.timeout(self._timeout):
                return await work()
        except Exception as exc:  # whatever the client raised: the policy is the same
            self._failed(exc)
            return fallback()

    async def take(
        self, windows: Sequence[Window], now_ms: int, lockout: Window | None = None
    ) -> list[int] | Window:
        keys = [self._prefixed(window.storage_key) for window in windows]
        every = list(windows)
        if lockout is not None:
            keys.append(self._prefixed(lockout.storage_key))
            every.append(lockout)
        args: list[int] = [len(windows)]
        for window in every:
            args += (window.amount, math.ceil(window.expiry_seconds(now_ms)))

        async def on_redis() -> list[int] | Window:
            answer = [int(n) for n in await self._run(self._take_script, keys, args)]
            if answer[0]:
                refused = every[answer[0] - 1]
                self.counts.raise_to(refused.storage_key, answer[1], refused.expiry_seconds(now_ms))
                return refused
            for window, count in zip(every, answer[1:], strict=True):
                self.counts.raise_to(window.storage_key, count, window.expiry_seconds(now_ms))
            return answer[1 : len(windows) + 1]

        return await self._shared(on_redis, lambda: self.counts.take(windows, now_ms, lockout))

    async def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        async def on_redis() -> int:
            count = int(await self._run(self._incr_script, [self._prefixed(key)], [expiry, amount]))
            self.counts.raise_to(key, count, expiry)
            return count

        return await self._shared(on_redis, lambda: self.counts.incr(key, expiry, amount))

    async def get(self, key: str) -> int:
        return await self._shared(lambda: self._redis.get(key), lambda: self.counts.get(key))

    async def get_expiry(self, key: str) -> float:
        return await self._shared(
            lambda: self._redis.get_expiry(key),
            lambda: time.time() + self.counts.seconds_left(key),
        )

    async def check(self) -> bool:
        try:
            async with asyncio.timeout(self._timeout):
                return bool(await self._redis.check())
        except Exception:
            return False

    async def reset(self) -> int | None:
        self.counts.reset()
        return await self._redis.reset()

    async def clear(self, key: str) -> None:
        self.counts.clear(key)
        await self._redis.clear(key)

    async def watch(self) -> None:
        """Until cancelled: while Redis is down, PING it every probe interval and switch back to
        it when it answers."""
        while True:
            await asyncio.sleep(self._probe_seconds)
            if not self._down:
                continue
            try:
                async with asyncio.timeout(self._timeout):
                    answered = bool(await self._redis.check())
            except Exception as exc:
                self._failed(exc)
                continue
            if answered:
                self._down = False
                log.warning(
                    "rate-limit storage %s answers again; limits are shared again",
                    self._display,
                )
            else:
                self._failed(RuntimeError("PING was not answered"))

    async def close(self) -> None:
        """Close the client's connections (after the pipelines already sent)."""
        try:
            await self._calls.drain()
            await self._client.aclose()
        except Exception as exc:
            log.debug("closing the rate-limit storage's connections: %s", exc)


def _script(source: str | bytes) -> tuple[str, str]:
    """(sha, source): what EVALSHA names a script by, and what loads it."""
    text = source.decode() if isinstance(source, bytes) else source
    return hashlib.sha1(text.encode()).hexdigest(), text  # noqa: S324 - Redis's script id


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer within the timeout"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def counters_for(
    storage_uri: str, timeout_ms: int, on_error: Callable[[], None] | None = None
) -> LocalCounters | SharedCounters:
    """The counters limits.storage_uri asks for: this process's when it is empty."""
    if not storage_uri:
        return LocalCounters()
    return SharedCounters(storage_uri, timeout_ms, on_error)
