"""SQLite: the group-commit writer thread, the cross-process write lock, the checkpointer."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import functools
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...clock import HOUR_MS
from ...config import DatabaseSettings
from ..errors import ClaimLost, KeyChanged
from ..rows import key_state
from ..types import KeyState, NewSession, Session
from .idempotency import claim_keys, complete_keys
from .schema import _open, checkpoint, checkpoint_to_start_over, is_full, translated
from .statements import CONSUME_SESSIONS, INSERT_SESSION_HEAD, KEY_STATE, SESSION_ROW

log = logging.getLogger("dailyplay.db")

# Most writes one group commit may carry (they share one transaction and one fsync).
MAX_GROUP = 256
# Reads run on the event loop (an indexed lookup costs microseconds, less than a hop to a thread);
# in WAL mode they never wait for writers, so this bound only matters in rare recovery moments.
# The reads of one turn of the loop share a transaction (Database.reader).
READER_BUSY_TIMEOUT_MS = 200

# A write of several statements: runs on the writer thread inside the group's transaction.
Work = Callable[[sqlite3.Connection], Any]


# How long a worker that released the write lock while another was waiting holds back from
# taking it again, at most, so that the other has its turn (WriterLock).
HANDOVER_SECONDS = 0.02


class WriterLock:
    """Orders the writers of all worker processes on one database with flock(2), taking turns.

    SQLite's own busy handler sleeps and polls (tails of hundreds of milliseconds when two
    workers write at once); a process blocked in flock is woken the moment the lock is released.
    flock is not fair, though: a released lock goes to whoever asks first, and the worker that
    released it, still running, usually asks again before the woken one has run. A worker with
    more writes queued could so take it back again and again while the other stayed blocked
    (seen: writes waiting 0.5-0.9 s with two workers under a mixed load). So:
    - a worker about to block first holds a shared lock on a second file (`-writer.wait`), and a
      worker that finds that file held by someone else does not take the free write lock but
      queues behind them;
    - every holder counts its turn in the lock file, and a worker that released the lock while
      another was waiting does not take it again until the count has moved on (the other has
      had its turn), or HANDOVER_SECONDS have passed (the other is not running).
    The lock files live beside the database: closing any descriptor of the database file would
    drop SQLite's POSIX locks on it.
    """

    def __init__(self, database_path: str):
        self._fd = os.open(f"{database_path}-writer.lock", os.O_RDWR | os.O_CREAT, 0o600)
        self._waiting_fd = os.open(f"{database_path}-writer.wait", os.O_RDWR | os.O_CREAT, 0o600)
        self._turn = 0
        # The turn count when this worker released the lock with another waiting, until the
        # other has had its turn.
        self._handed_over: int | None = None

    def _others_waiting(self) -> bool:
        try:
            fcntl.flock(self._waiting_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(self._waiting_fd, fcntl.LOCK_UN)
        return False

    def _wait_for_turn(self) -> None:
        fcntl.flock(self._waiting_fd, fcntl.LOCK_SH)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        finally:
            fcntl.flock(self._waiting_fd, fcntl.LOCK_UN)

    def _take_if_free(self) -> bool:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _last_turn(self) -> int:
        return int.from_bytes(os.pread(self._fd, 8, 0), "little")

    def _let_the_other_go_first(self) -> None:
        handed_over, self._handed_over = self._handed_over, None
        deadline = time.monotonic() + HANDOVER_SECONDS
        while (
            self._last_turn() == handed_over
            and self._others_waiting()
            and time.monotonic() < deadline
        ):
            time.sleep(0.0001)

    def acquire(self) -> bool:
        """Take the lock, blocking until it is this process's turn; True when another process
        held it or was waiting, and this one waited."""
        waited = self._handed_over is not None
        if waited:
            self._let_the_other_go_first()
        if self._others_waiting() or not self._take_if_free():
            self._wait_for_turn()
            waited = True
        self._turn = self._last_turn() + 1
        os.pwrite(self._fd, self._turn.to_bytes(8, "little"), 0)
        return waited

    def release(self) -> None:
        if self._others_waiting():
            self._handed_over = self._turn
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self._fd)
        os.close(self._waiting_fd)


# How often the checkpointer copies committed WAL pages into the database file.
CHECKPOINT_INTERVAL_SECONDS = 0.25
# WAL frames left un-copied after a checkpoint that are worth a warning (about 40 MB).
WAL_WARN_FRAMES = 10_000
# A WAL this long, all copied, is started over: the writer finishes the checkpoint between two
# groups (Checkpointer). 4,096 frames of 4 KiB pages is about 16 MiB: about a second of the
# benchmark's mixed workload at full speed (4,300 frames a second on one worker).
WAL_RESTART_FRAMES = 4096
# How long the writer, finishing a checkpoint between two groups, waits for readers still on the
# log's frames before it leaves the start-over to a later pass (writes queue meanwhile). Each
# worker's reads share one transaction per turn of its event loop (Database.reader), so a reader
# is usually gone within a few milliseconds; a long one (a backup) is not waited out.
RESTART_WAIT_MS = 20
# The start-over is asked for while a pass leaves at most this many frames uncopied: those
# committed since the snapshots of the loops' current turns. A reader that has kept one
# snapshot for long (a backup) leaves far more, and is not waited for.
WAL_RESTART_LAG_FRAMES = 512
# PRAGMA journal_size_limit: when the log starts over, its file is cut back to this size (after
# a long reader, such as a backup, let it grow); SQLite reuses the file up to it.


class Checkpointer:
    """Copies committed pages from the WAL into the database file on a thread of its own.

    No group commit pays for a checkpoint: the writer runs with wal_autocheckpoint off (SQLite's
    default would run one inside the COMMIT that passes 1,000 pages, 15-20 ms in which every
    request of that group waits), and this thread checkpoints PASSIVE (never blocking readers or
    the writer) every CHECKPOINT_INTERVAL_SECONDS while there are new commits. A checkpoint that
    cannot finish (a long reader, such as a backup) is retried next time; the WAL is logged if it
    stays large.

    The -wal file stays short under writes that never pause. SQLite starts the log over from
    its first frame only when a write transaction begins with every frame already copied, which
    a writer that keeps appending while this thread copies would rarely allow (the file, and the
    index of its frames each checkpoint builds, would grow without end). So once a pass has
    copied a log of WAL_RESTART_FRAMES or more with at most WAL_RESTART_LAG_FRAMES left (the
    event loops' reads each hold a snapshot for one turn of their loop, so a pass under load
    rarely copies every frame), finish_checkpoint (the writer's) is asked to copy the rest
    between two groups, holding the write lock, with a RESTART checkpoint that waits at most
    RESTART_WAIT_MS for readers to leave the log; the next write then starts the log over.
    """

    def __init__(self, settings: DatabaseSettings, finish_checkpoint: Callable[[], None]):
        self._settings = settings
        self._finish_checkpoint = finish_checkpoint
        self._stop = threading.Event()
        self._commits = 0  # bumped by the writer after each commit
        self._thread = threading.Thread(target=self._run, name="dailyplay-checkpoint", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def committed(self) -> None:
        self._commits += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        conn = _open(self._settings, busy_timeout_ms=1000)
        seen = 0
        try:
            while not self._stop.wait(CHECKPOINT_INTERVAL_SECONDS):
                if self._commits == seen:
                    continue
                seen = self._commits
                try:
                    _busy, frames, copied = checkpoint(conn)
                except sqlite3.Error as exc:
                    log.warning("WAL checkpoint failed; will retry: %s", exc)
                    continue
                if frames >= WAL_RESTART_FRAMES and frames - copied <= WAL_RESTART_LAG_FRAMES:
                    self._finish_checkpoint()
                if frames - copied > WAL_WARN_FRAMES:
                    log.warning(
                        "the WAL holds %d pages not yet copied into the database file "
                        "(a long-running reader?)", frames - copied,
                    )  # fmt: skip
        finally:
            conn.close()


class WriterThread:
    """The thread that owns the writing connection and commits the queued writes in groups.

    Callers queue _Write items (submit, from the event loop); the thread takes every write
    queued so far (at most MAX_GROUP) after taking the write lock, runs them in one transaction
    and sends the outcomes back to each caller's event loop in one call_soon_threadsafe. A
    "call" item runs a function on this thread between groups (opening and closing the
    connection, maintenance), in its place in the queue.
    """

    def __init__(
        self,
        lock: WriterLock,
        committed: Callable[[], None],
        observe_commit: Callable[[float, int, bool], None] | None,
        refused_for_space: Callable[[], None],
    ):
        self.conn: sqlite3.Connection | None = None
        self._lock = lock
        self._committed = committed
        self._observe_commit = observe_commit
        # Told (on this thread) whenever a write or call failed with SQLITE_FULL, whoever asked.
        self._refused_for_space = refused_for_space
        self._queue: collections.deque[_Write] = collections.deque()
        self._wake = threading.Event()
        self._stopping = False
        self._checkpoint_due = False
        self._thread = threading.Thread(target=self._run, name="dailyplay-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, item: _Write) -> None:
        if self._stopping:
            raise RuntimeError("database is not open")
        # deque.append is atomic; the thread clears the event before it looks at the queue, so
        # an item appended before this set() is always seen.
        self._queue.append(item)
        if not self._wake.is_set():
            self._wake.set()

    def finish_checkpoint(self) -> None:
        """From any thread: before its next group, this thread checkpoints (PASSIVE) holding the
        write lock, so that no frame is appended between that checkpoint and the next write."""
        self._checkpoint_due = True
        self._wake.set()

    def stop(self) -> None:
        """After every queued item has run (blocking; call it from a thread of its own)."""
        self._stopping = True
        self._wake.set()
        self._thread.join()
        self._lock.close()

    def _run(self) -> None:
        queue = self._queue
        while True:
            self._wake.wait()
            self._wake.clear()
            while True:
                if self._checkpoint_due:  # asked for even when no write is queued
                    self._checkpoint()
                if not queue:
                    break
                if queue[0].kind == "call":
                    item = queue.popleft()
                    function, args = item.payload
                    try:
                        outcome: tuple[bool, Any] = (True, function(*args))
                    except BaseException as exc:  # the caller gets it; the thread goes on
                        outcome = (False, exc)
                    self._note_refusals([outcome])
                    _settle([item], [outcome])
                else:
                    self._commit_next_group()
            if self._stopping and not queue:
                return

    def _checkpoint(self) -> None:
        self._checkpoint_due = False
        if self.conn is None:
            return
        try:
            self._lock.acquire()
            try:
                # Busy (another checkpoint running, a reader that stays) is not an error.
                checkpoint_to_start_over(self.conn, RESTART_WAIT_MS)
            finally:
                self._lock.release()
        except (sqlite3.Error, OSError) as exc:  # the checkpointer asks again
            log.warning("WAL checkpoint failed; will retry: %s", exc)

    def _note_refusals(self, outcomes: list[tuple[bool, Any]]) -> None:
        if any(not succeeded and is_full(value) for succeeded, value in outcomes):
            self._refused_for_space()

    def _take_group(self) -> list[_Write]:
        group: list[_Write] = []
        queue = self._queue
        while queue and len(group) < MAX_GROUP and queue[0].kind != "call":
            group.append(queue.popleft())
        return group

    def _commit_next_group(self) -> None:
        group: list[_Write] = []
        locked = waited = False
        started = time.perf_counter()
        try:
            waited = self._lock.acquire()
            locked = True
            started = time.perf_counter()
            # Taken after the lock: writes that came in while waiting join this group.
            group = self._take_group()
            assert self.conn is not None
            outcomes = _commit_writes(self.conn, [(item.kind, item.payload) for item in group])
        except BaseException as exc:  # every caller of the group gets it; the thread goes on
            group = group or self._take_group()  # the lock failed: these writes fail with it
            outcomes = [(False, exc)] * len(group)
        finally:
            if locked:
                self._lock.release()
        seconds = time.perf_counter() - started
        self._committed()
        self._note_refusals(outcomes)
        observe = self._observe_commit
        _settle(
            group,
            outcomes,
            None if observe is None else functools.partial(observe, seconds, len(group), waited),
        )


@dataclass
class _Write:
    """One caller's write waiting for the next group commit."""

    # "work" (payload: a Work), "insert_session", "consume_session" or "claim_key" (values),
    # or "call"
    # ((function, args): run between groups)
    kind: str
    payload: Any
    future: asyncio.Future[Any]


def _settle(
    group: list[_Write],
    outcomes: list[tuple[bool, Any]],
    then: Callable[[], None] | None = None,
) -> None:
    """From the writer thread: give each caller its outcome on the caller's event loop (one
    callback per loop for the whole group); `then` runs first, on the first of those loops."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Write, tuple[bool, Any]]]] = {}
    for item, outcome in zip(group, outcomes, strict=True):
        by_loop.setdefault(item.future.get_loop(), []).append((item, outcome))
    for loop, settled in by_loop.items():
        with contextlib.suppress(RuntimeError):  # that loop has closed: nobody is waiting
            loop.call_soon_threadsafe(_set_outcomes, settled, then)
        then = None


def _set_outcomes(
    settled: list[tuple[_Write, tuple[bool, Any]]], then: Callable[[], None] | None
) -> None:
    if then is not None:
        then()
    for item, (succeeded, value) in settled:
        if item.future.done():  # the caller went away; its write stands or failed anyway
            continue
        if succeeded:
            item.future.set_result(value)
        else:
            item.future.set_exception(translated(value))


# Same-kind hot writes of one group share a statement; a statement binds at most this many rows.
ROWS_PER_STATEMENT = 200


def _commit_writes(
    conn: sqlite3.Connection, writes: list[tuple[str, Any]]
) -> list[tuple[bool, Any]]:
    """On the writer thread: one transaction for all writes; (succeeded, result or exception)
    for each. A write that fails takes its group down; then each runs alone, so it fails by
    itself and the others still commit."""
    try:
        conn.execute("BEGIN IMMEDIATE")
    except Exception as exc:  # e.g. locked past busy_timeout: every caller gets it (503)
        return [(False, exc)] * len(writes)
    try:
        results = _run_group(conn, writes)
        conn.execute("COMMIT")
    except Exception as exc:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        if len(writes) == 1:
            return [(False, exc)]
        return [outcome for write in writes for outcome in _commit_writes(conn, [write])]
    return [(not isinstance(result, _REFUSALS), result) for result in results]


# What a write's result is when it stored nothing because what it was admitted on had changed.
_REFUSALS = (KeyChanged, ClaimLost)


def _run_group(conn: sqlite3.Connection, writes: list[tuple[str, Any]]) -> list[Any]:
    """Every write of the group inside the open transaction; results in the group's order.

    The writes of a group were all in flight together, so any order is a valid one: general
    work runs first in arrival order, then the token inserts, then the consumptions.
    """
    results: list[Any] = [None] * len(writes)
    claims, inserts, consumes = [], [], []
    for index, (kind, payload) in enumerate(writes):
        if kind == "work":
            results[index] = payload(conn)
        elif kind == "insert_session":
            inserts.append(index)
        elif kind == "claim_key":
            claims.append(index)
        else:
            consumes.append(index)
    if claims:
        for index, claim in zip(
            claims, claim_keys(conn, [writes[index][1] for index in claims]), strict=True
        ):
            results[index] = claim
    inserts = _admitted(conn, writes, inserts, results)
    for start in range(0, len(inserts), ROWS_PER_STATEMENT):
        chunk = inserts[start : start + ROWS_PER_STATEMENT]
        # No RETURNING: each returned row would be one more step, each handing the GIL back
        # and forth with the busy event loop; callers need only know the insert committed.
        values: list[NewSession] = [writes[index][1][0] for index in chunk]
        conn.execute(
            INSERT_SESSION_HEAD + ", ".join([SESSION_ROW] * len(chunk)),
            [value for row_values in values for value in row_values],
        )
        _count_usage(conn, "created", [(v.api_key_id, v.created_at) for v in values])
    for start in range(0, len(consumes), ROWS_PER_STATEMENT):
        chunk = consumes[start : start + ROWS_PER_STATEMENT]
        rows = conn.execute(
            CONSUME_SESSIONS.format(batch=", ".join(["(?, ?, ?, ?)"] * len(chunk))),
            [value for i, index in enumerate(chunk) for value in (i, *writes[index][1])],
        ).fetchall()
        won = {bytes(row[0]): Session._make(row[1:]) for row in rows}
        _count_usage(
            conn,
            "consumed",
            [(s.api_key_id, s.consumed_at) for s in won.values() if s.consumed_at is not None],
        )
        # A token asked for twice in one group is won by the first asker only.
        for index in chunk:
            results[index] = won.pop(writes[index][1][0], None)
    return results


def _admitted(
    conn: sqlite3.Connection, writes: list[tuple[str, Any]], inserts: list[int], results: list[Any]
) -> list[int]:
    """The token inserts whose key is still in the state they were admitted on (read once per
    key in the group) and whose idempotency claim, if any, is still theirs (its answer is
    stored here, with the token). The others get KeyChanged or ClaimLost as their result and
    insert nothing."""
    current: dict[int, KeyState | None] = {}
    admitted: list[int] = []
    completing: list[int] = []
    for index in inserts:
        values, admitted_on, completion = writes[index][1]
        if admitted_on is not None:
            key_id = values.api_key_id
            if key_id not in current:
                row = conn.execute(KEY_STATE, (key_id,)).fetchone()
                current[key_id] = None if row is None else key_state(row)
            if current[key_id] != admitted_on:
                results[index] = KeyChanged(key_id)
                continue
        (completing if completion is not None else admitted).append(index)
    if completing:
        held = complete_keys(conn, [writes[index][1][2] for index in completing])
        for index, still_held in zip(completing, held, strict=True):
            if still_held:
                admitted.append(index)
            else:
                results[index] = ClaimLost(writes[index][1][2].key)
    return admitted


def _count_usage(conn: sqlite3.Connection, column: str, events: list[tuple[Any, int]]) -> None:
    """Add (api_key_id, time) events to key_usage's hourly counters, one row per key and hour."""
    counts: dict[tuple[int, int], int] = {}
    for key_id, at in events:
        if key_id is not None:
            slot = (int(key_id), int(at) // HOUR_MS)
            counts[slot] = counts.get(slot, 0) + 1
    if counts:
        conn.executemany(
            f"INSERT INTO key_usage (api_key_id, hour, {column}) VALUES (?, ?, ?)"
            " ON CONFLICT (api_key_id, hour)"
            f" DO UPDATE SET {column} = {column} + excluded.{column}",
            [(key_id, hour, n) for (key_id, hour), n in counts.items()],
        )


def _checkpoint_and_close(conn: sqlite3.Connection) -> None:
    with contextlib.suppress(sqlite3.Error):
        checkpoint(conn)
    conn.close()
