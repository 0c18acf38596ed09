"""Values that cross the storage seam."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Actor:
    """Who makes a change, for the audit log: a JWT `sub` with the caller's address, or 'cli'."""

    name: str
    client_ip: str | None = None


CLI = Actor("cli")
