"""Cleanup after a failure, bounded: nothing that tidies up may keep a failed run alive.

Starting the stack again is not done here: that is StackGuard's, and it is never skipped.
What is here is the rest (aborting multipart uploads, removing the lock object), which
needs S3, the very thing that may have failed. Each step is bounded (STEP seconds; the
aborts of concurrent uploads run side by side, so a failing run spends at most a few
steps), never raises, and is skipped once the user asked twice to stop: prune collects
what it leaves behind. No deadline is shared across steps: one failing scope must not
use up the time of a later, healthy one (the prune after a backup, say).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

log = logging.getLogger(__name__)

STEP = 8.0  # seconds one cleanup step may take

_hurry = False
_signal: str | None = None


def signalled(name: str) -> None:
    """The first SIGINT/SIGTERM/SIGHUP: remembered so later messages can name it."""
    global _signal
    _signal = _signal or name


def signal_name() -> str | None:
    return _signal


def hurry() -> None:
    """A second SIGINT/SIGTERM/SIGHUP: skip every cleanup step still to come."""
    global _hurry
    _hurry = True


async def best_effort(what: str, step: Awaitable[object]) -> bool:
    """Run one cleanup step, at most STEP seconds; True when it finished."""
    if _hurry:
        _close(step)
        log.warning("skipped: %s (asked to stop again); prune removes what is left", what)
        return False
    try:
        async with asyncio.timeout(STEP):
            await step
        return True
    except TimeoutError:
        log.warning("could not %s within %.0f s; prune removes what is left", what, STEP)
    except Exception as exc:  # cleanup must not hide the error that caused it
        log.warning("could not %s (%s); prune removes what is left", what, str(exc).splitlines()[0][:200])
    return False


def _close(step: Awaitable[object]) -> None:
    close = getattr(step, "close", None)
    if close is not None:
        close()  # a coroutine never awaited: no "was never awaited" warning
