"""Cleanup after a failure, bounded: nothing that tidies up may keep a failed run alive.

Starting the stack again is not done here: that is StackGuard's, and it is never skipped.
What is here is the rest (aborting multipart uploads, removing the lock object), which
needs S3, the very thing that may have failed. Each such step gets what is left of one
shared deadline, never raises, and is skipped once the user asked twice to stop: prune
collects what it leaves behind.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable

log = logging.getLogger(__name__)

DEADLINE = 20.0  # seconds all S3 cleanup of one failing run may take together
STEP = 10.0  # seconds one cleanup step may take

_deadline: float | None = None
_hurry = False


def hurry() -> None:
    """A second SIGINT/SIGTERM/SIGHUP: skip every cleanup step still to come."""
    global _hurry
    _hurry = True


async def best_effort(what: str, step: Awaitable[object]) -> bool:
    """Run one cleanup step within the shared deadline; True when it finished."""
    global _deadline
    if _hurry:
        _close(step)
        log.warning("skipped: %s (asked to stop again); prune removes what is left", what)
        return False
    now = time.monotonic()
    if _deadline is None:
        _deadline = now + DEADLINE
    budget = min(STEP, _deadline - now)
    if budget <= 0:
        _close(step)
        log.warning("skipped: %s (cleanup is out of time); prune removes what is left", what)
        return False
    try:
        async with asyncio.timeout(budget):
            await step
        return True
    except TimeoutError:
        log.warning("could not %s within %.0f s; prune removes what is left", what, budget)
    except Exception as exc:  # cleanup must not hide the error that caused it
        log.warning("could not %s (%s); prune removes what is left", what, str(exc).splitlines()[0][:200])
    return False


def _close(step: Awaitable[object]) -> None:
    close = getattr(step, "close", None)
    if close is not None:
        close()  # a coroutine never awaited: no "was never awaited" warning
