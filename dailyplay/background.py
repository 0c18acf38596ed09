"""Background tasks that live as long as a block (the app's lifespan, mostly)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from .storage.errors import StorageBusy, StorageFull, StorageUnavailable


@contextlib.asynccontextmanager
async def running(coroutine: Coroutine[Any, Any, Any]) -> AsyncIterator[None]:
    """Run coroutine as a task for the length of the block; at its end cancel the task and
    wait until it has stopped."""
    task = asyncio.create_task(coroutine)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def log_failed_pass(logger: logging.Logger, what: str, exc: Exception) -> None:
    """A background pass failed and will run again. A full disk, a busy database or one out of
    reach is the operator's matter, not a fault here: one line, without a traceback."""
    if isinstance(exc, StorageFull):
        logger.error("%s refused: the database or disk is full; will retry", what)
    elif isinstance(exc, StorageBusy):
        logger.warning("%s: the database is busy; will retry", what)
    elif isinstance(exc, StorageUnavailable):
        logger.error("%s failed: the database is unavailable (%s); will retry", what, exc)
    else:
        logger.error("%s failed; will retry", what, exc_info=exc)
