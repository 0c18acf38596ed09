"""New session tokens: unguessable UUIDs whose first 16 bits follow the clock.

A token is looked up through the UNIQUE index on sessions.token. With fully random tokens each
insert would land on a random page of that index, so a group commit of n creates would write
about n index pages (4 KiB each) into the WAL, for the checkpointer to copy again. Tokens made
within the same sixteenth of a second share their first two bytes here, so they sort next to
each other and a group's inserts touch one or two index pages.

Layout (16 bytes, RFC 9562 field positions):
- bits 0-15: the time in sixteenths of a second, modulo 2**16 (it wraps about every 68 minutes;
  after a wrap new tokens sort among old ones of the same tick, still all in one place)
- version nibble 4 and the RFC variant bits, as a random (version 4) UUID has them, so that
  every client that checks a token's version accepts these as it accepted random ones
- the other 106 bits from OpenSSL's CSPRNG (`ssl.RAND_bytes`: a DRBG seeded from the operating
  system, reseeded in a forked child; os.urandom where Python was built without OpenSSL)

Why not os.urandom, as uuid.uuid4 uses: its getrandom() call releases the GIL, and under
create-session load the writer thread is nearly always waiting for the GIL, so it takes it
there and the event loop waits to get it back (15-18 µs per create in a served worker).
RAND_bytes keeps the GIL (docs/performance.md, "Design decisions that matter for speed").

106 random bits are far past guessing (OWASP asks at least 64 bits of a session identifier's
entropy); the clock bits tell a token's holder only the time of day modulo 68 minutes, to
1/16 s, of a creation whose expiry the API already answers with.
"""

from __future__ import annotations

import os
import uuid

try:
    from ssl import RAND_bytes as _random_bytes
except ImportError:  # a Python built without OpenSSL
    _random_bytes = os.urandom

TICKS_PER_SECOND = 16
CLOCK_BITS = 16
RANDOM_BITS = 128 - CLOCK_BITS - 6  # the version nibble and the two variant bits are fixed

_VERSION_MASK = 0xFFFF_FFFF_FFFF_0FFF_3FFF_FFFF_FFFF_FFFF  # clears version and variant
_VERSION_4 = 0x0000_0000_0000_4000_8000_0000_0000_0000  # version 4, variant 0b10
_CLOCK_SHIFT = 128 - CLOCK_BITS
_RANDOM_PART = (1 << _CLOCK_SHIFT) - 1


def clock_prefix(now_ms: int) -> int:
    """The token's first 16 bits for a creation at now_ms (milliseconds since the epoch)."""
    return (now_ms * TICKS_PER_SECOND // 1000) % (1 << CLOCK_BITS)


def new_session_token(now_ms: int) -> uuid.UUID:
    """A fresh session token for a creation at now_ms."""
    random_bits = int.from_bytes(_random_bytes(16)) & _RANDOM_PART
    value = (clock_prefix(now_ms) << _CLOCK_SHIFT | random_bits) & _VERSION_MASK | _VERSION_4
    return uuid.UUID(int=value)
