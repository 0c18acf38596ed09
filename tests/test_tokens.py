"""New session tokens: a clock prefix for the index's sake, the rest random, and still the
version-4 UUID shape clients may check."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

from conftest import add_org

from dailyplay import config
from dailyplay.storage import sqlite as db
from dailyplay.tokens import CLOCK_BITS, RANDOM_BITS, clock_prefix, new_session_token

NOW = 1_800_000_000_000  # a tick boundary: divisible by 1000


def test_a_token_has_the_version_and_variant_of_a_random_uuid() -> None:
    for _ in range(100):
        token = new_session_token(NOW)
        assert token.version == 4
        assert token.variant == uuid.RFC_4122
        assert str(token)[14] == "4"


def test_the_first_16_bits_count_sixteenths_of_a_second_and_wrap() -> None:
    assert new_session_token(NOW).int >> 112 == clock_prefix(NOW)
    assert clock_prefix(NOW + 62) == clock_prefix(NOW)  # same tick
    assert clock_prefix(NOW + 63) == (clock_prefix(NOW) + 1) % 2**16  # the next one
    assert clock_prefix(NOW + 1000) == (clock_prefix(NOW) + 16) % 2**16
    # It wraps after 2**16 ticks (4,096 s) and stays within 16 bits.
    assert clock_prefix(NOW + 4_096_000) == clock_prefix(NOW)
    assert all(0 <= clock_prefix(NOW + step * 977) < 2**16 for step in range(10_000))


def test_every_other_bit_is_random() -> None:
    tokens = [new_session_token(NOW).int for _ in range(2000)]
    assert len(set(tokens)) == len(tokens)
    fixed = {127 - 48, 127 - 49, 127 - 50, 127 - 51, 127 - 64, 127 - 65}  # version, variant
    random_positions = [
        bit for bit in range(128 - CLOCK_BITS) if bit not in fixed
    ]  # fmt: skip
    assert len(random_positions) == RANDOM_BITS == 106
    for bit in random_positions:
        ones = sum(token >> bit & 1 for token in tokens)
        # 2,000 fair coin flips: 1,000 +- 150 is more than 6 standard deviations wide.
        assert 850 <= ones <= 1150, f"bit {bit} was set in {ones} of 2000 tokens"


def test_a_forked_child_draws_other_tokens_than_its_parent() -> None:
    """The random bits come from a generator kept in the process (OpenSSL's): a child forked
    from a worker must not repeat the tokens its parent makes next."""
    new_session_token(NOW)  # the generator is seeded before the fork
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next 500 tokens, then out without pytest's clean-up
        status = 1
        try:
            os.close(read_end)
            os.write(write_end, b"".join(new_session_token(NOW).bytes for _ in range(500)))
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    parent_tokens = {new_session_token(NOW).bytes for _ in range(500)}
    with os.fdopen(read_end, "rb") as pipe:
        received = pipe.read()
    _pid, status = os.waitpid(pid, 0)
    assert status == 0
    child_tokens = {received[i : i + 16] for i in range(0, len(received), 16)}
    assert len(child_tokens) == 500
    assert not parent_tokens & child_tokens


def test_without_openssl_the_random_bits_come_from_the_os() -> None:
    """A Python built without the ssl module still makes tokens (os.urandom)."""
    script = (
        "import sys; sys.modules['ssl'] = None\n"
        "import os\n"
        "from dailyplay import tokens\n"
        "assert tokens._random_bytes is os.urandom\n"
        "print(tokens.new_session_token(1_800_000_000_000))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert uuid.UUID(out.strip()).version == 4


def _frames_written_by_one_insert(
    settings: config.Settings, make_token: Callable[[], uuid.UUID], count: int
) -> int:
    """WAL frames (pages) one transaction of `count` new tokens writes into a table that
    already holds 30,000 random ones."""
    org = add_org(settings)
    conn = db.connect(settings.database)
    try:

        def rows(tokens: list[uuid.UUID]) -> list[tuple[object, ...]]:
            return [(t.bytes, org, None, 1, None, None, None, NOW, NOW + 1) for t in tokens]

        with db.transaction(conn):
            db.insert_sessions(conn, rows([uuid.uuid4() for _ in range(30_000)]))
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        with db.transaction(conn):
            db.insert_sessions(conn, rows([make_token() for _ in range(count)]))
        busy, frames, _copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        assert busy == 0
        return int(frames)
    finally:
        conn.close()


def test_tokens_made_together_write_a_few_index_pages_not_one_each(
    settings: config.Settings, tmp_path: Path
) -> None:
    # What a group commit of 64 creates in one tick writes to the WAL: the table's last pages,
    # the last pages of its append-only indexes, and one or two pages of the token index
    # (10 or 11 frames when measured).
    together = _frames_written_by_one_insert(settings, lambda: new_session_token(NOW), 64)
    assert together <= 16, together
    # The same with fully random tokens, in a second file: most land on a page of their own
    # (71-81 frames when measured).
    other = settings.replace("database", path=str(tmp_path / "random.db"))
    random = _frames_written_by_one_insert(other, uuid.uuid4, 64)
    assert random >= 48, random
