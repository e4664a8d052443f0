"""How many requests a Store has in flight: --jobs is the ceiling, not a fixed number.

The limit starts at the ceiling (enough to fill the link: bench/wan.py) and is halved when
the server says it is overloaded (503 SlowDown, 429, Throttling), at most once per round of
answers, so one burst of refusals halves it once; each round of `limit` answers without a
refusal raises it by one again (additive increase, multiplicative decrease: how TCP shares a
link). The memory budget (budget.py) still bounds the bytes the requests hold.
"""

from __future__ import annotations

import asyncio
import collections
import logging

log = logging.getLogger(__name__)

THROTTLE_CODES = frozenset({"SlowDown", "503", "429", "Throttling", "ThrottlingException", "RequestLimitExceeded"})


class AdaptiveLimit:
    """A semaphore whose size moves between 1 and `ceiling` (see the module's docstring)."""

    def __init__(self, ceiling: int, name: str = "requests") -> None:
        self.ceiling = max(1, ceiling)
        self.limit = self.ceiling
        self.lowest = self.ceiling  # the least it was lowered to (tests, the run's log)
        self.active = 0
        self.throttles = 0  # refusals seen
        self.cuts = 0  # times the limit was halved
        self.name = name
        self._answers = 0  # answers since the last raise or cut
        self._since_cut = 1 << 30  # answers since the last cut: one cut per round
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def acquire(self) -> None:
        if self.active < self.limit and not self._waiters:
            self.active += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # granted as it was cancelled: hand it on
                self.release()
            else:
                self._waiters.remove(fut)
            raise

    def release(self) -> None:
        self.active -= 1
        self._wake()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def answered(self) -> None:
        """An answer that was not a refusal: a round of them raises the limit by one."""
        self._since_cut += 1
        self._answers += 1
        if self._answers >= self.limit and self.limit < self.ceiling:
            self.limit += 1
            self._answers = 0
            self._wake()

    def throttled(self) -> None:
        """The server refused for load: halve the limit, once per round of answers."""
        self.throttles += 1
        self._since_cut += 1
        if self._since_cut <= self.limit:
            return
        was = self.limit
        self.limit = max(1, self.limit // 2)
        self.lowest = min(self.lowest, self.limit)
        self.cuts += 1
        self._since_cut = 0
        self._answers = 0
        log.info(
            "the server asks to slow down: %d %s at once (was %d, at most %d)", self.limit, self.name, was, self.ceiling
        )

    def _wake(self) -> None:
        while self._waiters and self.active < self.limit:
            fut = self._waiters.popleft()
            if not fut.done():
                self.active += 1
                fut.set_result(None)
