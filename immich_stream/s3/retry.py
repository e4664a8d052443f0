"""The one retry wrapper (restic's backend_retry): every request a Store sends goes through
`Retry.call`, which holds it to --jobs, records it while it waits for its answer (the hang
watchdogs read that), retries transient failures with jittered exponential backoff, and
turns the last failure into the worded StoreError (classify.store_error)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from immich_stream.errors import StoreError
from immich_stream.s3.checksums import SMALL_FACTOR
from immich_stream.s3.classify import error_code, is_transient, short
from immich_stream.s3.concurrency import THROTTLE_CODES, AdaptiveLimit
from immich_stream.s3.direct import SinkFailed

log = logging.getLogger(__name__)
T = TypeVar("T")


class Retry:
    """Retries, concurrency and the requests in flight of one Store. `wording` makes the
    StoreError of a failure; `answered` is told of every answer."""

    def __init__(
        self,
        retries: int,
        jobs: int,
        wording: Callable[[str, BaseException], StoreError],
        answered: Callable[[], None],
    ) -> None:
        self.retries = retries
        self._wording = wording
        self._answered = answered
        self.inflight: dict[object, tuple[str, float]] = {}
        # every request, whoever sends it, counts against --jobs; a small PUT against a limit
        # SMALL_FACTOR times higher: its cost is the round trip, not bandwidth, and the byte
        # budget bounds its memory as it bounds every other buffer. Both are ceilings: a
        # server that says SlowDown lowers them (concurrency.py)
        self.limit = AdaptiveLimit(jobs)
        self.small_limit = AdaptiveLimit(jobs * SMALL_FACTOR, "small requests")

    def oldest_request(self) -> tuple[str, float] | None:
        """(what, seconds) of the request waiting longest for its answer, if any."""
        if not self.inflight:
            return None
        what, since = min(self.inflight.values(), key=lambda v: v[1])
        return what, time.monotonic() - since

    async def call(self, what: str, fn: Callable[[], Awaitable[T]], small: bool = False) -> T:
        delay = 0.25
        limit = self.small_limit if small else self.limit
        for attempt in range(1, self.retries + 1):
            token = object()
            try:
                async with limit:
                    self.inflight[token] = (what, time.monotonic())
                    try:
                        result = await fn()
                    finally:
                        del self.inflight[token]
                self._answered()
                limit.answered()
                return result
            except SinkFailed as exc:  # the caller's own error (e.g. its disk is full)
                raise exc.error from None
            except Exception as exc:  # classified below; non-transient errors are raised at once
                # Neither an error, a timeout nor a retry is progress; nor is an answer to a
                # small request (a lock refresh): callers touch() for bytes of data only.
                if error_code(exc) in THROTTLE_CODES:  # the server is overloaded: fewer at once
                    self.limit.throttled()
                    self.small_limit.throttled()
                if not is_transient(exc) or attempt == self.retries:
                    error = self._wording(what, exc)
                    if (code := error_code(exc)) is not None:
                        error.code = code
                    raise error from exc
                wait = min(delay * 2 ** (attempt - 1), 20.0) * (0.5 + random.random())
                log.debug("%s failed (%s), retry %d/%d in %.1fs", what, short(exc), attempt, self.retries - 1, wait)
                await asyncio.sleep(wait)
        raise AssertionError("unreachable")
